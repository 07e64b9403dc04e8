//! The host agent daemon, in process, on the real libvirt test driver (`test:///default`),
//! talking to a real key broker over QUIC with a host client certificate, with its clock in the
//! test's hands so hours can close without waiting: the launch gate before every start, order
//! relay, lifecycle, metering across hour boundaries and a restart, the credit check, terminate.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use host_agent::config::HostConfig;
use host_agent::control::{ControlRequest as R, ControlResponse};
use host_agent::daemon::{Clock, Daemon};
use host_agent::usage::HOUR;
use kbs::keys::FileKek;
use kbs::service::{Kbs, Role, TlsIdentity, issue_client_cert, serve};
use kbs::store::{SqliteStore, Store as _};
use proto::order::{Allowlist, Billing, ORDER_VERSION};
use serde_bytes::ByteBuf;
use snp::{Verifier, VerifierConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod common;
use common::{digest, spec};

fn real_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

struct Fixture {
    dir: tempfile::TempDir,
    operator: Ed25519KeyPair,
    chip_id: Vec<u8>,
    clock: Arc<AtomicU64>,
    kbs: Arc<Kbs>,
    config: PathBuf,
}

impl Fixture {
    fn clock(&self) -> Clock {
        let c = self.clock.clone();
        Arc::new(move || c.load(Ordering::SeqCst))
    }

    fn set(&self, t: u64) {
        self.clock.store(t, Ordering::SeqCst);
    }

    fn register(&self, vm_id: &str, spec: &str, chip: &[u8], billing: Option<Billing>) -> Vec<u8> {
        common::register_order(&self.operator, vm_id, spec, chip, billing)
    }

    fn terminate(&self, vm_id: &str) -> Vec<u8> {
        common::terminate_order(&self.operator, vm_id)
    }

    async fn open(&self) -> Arc<Daemon> {
        Daemon::open(HostConfig::load(&self.config).unwrap(), self.clock())
            .await
            .unwrap()
    }
}

/// A broker on loopback (SQLite, its allowlist holding `images`), a host client certificate
/// from its CA, and a host.toml pointing at it with `extra` appended.
async fn fixture(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = [digest(&spec(d, "probe"))];
    let operator = Ed25519KeyPair::generate().unwrap();
    let offline = Ed25519KeyPair::generate().unwrap();
    let kbs = Arc::new(Kbs::new(
        SqliteStore::open(&d.join("kbs.db")).await.unwrap(),
        Verifier::new(VerifierConfig::default()),
        proto::ResponseKey::generate().unwrap(),
        Box::new(FileKek::create(&d.join("kek")).unwrap()),
        vec![pk(&operator)],
        30,
    ));
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: images.iter().map(|m| ByteBuf::from(m.to_vec())).collect(),
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), real_now())
        .await
        .unwrap();
    let tls = TlsIdentity::generate("kbs.test").unwrap();
    let endpoint = kbs::service::server_endpoint(
        tls.server_config().unwrap(),
        (std::net::Ipv4Addr::LOCALHOST, 0).into(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(serve(endpoint, kbs.clone(), real_now));
    let (cert, key) = issue_client_cert(&tls.ca_key_pem, "miner-1", Role::Host).unwrap();
    std::fs::write(d.join("tls-ca.crt"), &tls.ca_pem).unwrap();
    std::fs::write(d.join("host.crt"), cert).unwrap();
    std::fs::write(d.join("host.key"), key.as_bytes()).unwrap();
    let config = d.join("host.toml");
    let broker = format!(
        "[platform]\nkind = \"simulator\"\nchip = 3\n\
         [kbs]\naddress = \"{addr}\"\nserver_name = \"kbs.test\"\nca = \"tls-ca.crt\"\n\
         client_cert = \"host.crt\"\nclient_key = \"host.key\"\n{extra}"
    );
    std::fs::write(&config, common::host_toml(&operator, &broker)).unwrap();
    Fixture {
        dir,
        operator,
        chip_id: common::chip_id("milan", 3),
        clock: Arc::new(AtomicU64::new(0)),
        kbs,
        config,
    }
}

fn ok(r: ControlResponse) -> serde_json::Value {
    assert!(r.ok, "{:?}", r.error);
    r.result.unwrap()
}

fn refused(r: ControlResponse) -> String {
    assert!(!r.ok, "expected a refusal, got {:?}", r.result);
    r.error.unwrap()
}

fn state_of(list: &serde_json::Value, vm: &str) -> Option<String> {
    list.as_array()?
        .iter()
        .find(|r| r["vm_id"] == vm)
        .map(|r| r["state"].as_str().unwrap_or("").to_string())
}

/// The start of the hour `n` hours from now (each test has its own outbox).
fn hour(n: u64) -> u64 {
    (real_now() / HOUR + n) * HOUR
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_relay_lifecycle_metering_restart_and_terminate() {
    let alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
    let f = fixture("").await;
    let d = f.dir.path();
    let s = spec(d, "vm-d1");
    let h0 = hour(2);
    f.set(h0 + 600);
    let agent = f.open().await;
    let billing = Some(Billing {
        account: alice.into(),
        rate_per_hour: 3600,
    });

    // An order for another chip is refused before anything is defined or registered.
    let e = refused(
        agent
            .handle(R::Create {
                spec: s.clone(),
                order: b64(&f.register("vm-d1", &s, &[0x42; 64], billing.clone())),
                start: true,
            })
            .await,
    );
    assert!(e.contains("not among the order's 1 chip id"), "{e}");
    // An order for a different image: the launch gate refuses.
    let other = s.replace("console=ttyS0", "console=ttyS1");
    let e = refused(
        agent
            .handle(R::Create {
                spec: s.clone(),
                order: b64(&f.register("vm-d1", &other, &f.chip_id, billing.clone())),
                start: true,
            })
            .await,
    );
    assert!(e.contains("launch gate") && e.contains("not among"), "{e}");
    // An order the operator did not sign: refused.
    let mut forged = f.register("vm-d1", &s, &f.chip_id, billing.clone());
    let n = forged.len();
    forged[n - 3] ^= 1;
    let e = refused(
        agent
            .handle(R::Create {
                spec: s.clone(),
                order: b64(&forged),
                start: true,
            })
            .await,
    );
    assert!(e.contains("launch gate"), "{e}");
    assert!(
        f.kbs.store.vm("vm-d1").await.unwrap().is_none(),
        "nothing registered"
    );

    // The right order: registered with the broker (over QUIC, as role host), defined, started.
    let v = ok(agent
        .handle(R::Create {
            spec: s.clone(),
            order: b64(&f.register("vm-d1", &s, &f.chip_id, billing.clone())),
            start: true,
        })
        .await);
    assert_eq!(v["state"], "running");
    assert_eq!(v["broker"], "registered with the broker");
    assert_eq!(v["measurement"], hex::encode(digest(&s)));
    assert!(
        f.kbs.store.vm("vm-d1").await.unwrap().is_some(),
        "registered"
    );
    // Invalid transitions say so.
    let e = refused(
        agent
            .handle(R::Start {
                vm_id: "vm-d1".into(),
            })
            .await,
    );
    assert!(e.contains("start") && e.contains("running"), "{e}");
    let e = refused(
        agent
            .handle(R::Stop {
                vm_id: "vm-nope".into(),
            })
            .await,
    );
    assert!(e.contains("no VM vm-nope"), "{e}");

    // The hour closes: 3000 s billed at 3600/h.
    f.set(h0 + HOUR + 5);
    let t = agent.tick().await.unwrap();
    assert_eq!(t.closed, vec![h0 / HOUR]);
    let recs = agent.outbox().records().await.unwrap();
    let r = recs.iter().find(|r| r.period == h0 / HOUR).unwrap();
    assert_eq!((r.account.as_str(), r.total), (alice, 3000));

    // Stopped 1800 s into the next hour; started again after a spec file changed on disk:
    // the gate runs again and refuses.
    f.set(h0 + HOUR + 1800);
    assert_eq!(
        ok(agent
            .handle(R::Stop {
                vm_id: "vm-d1".into()
            })
            .await)["state"],
        "stopped"
    );
    let kernel = d.join("vmlinuz");
    std::fs::write(&kernel, vec![0x5b; 100_000]).unwrap();
    let e = refused(
        agent
            .handle(R::Start {
                vm_id: "vm-d1".into(),
            })
            .await,
    );
    assert!(e.contains("launch gate"), "{e}");
    std::fs::write(&kernel, vec![0x5a; 100_000]).unwrap();
    f.set(h0 + HOUR + 2400);
    ok(agent
        .handle(R::Start {
            vm_id: "vm-d1".into(),
        })
        .await);

    // The agent goes away; the VM is powered off behind its back; the agent comes back: the
    // stop it did not see is dated at its last heartbeat.
    f.set(h0 + HOUR + 3000);
    agent.tick().await.unwrap(); // heartbeat
    drop(agent);
    {
        let h = host_agent::host::Host::open(
            "test:///default",
            Some(host_agent::domain::SevParams {
                cbitpos: 51,
                reduced_phys_bits: 1,
            }),
        )
        .unwrap();
        h.act("vm-d1", host_agent::lifecycle::Action::Stop).unwrap();
    }
    f.set(h0 + 2 * HOUR + 100);
    let agent = f.open().await;
    let list = ok(agent.handle(R::List).await);
    assert_eq!(state_of(&list, "vm-d1").as_deref(), Some("stopped"));
    let t = agent.tick().await.unwrap();
    assert_eq!(t.closed, vec![h0 / HOUR + 1]);
    let recs = agent.outbox().records().await.unwrap();
    let r = recs.iter().find(|r| r.period == h0 / HOUR + 1).unwrap();
    // 1800 s, then 2400 → 3000 (the heartbeat) = 600 s: 2400 in all.
    assert_eq!(r.total, 2400);

    // Terminate: a register order is not a terminate order; the operator's terminate order
    // shreds the key at the broker, then the domain and its disk go.
    let e = refused(
        agent
            .handle(R::Terminate {
                vm_id: "vm-d1".into(),
                order: b64(&f.register("vm-d1", &s, &f.chip_id, None)),
            })
            .await,
    );
    assert!(e.contains("terminate refused"), "{e}");
    let v = ok(agent
        .handle(R::Terminate {
            vm_id: "vm-d1".into(),
            order: b64(&f.terminate("vm-d1")),
        })
        .await);
    assert_eq!(v["broker"], "key crypto-shredded by the broker");
    assert!(!d.join("vm-d1.img").exists(), "disk wiped and removed");
    let list = ok(agent.handle(R::List).await);
    assert_eq!(state_of(&list, "vm-d1"), None);
    let vm = f.kbs.store.vm("vm-d1").await.unwrap().unwrap();
    assert!(vm.state.terminated, "the broker holds a tombstone");
    assert!(vm.wrapped_key.is_none(), "the key is shredded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_check_stops_accounts_that_cannot_pay() {
    let script = std::env::temp_dir().join(format!("attesta-credit-{}.sh", std::process::id()));
    // "broke" cannot pay; anyone else can.
    std::fs::write(
        &script,
        "#!/bin/sh\nif [ \"$1\" = broke ]; then echo \"balance 0 < $2\"; exit 1; fi\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = fixture(&format!(
        "[credit]\nkind = \"command\"\nargv = [\"{}\"]\n",
        script.display()
    ))
    .await;
    let d = f.dir.path();
    let h0 = hour(2);
    f.set(h0 + 10);
    let agent = f.open().await;
    for (vm, account) in [("vm-c1", "rich"), ("vm-c2", "broke")] {
        let s = spec(d, vm);
        let billing = Some(Billing {
            account: account.into(),
            rate_per_hour: 100,
        });
        let order = f.register(vm, &s, &f.chip_id, billing);
        let r = agent
            .handle(R::Create {
                spec: s,
                order: b64(&order),
                start: true,
            })
            .await;
        if account == "broke" {
            // Defined, but not started: the credit check refuses the launch.
            let e = refused(r);
            assert!(
                e.contains("account broke cannot pay: balance 0 < 100"),
                "{e}"
            );
        } else {
            assert_eq!(ok(r)["state"], "running");
        }
    }
    let list = ok(agent.handle(R::List).await);
    assert_eq!(state_of(&list, "vm-c2").as_deref(), Some("stopped"));
    // A VM started while its account could pay, then the account runs dry: at the hour's
    // close it is stopped, and the list says why.
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"no credit left for $1\"; exit 1\n",
    )
    .unwrap();
    f.set(h0 + HOUR + 1);
    let t = agent.tick().await.unwrap();
    assert_eq!(t.stopped.len(), 1, "{t:?}");
    assert_eq!(t.stopped[0].0, "vm-c1");
    let list = ok(agent.handle(R::List).await);
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vm_id"] == "vm-c1")
        .unwrap()
        .clone();
    assert_eq!(row["state"], "stopped");
    assert!(
        row["stop_reason"]
            .as_str()
            .unwrap()
            .contains("account rich cannot pay: no credit left for rich"),
        "{row}"
    );
    // Its hour was billed up to the close (3590 s at 100/h = 99).
    let r = agent.outbox().records().await.unwrap();
    assert_eq!(r.iter().find(|r| r.account == "rich").unwrap().total, 99);
    for vm in ["vm-c1", "vm-c2"] {
        ok(agent
            .handle(R::Terminate {
                vm_id: vm.into(),
                order: b64(&f.terminate(vm)),
            })
            .await);
    }
    let _ = std::fs::remove_file(&script);
}

/// With the chain unreachable: the credit check cannot be made and `on_error = "keep"` keeps
/// the VM running; the hour's usage waits in the outbox and retries back off (5 s, then 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_chain_keeps_vms_and_backs_off() {
    let secret = "[billing]\nchain = \"ws://127.0.0.1:1\"\nsigner_file = \"billing.secret\"\n\
                  [credit]\nkind = \"chain-balance\"\non_error = \"keep\"\n";
    let f = fixture(secret).await;
    let d = f.dir.path();
    std::fs::write(d.join("billing.secret"), "//Alice\n").unwrap();
    let h0 = hour(2);
    f.set(h0 + 60);
    let agent = f.open().await;
    let s = spec(d, "vm-b1");
    let billing = Some(Billing {
        account: "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY".into(),
        rate_per_hour: 60,
    });
    let v = ok(agent
        .handle(R::Create {
            spec: s.clone(),
            order: b64(&f.register("vm-b1", &s, &f.chip_id, billing)),
            start: true,
        })
        .await);
    assert_eq!(v["state"], "running");
    f.set(h0 + HOUR);
    let t = agent.tick().await.unwrap();
    assert_eq!((t.closed.len(), t.stopped.len()), (1, 0), "{t:?}");
    assert!(agent.drain_if_due().await.is_err(), "chain unreachable");
    assert!(agent.drain_if_due().await.unwrap().is_none(), "backing off");
    f.set(h0 + HOUR + 5);
    assert!(agent.drain_if_due().await.is_err(), "retried after 5 s");
    f.set(h0 + HOUR + 10);
    assert!(
        agent.drain_if_due().await.unwrap().is_none(),
        "then waits 10 s"
    );
    f.set(h0 + HOUR + 15);
    assert!(agent.drain_if_due().await.is_err(), "retried after 10 s");
    let recs = agent.outbox().records().await.unwrap();
    assert_eq!(
        (recs.len(), recs[0].total, &recs[0].state),
        (1, 59, &host_agent::billing::State::Pending)
    );
    ok(agent
        .handle(R::Terminate {
            vm_id: "vm-b1".into(),
            order: b64(&f.terminate("vm-b1")),
        })
        .await);
}

