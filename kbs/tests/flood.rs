//! Denial of service, over real QUIC on loopback (THREAT-MODEL invariant 10): a flood from one
//! source address — connections held open, bogus evidence, oversized ids — leaves every genuine
//! guest served within its timeout, and the audit log and the broker's memory bounded.
//!
//! Genuine guests and the flooder come from different loopback addresses (127.0.0.1 and
//! 127.0.0.2: all of 127.0.0.0/8 is local on Linux).

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use guest_agent::client::{Broker, exchange};
use kbs::keys::FileKek;
use kbs::service::{Kbs, TlsIdentity, serve};
use kbs::store::{SqliteStore, Store};
use proto::ResponseKey;
use proto::msg::{Request, Response, VERSION};
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::{Product, Revocation, Verifier, VerifierConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const GOOD: [u8; 48] = [0x4d; 48];
/// The guest agent's default `timeout_secs`: how long a booting guest keeps trying.
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
const FLOODER: &str = "127.0.0.2";

fn now() -> u64 {
    1_780_272_000 // 2026-06-01: inside the simulated VCEKs' validity
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    chip: &'static Chip,
    kbs: Arc<Kbs>,
    broker: Arc<Broker>,
}

/// A broker adjusted by `f`, with `vms` VMs registered (vm-0…) on one chip, served on
/// 127.0.0.1.
async fn setup(vms: usize, f: impl FnOnce(&mut Kbs)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::from_seed(Product::Milan, Seed::from_text("flood")).unwrap());
    let chip: &'static Chip = Box::leak(Box::new(
        Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap(),
    ));
    let (operator, offline) = (
        Ed25519KeyPair::generate().unwrap(),
        Ed25519KeyPair::generate().unwrap(),
    );
    let response_key = ResponseKey::generate().unwrap();
    let response_pub = response_key.public();
    let mut kbs = Kbs::new(
        SqliteStore::open(&dir.path().join("kbs.db")).await.unwrap(),
        Verifier::new(VerifierConfig {
            trust_roots: vec![pki.ark.cert.clone()],
            revocation: Revocation::IfAvailable,
            ..Default::default()
        }),
        response_key,
        Box::new(FileKek::create(&dir.path().join("kek")).unwrap()),
        vec![pk(&operator)],
        30,
    );
    f(&mut kbs);
    let kbs = Arc::new(kbs);
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), now())
        .await
        .unwrap();
    for i in 0..vms {
        let o = Order {
            v: ORDER_VERSION,
            kind: OrderKind::Register,
            vm_id: format!("vm-{i}"),
            tenant: "tenant-a".into(),
            measurements: vec![ByteBuf::from(GOOD.to_vec())],
            policy: String::new(),
            chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
            not_after: now() + 3600,
            boot_config: ByteBuf::new(),
            billing: None,
            mesh_ip: None,
            split: None,
        };
        kbs.register(&o.sign(&operator), now()).await.unwrap();
    }
    let tls = TlsIdentity::generate("kbs.attesta.test").unwrap();
    let endpoint =
        quinn::Endpoint::server(tls.server_config().unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(serve(endpoint, kbs.clone(), now));
    let broker = Arc::new(Broker {
        addr,
        server_name: "kbs.attesta.test".into(),
        ca_der: tls.ca_der,
        response_key: response_pub,
    });
    Setup {
        _dir: dir,
        chip,
        kbs,
        broker,
    }
}

/// A client endpoint on `ip` (a loopback address).
fn client_on(ip: &str) -> quinn::Endpoint {
    quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap()
}

/// A guest's client configuration, kept alive while it idles (as a flooder holding its
/// connections open would).
fn held_config(broker: &Broker) -> quinn::ClientConfig {
    let mut cfg = guest_agent::client::client_config(broker).unwrap();
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    cfg.transport_config(Arc::new(t));
    cfg
}

/// Evidence for a nonce the broker never issued.
fn bogus_evidence(vm_id: &str) -> Request {
    let mut nonce = [0u8; 32];
    aws_lc_rs::rand::fill(&mut nonce).unwrap();
    Request::Evidence {
        v: VERSION,
        vm_id: vm_id.into(),
        nonce: nonce.to_vec(),
        report: vec![0x5a; 1184],
        cert_table: Vec::new(),
        guest_public_key: vec![7; 32],
        mesh_key: Vec::new(),
    }
}

