//! Several real `attesta-kbs serve` processes on one real PostgreSQL database, under a boot
//! storm of guests that each know every replica's address:
//! - two and three replicas, one of them SIGKILLed at pseudo-random points and restarted, again
//!   and again: no nonce or boot is released twice, every release a guest received is in the
//!   one audit log, `audit verify` passes, and no VM loses its key;
//! - PostgreSQL itself crashed mid-storm: the brokers answer with signed `storage_unavailable`
//!   denials and `/readyz` says 503 meanwhile, none of them exits, and they serve again once it
//!   is back, without a restart.

mod common;

use common::fleet::{Fleet, guest};
use common::postgres::Cluster;
use common::{KillOnDrop, free_port, free_tcp_port, http_get};
use guest_agent::client::{Broker, ClientError, fetch};
use guest_agent::unlock::fetch_with_retry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VMS: usize = 12;

/// What guests received: (vm, boot counter, volume key).
type Received = Arc<Mutex<Vec<(String, u64, Vec<u8>)>>>;

/// The replicas of one deployment: their configs, processes and logs.
struct Replicas {
    fleet: Fleet,
    cfgs: Vec<PathBuf>,
    procs: Vec<Option<KillOnDrop>>,
    logs: Vec<Arc<Mutex<String>>>,
    brokers: Vec<Broker>,
    /// The database servers (kept running until the end).
    db: Vec<Cluster>,
}

impl Replicas {
    /// `n` replicas of one deployment on a fresh cluster; `edit` applies to every `kbs.toml`.
    fn start(seed: &str, n: usize, edit: impl FnOnce(String) -> String) -> Option<Replicas> {
        let db = Cluster::start()?;
        let url = db.url("postgres");
        Some(Self::start_on(seed, n, &url, vec![db], edit))
    }

    /// `n` replicas of one deployment on the database `url` names (served by `db`).
    fn start_on(
        seed: &str,
        n: usize,
        url: &str,
        db: Vec<Cluster>,
        edit: impl FnOnce(String) -> String,
    ) -> Replicas {
        let listens: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        // Frequent checkpoints, so kills also land around checkpoint writes.
        let fleet = Fleet::new(seed, &listens[0], VMS, |t| {
            let t = t
                .replace("database = \"kbs.db\"", &format!("database = {url:?}"))
                .replace("checkpoint_every = 1000", "checkpoint_every = 7");
            assert!(t.contains(url), "kbs.toml names the database");
            edit(t)
        });
        let mut cfgs = vec![fleet.cfg.clone()];
        cfgs.extend((1..n).map(|i| fleet.replica_config(i, &listens[i])));
        let brokers = listens
            .iter()
            .map(|l| fleet.broker_at(l.parse().unwrap()))
            .collect();
        let mut r = Replicas {
            fleet,
            cfgs,
            procs: (0..n).map(|_| None).collect(),
            logs: (0..n).map(|_| Arc::default()).collect(),
            brokers,
            db,
        };
        for i in 0..n {
            r.launch(i);
        }
        r
    }

    fn launch(&mut self, i: usize) {
        self.procs[i] = Some(KillOnDrop(common::start(
            &self.cfgs[i],
            self.logs[i].clone(),
        )));
    }

