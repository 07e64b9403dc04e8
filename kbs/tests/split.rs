//! A volume key split 2-of-2 between two independent brokers — the network operator's and the
//! tenant's own, each from its own `init` (keys, KEK, store, operator), serving over QUIC. The
//! guest attests to each on its own, formats the disk on the first boot and opens it on the
//! second with the XOR of both shares; neither share alone opens it (a broker's store and KEK
//! yield only its share); the tenant's broker withdrawing the image stops the boot.

mod common;

use common::fleet::{Fleet, guest};
use common::{KillOnDrop, free_port, kbs, ok, sign_allowlist_at, start};
use guest_agent::client::fetch;
use guest_agent::config::GuestConfig;
use guest_agent::luks::{self, DiskLabel, LuksError, VolumeKey};
use guest_agent::unlock::{UnlockError, Unlocked, run_with};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `[broker]`-style table pinning a fleet's broker.
fn pins(f: &Fleet, listen: &str) -> String {
    let key = std::fs::read_to_string(f.d.join("response.pub")).unwrap();
    format!(
        "address = \"{listen}\"\nserver_name = \"kbs.attesta.local\"\nca = \"{}\"\nresponse_key = \"{}\"\ntimeout_secs = 20\n",
        f.d.join("tls-ca.crt").display(),
        key.trim()
    )
}

/// A blank 32 MiB disk image in `dir`, and a tmpfs folder for the boot configuration.
fn blank_disk(dir: &std::path::Path, prefix: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let shm = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    (shm, disk)
}

/// A boot that got the key: formatted or not, activated where device-mapper exists.
fn unlocked(r: Result<Unlocked, UnlockError>) -> Unlocked {
    match r {
        Ok(u) | Err(UnlockError::NoDeviceMapper(u)) => u,
        Err(e) => panic!("expected the disk opened, got: {e}"),
    }
}

