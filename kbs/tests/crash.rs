//! Crash consistency: SIGKILL the real broker at pseudo-random points during a release storm,
//! restart it, and check that no nonce was ever accepted twice, that every release a guest
//! received is in the audit log (commit before emit), that no VM lost its key, and that the
//! audit log still verifies.

mod common;

use common::{free_port, kbs};
use guest_agent::client::{Broker, fetch};
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VMS: usize = 12;
const ROUNDS: usize = 6;

fn run(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What guests received: (vm, boot counter) → volume key.
type Received = Arc<Mutex<Vec<(String, u64, Vec<u8>)>>>;

/// Starts `serve`; its log is not examined here.
fn start(cfg: &std::path::Path) -> std::process::Child {
    common::start(cfg, Arc::default())
}

#[test]
fn sigkill_during_a_release_storm_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let pki = Arc::new(
        Pki::cached(
            snp::Product::Milan,
            &Seed::from_text("crash-test"),
            &dir.path().join("state"),
            |_| {},
        )
        .unwrap(),
    );
    let chip = Arc::new(Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap());
    std::fs::write(dir.path().join("ark.der"), &pki.ark.cert).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    run(kbs()
        .args(["init", "--dir"])
        .arg(&d)
        .args([
            "--listen",
            &listen,
            "--metrics-listen",
            "none",
            "--trust-root",
        ])
        .arg(dir.path().join("ark.der")));
    let image = hex::encode([0x4d; 48]);
    common::sign_allowlist(&d, &image);
    let cfg = d.join("kbs.toml");
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    // Frequent checkpoints, so kills also land around checkpoint writes.
    toml = toml.replace("checkpoint_every = 1000", "checkpoint_every = 7");
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(&cfg, toml).unwrap();
    for i in 0..VMS {
        let order = dir.path().join(format!("order-{i}"));
        run(kbs()
            .args(["order", "register", "--key"])
            .arg(d.join("operator.key"))
            .args(["--vm-id", &format!("vm-{i}"), "--tenant", "t"])
            .args(["--measurement", &image])
            .args(["--chip-id", &hex::encode(chip.config.chip_id), "--out"])
            .arg(&order));
        run(kbs()
            .args(["vm", "register"])
            .arg(&order)
            .arg("--config")
            .arg(&cfg));
    }
    let broker = Broker {
        addr: listen.parse().unwrap(),
        server_name: "kbs.attesta.local".into(),
        ca_der: snp::certs::pem_blocks(&std::fs::read(d.join("tls-ca.crt")).unwrap())
            .unwrap()
            .remove(0),
        response_key: hex::decode(
            std::fs::read_to_string(d.join("response.pub"))
                .unwrap()
                .trim(),
        )
        .unwrap()
        .try_into()
        .unwrap(),
    };

    let received: Received = Arc::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A fixed pseudo-random schedule of kill points (reproducible failures).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..ROUNDS {
        let mut server = start(&cfg);
        let tasks: Vec<_> = (0..VMS)
            .map(|i| {
                let (chip, broker, received) = (chip.clone(), broker.clone(), received.clone());
                rt.spawn(async move {
                    let vm = format!("vm-{i}");
                    let guest = chip.launch(GuestLaunch {
                        measurement: [0x4d; 48],
                        ..Default::default()
                    });
                    loop {
                        match tokio::time::timeout(
                            Duration::from_secs(2),
                            fetch(&broker, &vm, &guest),
                        )
                        .await
                        {
                            Ok(Ok(r)) => received.lock().unwrap().push((
                                vm.clone(),
                                r.boot_counter,
                                r.volume_key.to_vec(),
                            )),
                            _ => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = 200 + x % 900;
        std::thread::sleep(Duration::from_millis(at));
        server.kill().unwrap(); // SIGKILL
        server.wait().unwrap();
        for t in tasks {
            t.abort();
        }
        eprintln!(
            "round {round}: killed after {at} ms; {} releases so far",
            received.lock().unwrap().len()
        );
    }

    // After the last restart every VM still gets its key, the same one as before.
    let server = start(&cfg);
    let after: Vec<(String, Vec<u8>)> = rt.block_on(async {
        let mut v = vec![];
        for i in 0..VMS {
            let vm = format!("vm-{i}");
            let guest = chip.launch(GuestLaunch {
                measurement: [0x4d; 48],
                ..Default::default()
            });
            let r = fetch(&broker, &vm, &guest).await.unwrap();
            v.push((vm, r.volume_key.to_vec()));
        }
        v
    });
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let mut server = server;
    server.wait().unwrap();

    let got = received.lock().unwrap().clone();
    assert!(
        got.len() >= VMS,
        "the storm released too little to test anything: {}",
        got.len()
    );
    let keys: HashMap<&str, &Vec<u8>> = after.iter().map(|(v, k)| (v.as_str(), k)).collect();
    for (vm, _, key) in &got {
        assert_eq!(keys[vm.as_str()], key, "{vm} lost or changed its key");
    }

    // The log verifies, holds every release a guest received, and no nonce released twice.
    let export = dir.path().join("audit.jsonl");
    run(kbs()
        .args(["audit", "export", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&export));
    run(kbs()
        .args(["audit", "verify"])
        .arg(&export)
        .arg("--key")
        .arg(d.join("audit.pub")));
    let mut nonces = HashSet::new();
    let mut boots = HashSet::new();
    for line in std::fs::read_to_string(&export).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "release" {
            let nonce = v["detail"]["nonce"].as_str().unwrap().to_string();
            assert!(nonces.insert(nonce.clone()), "nonce {nonce} released twice");
            let boot = (
                v["vm_id"].as_str().unwrap().to_string(),
                v["detail"]["boot_counter"].as_u64().unwrap(),
            );
            assert!(boots.insert(boot.clone()), "boot {boot:?} released twice");
        }
    }
    for (vm, boot, _) in &got {
        assert!(
            boots.contains(&(vm.clone(), *boot)),
            "{vm} boot {boot} was answered but is not in the audit log"
        );
    }
    eprintln!(
        "{} releases received across {ROUNDS} kills; {} in the log",
        got.len(),
        boots.len()
    );
}
