//! `[collateral]`: a guest whose report comes without a certificate table (as on real hosts,
//! which often supply none) is released with the VCEK, chain and CRL the broker fetches from a
//! key server (here a loopback one that counts requests) — once: later boots, and a restarted
//! broker, read the cache; the CRL is fetched again only after its nextUpdate. A key server
//! that is down denies with `vcek_unavailable`, and chips the VM's order does not name are never
//! looked up.

mod common;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use kbs::collateral::{Collateral, CollateralConfig, CollateralError};
use kbs::keys::FileKek;
use kbs::service::{Kbs, Role, vm_policy};
use kbs::store::SqliteStore;
use proto::ResponseKey;
use proto::msg::{Decision, Request, Response, VERSION, verify_decision};
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::device::GuestDevice;
use snp::{Product, Revocation, Tcb, Verifier, VerifierConfig};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const GOOD: [u8; 48] = [0x4d; 48];
const NOW: u64 = 1_780_272_000; // 2026-06-01: inside the simulated VCEKs' validity
const DAY: u64 = 86_400;

static PKI: LazyLock<Arc<Pki>> = LazyLock::new(|| {
    Arc::new(Pki::from_seed(Product::Milan, Seed::from_text("collateral-test")).unwrap())
});

/// A loopback key server: path → body (changeable), else 404; counts requests per path.
#[derive(Default)]
struct Kds {
    routes: Mutex<HashMap<String, Vec<u8>>>,
    /// Paths answered only after a long wait.
    stall: Mutex<Vec<String>>,
    hits: Mutex<HashMap<String, usize>>,
}

impl Kds {
    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

async fn serve(kds: Arc<Kds>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let kds = kds.clone();
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
                *kds.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                if kds.stall.lock().unwrap().contains(&path) {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let body = kds.routes.lock().unwrap().get(&path).cloned();
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", b"no such certificate".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    base
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    cache: std::path::PathBuf,
    chip: Chip,
    elsewhere: Chip,
    order: Order,
    response_pub: [u8; 32],
    kbs: Arc<Kbs>,
}

fn verifier() -> Verifier {
    Verifier::new(VerifierConfig {
        trust_roots: vec![PKI.ark.cert.clone()],
        revocation: Revocation::Require,
        ..Default::default()
    })
}

fn collateral_config(kds_url: &str, cache: &std::path::Path) -> CollateralConfig {
    CollateralConfig {
        kds_url: kds_url.into(),
        cache_dir: Some(cache.to_path_buf()),
        fetch_timeout_secs: 10,
        ..Default::default()
    }
}

fn fast() -> snp_kds::Backoff {
    snp_kds::Backoff {
        first: Duration::from_millis(10),
        max: Duration::from_millis(50),
        attempts: 2,
    }
}

/// A broker (revocation required, the simulator's root trusted) fetching from `kds_url`, with
/// vm-1 placed on `chip`.
async fn setup(kds_url: &str) -> Setup {
    setup_with(kds_url, None).await
}

/// [`setup`], with an offline store.
async fn setup_with(kds_url: &str, offline_dir: Option<&std::path::Path>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("kds-cache");
    let chip = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let elsewhere = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 1)).unwrap();
    let (operator, offline) = (
        Ed25519KeyPair::generate().unwrap(),
        Ed25519KeyPair::generate().unwrap(),
    );
    let response_key = ResponseKey::generate().unwrap();
    let response_pub = response_key.public();
    let kbs = Kbs::new(
        SqliteStore::open(&dir.path().join("kbs.db")).await.unwrap(),
        verifier(),
        response_key,
        Box::new(FileKek::create(&dir.path().join("kek")).unwrap()),
        vec![pk(&operator)],
        30,
    );
    let cfg = CollateralConfig {
        offline_dir: offline_dir.map(std::path::Path::to_path_buf),
        ..collateral_config(kds_url, &cache)
    };
    let col = Collateral::with_backoff(&cfg, fast()).unwrap();
    assert!(kbs.collateral.set(col).is_ok());
    let kbs = Arc::new(kbs);
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), NOW)
        .await
        .unwrap();
    let order = Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: "vm-1".into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
        not_after: NOW + 30 * DAY,
        boot_config: ByteBuf::from(b"ssh-ed25519 AAAA tenant".to_vec()),
        billing: None,
        mesh_ip: None,
        split: None,
    };
    kbs.register(&order.sign(&operator), NOW).await.unwrap();
    Setup {
        _dir: dir,
        cache,
        chip,
        elsewhere,
        order,
        response_pub,
        kbs,
    }
}

