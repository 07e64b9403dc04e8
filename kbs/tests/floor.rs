//! The broker's policy floor (invariants 8 and 9), in process over real QUIC: an order asking
//! for less than the floor is refused at registration (`policy_below_floor`), and a VM
//! registered before the floor was raised is judged at release by the new floor ∧ its order,
//! with the policy's own reason codes.

mod common;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use guest_agent::client::{Broker, ClientError, fetch};
use kbs::keys::FileKek;
use kbs::service::{Kbs, TlsIdentity, serve};
use kbs::store::{SqliteStore, Store};
use proto::ResponseKey;
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::tcb::TcbMinimum;
use snp::{Floor, Product, Revocation, Verifier, VerifierConfig};
use std::path::Path;
use std::sync::Arc;

const GOOD: [u8; 48] = [0x4d; 48];

fn now() -> u64 {
    1_780_272_000 // 2026-06-01: inside the simulated VCEKs' validity
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

struct Lab {
    dir: tempfile::TempDir,
    pki: Arc<Pki>,
    chip: Chip,
    operator: Ed25519KeyPair,
    offline: Ed25519KeyPair,
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    FileKek::create(&dir.path().join("kek")).unwrap();
    let pki = Arc::new(Pki::from_seed(Product::Milan, Seed::from_text("floor")).unwrap());
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    Lab {
        dir,
        pki,
        chip,
        operator: Ed25519KeyPair::generate().unwrap(),
        offline: Ed25519KeyPair::generate().unwrap(),
    }
}

/// A broker on the lab's store (as if started with a kbs.toml whose `[floor]` is `floor`).
async fn broker(lab: &Lab, floor: Floor) -> (Arc<Kbs>, Broker) {
    let d: &Path = lab.dir.path();
    let response_key = ResponseKey::generate().unwrap();
    let response_pub = response_key.public();
    let kbs = Kbs::new(
        SqliteStore::open(&d.join("kbs.db")).await.unwrap(),
        Verifier::new(VerifierConfig {
            trust_roots: vec![lab.pki.ark.cert.clone()],
            revocation: Revocation::IfAvailable,
            ..Default::default()
        }),
        response_key,
        Box::new(FileKek::load(&d.join("kek")).unwrap()),
        vec![pk(&lab.operator)],
        30,
    );
    kbs.set_floor(floor);
    let kbs = Arc::new(kbs);
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
    };
    kbs.load_allowlist(Some(&allow.sign(&lab.offline)), &pk(&lab.offline), now())
        .await
        .unwrap();
    let tls = TlsIdentity::generate("kbs.attesta.test").unwrap();
    let endpoint =
        quinn::Endpoint::server(tls.server_config().unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(serve(endpoint, kbs.clone(), now));
    let b = Broker {
        addr,
        server_name: "kbs.attesta.test".into(),
        ca_der: tls.ca_der,
        response_key: response_pub,
    };
    (kbs, b)
}

fn order(lab: &Lab, vm: &str, policy: &str) -> Vec<u8> {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm.into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
        policy: policy.into(),
        chip_ids: vec![ByteBuf::from(lab.chip.config.chip_id.to_vec())],
        not_after: now() + 3600,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
    .sign(&lab.operator)
}

fn denied(r: Result<guest_agent::client::Released, ClientError>) -> Vec<String> {
    match r {
        Err(ClientError::Denied(reasons)) => reasons,
        Ok(_) => panic!("expected a denial, got a release"),
        Err(other) => panic!("expected a denial, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_below_the_floor_are_refused_at_registration() {
    let lab = lab();
    let (kbs, _) = broker(&lab, Floor::default()).await;
    for (vm, policy) in [
        ("debug", "version = 1\n[guest_policy]\nallow_debug = true\n"),
        ("any-vmpl", "version = 1\nany_vmpl = true\n"),
        ("vmpl-2", "version = 1\nvmpl = 2\n"),
        ("vlek", "version = 1\nsigning_keys = [\"vlek\"]\n"),
        (
            "old-tcb",
            "version = 1\n[tcb.minimum_by_product.milan]\nsnp = 8\n",
        ),
    ] {
        let e = kbs
            .register(&order(&lab, vm, policy), now())
            .await
            .unwrap_err();
        assert_eq!(e.code(), "policy_below_floor", "{vm}: {e}");
    }
    // Tightening is fine, and nothing of the refused ones was stored.
    kbs.register(
        &order(
            &lab,
            "tight",
            "version = 1\nminimum_guest_svn = 0\n[tcb.minimum_by_product.milan]\nsnp = 24\n",
        ),
        now(),
    )
    .await
    .unwrap();
    for vm in ["debug", "any-vmpl", "vmpl-2", "vlek", "old-tcb"] {
        assert!(kbs.store.vm(vm).await.unwrap().is_none(), "{vm} was stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_floor_governs_vms_registered_before_it() {
    let lab = lab();
    let guest = lab.chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let debug_guest = lab.chip.launch(GuestLaunch {
        measurement: GOOD,
        policy: 0x3_001f | (1 << 19),
        ..Default::default()
    });
    // Before: a floor that allowed debug guests and had no Milan minimum.
    let mut old = Floor {
        allow_debug: true,
        ..Floor::default()
    };
    old.minimum_tcb.remove(&Product::Milan);
    {
        let (kbs, b) = broker(&lab, old).await;
        kbs.register(&order(&lab, "vm-1", ""), now()).await.unwrap();
        let debug_ok = "version = 1\n[guest_policy]\nallow_debug = true\n";
        kbs.register(&order(&lab, "vm-debug", debug_ok), now())
            .await
            .unwrap();
        fetch(&b, "vm-1", &guest).await.unwrap();
        fetch(&b, "vm-debug", &debug_guest).await.unwrap();
    }
    // After a restart with a raised floor: the built-in one (no debug) with Milan's SNP SPL
    // above what this chip runs.
    let mut raised = Floor::default();
    let snp = lab.chip.config.current_tcb.snp;
    raised.minimum_tcb.insert(
        Product::Milan,
        TcbMinimum {
            snp: Some(snp + 1),
            ..Default::default()
        },
    );
    let (_kbs, b) = broker(&lab, raised).await;
    let r = denied(fetch(&b, "vm-1", &guest).await);
    assert!(r.contains(&"tcb_below_minimum".to_string()), "{r:?}");
    let r = denied(fetch(&b, "vm-debug", &debug_guest).await);
    assert!(r.contains(&"policy_flag_forbidden".to_string()), "{r:?}");
    // The built-in floor releases vm-1's genuine report: the denial above is the raised TCB.
    let (_kbs, b) = broker(&lab, Floor::default()).await;
    fetch(&b, "vm-1", &guest).await.unwrap();
}

/// Through the real binary: `init` writes the strict floor into kbs.toml, `vm register`
/// refuses an order whose policy allows debug, and the floor widened in kbs.toml admits it.
#[test]
fn the_written_floor_refuses_a_debug_order_and_widening_it_admits_it() {
    use common::{kbs, ok, sign_allowlist};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--metrics-listen", "none"])
            .output()
            .unwrap(),
        "init",
    );
    let cfg = d.join("kbs.toml");
    let written = std::fs::read_to_string(&cfg).unwrap();
    assert!(written.contains("floor.allow_debug = false"), "{written}");
    assert!(written.contains("floor.minimum_tcb.milan"), "{written}");
    let image = hex::encode(GOOD);
    sign_allowlist(&d, &image);
    std::fs::write(&cfg, format!("{written}allowlist = \"allowlist.signed\"\n")).unwrap();
    let policy = dir.path().join("debug.toml");
    std::fs::write(&policy, "version = 1\n[guest_policy]\nallow_debug = true\n").unwrap();
    let signed = dir.path().join("debug.signed");
    ok(
        kbs()
            .args(["order", "register", "--key"])
            .arg(d.join("operator.key"))
            .args([
                "--vm-id",
                "vm-debug",
                "--tenant",
                "t",
                "--measurement",
                &image,
            ])
            .args(["--chip-id", &"ab".repeat(64), "--policy"])
            .arg(&policy)
            .arg("--out")
            .arg(&signed)
            .output()
            .unwrap(),
        "order register",
    );
    let register = || {
        kbs()
            .args(["vm", "register"])
            .arg(&signed)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = register();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a debug order was registered");
    assert!(
        err.contains("less than the broker's floor") && err.contains("allow_debug"),
        "{err}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("floor.allow_debug = false", "floor.allow_debug = true"),
    )
    .unwrap();
    ok(register(), "vm register under a widened floor");
}

/// Raising the floor of a serving broker takes effect at its next release (no restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_raised_while_serving_stops_the_next_release() {
    let lab = lab();
    let guest = lab.chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let (kbs, b) = broker(&lab, Floor::default()).await;
    kbs.register(&order(&lab, "vm-1", ""), now()).await.unwrap();
    fetch(&b, "vm-1", &guest).await.unwrap();
    let mut raised = Floor::default();
    raised.minimum_tcb.insert(
        Product::Milan,
        TcbMinimum {
            microcode: Some(lab.chip.config.current_tcb.microcode + 1),
            ..Default::default()
        },
    );
    assert!(kbs.set_floor(raised));
    let r = denied(fetch(&b, "vm-1", &guest).await);
    assert!(r.contains(&"tcb_below_minimum".to_string()), "{r:?}");
    assert!(kbs.set_floor(Floor::default()));
    fetch(&b, "vm-1", &guest).await.unwrap();
}

/// `serve` follows kbs.toml's floor: an edit is picked up without a restart, and a broken
/// file leaves the floor in force.
#[test]
fn serve_follows_the_floor_in_kbs_toml() {
    use common::{free_port, kbs, ok, start};
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let listen = format!("127.0.0.1:{}", free_port());
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &listen, "--metrics-listen", "none"])
            .output()
            .unwrap(),
        "init",
    );
    let cfg = d.join("kbs.toml");
    let written = std::fs::read_to_string(&cfg).unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut server = start(&cfg, log.clone());
    let wait_for = |what: &str| {
        for _ in 0..100 {
            if log.lock().unwrap().contains(what) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    };
    std::fs::write(&cfg, format!("{written}not toml ==\n")).unwrap();
    let broken = wait_for("the policy floor in force stays");
    std::fs::write(&cfg, written.replace("snp = 24,", "snp = 30,")).unwrap();
    let changed = wait_for("policy floor changed");
    let _ = server.kill();
    let _ = server.wait();
    assert!(broken, "{}", log.lock().unwrap());
    assert!(changed, "{}", log.lock().unwrap());
}