/// `[capacity]`: a create beyond the host's vCPUs or the tenant's VM limit is refused with its
/// code before anything is registered or defined, and a stopped VM still holds its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_beyond_capacity_or_quota_are_refused_with_the_reason() {
    // Room for one 4-vCPU VM and a half; tenant-a may have two VMs.
    let f = fixture("[capacity]\nvcpus = 6\ntenants = { \"tenant-a\" = 2 }\n").await;
    let d = f.dir.path();
    f.set(real_now());
    let agent = f.open().await;
    let create = |vm: &str| {
        let s = spec(d, vm);
        R::Create {
            order: b64(&f.register(vm, &s, &f.chip_id, None)),
            spec: s,
            start: true,
        }
    };
    assert_eq!(
        ok(agent.handle(create("vm-cap1")).await)["state"],
        "running"
    );
    ok(agent
        .handle(R::Stop {
            vm_id: "vm-cap1".into(),
        })
        .await);
    // Stopped, vm-c1 still holds its 4 vCPUs: 4 more do not fit in 6.
    let e = refused(agent.handle(create("vm-cap2")).await);
    assert!(
        e.contains("capacity_vcpus: 4 vCPUs asked, 4 of 6 in use"),
        "{e}"
    );
    assert!(
        f.kbs.store.vm("vm-cap2").await.unwrap().is_none(),
        "not registered"
    );
    let list = ok(agent.handle(R::List).await);
    assert_eq!(state_of(&list, "vm-cap2"), None, "not defined");

    // Room for vCPUs, but the tenant's limit is one VM here.
    let f =
        fixture("[capacity]\nvcpus = 64\nmax_vms_per_tenant = 8\ntenants = { \"tenant-a\" = 1 }\n")
            .await;
    let d = f.dir.path();
    f.set(real_now());
    let agent = f.open().await;
    let create = |vm: &str| {
        let s = spec(d, vm);
        R::Create {
            order: b64(&f.register(vm, &s, &f.chip_id, None)),
            spec: s,
            start: false,
        }
    };
    ok(agent.handle(create("vm-quota1")).await);
    let e = refused(agent.handle(create("vm-quota2")).await);
    assert!(
        e.contains("tenant_quota: tenant tenant-a has 1 VM(s) here, its limit is 1"),
        "{e}"
    );
}
