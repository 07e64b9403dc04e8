//! The signed allowlist governs releases, not only registrations, and reaches a running broker:
//! `attesta-kbs allowlist install` run against the database of a serving `attesta-kbs serve`
//! withdraws an image, and the next boot of a VM registered earlier with it is denied
//! (`measurement_withdrawn`) without a restart; older epochs are refused; after a restart the
//! installed epoch still governs, even over an older configured file.

mod common;

use common::{free_port, kbs, ok, sign_allowlist, sign_allowlist_at, start};
use guest_agent::client::{ClientError, fetch};
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IMAGE: [u8; 48] = [0x4d; 48];
const OTHER: [u8; 48] = [0x0e; 48];

/// A serving broker, killed if the test fails before it is stopped.
struct Serving(Option<Child>);

impl Serving {
    fn stop(mut self) {
        let mut server = self.0.take().unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &server.id().to_string()])
            .status();
        assert!(server.wait().unwrap().success());
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// Waits until the broker's log contains `what` (it polls the store every second).
fn wait_for_log(log: &Arc<Mutex<String>>, what: &str) {
    let start = Instant::now();
    while !log.lock().unwrap().contains(what) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the broker never logged {what:?}: {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_installed_allowlist_withdraws_an_image_from_a_running_broker() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let pki = Arc::new(
        Pki::cached(
            snp::Product::Genoa,
            &Seed::from_text("allowlist-test"),
            &dir.path().join("sim-state"),
            |_| {},
        )
        .unwrap(),
    );
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let ark = dir.path().join("sim-ark.der");
    std::fs::write(&ark, &pki.ark.cert).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &listen, "--metrics-listen", "none"])
            .arg("--trust-root")
            .arg(&ark)
            .output()
            .unwrap(),
        "init",
    );
    let (image, other) = (hex::encode(IMAGE), hex::encode(OTHER));
    let p = |n: &str| dir.path().join(n);
    // Epoch 1 (configured) lists the image; epoch 2 withdraws it; epoch 3 lists it again.
    sign_allowlist(&d, &image);
    sign_allowlist_at(&d, 2, &[&other], &p("epoch2.signed"));
    sign_allowlist_at(&d, 2, &[&other, &image], &p("epoch2-other.signed"));
    sign_allowlist_at(&d, 3, &[&image, &other], &p("epoch3.signed"));
    let cfg = d.join("kbs.toml");
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(&cfg, toml).unwrap();
    ok(
        kbs()
            .args(["order", "register", "--key"])
            .arg(d.join("operator.key"))
            .args([
                "--vm-id",
                "vm-1",
                "--tenant",
                "tenant-a",
                "--measurement",
                &image,
            ])
            .args(["--chip-id", &hex::encode(chip.config.chip_id), "--out"])
            .arg(p("order.signed"))
            .output()
            .unwrap(),
        "order register",
    );
    let install = |file: &str| {
        kbs()
            .args(["allowlist", "install"])
            .arg(p(file))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };

    let log = Arc::new(Mutex::new(String::new()));
    let server = Serving(Some(start(&cfg, log.clone())));
    // Registered while it serves, straight into its store.
    ok(
        kbs()
            .args(["vm", "register"])
            .arg(p("order.signed"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap(),
        "vm register",
    );
    let broker = common::broker_pins(&d, &listen);
    let guest = chip.launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let boot = || rt.block_on(fetch(&broker, "vm-1", &guest));
    let denied = |r: Result<_, ClientError>| match r {
        Err(ClientError::Denied(reasons)) => reasons,
        Err(e) => panic!("expected a denial, got {e}"),
        Ok(_) => panic!("expected a denial, got a release"),
    };
    assert_eq!(boot().unwrap().boot_counter, 1);

    // The operator withdraws the image: the running broker follows, the next boot is denied.
    let out = ok(install("epoch2.signed"), "allowlist install epoch 2");
    assert!(out.contains("epoch 2 installed"), "{out}");
    wait_for_log(&log, "allowlist epoch changed");
    assert_eq!(denied(boot()), ["measurement_withdrawn"]);

    // Older epochs, and another list under the current epoch, are refused.
    for (file, why) in [
        ("kbs/allowlist.signed", "older"),
        ("epoch2-other.signed", "other contents"),
    ] {
        let out = install(file);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(err.contains(why), "{file}: {err}");
    }
    assert_eq!(denied(boot()), ["measurement_withdrawn"]);

    // A restart keeps the installed epoch in force over the older configured file.
    server.stop();
    let log = Arc::new(Mutex::new(String::new()));
    let server = Serving(Some(start(&cfg, log.clone())));
    assert!(
        log.lock().unwrap().contains("older than the installed one"),
        "{}",
        log.lock().unwrap()
    );
    assert_eq!(denied(boot()), ["measurement_withdrawn"]);

    // Listed again in a newer epoch: the VM boots again, its boot counter where it was.
    ok(install("epoch3.signed"), "allowlist install epoch 3");
    wait_for_log(&log, "allowlist epoch changed");
    assert_eq!(boot().unwrap().boot_counter, 2);
    server.stop();

    // Every installed epoch is in the audit log.
    let export = p("audit.jsonl");
    ok(
        kbs()
            .args(["audit", "export", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&export)
            .output()
            .unwrap(),
        "audit export",
    );
    let text = std::fs::read_to_string(&export).unwrap();
    let epochs: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "allowlist")
        .filter_map(|v| v["detail"]["epoch"].as_u64())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);
}