/// The signed denial's reasons, or the error's code.
fn reasons(r: &Response, pinned: &[u8; 32]) -> Vec<String> {
    match r {
        Response::Error { code, .. } => vec![code.clone()],
        _ => match proto::msg::verify_decision(pinned, r) {
            Ok(proto::msg::Decision::Denial(d)) => d.reasons,
            other => panic!("unexpected answer {other:?}"),
        },
    }
}

async fn audit_len(kbs: &Kbs) -> usize {
    kbs.store.audit_entries().await.unwrap().len()
}

/// The flood: `tasks` clients from [`FLOODER`], each taking a connection whenever it can
/// (counted in `held`; refusals in `refused`, each followed by `backoff`), sending oversized ids and bogus evidence on it,
/// then holding it (a keep-alive and a bogus request now and then) until the broker closes it
/// or `stop`.
fn flood(
    broker: &Arc<Broker>,
    tasks: usize,
    backoff: Duration,
    stop: &Arc<AtomicBool>,
    held: &Arc<AtomicU64>,
    refused: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let flooder = client_on(FLOODER);
    (0..tasks)
        .map(|_| {
            let (broker, flooder, stop) = (broker.clone(), flooder.clone(), stop.clone());
            let (held, refused) = (held.clone(), refused.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let connecting = flooder
                        .connect_with(held_config(&broker), broker.addr, "kbs.attesta.test")
                        .unwrap();
                    let Ok(conn) = connecting.await else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        continue;
                    };
                    held.fetch_add(1, Ordering::Relaxed);
                    // Oversized and malformed ids, on challenges and evidence alike.
                    for id in ["x".repeat(129), "x".repeat(20_000), "vm 1".into()] {
                        let ch = Request::Challenge {
                            v: VERSION,
                            vm_id: id.clone(),
                        };
                        for req in [ch, bogus_evidence(&id)] {
                            if let Ok(r) = exchange(&conn, &req).await {
                                assert_eq!(
                                    reasons(&r, &broker.response_key),
                                    ["bad_request"],
                                    "{id:.20}"
                                );
                            }
                        }
                    }
                    // Bogus evidence for a real VM, more than a connection may send.
                    for _ in 0..12 {
                        if let Ok(r) = exchange(&conn, &bogus_evidence("vm-0")).await {
                            let why = reasons(&r, &broker.response_key);
                            assert!(
                                why == ["unknown_nonce"] || why == ["too_many_evidence"],
                                "{why:?}"
                            );
                        }
                    }
                    // Then hold the connection, asking now and then, until the broker or the
                    // test ends it.
                    while !stop.load(Ordering::Relaxed) && conn.close_reason().is_none() {
                        let _ = exchange(&conn, &bogus_evidence("vm-0")).await;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    held.fetch_sub(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// One address floods — as many connections as it can get, each held open with a keep-alive,
/// sending bogus evidence and oversized ids — while eight guests boot behind one other address
/// (a NAT): every guest is released within its timeout, the audit log grows by their eight
/// releases only, and what the broker holds stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_locks_no_guest_out() {
    let Setup {
        _dir,
        chip,
        kbs,
        broker,
    } = setup(8, |k| {
        k.max_sessions = 8;
        k.max_sessions_per_address = 4;
        // Connections that keep asking may last long (a long nonce TTL): only the per-address
        // cap keeps the flooder from holding every slot for all of it.
        k.session_limit = Duration::from_secs(300);
    })
    .await;
    let audit0 = audit_len(&kbs).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (held, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let floods = flood(
        &broker,
        16,
        Duration::from_millis(20),
        &stop,
        &held,
        &refused,
    );
    // The flood is on: the flooder holds connections.
    let t = std::time::Instant::now();
    while held.load(Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < GUEST_TIMEOUT, "the flooder never got in");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Eight guests boot at once from another address, as the guest agent does.
    let guest = Arc::new(chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    }));
    let boots: Vec<_> = (0..8)
        .map(|i| {
            let (broker, guest) = (broker.clone(), guest.clone());
            tokio::spawn(async move {
                guest_agent::unlock::fetch_with_retry(
                    std::slice::from_ref(&broker),
                    &format!("vm-{i}"),
                    &*guest,
                    GUEST_TIMEOUT,
                    None,
                )
                .await
            })
        })
        .collect();
    for (i, b) in boots.into_iter().enumerate() {
        let r = b.await.unwrap();
        assert!(r.is_ok(), "vm-{i} not released in its timeout: {r:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.await.unwrap();
    }

    let m = &kbs.metrics;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    assert!(
        g(&m.refused_per_address) > 0,
        "the flooder was never refused"
    );
    assert!(refused.load(Ordering::Relaxed) > 0);
    assert!(g(&m.evidence_refused) > 0);
    assert_eq!(g(&m.releases), 8);
    // The audit log grew by the eight releases, nothing of the flood's.
    let log = kbs.store.audit_entries().await.unwrap();
    assert_eq!(log.len(), audit0 + 8, "audit entries: {:?}", &log[audit0..]);
    // Bounded: never more than max_sessions at once, no nonce issued to the flooder.
    assert!(g(&m.sessions_peak) <= 8, "peak {}", g(&m.sessions_peak));
    assert!(kbs.nonces.lock().unwrap().len() <= 8 * 8);
}

/// Per connection: at most MAX_EVIDENCE_PER_SESSION evidence messages; evidence on a nonce the
/// broker never issued, or already spent, is denied without touching the store or the log; a
/// connection that asks nothing after its handshake is closed soon (0x12), long before its
/// session limit; and the QUIC limits allow a few request streams, no unidirectional ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_is_bounded_and_bogus_evidence_leaves_no_trace() {
    let Setup {
        _dir, kbs, broker, ..
    } = setup(1, |k| k.session_limit = Duration::from_secs(300)).await;
    let client = client_on("127.0.0.1");
    let connect = || async {
        client
            .connect_with(
                guest_agent::client::client_config(&broker).unwrap(),
                broker.addr,
                "kbs.attesta.test",
            )
            .unwrap()
            .await
            .unwrap()
    };
    let audit0 = audit_len(&kbs).await;
    let stores0 = kbs
        .store
        .stats
        .writes
        .load(std::sync::atomic::Ordering::Relaxed);
    let conn = connect().await;
    for i in 0..kbs::quic::MAX_EVIDENCE_PER_SESSION {
        let r = exchange(&conn, &bogus_evidence("vm-0")).await.unwrap();
        assert_eq!(
            reasons(&r, &broker.response_key),
            ["unknown_nonce"],
            "evidence {i}"
        );
    }
    let r = exchange(&conn, &bogus_evidence("vm-0")).await.unwrap();
    assert_eq!(reasons(&r, &broker.response_key), ["too_many_evidence"]);
    // Oversized ids are refused on evidence too.
    let conn = connect().await;
    let r = exchange(&conn, &bogus_evidence(&"v".repeat(129)))
        .await
        .unwrap();
    assert_eq!(reasons(&r, &broker.response_key), ["bad_request"]);
    // A live nonce asked for a VM the broker does not hold (challenges are free): its evidence
    // is refused without a store write or an audit entry too.
    let r = exchange(
        &conn,
        &Request::Challenge {
            v: VERSION,
            vm_id: "vm-nobody".into(),
        },
    )
    .await
    .unwrap();
    let Response::Challenge { nonce, .. } = r else {
        panic!("expected a challenge, got {r:?}")
    };
    let Request::Evidence {
        v,
        vm_id,
        report,
        cert_table,
        guest_public_key,
        mesh_key,
        ..
    } = bogus_evidence("vm-nobody")
    else {
        unreachable!()
    };
    let live = Request::Evidence {
        v,
        vm_id,
        nonce,
        report,
        cert_table,
        guest_public_key,
        mesh_key,
    };
    let r = exchange(&conn, &live).await.unwrap();
    assert_eq!(reasons(&r, &broker.response_key), ["unknown_vm"]);
    assert_eq!(audit_len(&kbs).await, audit0, "the log grew");
    assert_eq!(
        kbs.store.stats.writes.load(Ordering::Relaxed),
        stores0,
        "the store was written"
    );
    assert_eq!(kbs.metrics.evidence_refused.load(Ordering::Relaxed), 9);

    // Four request streams at once, no unidirectional stream: known from the handshake, so the
    // client cannot open more without waiting for the broker.
    let conn = connect().await;
    let mut open = Vec::new();
    for _ in 0..kbs::tls::MAX_STREAMS {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0]).await.unwrap(); // half a length: the stream stays open
        open.push((send, recv));
    }
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let fifth = std::pin::pin!(conn.open_bi());
    assert!(fifth.poll(&mut cx).is_pending(), "a fifth stream opened");
    let uni = std::pin::pin!(conn.open_uni());
    assert!(
        uni.poll(&mut cx).is_pending(),
        "a unidirectional stream opened"
    );

    // A connection that asks nothing is closed well before its 300 s session limit.
    let idle = connect().await;
    match tokio::time::timeout(GUEST_TIMEOUT, idle.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(a)) => {
            assert_eq!(a.error_code, kbs::quic::CLOSE_IDLE.into())
        }
        other => panic!("expected the broker to close an idle connection: {other:?}"),
    }
    // (So was the one holding four half-sent requests: none of them ever arrived whole.)
    assert_eq!(kbs.metrics.idle_closed.load(Ordering::Relaxed), 2);
}

