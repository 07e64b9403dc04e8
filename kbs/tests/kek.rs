//! KEK rotation: `attesta-kbs kek rotate` re-wraps every live volume key under a new KEK file
//! (the volume keys themselves stay), points kbs.toml at it and destroys the old KEK file; the old
//! KEK then opens nothing in the store, and guests still get the same keys. A broker still
//! holding the old KEK cannot register (it would wrap a key under the retired KEK), and a
//! rotation that does not cover exactly the live keys changes nothing.

mod common;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use common::{free_port, kbs, ok, sign_allowlist, start};
use guest_agent::client::fetch;
use kbs::keys::{FileKek, Kek};
use kbs::service::Kbs;
use kbs::store::{SqliteStore, Store, StoreError};
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};

const IMAGE: [u8; 48] = [0x4d; 48];

fn stop(mut server: Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    assert!(server.wait().unwrap().success());
}

/// A copy of a KEK file, mode 0600 (as `FileKek::load` requires).
fn copy_kek(from: &Path, to: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = std::fs::read(from).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .unwrap();
    f.write_all(&bytes).unwrap();
}

#[test]
fn rotation_rewraps_every_live_key_and_retires_the_old_kek() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let pki = Arc::new(
        Pki::cached(
            snp::Product::Genoa,
            &Seed::from_text("kek-test"),
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
    let image = hex::encode(IMAGE);
    sign_allowlist(&d, &image);
    let cfg = d.join("kbs.toml");
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(&cfg, toml).unwrap();
    let p = |n: &str| dir.path().join(n);
    let order = |verb: &str, vm: &str| {
        let mut cmd = kbs();
        cmd.args(["order", verb, "--key"])
            .arg(d.join("operator.key"))
            .args(["--vm-id", vm, "--tenant", "tenant-a"]);
        if verb == "register" {
            cmd.args(["--measurement", &image])
                .args(["--chip-id", &hex::encode(chip.config.chip_id)]);
        }
        ok(
            cmd.arg("--out")
                .arg(p(&format!("{verb}-{vm}.signed")))
                .output()
                .unwrap(),
            "order",
        );
        ok(
            kbs()
                .args(["vm", verb])
                .arg(p(&format!("{verb}-{vm}.signed")))
                .arg("--config")
                .arg(&cfg)
                .output()
                .unwrap(),
            "vm",
        );
    };
    for vm in ["vm-1", "vm-2", "vm-3"] {
        order("register", vm);
    }
    order("terminate", "vm-3");

    let broker = common::broker_pins(&d, &listen);
    let guest = chip.launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = start(&cfg, Arc::new(Mutex::new(String::new())));
    let before = rt.block_on(fetch(&broker, "vm-1", &guest)).unwrap();
    stop(server);

    // The operator's copy of the old KEK, to show it opens nothing afterwards.
    copy_kek(&d.join("kek"), &p("old-kek"));
    let out = ok(
        kbs()
            .args(["kek", "rotate", "--config"])
            .arg(&cfg)
            .arg("--new-kek")
            .arg(d.join("kek2"))
            .output()
            .unwrap(),
        "kek rotate",
    );
    assert!(out.contains("2 keys re-wrapped"), "{out}");
    assert!(!d.join("kek").exists(), "the old KEK file is destroyed");
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("kek = { file = \"kek2\" }")
    );
    let again = kbs()
        .args(["kek", "rotate", "--config"])
        .arg(&cfg)
        .arg("--new-kek")
        .arg(d.join("kek2"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "the current KEK is not new");

    let (old, new) = (
        FileKek::load(&p("old-kek")).unwrap(),
        FileKek::load(&d.join("kek2")).unwrap(),
    );
    rt.block_on(async {
        let s = SqliteStore::open(&d.join("kbs.db")).await.unwrap();
        let live = s.live_keys().await.unwrap();
        assert_eq!(live.len(), 2);
        for (vm, generation, wrapped) in &live {
            assert!(old.unwrap_key(vm, *generation, wrapped).is_err(), "{vm}");
            assert!(new.unwrap_key(vm, *generation, wrapped).is_ok(), "{vm}");
        }
        let kinds: Vec<String> = s
            .audit_entries()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert!(kinds.contains(&"kek_rotate".to_string()), "{kinds:?}");
    });

    // Guests get the same keys as before, under the new KEK.
    let server = start(&cfg, Arc::new(Mutex::new(String::new())));
    let after = rt.block_on(fetch(&broker, "vm-1", &guest)).unwrap();
    assert_eq!(&after.volume_key[..], &before.volume_key[..]);
    assert_eq!(after.boot_counter, 2);
    assert!(rt.block_on(fetch(&broker, "vm-2", &guest)).is_ok());
    stop(server);
}

fn signed_order(operator: &Ed25519KeyPair, vm: &str) -> Vec<u8> {
    use proto::order::{ORDER_VERSION, Order, OrderKind};
    use serde_bytes::ByteBuf;
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm.into(),
        tenant: "t".into(),
        measurements: vec![ByteBuf::from(IMAGE.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(vec![2; 64])],
        not_after: 1_000,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
    .sign(operator)
}

/// Two brokers on one database, as a forgotten `serve` and `kek rotate` would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_holding_the_retired_kek_cannot_register() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Ed25519KeyPair::generate().unwrap();
    let offline = Ed25519KeyPair::generate().unwrap();
    let allowlist_key: [u8; 32] = offline.public_key().as_ref().try_into().unwrap();
    let allow = proto::order::Allowlist {
        v: proto::order::ORDER_VERSION,
        epoch: 1,
        measurements: vec![serde_bytes::ByteBuf::from(IMAGE.to_vec())],
    }
    .sign(&offline);
    let kek_path = dir.path().join("kek");
    FileKek::create(&kek_path).unwrap();
    let broker = async || {
        let k = Kbs::new(
            SqliteStore::open(&dir.path().join("kbs.db")).await.unwrap(),
            snp::Verifier::new(snp::VerifierConfig::default()),
            proto::ResponseKey::generate().unwrap(),
            Box::new(FileKek::load(&kek_path).unwrap()),
            vec![operator.public_key().as_ref().try_into().unwrap()],
            30,
        );
        k.bind_kek().await.unwrap();
        k.load_allowlist(Some(&allow), &allowlist_key, 1)
            .await
            .unwrap();
        k
    };
    let serving = broker().await;
    serving
        .register(&signed_order(&operator, "vm-1"), 1)
        .await
        .unwrap();
    let rotating = broker().await;
    serving
        .register(&signed_order(&operator, "vm-2"), 1)
        .await
        .unwrap();

    // A rotation that does not cover every live key changes nothing.
    let live = rotating.store.live_keys().await.unwrap();
    let bound = rotating.store.bound_kek().unwrap();
    let partial = vec![(
        live[0].0.clone(),
        live[0].1,
        live[0].2.clone(),
        live[0].2.clone(),
    )];
    assert!(matches!(
        rotating.store.rekey(&bound, b"other", partial, 2).await,
        Err(StoreError::RotationRace)
    ));
    assert_eq!(rotating.store.live_keys().await.unwrap(), live);

    let new = FileKek::create(&dir.path().join("kek2")).unwrap();
    assert_eq!(rotating.rotate_kek(&new, 2).await.unwrap(), 2);
    let e = serving
        .register(&signed_order(&operator, "vm-3"), 3)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "kek_rotated", "{e}");
    assert!(serving.store.vm("vm-3").await.unwrap().is_none());
    // Nor does a broker start with it.
    let stale = Kbs::new(
        SqliteStore::open(&dir.path().join("kbs.db")).await.unwrap(),
        snp::Verifier::new(snp::VerifierConfig::default()),
        proto::ResponseKey::generate().unwrap(),
        Box::new(FileKek::load(&kek_path).unwrap()),
        vec![],
        30,
    );
    assert!(stale.bind_kek().await.is_err());
}
