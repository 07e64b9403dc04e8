//! Crash consistency: SIGKILL the real broker at pseudo-random points during a release storm,
//! restart it, and check that no nonce was ever accepted twice, that every release a guest
//! received is in the audit log (commit before emit), that no VM lost its key, and that the
//! audit log still verifies.

mod common;

use common::fleet::{Fleet, guest};
use common::free_port;
use guest_agent::client::fetch;
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VMS: usize = 12;
const ROUNDS: usize = 6;

/// What guests received: (vm, boot counter) → volume key.
type Received = Arc<Mutex<Vec<(String, u64, Vec<u8>)>>>;

/// Starts `serve`; its log is not examined here.
fn start(cfg: &std::path::Path) -> std::process::Child {
    common::start(cfg, Arc::default())
}

#[test]
fn sigkill_during_a_release_storm_loses_nothing_and_repeats_nothing() {
    let listen = format!("127.0.0.1:{}", free_port());
    // Frequent checkpoints, so kills also land around checkpoint writes.
    let fleet = Fleet::new("crash-test", &listen, VMS, |t| {
        t.replace("checkpoint_every = 1000", "checkpoint_every = 7")
    });
    let (chip, broker, cfg) = (fleet.chip.clone(), fleet.broker.clone(), fleet.cfg.clone());

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
                    let guest = guest(&chip);
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
            let r = fetch(&broker, &vm, &guest(&chip)).await.unwrap();
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
    let answered: Vec<(String, u64)> = got.iter().map(|(v, b, _)| (v.clone(), *b)).collect();
    let logged = fleet.check_audit(&answered);
    eprintln!(
        "{} releases received across {ROUNDS} kills; {logged} in the log",
        got.len()
    );
}