/// Beyond `max_sessions_per_address`, an address's connections are refused at once (QUIC
/// CONNECTION_REFUSED), while another address still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_cap_is_refused_at_once() {
    let Setup {
        _dir, kbs, broker, ..
    } = setup(0, |k| {
        k.max_sessions = 8;
        k.max_sessions_per_address = 2;
        k.session_limit = Duration::from_secs(300);
    })
    .await;
    let flooder = client_on(FLOODER);
    let connect = |from: &quinn::Endpoint| {
        from.connect_with(held_config(&broker), broker.addr, "kbs.attesta.test")
            .unwrap()
    };
    let a = connect(&flooder).await.unwrap();
    let b = connect(&flooder).await.unwrap();
    match connect(&flooder).await {
        Err(quinn::ConnectionError::ConnectionClosed(c)) => {
            assert_eq!(c.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED)
        }
        other => panic!(
            "a third connection from one address: {:?}",
            other.map(|_| ())
        ),
    }
    // Others are not affected…
    let other = connect(&client_on("127.0.0.1")).await.unwrap();
    let r = exchange(
        &other,
        &Request::Challenge {
            v: VERSION,
            vm_id: "vm-0".into(),
        },
    )
    .await
    .unwrap();
    assert!(matches!(r, Response::Challenge { .. }), "{r:?}");
    // …and a slot given back is the address's again.
    a.close(0u32.into(), b"");
    let t = std::time::Instant::now();
    loop {
        match connect(&flooder).await {
            Ok(_) => break,
            Err(e) => assert!(t.elapsed() < GUEST_TIMEOUT, "never admitted again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
    assert!(kbs.metrics.refused_per_address.load(Ordering::Relaxed) >= 1);
}

/// A process's resident memory now and at its peak, KiB (`VmRSS`, `VmHWM`).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const FIGURE_VMS: usize = 300;
/// Set in the environment of the broker process [`flood_figure`] starts.
const BROKER_ROLE: &str = "ATTESTA_FLOOD_FIGURE_BROKER";

/// The broker's side of [`flood_figure`], in a process of its own so that its memory is its
/// own: kbs.toml's defaults (64 slots, 16 per address), `FIGURE_VMS` VMs. Prints where it
/// serves, serves until its stdin closes, then prints its counters. Does nothing when run
/// on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn flood_figure_broker() {
    if std::env::var_os(BROKER_ROLE).is_none() {
        return;
    }
    let Setup {
        _dir, kbs, broker, ..
    } = setup(FIGURE_VMS, |k| {
        k.max_sessions_per_address = kbs::limits::default_per_address(k.max_sessions);
    })
    .await;
    let audit0 = audit_len(&kbs).await;
    println!(
        "BROKER {}",
        serde_json::json!({
            "addr": broker.addr.to_string(),
            "ca_der": hex::encode(&broker.ca_der),
            "response_key": hex::encode(broker.response_key),
        })
    );
    // Until the measuring process closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
    let m = &kbs.metrics;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "COUNTERS {}",
        serde_json::json!({
            "flood_refused_connections": g(&m.refused_per_address),
            "flood_evidence_refused": g(&m.evidence_refused),
            "idle_closed": g(&m.idle_closed),
            "audit_entries_added": audit_len(&kbs).await - audit0,
            "sessions_peak": g(&m.sessions_peak),
            "nonces_held": kbs.nonces.lock().map(|b| b.len()).unwrap_or(0),
        })
    );
}