/// One boot at `t`: challenge, then evidence with an empty certificate table.
async fn boot(s: &Setup, chip: &Chip, t: u64) -> Decision {
    let exporter = [7u8; 32];
    let Response::Challenge { nonce, .. } = s
        .kbs
        .handle(
            Request::Challenge {
                v: VERSION,
                vm_id: "vm-1".into(),
            },
            Role::Guest,
            exporter,
            t,
        )
        .await
    else {
        panic!("no challenge");
    };
    let nonce: [u8; 32] = nonce.try_into().unwrap();
    let key = proto::GuestKey::generate().unwrap();
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let report = guest
        .get_report(&proto::report_data(&nonce, &key.public(), &exporter), 0)
        .unwrap();
    let r = s
        .kbs
        .handle(
            Request::Evidence {
                v: VERSION,
                vm_id: "vm-1".into(),
                nonce: nonce.to_vec(),
                report,
                cert_table: Vec::new(),
                guest_public_key: key.public().to_vec(),
                mesh_key: Vec::new(),
            },
            Role::Guest,
            exporter,
            t,
        )
        .await;
    verify_decision(&s.response_pub, &r).unwrap()
}

fn reasons(d: &Decision) -> Vec<String> {
    match d {
        Decision::Denial(b) => b.reasons.clone(),
        Decision::Release(_) | Decision::Renewed(_) => Vec::new(),
    }
}

/// Key-server paths for `chip`'s VCEK, the chain and the CRL.
fn paths(chip: &Chip) -> (String, String, String) {
    let guest = chip.launch(GuestLaunch::default());
    let r = snp::AttestationReport::from_bytes(&guest.get_report(&[0; 64], 0).unwrap()).unwrap();
    let tcb = Tcb::decode(r.reported_tcb, Product::Milan);
    (
        snp::kds::vcek_path(Product::Milan, &r.chip_id, &tcb),
        snp::kds::cert_chain_path(Product::Milan),
        snp::kds::crl_path(Product::Milan),
    )
}

fn crl(this_update: u64, next_update: u64) -> Vec<u8> {
    PKI.ark
        .sign_crl(&[], this_update, Some(next_update))
        .unwrap()
}

