//! The key-server client against a real HTTP server on loopback that serves the corpus's
//! genuine VCEKs: fetch, verify, cache, one fetch for concurrent misses, backoff on 429.

#[path = "../../snp/tests/common/mod.rs"]
mod common;

use snp::kds::{crl_path, vcek_path};
use snp::{AttestationReport, Evidence, Product, Revocation, Tcb, Verifier, VerifierConfig};
use snp_kds::{Backoff, KdsClient, KdsError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
struct Server {
    routes: HashMap<String, Vec<u8>>,
    hits: Mutex<HashMap<String, usize>>,
    /// Answer this many requests per path with 429 before serving.
    throttle: usize,
    delay: Duration,
    total: AtomicUsize,
}

impl Server {
    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn serve(server: Arc<Server>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let server = server.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&buf)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                server.total.fetch_add(1, Ordering::SeqCst);
                let n = {
                    let mut h = server.hits.lock().unwrap();
                    let e = h.entry(path.clone()).or_default();
                    *e += 1;
                    *e
                };
                tokio::time::sleep(server.delay).await;
                let (status, body): (&str, &[u8]) = if n <= server.throttle {
                    ("429 Too Many Requests", b"slow down")
                } else if let Some(b) = server.routes.get(&path) {
                    ("200 OK", b)
                } else {
                    ("404 Not Found", b"no such certificate")
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nRetry-After: 0\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (base, task)
}

/// Key-server paths of every genuine VCEK in the corpus, with the report it belongs to.
/// (key-server path, VCEK DER, report, product, reported TCB, chip id).
type Route = (String, Vec<u8>, Vec<u8>, Product, Tcb, [u8; 64]);

fn corpus_routes(dir: &std::path::Path) -> Vec<Route> {
    let v = Verifier::new(VerifierConfig {
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    let mut out: Vec<Route> = Vec::new();
    for it in common::items(dir)
        .into_iter()
        .filter(|i| !i.expect_fail && !i.name.contains("vlek"))
    {
        let verdict = v.verify(
            &Evidence {
                report: &it.report,
                vcek: Some(&it.vcek),
                ..Default::default()
            },
            common::AT,
        );
        let product = verdict.product.unwrap();
        let r = AttestationReport::from_bytes(&it.report).unwrap();
        let tcb = Tcb::decode(r.reported_tcb, product);
        let der = snp::certs::to_der(&it.vcek).unwrap();
        let path = vcek_path(product, &r.chip_id, &tcb);
        // Re-issued VCEKs share a chip and TCB: the server holds one of them, as AMD's does.
        if !out.iter().any(|o| o.0 == path) {
            out.push((path, der, it.report.clone(), product, tcb, r.chip_id));
        }
    }
    out
}

fn fast() -> Backoff {
    Backoff {
        first: Duration::from_millis(10),
        max: Duration::from_millis(50),
        attempts: 4,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_verifies_and_then_needs_no_network() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let routes = corpus_routes(&dir);
    assert!(routes.len() >= 10);
    let server = Arc::new(Server {
        routes: routes.iter().map(|r| (r.0.clone(), r.1.clone())).collect(),
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    let verifier = Verifier::new(VerifierConfig {
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    for (path, der, report, product, tcb, chip) in &routes {
        let got = client.vcek(*product, chip, tcb).await.unwrap();
        assert_eq!(&got, der, "{path}");
        let v = verifier.verify(
            &Evidence {
                report,
                vcek: Some(&got),
                ..Default::default()
            },
            common::AT,
        );
        assert!(v.accepted(), "{path}: {:?}", v.reasons);
    }
    let fetched = server.total.load(Ordering::SeqCst);
    // Items sharing a chip and TCB are fetched once.
    let distinct: std::collections::HashSet<_> = routes.iter().map(|r| r.0.clone()).collect();
    assert_eq!(fetched, distinct.len());

    // Stop the server: a new client on the same cache still has every VCEK.
    task.abort();
    let offline = KdsClient::new("http://127.0.0.1:9", cache.path(), fast()).unwrap();
    for (_, der, _, product, tcb, chip) in &routes {
        assert_eq!(&offline.vcek(*product, chip, tcb).await.unwrap(), der);
    }
    // And the cache is an offline store in trustee's layout.
    let store = snp_kds::OfflineStore::new(cache.path());
    let (_, _, _, product, tcb, chip) = &routes[0];
    let (p, _) = store.lookup(*product, chip, tcb).unwrap().unwrap();
    assert!(p.to_string_lossy().contains("/vcek/"), "{}", p.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_fetch() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let routes = corpus_routes(&dir);
    let (path, der, _, product, tcb, chip) = routes[0].clone();
    let server = Arc::new(Server {
        routes: [(path.clone(), der.clone())].into(),
        delay: Duration::from_millis(300),
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = Arc::new(KdsClient::new(&base, cache.path(), fast()).unwrap());
    let mut joins = Vec::new();
    for _ in 0..16 {
        let c = client.clone();
        joins.push(tokio::spawn(
            async move { c.vcek(product, &chip, &tcb).await },
        ));
    }
    for j in joins {
        assert_eq!(j.await.unwrap().unwrap(), der);
    }
    assert_eq!(server.hits(&path), 1);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backs_off_on_429_and_gives_up_with_a_clear_error() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let routes = corpus_routes(&dir);
    let (path, der, _, product, tcb, chip) = routes[0].clone();
    let server = Arc::new(Server {
        routes: [(path.clone(), der.clone())].into(),
        throttle: 2,
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    assert_eq!(client.vcek(product, &chip, &tcb).await.unwrap(), der);
    assert_eq!(server.hits(&path), 3);
    // Unknown chip: 404 is final, not retried (after the throttled first two answers), and
    // remembered, so asking again does not reach the key server.
    let mut other = chip;
    other[0] ^= 0xff;
    let other_path = vcek_path(product, &other, &tcb);
    let err = client.vcek(product, &other, &tcb).await.unwrap_err();
    assert!(matches!(err, KdsError::Http { status: 404, .. }), "{err}");
    let hits = server.hits(&other_path);
    let err = client.vcek(product, &other, &tcb).await.unwrap_err();
    assert!(matches!(err, KdsError::Http { status: 404, .. }), "{err}");
    assert_eq!(server.hits(&other_path), hits, "a 404 is remembered");
    let forgetful = KdsClient::new(&base, cache.path(), fast())
        .unwrap()
        .with_negative_ttl(Duration::ZERO);
    assert!(forgetful.vcek(product, &other, &tcb).await.is_err());
    assert_eq!(server.hits(&other_path), hits + 1);
    task.abort();

    let server = Arc::new(Server {
        routes: [(path.clone(), der)].into(),
        throttle: 100,
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    let err = client.vcek(product, &chip, &tcb).await.unwrap_err();
    assert!(
        matches!(err, KdsError::RateLimited { attempts: 4, .. }),
        "{err}"
    );
    assert_eq!(server.hits(&path), 4);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_is_cached_until_next_update() {
    let pki = simulator::Pki::generate(Product::Genoa).unwrap();
    let now = 1_780_272_000u64;
    let crl = pki.ark.sign_crl(&[], now - 60, Some(now + 3600)).unwrap();
    let path = crl_path(Product::Genoa);
    let server = Arc::new(Server {
        routes: [(path.clone(), crl.clone())].into(),
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    assert_eq!(client.crl(Product::Genoa, now).await.unwrap(), crl);
    assert_eq!(client.crl(Product::Genoa, now + 1800).await.unwrap(), crl);
    assert_eq!(server.hits(&path), 1);
    // Past nextUpdate it is fetched again.
    client.crl(Product::Genoa, now + 7200).await.unwrap();
    assert_eq!(server.hits(&path), 2);
    // The verifier takes it once it checks out against the (configured) ARK.
    let v = Verifier::new(VerifierConfig {
        trust_roots: vec![pki.ark.cert.clone()],
        ..Default::default()
    });
    v.add_crl(&crl, Product::Genoa).unwrap();
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_oversized_answer_is_refused_and_not_cached() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let routes = corpus_routes(&dir);
    let (path, _, _, product, tcb, chip) = routes[0].clone();
    // The mirror answers with another chip's (genuine) VCEK.
    let other = routes
        .iter()
        .find(|r| r.5 != chip)
        .expect("a second chip")
        .1
        .clone();
    let server = Arc::new(Server {
        routes: [(path.clone(), other)].into(),
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    for _ in 0..2 {
        let err = client.vcek(product, &chip, &tcb).await.unwrap_err();
        assert!(matches!(err, KdsError::BadCertificate(_)), "{err}");
    }
    assert_eq!(server.hits(&path), 2, "a refused answer is not cached");
    assert!(
        snp_kds::OfflineStore::new(cache.path())
            .lookup(product, &chip, &tcb)
            .unwrap()
            .is_none()
    );
    task.abort();

    let server = Arc::new(Server {
        routes: [(path.clone(), vec![0x30; 5 << 20])].into(),
        ..Default::default()
    });
    let (base, task) = serve(server).await;
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    let err = client.vcek(product, &chip, &tcb).await.unwrap_err();
    assert!(matches!(err, KdsError::TooLarge { .. }), "{err}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cert_chain_is_fetched_once_and_a_malformed_one_is_not_kept() {
    use snp::roots::{Builtin, pem};
    let path = snp::kds::cert_chain_path(Product::Milan);
    let chain = format!(
        "{}{}",
        pem(Product::Milan, Builtin::Ask),
        pem(Product::Milan, Builtin::Ark)
    );
    let server = Arc::new(Server {
        routes: [(path.clone(), chain.clone().into_bytes())].into(),
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    for _ in 0..3 {
        assert_eq!(
            client.cert_chain(Product::Milan).await.unwrap(),
            chain.as_bytes()
        );
    }
    assert_eq!(server.hits(&path), 1);
    task.abort();

    // One certificate is not a chain: refused, and asked for again next time.
    let server = Arc::new(Server {
        routes: [(
            path.clone(),
            pem(Product::Milan, Builtin::Ark).as_bytes().to_vec(),
        )]
        .into(),
        ..Default::default()
    });
    let (base, task) = serve(server.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = KdsClient::new(&base, cache.path(), fast()).unwrap();
    for _ in 0..2 {
        let err = client.cert_chain(Product::Milan).await.unwrap_err();
        assert!(matches!(err, KdsError::BadCertificate(_)), "{err}");
    }
    assert_eq!(server.hits(&path), 2);
    task.abort();
}