/// The figure for BENCHMARKS.md (not a check; run it in release):
/// `cargo test --release -p kbs --test flood -- --ignored --nocapture flood_figure`.
/// The broker runs in a process of its own ([`flood_figure_broker`], this test binary started
/// again); 256 flooding clients (each retrying 100 ms after a refusal) on one address while
/// `FIGURE_VMS` guests boot at once behind another (a NAT, retrying as the agent does). Prints
/// the boot times, the broker's counters and the broker process's memory (VmRSS, VmHWM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn flood_figure() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "flood_figure_broker", "--nocapture"])
        .env(BROKER_ROLE, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut marked = |mark: &str| -> serde_json::Value {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the broker ended");
            if let Some(j) = line.strip_prefix(mark) {
                return serde_json::from_str(j).unwrap();
            }
        }
    };
    let at = marked("BROKER ");
    let text = |k: &str| at[k].as_str().unwrap().to_string();
    let broker = Arc::new(Broker {
        addr: text("addr").parse().unwrap(),
        server_name: "kbs.attesta.test".into(),
        ca_der: hex::decode(text("ca_der")).unwrap(),
        response_key: hex::decode(text("response_key"))
            .unwrap()
            .try_into()
            .unwrap(),
    });
    // The same simulated chip the broker's VMs are ordered on (derived from the same seed).
    let pki = Arc::new(Pki::from_seed(Product::Milan, Seed::from_text("flood")).unwrap());
    let chip: &'static Chip = Box::leak(Box::new(
        Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap(),
    ));
    let (rss0, _) = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let (held, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let floods = flood(
        &broker,
        256,
        Duration::from_millis(100),
        &stop,
        &held,
        &refused,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_flood, _) = rss_kib(pid);
    let guest = Arc::new(chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    }));
    let t = std::time::Instant::now();
    let boots: Vec<_> = (0..FIGURE_VMS)
        .map(|i| {
            let (broker, guest) = (broker.clone(), guest.clone());
            tokio::spawn(async move {
                let r = guest_agent::unlock::fetch_with_retry(
                    std::slice::from_ref(&broker),
                    &format!("vm-{i}"),
                    &*guest,
                    GUEST_TIMEOUT,
                    None,
                )
                .await;
                (r.is_ok(), t.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failed = 0;
    for b in boots {
        let (ok, secs) = b.await.unwrap();
        if ok {
            times.push(secs);
        } else {
            failed += 1;
        }
    }
    let storm = t.elapsed().as_secs_f64();
    let (rss1, hwm) = rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        let _ = f.await;
    }
    drop(child.stdin.take());
    let counters = marked("COUNTERS ");
    let _ = child.wait();
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
    };
    println!(
        "{}",
        serde_json::json!({
            "vms": FIGURE_VMS, "released": times.len(), "failed": failed,
            "boot_p50_s": pct(0.5), "boot_max_s": pct(1.0), "storm_s": storm,
            "broker": counters,
            "broker_rss_kib_before": rss0, "broker_rss_kib_flooding": rss_flood,
            "broker_rss_kib_after_storm": rss1, "broker_rss_kib_peak": hwm,
        })
    );
    assert_eq!(failed, 0);
    assert!(
        rss0 > 0 && hwm >= rss_flood && rss_flood > 0,
        "no memory figures read"
    );
}

/// Bogus evidence bound to its connection (no nonce) is judged like any evidence for a VM the
/// broker holds: denied, signed and audited, one per connection, so each audited decision costs
/// its sender a whole handshake; a second on the connection is refused unaudited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_evidence_bound_to_its_connection_costs_a_handshake_each() {
    let Setup {
        _dir, kbs, broker, ..
    } = setup(1, |_| {}).await;
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut bound = bogus_evidence("vm-0");
    if let Request::Evidence { nonce, .. } = &mut bound {
        nonce.clear();
    }
    let audit0 = audit_len(&kbs).await;
    for round in 1..=3 {
        let conn = client
            .connect_with(held_config(&broker), broker.addr, "kbs.attesta.test")
            .unwrap()
            .await
            .unwrap();
        let why = reasons(
            &exchange(&conn, &bound).await.unwrap(),
            &broker.response_key,
        );
        assert!(
            !why.is_empty() && !why.iter().any(|w| w.contains("nonce")),
            "judged, not refused on a nonce: {why:?}"
        );
        assert_eq!(audit_len(&kbs).await, audit0 + round);
        let again = reasons(
            &exchange(&conn, &bound).await.unwrap(),
            &broker.response_key,
        );
        assert_eq!(again, ["too_many_evidence"]);
        assert_eq!(audit_len(&kbs).await, audit0 + round);
    }
}