    /// SIGKILL, reaped.
    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.0.kill().unwrap();
            p.0.wait().unwrap();
        }
    }

    /// Replica 0's `/readyz` (on `port`) says 200 within `limit`; else fails with its last
    /// answer and the replica's log.
    fn ready_within(&self, port: u16, limit: Duration, when: &str) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let got = http_get(port, "/readyz");
            if got.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not ready {when}: {got}\nreplica 0's log:\n{}",
                self.logs[0].lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every replica is still running (none exited on its own).
    fn all_alive(&mut self) {
        for (i, p) in self.procs.iter_mut().enumerate() {
            let p = p.as_mut().expect("running");
            assert!(
                p.0.try_wait().unwrap().is_none(),
                "replica {i} exited: {}",
                self.logs[i].lock().unwrap()
            );
        }
    }

    /// Guests booting again and again, each trying the replicas in turn.
    fn storm(&self, rt: &tokio::runtime::Runtime, received: &Received) -> Storm {
        let failed: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..VMS)
            .map(|i| {
                let (chip, brokers, received, failed) = (
                    self.fleet.chip.clone(),
                    self.brokers.clone(),
                    received.clone(),
                    failed.clone(),
                );
                rt.spawn(async move {
                    let vm = format!("vm-{i}");
                    loop {
                        let got = fetch_with_retry(
                            &brokers,
                            &vm,
                            &guest(&chip),
                            // Longer than the idle timeout: a guest whose replica died after
                            // its evidence was sent waits that long, then asks the next.
                            Duration::from_secs(90),
                            None,
                        )
                        .await;
                        match got {
                            Ok(r) => received.lock().unwrap().push((
                                vm.clone(),
                                r.boot_counter,
                                r.volume_key.to_vec(),
                            )),
                            Err(e) => failed.lock().unwrap().push(format!("{vm}: {e}")),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Storm { tasks, failed }
    }

    /// After the storm: every VM gets its key from every replica — the key it always had — and
    /// the log holds every release answered, once.
    fn check(&self, rt: &tokio::runtime::Runtime, received: &Received) {
        let got = received.lock().unwrap().clone();
        assert!(
            got.len() >= VMS,
            "the storm released too little to test anything: {}",
            got.len()
        );
        let mut keys: HashMap<String, Vec<u8>> = HashMap::new();
        rt.block_on(async {
            for broker in &self.brokers {
                for i in 0..VMS {
                    let vm = format!("vm-{i}");
                    // An aborted guest's evidence may still be in a broker's hands (its commit
                    // waited out the outage): a release of ours that loses to it is denied
                    // `vm_changed`, as it must be, and is asked for again.
                    let mut tries = 0;
                    let r = loop {
                        match fetch(broker, &vm, &guest(&self.fleet.chip)).await {
                            Err(ClientError::Denied(why)) if why == ["vm_changed"] && tries < 5 => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            r => {
                                break r.unwrap_or_else(|e| panic!("{vm} at {}: {e}", broker.addr));
                            }
                        }
                    };
                    let key = keys.entry(vm.clone()).or_insert(r.volume_key.to_vec());
                    assert_eq!(*key, r.volume_key.to_vec(), "{vm}: replicas disagree");
                }
            }
        });
        for (vm, _, key) in &got {
            assert_eq!(&keys[vm], key, "{vm} lost or changed its key");
        }
        let answered: Vec<(String, u64)> = got.iter().map(|(v, b, _)| (v.clone(), *b)).collect();
        let logged = self.fleet.check_audit(&answered);
        eprintln!("{} releases answered; {logged} in the one log", got.len());
    }
}

/// The guests of a storm, and the boots that failed (a guest that got its key from no replica
/// within its timeout).
struct Storm {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    failed: Arc<Mutex<Vec<String>>>,
}

impl Storm {
    /// Ends the storm; every boot in it got its key.
    fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let failed = self.failed.lock().unwrap();
        assert!(failed.is_empty(), "boots failed: {failed:?}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The storm with one replica SIGKILLed and restarted `rounds` times.
fn kills(n: usize, rounds: usize) {
    let Some(mut r) = Replicas::start(&format!("replicas-{n}"), n, |t| t) else {
        return;
    };
    let rt = runtime();
    let received: Received = Arc::default();
    let storm = r.storm(&rt, &received);
    // A fixed pseudo-random schedule of kill points and victims (reproducible failures).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ n as u64;
    for round in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (at, victim) = (200 + x % 900, (x >> 32) as usize % n);
        std::thread::sleep(Duration::from_millis(at));
        let before = received.lock().unwrap().len();
        r.kill(victim);
        std::thread::sleep(Duration::from_millis(100 + x % 400));
        r.launch(victim);
        eprintln!("round {round}: replica {victim} killed after {at} ms; {before} releases so far");
    }
    std::thread::sleep(Duration::from_millis(500));
    storm.stop();
    r.all_alive();
    // The replicas served at once: each released keys in this storm.
    for (i, log) in r.logs.iter().enumerate() {
        assert!(
            log.lock().unwrap().contains("key released"),
            "replica {i} released nothing"
        );
    }
    r.check(&rt, &received);
}

#[test]
fn two_replicas_one_killed_again_and_again() {
    kills(2, 6);
}

#[test]
fn three_replicas_one_killed_again_and_again() {
    kills(3, 6);
}

/// PostgreSQL crashes mid-storm and comes back: meanwhile a replica denies with a signed
/// `storage_unavailable` and is not ready; afterwards both serve again without a restart.
#[test]
fn postgres_restarted_mid_storm() {
    let metrics = free_tcp_port();
    let Some(mut r) = Replicas::start("replicas-pg-restart", 2, |t| {
        t.replace(
            "# metrics_listen = \"127.0.0.1:9464\"",
            &format!("metrics_listen = \"127.0.0.1:{metrics}\""),
        )
    }) else {
        return;
    };
    r.ready_within(metrics, Duration::from_secs(30), "at start");
    let rt = runtime();
    let received: Received = Arc::default();
    let storm = r.storm(&rt, &received);
    std::thread::sleep(Duration::from_millis(800));

    r.db[0].crash();
    let during = received.lock().unwrap().len();
    // Every replica, asked directly: a signed denial that says only that, no release.
    for broker in &r.brokers {
        let got = rt.block_on(fetch(broker, "vm-0", &guest(&r.fleet.chip)));
        match got {
            Err(ClientError::Denied(reasons)) => {
                assert_eq!(reasons, ["storage_unavailable"], "{}", broker.addr)
            }
            other => panic!("{}: while the database is down: {other:?}", broker.addr),
        }
    }
    let ready = http_get(metrics, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    std::thread::sleep(Duration::from_millis(1500));
    r.all_alive();
    assert!(
        received.lock().unwrap().len() <= during + VMS,
        "releases went on while the database was down"
    );

    r.db[0].start_again().unwrap();
    // Back without a restart: ready again, and the storm goes on.
    r.ready_within(
        metrics,
        Duration::from_secs(30),
        "after the database came back",
    );
    let back = received.lock().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().len() < back + VMS {
        assert!(
            std::time::Instant::now() < deadline,
            "the storm did not resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    storm.stop();
    r.all_alive();
    for (i, log) in r.logs.iter().enumerate() {
        assert!(
            !log.lock().unwrap().contains("panicked"),
            "replica {i} panicked"
        );
    }
    r.check(&rt, &received);
}

/// A primary with a synchronous standby; the brokers are given both, read-write only. The
/// primary is killed mid-storm and the standby promoted: the brokers move to it on their own,
/// the storm goes on, and every release a guest was answered is in the promoted database.
#[test]
fn standby_promoted_mid_storm() {
    let Some(primary) = Cluster::start() else {
        return;
    };
    let standby = primary.sync_standby("standby1");
    // libpq's multi-host form: both servers' sockets, the one taking writes wanted.
    let url = format!(
        "{},{}&target_session_attrs=read-write",
        primary.url("postgres"),
        standby.url("postgres").split("?host=").nth(1).unwrap()
    );
    let mut r = Replicas::start_on("replicas-promote", 2, &url, vec![primary, standby], |t| t);
    let rt = runtime();
    let received: Received = Arc::default();
    let storm = r.storm(&rt, &received);
    std::thread::sleep(Duration::from_millis(1000));

    r.db[0].crash();
    let at_crash = received.lock().unwrap().len();
    assert!(
        at_crash >= VMS,
        "too few releases before the crash: {at_crash}"
    );
    std::thread::sleep(Duration::from_millis(500));
    r.db[1].promote();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while received.lock().unwrap().len() < at_crash + 2 * VMS {
        assert!(
            std::time::Instant::now() < deadline,
            "the storm did not resume on the promoted standby"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    storm.stop();
    r.all_alive();
    for (i, log) in r.logs.iter().enumerate() {
        assert!(
            log.lock().unwrap().contains("database server switched"),
            "replica {i} did not follow the promotion"
        );
    }
    // Read back from the promoted standby alone (the old primary is gone).
    r.check(&rt, &received);
}

/// Hosts and operator tools pass over a replica that is down: `vm register --kbs DOWN,UP`
/// reaches the one that is up; with none up, the error names each.
#[test]
fn operator_tools_pass_over_a_replica_that_is_down() {
    let Some(mut r) = Replicas::start("replicas-tools", 2, |t| t) else {
        return;
    };
    let d = r.fleet.d.clone();
    let certs = r.fleet.dir.path().join("certs");
    common::ok(
        common::kbs()
            .args(["cert", "issue", "--ca-key"])
            .arg(d.join("tls-ca.key"))
            .args(["--name", "miner-1", "--role", "host", "--out-dir"])
            .arg(&certs)
            .output()
            .unwrap(),
        "cert issue",
    );
    let order = r.fleet.dir.path().join("order-extra");
    common::ok(
        common::kbs()
            .args(["order", "register", "--key"])
            .arg(d.join("operator.key"))
            .args(["--vm-id", "vm-extra", "--tenant", "t"])
            .args(["--measurement", &hex::encode(common::fleet::IMAGE)])
            .args([
                "--chip-id",
                &hex::encode(r.fleet.chip.config.chip_id),
                "--out",
            ])
            .arg(&order)
            .output()
            .unwrap(),
        "order register",
    );
    let register = |list: &str| {
        common::kbs()
            .args(["vm", "register"])
            .arg(&order)
            .args(["--kbs", list, "--ca"])
            .arg(d.join("tls-ca.crt"))
            .arg("--cert")
            .arg(certs.join("miner-1.crt"))
            .arg("--key")
            .arg(certs.join("miner-1.key"))
            .output()
            .unwrap()
    };
    r.kill(0);
    let (down, up) = (r.brokers[0].addr.to_string(), r.brokers[1].addr.to_string());
    let out = common::ok(register(&format!("{down},{up}")), "register via the list");
    assert_eq!(out.trim(), "registered vm-extra");
    r.kill(1);
    let out = register(&format!("{down},{up}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&down) && err.contains(&up), "{err}");
}

/// `attesta-sim load --store postgres://… --replicas 2`: a storm against two real broker
/// processes on one database, every boot released, the JSON saying what ran.
#[test]
fn load_against_two_replicas_on_postgres() {
    let Some(db) = Cluster::start() else {
        return;
    };
    let sim = common::sibling("attesta-sim");
    assert!(
        sim.exists(),
        "{} is missing: cargo build -p attesta-sim",
        sim.display()
    );
    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&sim)
        .args([
            "load",
            "--vms",
            "60",
            "--registered",
            "150",
            "--chips",
            "3",
            "--json",
        ])
        .args(["--store", &db.url("postgres"), "--replicas", "2"])
        .arg("--kbs-bin")
        .arg(common::sibling("attesta-kbs"))
        .env("ATTESTA_SIM_STATE", state.path())
        .output()
        .unwrap();
    let text = common::ok(out, "attesta-sim load");
    let j: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(j["store"], "postgres", "{j}");
    assert_eq!(j["replicas"], 2, "{j}");
    assert_eq!(j["broker"], "processes", "{j}");
    assert_eq!(
        (j["released"].as_u64(), j["failed"].as_u64()),
        (Some(60), Some(0)),
        "{j}"
    );
    assert_eq!(j["registered"], 150, "{j}");
    let rss = j["broker_peak_rss_mib"].as_array().unwrap();
    assert_eq!(rss.len(), 2, "{j}");
    assert!(rss.iter().all(|m| m.as_f64().unwrap() > 1.0), "{j}");
    assert!(
        j["broker_cpu_us"]["per_release"].as_f64().unwrap() > 0.0,
        "{j}"
    );
    // Both replicas wrote to the one database: every storm boot and warm-up is in its log.
    let releases = db.psql("SELECT count(*) FROM audit WHERE entry LIKE '%\"release\"%'");
    assert_eq!(
        releases.trim(),
        "62",
        "60 storm boots and one warm-up per replica"
    );
}

/// `attesta-sim demo --store postgres://… --replicas 3`: the whole demo with its fleet's broker
/// as three replicas on one database, one stopped halfway through the second boots (seen
/// refusing a guest) where a later guest starts; that guest passes over it, every VM still
/// unlocks, the stopped replica releases nothing more, another replica still serving denies the
/// terminated VM, every attack is denied, and the releases are in the one database's log.
#[test]
fn demo_on_three_replicas_one_stopped() {
    let Some(db) = Cluster::start() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let demo = |store: &str, replicas: &str| {
        std::process::Command::new(common::sibling("attesta-sim"))
            .args(["demo", "--vms", "6", "--real-vms", "0", "--json"])
            .args(["--store", store, "--replicas", replicas])
            .env("ATTESTA_SIM_STATE", state.path())
            .output()
            .unwrap()
    };
    let url = db.url("postgres");
    let text = common::ok(demo(&url, "3"), "attesta-sim demo");
    let j: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(
        (&j["store"], &j["replicas"]),
        (&"postgres".into(), &3.into())
    );
    assert_eq!(j["replica_stopped_mid_boot"], true, "{j}");
    assert!(j["failed_over"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(j["released_by_stopped_after_stop"], 0, "{j}");
    let per: Vec<u64> = j["replica_releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), 3, "{j}");
    assert!(per.iter().filter(|n| **n > 0).count() >= 2, "{j}");
    assert_eq!(j["unlocked"], 6, "{j}");
    let on_another = j["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == "live-terminated-vm-on-another-replica")
        .collect::<Vec<_>>();
    assert_eq!(on_another.len(), 1, "{j}");
    assert_eq!(on_another[0]["reason"], "vm_terminated", "{j}");
    // Every release any replica made is in the one database's log.
    let releases = db.psql("SELECT count(*) FROM audit WHERE entry LIKE '%\"release\"%'");
    assert_eq!(
        releases.trim().parse::<u64>().unwrap(),
        per.iter().sum::<u64>(),
        "{j}"
    );
    // The same database again: not empty, refused up front.
    let out = demo(&url, "1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not empty"), "{err}");
    // Several replicas need PostgreSQL; the count is bounded.
    for (store, replicas, why) in [
        ("sqlite", "2", "several replicas need PostgreSQL"),
        (url.as_str(), "9", "--replicas must be between 1 and 8"),
        (
            "mysql://x",
            "1",
            "--store must be `sqlite` or a postgres:// URL",
        ),
    ] {
        let out = demo(store, replicas);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{store} ×{replicas}: {err}");
    }
}

/// `vm register FOLDER`: every order in it registered concurrently; a bad one is reported by
/// name and the others still registered; registering them again refuses each.
#[test]
fn bulk_registration_reports_each_failure() {
    let fleet = Fleet::new("bulk", "127.0.0.1:1", 0, |t| t);
    let orders = fleet.dir.path().join("orders");
    std::fs::create_dir_all(&orders).unwrap();
    for i in 0..5 {
        common::ok(
            common::kbs()
                .args(["order", "register", "--key"])
                .arg(fleet.d.join("operator.key"))
                .args(["--vm-id", &format!("bulk-{i}"), "--tenant", "t"])
                .args(["--measurement", &hex::encode(common::fleet::IMAGE)])
                .args([
                    "--chip-id",
                    &hex::encode(fleet.chip.config.chip_id),
                    "--out",
                ])
                .arg(orders.join(format!("o{i}")))
                .output()
                .unwrap(),
            "order register",
        );
    }
    std::fs::write(orders.join("o9-garbage"), b"not an order").unwrap();
    let register = || {
        common::kbs()
            .args(["vm", "register"])
            .arg(&orders)
            .arg("--config")
            .arg(&fleet.cfg)
            .output()
            .unwrap()
    };
    let out = register();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "registered 5 VMs (1 failed)"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("o9-garbage") && err.lines().count() == 1,
        "{err}"
    );
    let again = register();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "registered 0 VMs (6 failed)"
    );
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("already exists").count(), 5, "{err}");
}

/// Two servers that both take writes (a split brain: a failed primary back beside the promoted
/// one) are refused: the broker serves from neither. Several hosts without
/// `target_session_attrs=read-write` are refused too.
#[test]
fn two_writable_servers_are_refused() {
    let (Some(a), Some(b)) = (Cluster::start(), Cluster::start()) else {
        return;
    };
    let both = format!(
        "{},{}",
        a.url("postgres"),
        b.url("postgres").split("?host=").nth(1).unwrap()
    );
    for (url, why) in [
        (
            format!("{both}&target_session_attrs=read-write"),
            "split brain",
        ),
        (both.clone(), "need target_session_attrs=read-write"),
    ] {
        let fleet = Fleet::new("split", "127.0.0.1:1", 0, |t| {
            t.replace("database = \"kbs.db\"", &format!("database = {url:?}"))
        });
        let mut serve = common::kbs()
            .args(["serve", "--config"])
            .arg(&fleet.cfg)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while serve.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                serve.kill().unwrap();
                panic!("serve started on {url}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = serve.wait_with_output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{url}: {err}");
    }
}

/// A second server that takes writes appears while the broker serves (a failed primary back
/// beside the promoted one): within the watcher's round of every host, the broker stops
/// writing — a signed `storage_unavailable`, not a release from one of two histories.
#[test]
fn a_second_writable_server_stops_the_writes() {
    let (Some(a), Some(b)) = (Cluster::start(), Cluster::start()) else {
        return;
    };
    b.crash();
    let url = format!(
        "{},{}&target_session_attrs=read-write",
        a.url("postgres"),
        b.url("postgres").split("?host=").nth(1).unwrap()
    );
    let r = Replicas::start_on("replicas-split-late", 1, &url, vec![a, b], |t| t);
    let rt = runtime();
    let boot = |vm: &str| {
        rt.block_on(async {
            let g = guest(&r.fleet.chip);
            tokio::time::timeout(Duration::from_secs(10), fetch(&r.brokers[0], vm, &g)).await
        })
    };
    assert!(
        matches!(boot("vm-0"), Ok(Ok(_))),
        "serving from the one writable server"
    );
    r.db[1].start_again().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match boot("vm-1") {
            Ok(Err(ClientError::Denied(reasons))) if reasons == ["storage_unavailable"] => break,
            Ok(Ok(_)) => {}
            other => panic!("neither a release nor storage_unavailable: {other:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still writing with two writable servers"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        r.logs[0]
            .lock()
            .unwrap()
            .contains("no writes until one of the servers is gone")
    );
}