/// A key server with `chip`'s VCEK, the chain and a CRL current for a week from NOW - 1 day.
async fn key_server(chip: &Chip) -> (Arc<Kds>, String) {
    let (vcek, chain, crl_p) = paths(chip);
    let pem = snp::certs::pem_encode("CERTIFICATE", &PKI.ask.cert)
        + &snp::certs::pem_encode("CERTIFICATE", &PKI.ark.cert);
    let kds = Arc::new(Kds::default());
    kds.routes.lock().unwrap().extend([
        (vcek, chip.vcek().cert.clone()),
        (chain, pem.into_bytes()),
        (crl_p, crl(NOW - DAY, NOW + 6 * DAY)),
    ]);
    let base = serve(kds.clone()).await;
    (kds, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_without_certificates_is_released_with_a_vcek_fetched_once() {
    let chip = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let (kds, base) = key_server(&chip).await;
    let (vcek, chain, crl_p) = paths(&chip);
    let s = setup(&base).await;

    // First boot: VCEK, chain and CRL fetched, each once; released.
    let d = boot(&s, &s.chip, NOW).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(
        (kds.hits(&vcek), kds.hits(&chain), kds.hits(&crl_p)),
        (1, 1, 1)
    );
    // The second boot (and more) asks the key server nothing.
    for i in 1..=3 {
        let d = boot(&s, &s.chip, NOW + i * 60).await;
        let Decision::Release(body) = d else {
            panic!("{:?}", reasons(&d))
        };
        assert_eq!(body.boot_counter, 1 + i);
    }
    assert_eq!(kds.total(), 3, "no key-server request once cached");

    // A restarted broker (fresh verifier, same cache) needs no key server either.
    let fresh = Collateral::with_backoff(&collateral_config(&base, &s.cache), fast()).unwrap();
    let v = verifier();
    let guest = s.chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let report = guest.get_report(&[1; 64], 0).unwrap();
    let verdict = kbs::collateral::verify(
        &v,
        Some(&fresh),
        &report,
        &[],
        Some(&s.order),
        &vm_policy(Some(&s.order)),
        NOW + DAY,
    )
    .await;
    assert!(verdict.accepted(), "{:?}", verdict.reasons);
    assert!(verdict.revocation_checked);
    assert_eq!(kds.total(), 3, "a restart reads the cache");

    // A chip the order does not name is never looked up: no request, denied for the chip.
    let d = boot(&s, &s.elsewhere, NOW + 120).await;
    assert!(
        reasons(&d).contains(&"chip_not_allowed".to_string()),
        "{:?}",
        reasons(&d)
    );
    assert_eq!(kds.total(), 3, "no lookup for a chip outside the order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crl_is_fetched_again_only_after_its_next_update() {
    let chip = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let (kds, base) = key_server(&chip).await;
    let (_, _, crl_p) = paths(&chip);
    let s = setup(&base).await;

    let d = boot(&s, &s.chip, NOW).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(kds.hits(&crl_p), 1);
    // Until its nextUpdate (NOW + 6 days) the CRL held serves.
    let d = boot(&s, &s.chip, NOW + 6 * DAY - 60).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(kds.hits(&crl_p), 1);
    // AMD publishes the next one; past the nextUpdate it is fetched, once.
    kds.routes
        .lock()
        .unwrap()
        .insert(crl_p.clone(), crl(NOW + 5 * DAY, NOW + 12 * DAY));
    let d = boot(&s, &s.chip, NOW + 7 * DAY).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(kds.hits(&crl_p), 2);
    let d = boot(&s, &s.chip, NOW + 8 * DAY).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(kds.hits(&crl_p), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_server_that_is_down_denies_with_the_reason() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = setup(&format!("http://127.0.0.1:{port}")).await;
    let d = boot(&s, &s.chip, NOW).await;
    let r = reasons(&d);
    assert!(matches!(d, Decision::Denial(_)));
    assert!(r.contains(&"vcek_unavailable".to_string()), "{r:?}");
    assert!(!r.contains(&"missing_certificate".to_string()), "{r:?}");
    // And again (a retry), still a denial, not a panic.
    let d = boot(&s, &s.chip, NOW + 1).await;
    assert!(reasons(&d).contains(&"vcek_unavailable".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_collateral_a_report_without_certificates_is_denied() {
    let chip = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let (kds, base) = key_server(&chip).await;
    let s = setup(&base).await;
    let guest = s.chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let report = guest.get_report(&[1; 64], 0).unwrap();
    let verdict = kbs::collateral::verify(
        &verifier(),
        None,
        &report,
        &[],
        Some(&s.order),
        &vm_policy(Some(&s.order)),
        NOW,
    )
    .await;
    assert!(!verdict.accepted());
    assert!(
        verdict
            .reasons
            .iter()
            .any(|r| r.code() == "missing_certificate")
    );
    assert_eq!(kds.total(), 0);
}

/// kbs.toml's `[collateral]`: a section naming no source stops the start; a working one is
/// reported, and with a key server fetching CRLs, `revocation = "require"` without `crls` no
/// longer warns that every release will be denied.
#[test]
fn kbs_toml_collateral_section() {
    use common::{free_port, kbs, ok, start};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-listen", "none"])
            .output()
            .unwrap(),
        "init",
    );
    let cfg = d.join("kbs.toml");
    let base = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("revocation = \"if_available\"", "revocation = \"require\"");
    assert!(
        base.contains("# [collateral]"),
        "init shows where it goes: {base}"
    );

    std::fs::write(&cfg, format!("{base}\n[collateral]\nkds_url = \"none\"\n")).unwrap();
    let out = kbs()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("[collateral]"), "{err}");

    std::fs::write(
        &cfg,
        format!("{base}\n[collateral]\nkds_url = \"http://127.0.0.1:9\"\ncache_dir = \"kds\"\n"),
    )
    .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut server = start(&cfg, log.clone());
    let _ = server.kill();
    let _ = server.wait();
    let l = log.lock().unwrap();
    assert!(l.contains("collateral sources configured"), "{l}");
    assert!(!l.contains("every release will be denied"), "{l}");
}

/// After a firmware update the VCEK for the new TCB is fetched, even when the offline store
/// holds the chip's old one under the generic name `vcek/{hwid}/vcek.der`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_offline_vcek_of_older_firmware_does_not_stand_in_the_way() {
    let mut updated = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let old = updated.vcek().cert.clone();
    let mut tcb = updated.config.current_tcb;
    tcb.snp += 1;
    let fw = updated.config.firmware;
    updated.update_firmware(tcb, fw).unwrap();
    let (kds, base) = key_server(&updated).await;
    let offline = tempfile::tempdir().unwrap();
    let generic = offline
        .path()
        .join("vcek")
        .join(snp::kds::hwid_hex(Product::Milan, &updated.config.chip_id));
    std::fs::create_dir_all(&generic).unwrap();
    std::fs::write(generic.join("vcek.der"), &old).unwrap();
    let s = setup_with(&base, Some(offline.path())).await;
    let d = boot(&s, &updated, NOW).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(kds.hits(&paths(&updated).0), 1);
    // A chip still on the old firmware (the key server has no VCEK for it here) is served
    // from the offline store's generic name.
    let d = boot(&s, &s.chip, NOW + 60).await;
    assert!(matches!(d, Decision::Release(_)), "{:?}", reasons(&d));
    assert_eq!(kds.hits(&paths(&s.chip).0), 1);
}

/// Key-server fetches under way are bounded: beyond the limit a release is denied at once
/// (`vcek_unavailable`, busy) instead of starting another fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_server_fetches_under_way_are_bounded() {
    // A key server that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", silent.local_addr().unwrap());
    let cache = tempfile::tempdir().unwrap();
    let cfg = CollateralConfig {
        fetch_timeout_secs: 1,
        ..collateral_config(&base, cache.path())
    };
    let col = Collateral::with_limits(&cfg, fast(), 1).unwrap();
    let tcb = Tcb::decode(0, Product::Milan);
    let t0 = std::time::Instant::now();
    let first = col
        .vcek("vm-1", Product::Milan, &[1; 64], &tcb, NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(first, kbs::collateral::CollateralError::TimedOut(1)),
        "{first}"
    );
    // The first fetch goes on (its guest gave up); a second, for another chip, is refused.
    let second = col
        .vcek("vm-1", Product::Milan, &[2; 64], &tcb, NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(second, kbs::collateral::CollateralError::Busy(1)),
        "{second}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    drop(silent);
}

/// VCEK fetches under way never keep the CRL from being renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_is_renewed_while_vcek_fetches_fill_the_limit() {
    let chip = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let (kds, base) = key_server(&chip).await;
    let (vcek, _, crl_p) = paths(&chip);
    kds.stall.lock().unwrap().push(vcek.clone());
    let cache = tempfile::tempdir().unwrap();
    let cfg = CollateralConfig {
        fetch_timeout_secs: 1,
        ..collateral_config(&base, cache.path())
    };
    let col = Collateral::with_limits(&cfg, fast(), 1).unwrap();
    let r = snp::AttestationReport::from_bytes(
        &chip
            .launch(GuestLaunch::default())
            .get_report(&[0; 64], 0)
            .unwrap(),
    )
    .unwrap();
    let tcb = Tcb::decode(r.reported_tcb, Product::Milan);
    let e = col
        .vcek("vm-1", Product::Milan, &chip.config.chip_id, &tcb, NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(e, kbs::collateral::CollateralError::TimedOut(1)),
        "{e}"
    );
    assert_eq!(kds.hits(&vcek), 1);
    // The one fetch allowed is under way; the CRL is fetched all the same.
    // (On a loaded machine the second may pass before the request is out; it goes on.)
    col.refresh_crl(&verifier(), Product::Milan, NOW).await;
    for _ in 0..100 {
        if kds.hits(&crl_p) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kds.hits(&crl_p), 1);
}

/// Evidence for one VM with ever new TCBs (the report is not verified before its VCEK is
/// looked for, and challenges are free) gets at most that VM's daily budget of key-server
/// fetches; retries of the same VCEK and cached VCEKs are free; another VM on the same chip
/// keeps its own budget (one tenant cannot lock a shared chip out); a day later the budget is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_tcbs_spend_only_the_vms_daily_fetch_budget() {
    let chip = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let (kds, base) = key_server(&chip).await;
    let cache = tempfile::tempdir().unwrap();
    let cfg = CollateralConfig {
        vm_fetches_per_day: 3,
        ..collateral_config(&base, cache.path())
    };
    let col = Collateral::with_backoff(&cfg, fast()).unwrap();
    let id = chip.config.chip_id;
    let (vcek, _, _) = paths(&chip);
    let genuine = Tcb::decode(
        snp::AttestationReport::from_bytes(
            &chip
                .launch(GuestLaunch::default())
                .get_report(&[0; 64], 0)
                .unwrap(),
        )
        .unwrap()
        .reported_tcb,
        Product::Milan,
    );
    // The genuine TCB: one fetch (of vm-1's three), cached.
    col.vcek("vm-1", Product::Milan, &id, &genuine, NOW)
        .await
        .unwrap();
    let before = kds.total();
    let made_up = |i: u8| Tcb {
        microcode: genuine.microcode.wrapping_add(1 + i),
        ..genuine
    };
    for i in 0..6u8 {
        let e = col
            .vcek("vm-1", Product::Milan, &id, &made_up(i), NOW + 1)
            .await
            .unwrap_err();
        if i < 2 {
            // Within the budget: asked (the key server has none).
            assert!(!matches!(e, CollateralError::VmBudget(_)), "{e}");
        } else {
            assert!(matches!(e, CollateralError::VmBudget(3)), "{e}");
        }
    }
    // Two made-up ones were asked for; the rest never left the broker.
    assert_eq!(kds.total() - before, 2);
    // A retry of a VCEK already asked for is not refused for the budget.
    let again = col
        .vcek("vm-1", Product::Milan, &id, &made_up(0), NOW + 2)
        .await
        .unwrap_err();
    assert!(!matches!(again, CollateralError::VmBudget(_)), "{again}");
    // The genuine VCEK is still served from the cache, spending nothing.
    col.vcek("vm-1", Product::Milan, &id, &genuine, NOW + 2)
        .await
        .unwrap();
    assert_eq!(kds.hits(&vcek), 1);
    // Another VM on the same chip has its own budget; a day later vm-1 has its budget back.
    let other = col
        .vcek("vm-2", Product::Milan, &id, &made_up(5), NOW + 3)
        .await
        .unwrap_err();
    assert!(!matches!(other, CollateralError::VmBudget(_)), "{other}");
    let later = col
        .vcek("vm-1", Product::Milan, &id, &made_up(5), NOW + DAY + 2)
        .await
        .unwrap_err();
    assert!(!matches!(later, CollateralError::VmBudget(_)), "{later}");
}

/// A report whose TCB is below the broker's floor is denied without its VCEK being looked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcb_below_the_floor_is_not_looked_up() {
    let mut old = Chip::new(PKI.clone(), ChipConfig::typical(&PKI, 0)).unwrap();
    let fw = old.config.firmware;
    old.update_firmware(Tcb::decode(0, Product::Milan), fw)
        .unwrap();
    let (kds, base) = key_server(&old).await;
    let s = setup(&base).await;
    let d = boot(&s, &old, NOW).await;
    let why = reasons(&d);
    assert!(why.iter().any(|r| r == "vcek_unavailable"), "{why:?}");
    assert_eq!(kds.hits(&paths(&old).0), 0);
}