#[test]
fn a_key_split_between_two_independent_brokers() {
    let (la, lb) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    // One simulated chip (same seed), two brokers that share nothing else.
    let split = [
        "--split-broker",
        "operator",
        "--split-broker",
        "tenant",
        "--split-threshold",
        "2",
    ];
    let operator = Fleet::with_orders("split-test", &la, 1, |t| t, &split);
    let tenant = Fleet::with_orders("split-test", &lb, 1, |t| t, &split);
    // An order may not let one broker alone open the disk.
    let mut bad = kbs();
    bad.args(["order", "register", "--key"])
        .arg(operator.d.join("operator.key"))
        .args([
            "--vm-id",
            "v",
            "--tenant",
            "t",
            "--measurement",
            &"4d".repeat(48),
        ])
        .args([
            "--chip-id",
            &"00".repeat(64),
            "--split-broker",
            "a",
            "--split-broker",
            "b",
        ])
        .args(["--split-threshold", "1", "--out"])
        .arg(operator.dir.path().join("bad.signed"));
    let out = bad.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("threshold is 2 (no broker alone)"));
    let (log_a, log_b) = (
        Arc::new(Mutex::new(String::new())),
        Arc::new(Mutex::new(String::new())),
    );
    let _a = KillOnDrop(start(&operator.cfg, log_a.clone()));
    let _b = KillOnDrop(start(&tenant.cfg, log_b.clone()));

    let dir = operator.dir.path();
    let (shm, disk) = blank_disk(dir, "attesta-split");
    let toml = format!(
        "vm_id = \"vm-0\"\nrequire_mlock = false\n[broker]\n{}\n[split]\nthreshold = 2\n[[split.brokers]]\n{}\n\
         [disk]\npath = \"{}\"\n[boot_config]\npath = \"{}\"\n",
        pins(&operator, &la),
        pins(&tenant, &lb),
        disk.display(),
        shm.path().join("boot-config").display()
    );
    std::fs::write(dir.join("guest.toml"), &toml).unwrap();
    let cfg = GuestConfig::load(&dir.join("guest.toml")).unwrap();
    // 3-of-2 and 1-of-2 (any broker alone) are refused.
    for t in ["threshold = 3", "threshold = 1"] {
        std::fs::write(dir.join("bad.toml"), toml.replace("threshold = 2", t)).unwrap();
        let e = GuestConfig::load(&dir.join("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 2 (no broker alone) and 2"), "{t}: {e}");
    }

    // Each broker's log states the split it holds a share of.
    for f in [&operator, &tenant] {
        let out = f.dir.path().join("audit.jsonl");
        ok(
            kbs()
                .args(["audit", "export", "--config"])
                .arg(&f.cfg)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap(),
            "audit export",
        );
        let log = std::fs::read_to_string(&out).unwrap();
        assert!(log.contains("\"split\":\"2-of-2\""), "{log}");
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let first = unlocked(rt.block_on(run_with(&cfg, &guest(&operator.chip))));
    assert!(first.formatted);
    assert_eq!(first.boot_counter, 1);
    let second = unlocked(rt.block_on(run_with(&cfg, &guest(&operator.chip))));
    assert!(!second.formatted);
    assert_eq!(second.boot_counter, 2);

    // What each broker's operator can get from its own store and KEK: its share, by releasing
    // it to a guest. Neither share opens the disk; together they do.
    let share = |f: &Fleet| {
        rt.block_on(fetch(&f.broker, "vm-0", &guest(&operator.chip)))
            .unwrap()
            .volume_key
    };
    let (a, b) = (share(&operator), share(&tenant));
    let label = DiskLabel {
        vm_id: "vm-0".into(),
        generation: 1,
    };
    let opens = |key: &[u8]| match luks::unlock(
        &disk,
        "attesta-split-test",
        &VolumeKey::from_bytes(key).unwrap(),
        &label,
    ) {
        Ok(()) | Err(LuksError::DeviceMapperUnavailable) => true,
        Err(_) => false,
    };
    assert!(!opens(&a), "the operator's share alone opened the disk");
    assert!(!opens(&b), "the tenant's share alone opened the disk");
    let both: Vec<u8> = a.iter().zip(b.iter()).map(|(x, y)| x ^ y).collect();
    assert!(opens(&both));
    if std::path::Path::new("/dev/mapper/control").exists() {
        let _ = std::process::Command::new("dmsetup")
            .args(["remove", "attesta-split-test"])
            .status();
    }

    // The tenant withdraws the image at their broker: the operator's broker still releases its
    // share, but the boot stops.
    let epoch2 = dir.join("epoch2.signed");
    sign_allowlist_at(&tenant.d, 2, &[&"0e".repeat(48)], &epoch2);
    ok(
        kbs()
            .args(["allowlist", "install"])
            .arg(&epoch2)
            .arg("--config")
            .arg(&tenant.cfg)
            .output()
            .unwrap(),
        "allowlist install",
    );
    let start = Instant::now();
    while !log_b.lock().unwrap().contains("allowlist epoch changed") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the tenant's broker never followed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(shm.path().join("boot-config"));
    match rt.block_on(run_with(&cfg, &guest(&operator.chip))) {
        Err(UnlockError::Release(guest_agent::client::ClientError::Denied(r))) => {
            assert_eq!(r, ["measurement_withdrawn"]);
        }
        other => panic!("expected the tenant's denial, got {other:?}"),
    }
    assert!(!shm.path().join("boot-config").exists(), "nothing placed");
    assert!(log_a.lock().unwrap().contains("key released"));
}

