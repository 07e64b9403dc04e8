//! End to end over real QUIC on loopback: a simulated SEV-SNP guest gets its disk key from the
//! broker, formats a real LUKS2 image on first boot and verifies the key on the second; wrong
//! images, wrong chips, terminated and unknown VMs are denied, with signed denials.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use guest_agent::client::{Broker, ClientError, fetch};
use guest_agent::luks::{self, DiskLabel, VolumeKey as DiskKey};
use kbs::keys::FileKek;
use kbs::service::{Kbs, Role, TlsIdentity, serve};
use kbs::store::{SqliteStore, Store};
use proto::ResponseKey;
use proto::msg::{Request, Response, VERSION};
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::{Product, Revocation, Verifier, VerifierConfig};
use std::sync::Arc;

const GOOD: [u8; 48] = [0x4d; 48];

fn now() -> u64 {
    1_780_272_000 // 2026-06-01: inside the simulated VCEKs' validity
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_release_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    // The simulated platform: one Milan chip where the VM is placed, another where it is not.
    let pki = Arc::new(Pki::from_seed(Product::Milan, Seed::from_text("e2e")).unwrap());
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let elsewhere = Chip::new(pki.clone(), ChipConfig::typical(&pki, 1)).unwrap();

    // Operator and allowlist keys; the broker's keys and store.
    let (operator, offline) = (
        Ed25519KeyPair::generate().unwrap(),
        Ed25519KeyPair::generate().unwrap(),
    );
    let response_key = ResponseKey::generate().unwrap();
    let response_pub = response_key.public();
    let kbs = Arc::new(Kbs::new(
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
    ));
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), now())
        .await
        .unwrap();
    let order = |vm: &str, m: [u8; 48]| Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm.into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(m.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
        not_after: now() + 3600,
        boot_config: ByteBuf::from(b"ssh-ed25519 AAAA tenant".to_vec()),
        billing: None,
    };
    kbs.register(&order("vm-1", GOOD).sign(&operator), now())
        .await
        .unwrap();
    kbs.register(&order("vm-2", GOOD).sign(&operator), now())
        .await
        .unwrap();
    // A host cannot register with its own key, nor an image outside the allowlist.
    let host = Ed25519KeyPair::generate().unwrap();
    assert!(
        kbs.register(&order("vm-3", GOOD).sign(&host), now())
            .await
            .is_err()
    );
    assert!(
        kbs.register(&order("vm-4", [0x66; 48]).sign(&operator), now())
            .await
            .is_err()
    );

    // TLS for the broker, from a CA the guest pins.
    let tls = TlsIdentity::generate("kbs.attesta.test").unwrap();
    let cfg = tls.server_config().unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(serve(endpoint, kbs.clone(), now));
    let broker = Broker {
        addr,
        server_name: "kbs.attesta.test".into(),
        ca_der: tls.ca_der.clone(),
        response_key: response_pub,
    };

    // First boot: the guest gets its key and formats its LUKS2 disk.
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let first = fetch(&broker, "vm-1", &guest).await.unwrap();
    assert_eq!(first.volume_key.len(), 64);
    assert_eq!(first.boot_config, b"ssh-ed25519 AAAA tenant");
    assert_eq!(first.boot_counter, 1);
    let img = dir.path().join("vm-1.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let disk_key = DiskKey::from_bytes(&first.volume_key).unwrap();
    luks::format(
        &img,
        &disk_key,
        &DiskLabel {
            vm_id: "vm-1".into(),
            generation: first.generation,
        },
    )
    .unwrap();
    // Second boot: the same key opens the disk; the boot counter moved on.
    let second = fetch(&broker, "vm-1", &guest).await.unwrap();
    assert_eq!(second.boot_counter, 2);
    luks::verify_key(&img, &DiskKey::from_bytes(&second.volume_key).unwrap()).unwrap();
    // Another VM has another key.
    let other = fetch(&broker, "vm-2", &guest).await.unwrap();
    assert_ne!(&other.volume_key[..], &first.volume_key[..]);

    // Denials, each signed and with its reason.
    let denied = |r: Result<_, ClientError>| match r {
        Err(ClientError::Denied(reasons)) => reasons,
        other => panic!("expected a denial, got {other:?}"),
    };
    let wrong_image = chip.launch(GuestLaunch {
        measurement: [0x01; 48],
        ..Default::default()
    });
    assert!(
        denied(fetch(&broker, "vm-1", &wrong_image).await)
            .contains(&"measurement_not_allowed".to_string())
    );
    let moved = elsewhere.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    assert!(denied(fetch(&broker, "vm-1", &moved).await).contains(&"chip_not_allowed".to_string()));
    let debug = chip.launch(GuestLaunch {
        measurement: GOOD,
        policy: 0x3_001f | (1 << 19),
        ..Default::default()
    });
    assert!(
        denied(fetch(&broker, "vm-1", &debug).await).contains(&"policy_flag_forbidden".to_string())
    );
    assert!(denied(fetch(&broker, "vm-9", &guest).await).contains(&"unknown_vm".to_string()));
    // Orders over the wire: a guest (no client certificate) may not give any; a host may relay
    // only what an operator signed, and a terminate needs a terminate order.
    let terminate = Order {
        kind: OrderKind::Terminate,
        measurements: vec![],
        chip_ids: vec![],
        ..order("vm-2", GOOD)
    };
    let doc = terminate.sign(&operator);
    let x = [0u8; 32];
    let refused = |r: Response| match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    };
    let req = |order: Vec<u8>, terminate: bool| {
        if terminate {
            Request::Terminate { v: VERSION, order }
        } else {
            Request::Register { v: VERSION, order }
        }
    };
    assert_eq!(
        refused(
            kbs.handle(req(doc.clone(), true), Role::Guest, x, now())
                .await
        ),
        "forbidden"
    );
    assert_eq!(
        refused(
            kbs.handle(req(doc.clone(), false), Role::Host, x, now())
                .await
        ),
        "order_kind"
    );
    let forged = terminate.sign(&offline);
    assert_eq!(
        refused(
            kbs.handle(req(forged, true), Role::Operator, x, now())
                .await
        ),
        "order_signature"
    );
    let new_vm = order("vm-3", GOOD).sign(&operator);
    assert!(matches!(
        kbs.handle(req(new_vm, false), Role::Host, x, now()).await,
        Response::Done { .. }
    ));
    assert!(matches!(
        kbs.handle(req(doc, true), Role::Host, x, now()).await,
        Response::Done { .. }
    ));
    assert!(
        kbs.store
            .vm("vm-2")
            .await
            .unwrap()
            .unwrap()
            .wrapped_key
            .is_none()
    );
    assert!(denied(fetch(&broker, "vm-2", &guest).await).contains(&"vm_terminated".to_string()));
    // A guest pinning another response key refuses even a genuine release.
    // A guest pinning another CA does not even finish the handshake.
    let other_ca = TlsIdentity::generate("kbs.attesta.local").unwrap();
    let wrong_ca = Broker {
        ca_der: other_ca.ca_der.clone(),
        ..broker.clone()
    };
    assert!(matches!(
        fetch(&wrong_ca, "vm-1", &guest).await,
        Err(ClientError::Connect(_))
    ));
    let wrong_pin = Broker {
        response_key: [9; 32],
        ..broker.clone()
    };
    assert!(matches!(
        fetch(&wrong_pin, "vm-1", &guest).await,
        Err(ClientError::Signature)
    ));

    // Every decision is in the audit log: 3 registrations... (2 accepted) + releases + denials.
    let entries = kbs.store.audit_entries().await.unwrap();
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "release").count(),
        4,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "denial").count(),
        5,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"terminate"));
    assert_eq!(kinds.iter().filter(|k| **k == "register").count(), 3);
}
