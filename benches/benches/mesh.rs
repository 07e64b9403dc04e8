//! The mesh's transport against plain quinn/rustls with the same certificates, in one run:
//! mutual-TLS handshakes per second (our verifier, revocation check and firewall decision vs
//! rustls's WebPKI verifiers with the mesh CA as the root), and single-stream throughput.
//! Real QUIC over loopback; the server's side of each handshake is finished before the next.
//!
//! Run: `cargo bench -p attesta-benches --bench mesh`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh::cert::{LocalCa, MeshCert, Role};
use mesh::firewall::{Firewall, Peer, Service, Verdict};
use mesh::transport::{Identity, Trust, client_tls, peer, server_tls};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ALPN: &[u8] = b"attesta-bench/1";
const RULES: &str =
    "version = 1\n[[inbound]]\nfrom = { groups = [\"tenant:a\"] }\nservice = \"attesta-bench/1\"\n";

struct Pki {
    ca: MeshCert,
    ca_der: CertificateDer<'static>,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let root = LocalCa::root("bench-ca", &[], now - 3600, now + 86_400).expect("root");
    let node = |name: &str, ip: &str, role: Role| {
        let n = root
            .issue(name, ip, &["tenant:a"], role, now - 60, now + 3600)
            .expect("sign");
        (n.issued.cert_pem, n.issued.key_pem.to_string())
    };
    let ca = root.cert.clone();
    Pki {
        ca_der: CertificateDer::from(ca.der.clone()),
        server: node("srv", "10.42.0.1/16", Role::Kbs),
        client: node("cli", "10.42.0.2/16", Role::Guest),
        ca,
    }
}

fn id(pair: &(String, String)) -> Identity {
    Identity::from_pem(pair.0.as_bytes(), pair.1.as_bytes()).expect("identity")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// (server config, client config) for the mesh and for plain rustls.
fn configs(p: &Pki, mesh: bool) -> (rustls::ServerConfig, rustls::ClientConfig) {
    if mesh {
        let trust = Trust::new(vec![p.ca.clone()]);
        (
            server_tls(id(&p.server), trust.clone(), true, &[ALPN]).expect("server"),
            client_tls(id(&p.client), trust, ALPN).expect("client"),
        )
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(p.ca_der.clone()).expect("root");
        let roots = Arc::new(roots);
        let cv =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .expect("client verifier");
        let s = id(&p.server);
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_client_cert_verifier(cv)
            .with_single_cert(s.chain, s.key)
            .expect("server cert");
        server.alpn_protocols = vec![ALPN.to_vec()];
        let c = id(&p.client);
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_client_auth_cert(c.chain, c.key)
            .expect("client cert");
        client.alpn_protocols = vec![ALPN.to_vec()];
        (server, client)
    }
}

struct Pair {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    cc: quinn::ClientConfig,
    addr: SocketAddr,
    /// The server signals each connection it has admitted.
    admitted: tokio::sync::mpsc::UnboundedReceiver<quinn::Connection>,
}

fn pair(rt: &tokio::runtime::Runtime, p: &Pki, mesh: bool) -> Pair {
    let (s, c) = configs(p, mesh);
    let _g = rt.enter();
    let sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(s).expect("quic server"),
    ));
    let server = quinn::Endpoint::server(sc, "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(c).expect("quic client"),
    ));
    let addr = server.local_addr().expect("addr");
    let (tx, admitted) = tokio::sync::mpsc::unbounded_channel();
    let srv = server.clone();
    let fw = Firewall::load(RULES).expect("rules");
    rt.spawn(async move {
        while let Some(inc) = srv.accept().await {
            let Ok(conn) = inc.await else { continue };
            if mesh {
                // What a mesh node does on admission: the identity from the connection, then
                // the rules.
                let chain = conn
                    .peer_identity()
                    .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok());
                let Some(cert) = peer(chain.as_deref().map(|v| v.as_slice())) else {
                    continue;
                };
                let who = Peer::from_cert(&cert);
                if fw.decide(&who, &Service::Named("attesta-bench/1".into())) == Verdict::Deny {
                    continue;
                }
            }
            let _ = tx.send(conn);
        }
    });
    Pair {
        server,
        client,
        cc,
        addr,
        admitted,
    }
}

async fn handshakes(p: &mut Pair, n: u64) -> Duration {
    let name = "srv";
    let t = Instant::now();
    for _ in 0..n {
        let c = p
            .client
            .connect_with(p.cc.clone(), p.addr, name)
            .expect("connect")
            .await
            .expect("handshake");
        let s = p.admitted.recv().await.expect("admitted");
        c.close(0u32.into(), b"");
        s.close(0u32.into(), b"");
    }
    t.elapsed()
}

const BYTES: usize = 16 << 20;

async fn stream(p: &mut Pair) -> Duration {
    let c = p
        .client
        .connect_with(p.cc.clone(), p.addr, "srv")
        .expect("connect")
        .await
        .expect("handshake");
    let s = p.admitted.recv().await.expect("admitted");
    let sink = tokio::spawn(async move {
        let (mut tx, mut rx) = s.accept_bi().await.expect("stream");
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while let Some(k) = rx.read(&mut buf).await.expect("read") {
            n += k;
        }
        tx.write_all(&(n as u64).to_be_bytes()).await.expect("ack");
        let _ = tx.finish();
        s
    });
    let chunk = vec![7u8; 64 * 1024];
    let t = Instant::now();
    let (mut tx, mut rx) = c.open_bi().await.expect("open");
    for _ in 0..BYTES / chunk.len() {
        tx.write_all(&chunk).await.expect("write");
    }
    tx.finish().expect("finish");
    let ack = rx.read_to_end(8).await.expect("ack");
    let took = t.elapsed();
    assert_eq!(ack, (BYTES as u64).to_be_bytes());
    let s = sink.await.expect("sink");
    c.close(0u32.into(), b"");
    s.close(0u32.into(), b"");
    took
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let p = pki();
    let mut mesh_pair = pair(&rt, &p, true);
    let mut plain_pair = pair(&rt, &p, false);

    let mut g = c.benchmark_group("mesh_handshake");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.bench_function("mesh_mtls_verifier_firewall", |b| {
        b.iter_custom(|n| rt.block_on(handshakes(&mut mesh_pair, n)))
    });
    g.bench_function("plain_quinn_rustls_webpki (baseline)", |b| {
        b.iter_custom(|n| rt.block_on(handshakes(&mut plain_pair, n)))
    });
    g.finish();

    let mut g = c.benchmark_group("mesh_stream");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.sample_size(10);
    g.bench_function("mesh_single_stream_16MiB", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let mut t = Duration::ZERO;
                for _ in 0..n {
                    t += stream(&mut mesh_pair).await;
                }
                t
            })
        })
    });
    g.bench_function("plain_quinn_single_stream_16MiB (baseline)", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let mut t = Duration::ZERO;
                for _ in 0..n {
                    t += stream(&mut plain_pair).await;
                }
                t
            })
        })
    });
    g.finish();
    drop((
        mesh_pair.server,
        mesh_pair.client,
        plain_pair.server,
        plain_pair.client,
    ));
}

criterion_group!(benches, bench);
criterion_main!(benches);