/// 2-of-3 between three independent brokers: the first boot needs all three (the guest deals
/// the key and seals it on the disk once per pair); later boots open with any two — one broker
/// stopped, or one refusing — and with only one left the boot fails closed.
#[test]
fn a_key_split_two_of_three() {
    let listen: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let split = [
        "--split-broker",
        "operator",
        "--split-broker",
        "tenant",
        "--split-broker",
        "escrow",
        "--split-threshold",
        "2",
    ];
    let fleets: Vec<Fleet> = listen
        .iter()
        .map(|l| Fleet::with_orders("split-test", l, 1, |t| t, &split))
        .collect();
    let logs: Vec<Arc<Mutex<String>>> = (0..3)
        .map(|_| Arc::new(Mutex::new(String::new())))
        .collect();
    let mut servers: Vec<Option<KillOnDrop>> = fleets
        .iter()
        .zip(&logs)
        .map(|(f, l)| Some(KillOnDrop(start(&f.cfg, l.clone()))))
        .collect();
    let dir = fleets[0].dir.path();
    let (shm, disk) = blank_disk(dir, "attesta-split3");
    std::fs::write(
        dir.join("guest.toml"),
        format!(
            "vm_id = \"vm-0\"\nrequire_mlock = false\n[broker]\n{}\n[split]\nthreshold = 2\n\
             [[split.brokers]]\n{}\n[[split.brokers]]\n{}\n\
             [disk]\npath = \"{}\"\n[boot_config]\npath = \"{}\"\n",
            pins(&fleets[0], &listen[0]).replace("timeout_secs = 20", "timeout_secs = 9"),
            pins(&fleets[1], &listen[1]),
            pins(&fleets[2], &listen[2]),
            disk.display(),
            shm.path().join("boot-config").display()
        ),
    )
    .unwrap();
    let cfg = GuestConfig::load(&dir.join("guest.toml")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chip = &fleets[0].chip;
    let boot = || rt.block_on(run_with(&cfg, &guest(chip)));

    let first = unlocked(boot());
    assert!(first.formatted);
    // The disk holds one wrap per pair, under the header's MAC.
    let wraps = luks::split_wraps(&disk).unwrap().unwrap();
    assert_eq!(wraps["wraps"].as_array().map(Vec::len), Some(3));

    // The escrow broker stopped: the other two open the disk.
    servers[2] = None;
    let second = unlocked(boot());
    assert!(!second.formatted);
    // The tenant's broker withdraws the image too: one share left, fail closed.
    let epoch2 = dir.join("epoch2.signed");
    sign_allowlist_at(&fleets[1].d, 2, &[&"0e".repeat(48)], &epoch2);
    ok(
        kbs()
            .args(["allowlist", "install"])
            .arg(&epoch2)
            .arg("--config")
            .arg(&fleets[1].cfg)
            .output()
            .unwrap(),
        "allowlist install",
    );
    let start_wait = Instant::now();
    while !logs[1].lock().unwrap().contains("allowlist epoch changed") {
        assert!(start_wait.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    match boot() {
        Err(UnlockError::Shares(why)) => {
            assert!(why.contains("1 of the 2 shares needed"), "{why}");
            assert!(why.contains("measurement_withdrawn"), "{why}");
        }
        other => panic!("expected too few shares, got {other:?}"),
    }
    // The escrow broker back: the operator's and the escrow's shares open it.
    servers[2] = Some(KillOnDrop(start(&fleets[2].cfg, logs[2].clone())));
    let again = unlocked(boot());
    assert!(!again.formatted);

    // One share alone opens no wrap (and is not the volume key).
    let share = rt
        .block_on(fetch(&fleets[0].broker, "vm-0", &guest(chip)))
        .unwrap()
        .volume_key;
    let label = DiskLabel {
        vm_id: "vm-0".into(),
        generation: 1,
    };
    let alone = luks::unlock(
        &disk,
        "attesta-split3",
        &VolumeKey::from_bytes(&share).unwrap(),
        &label,
    );
    assert!(
        matches!(alone, Err(LuksError::WrongKey) | Err(LuksError::Header(_))),
        "{alone:?}"
    );
    let have = [(0usize, &share[..])];
    assert!(guest_agent::split::open(&wraps, 2, 3, &have, "vm-0", 1).is_err());
    drop(servers);
}