/// A broker on `dir`'s database (each with a KEK of its own: only allowlists matter here).
async fn broker(dir: &std::path::Path, kek: &str) -> kbs::service::Kbs {
    kbs::service::Kbs::new(
        kbs::store::SqliteStore::open(&dir.join("kbs.db"))
            .await
            .unwrap(),
        snp::Verifier::new(snp::VerifierConfig::default()),
        proto::ResponseKey::generate().unwrap(),
        Box::new(kbs::keys::FileKek::create(&dir.join(kek)).unwrap()),
        vec![],
        30,
    )
}

fn signed(key: &aws_lc_rs::signature::Ed25519KeyPair, epoch: u64, images: &[[u8; 48]]) -> Vec<u8> {
    proto::order::Allowlist {
        v: proto::order::ORDER_VERSION,
        epoch,
        measurements: images
            .iter()
            .map(|m| serde_bytes::ByteBuf::from(m.to_vec()))
            .collect(),
    }
    .sign(key)
}

/// Two brokers on one database (as `serve` and `allowlist install` are): the serving one follows
/// what the other installs; a stored document that does not verify leaves it with none (every
/// release denied) rather than with the list it replaced; at start the newer of the stored and
/// the configured list governs, and a stored one that does not verify stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_on_one_store_follow_the_installed_allowlist() {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    use kbs::service::AllowlistChange;
    use kbs::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let offline = Ed25519KeyPair::generate().unwrap();
    let key: [u8; 32] = offline.public_key().as_ref().try_into().unwrap();
    let serving = broker(dir.path(), "kek").await;
    assert_eq!(serving.load_allowlist(None, &key, 10).await.unwrap(), None);
    assert_eq!(serving.allowlist_epoch().await, None);
    let e1 = signed(&offline, 1, &[IMAGE]);
    assert_eq!(
        serving.load_allowlist(Some(&e1), &key, 10).await.unwrap(),
        Some(1)
    );
    let mut seen = 1;
    assert!(matches!(
        serving.follow_allowlist(&key, &mut seen).await.unwrap(),
        AllowlistChange::Unchanged
    ));

    let installer = broker(dir.path(), "kek2").await;
    installer
        .set_allowlist(&signed(&offline, 2, &[OTHER]), &key, 20)
        .await
        .unwrap();
    assert!(matches!(
        serving.follow_allowlist(&key, &mut seen).await.unwrap(),
        AllowlistChange::Adopted {
            from: Some(1),
            to: 2
        }
    ));
    assert_eq!(serving.allowlist_epoch().await, Some(2));
    assert!(
        serving
            .metrics
            .render(&serving.store.stats)
            .contains("attesta_kbs_allowlist_epoch 2")
    );
    // Restarted with the older configured file: the installed epoch 2 governs.
    let restarted = broker(dir.path(), "kek3").await;
    assert_eq!(
        restarted.load_allowlist(Some(&e1), &key, 30).await.unwrap(),
        Some(2)
    );
    // A configured file signed with another key is refused.
    let stranger = Ed25519KeyPair::generate().unwrap();
    assert!(
        restarted
            .load_allowlist(Some(&signed(&stranger, 9, &[IMAGE])), &key, 30)
            .await
            .is_err()
    );

    // The database is not trusted to sign: a document written into it past `allowlist install`
    // that does not verify leaves the serving broker with no allowlist.
    installer
        .store
        .set_allowlist(3, &signed(&stranger, 3, &[IMAGE]), 40)
        .await
        .unwrap();
    assert!(matches!(
        serving.follow_allowlist(&key, &mut seen).await.unwrap(),
        AllowlistChange::Refused { epoch: 3, .. }
    ));
    assert_eq!(serving.allowlist_epoch().await, None);
    assert!(matches!(
        serving.follow_allowlist(&key, &mut seen).await.unwrap(),
        AllowlistChange::Unchanged
    ));
    assert!(
        broker(dir.path(), "kek4")
            .await
            .load_allowlist(None, &key, 50)
            .await
            .is_err(),
        "a stored allowlist that does not verify stops the start"
    );
    // A genuine newer epoch puts one in force again.
    installer
        .set_allowlist(&signed(&offline, 4, &[IMAGE]), &key, 60)
        .await
        .unwrap();
    assert!(matches!(
        serving.follow_allowlist(&key, &mut seen).await.unwrap(),
        AllowlistChange::Adopted { from: None, to: 4 }
    ));

    // An older `allowlist install` (before the document was stored) bumps only the epoch: the
    // stored document (epoch 4) cannot say what epoch 5 withdrew, so nothing is in force.
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("kbs.db").display()))
            .await
            .unwrap();
    sqlx::query("UPDATE meta SET value = '5' WHERE key = 'allowlist_epoch'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(matches!(
        serving.follow_allowlist(&key, &mut seen).await.unwrap(),
        AllowlistChange::Refused { epoch: 5, .. }
    ));
    assert_eq!(serving.allowlist_epoch().await, None);
}
