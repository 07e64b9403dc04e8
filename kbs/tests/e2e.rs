//! End to end over real QUIC on loopback: a simulated SEV-SNP guest gets its disk key from the
//! broker, formats a real LUKS2 image on first boot and verifies the key on the second; wrong
//! images, wrong chips, terminated and unknown VMs are denied, with signed denials.

mod common;

use aws_lc_rs::signature::Ed25519KeyPair;
use common::inproc::{GOOD, Setup, connect, now, order_on, serve_on_loopback, setup, setup_with};
use guest_agent::client::{Broker, ClientError, fetch};
use guest_agent::luks::{self, DiskLabel, VolumeKey as DiskKey};
use kbs::keys::FileKek;
use kbs::service::{Role, TlsIdentity};
use kbs::store::Store;
use proto::msg::{Request, Response, VERSION};
use proto::order::{ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, GuestLaunch};
use snp::device::GuestDevice;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_release_over_quic() {
    let Setup {
        dir,
        chip,
        elsewhere,
        operator,
        response_pub,
        kbs,
        ..
    } = setup().await;
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
        mesh_ip: None,
        split: None,
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

    let broker = serve_on_loopback(&kbs, response_pub);

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
    let forged = terminate.sign(&Ed25519KeyPair::generate().unwrap());
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

    // Every decision is in the audit log: 3 registrations... (2 accepted) + releases + denials
    // (evidence for vm-9, which the broker does not hold, is refused without an entry: such
    // evidence decides nothing about any VM, and challenges are free to ask for).
    let entries = kbs.store.audit_entries().await.unwrap();
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "release").count(),
        4,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "denial").count(),
        4,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"terminate"));
    assert_eq!(kinds.iter().filter(|k| **k == "register").count(), 3);
}

/// The broker certifies a guest's mesh key only when the attested report binds exactly that
/// key: the certificate names the VM, its ordered overlay address and `tenant:<tenant>`, and is
/// for that key; a report binding another key, or none, is denied; an order without an overlay
/// address gets its release without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_bound_mesh_identity() {
    let Setup {
        dir: _dir,
        chip,
        operator,
        response_pub,
        kbs,
        ..
    } = setup().await;
    let t = now();
    let ca =
        mesh::cert::LocalCa::root("guest-ca", &["10.42.0.0/16"], t - 86_400, t + 86_400).unwrap();
    assert!(
        kbs.guest_issuer
            .set(kbs::service::GuestIssuer::new(
                ca.cert.clone(),
                vec![],
                ca.key.clone(),
                3600
            ))
            .is_ok()
    );
    for (vm, ip) in [("vm-m", Some("10.42.7.9/16")), ("vm-plain", None)] {
        let order = Order {
            v: ORDER_VERSION,
            kind: OrderKind::Register,
            vm_id: vm.into(),
            tenant: "tenant-a".into(),
            measurements: vec![ByteBuf::from(GOOD.to_vec())],
            policy: String::new(),
            chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
            not_after: t + 3600,
            boot_config: ByteBuf::new(),
            billing: None,
            mesh_ip: ip.map(String::from),
            split: None,
        };
        kbs.register(&order.sign(&operator), t).await.unwrap();
    }
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let exporter = [9u8; 32];
    let mesh_a = [0xa1u8; 32];
    let mesh_b = [0xb2u8; 32];
    // One evidence round by hand: the report binds `bound`, the request carries `sent`.
    let round = |vm: &'static str, bound: Option<[u8; 32]>, sent: Vec<u8>| {
        let kbs = kbs.clone();
        let guest = &guest;
        async move {
            let Response::Challenge { nonce, .. } = kbs
                .handle(
                    Request::Challenge {
                        v: VERSION,
                        vm_id: vm.into(),
                    },
                    Role::Guest,
                    exporter,
                    t,
                )
                .await
            else {
                panic!("no challenge");
            };
            let nonce: [u8; 32] = nonce.try_into().unwrap();
            let key = proto::GuestKey::generate().unwrap();
            let rd = match &bound {
                Some(m) => proto::report_data_with_mesh_key(&nonce, &key.public(), &exporter, m),
                None => proto::report_data(&nonce, &key.public(), &exporter),
            };
            let (report, cert_table) = guest.get_ext_report(&rd, 0).unwrap();
            let req = Request::Evidence {
                v: VERSION,
                vm_id: vm.into(),
                nonce: nonce.to_vec(),
                report,
                cert_table,
                guest_public_key: key.public().to_vec(),
                mesh_key: sent,
            };
            kbs.handle(req, Role::Guest, exporter, t).await
        }
    };
    let decision = |r: &Response| proto::msg::verify_decision(&response_pub, r).unwrap();
    use proto::msg::Decision;

    // Bound A, sent A: released, with a certificate for A.
    let r = round("vm-m", Some(mesh_a), mesh_a.to_vec()).await;
    let Decision::Release(body) = decision(&r) else {
        panic!("{r:?}")
    };
    let cert = mesh::cert::MeshCert::parse(&body.mesh_cert).unwrap();
    assert_eq!(cert.name, "vm-m");
    assert_eq!(cert.claims.ips, vec!["10.42.7.9/16".to_string()]);
    assert_eq!(cert.claims.groups, vec!["tenant:tenant-a".to_string()]);
    assert_eq!(cert.claims.role, Some(mesh::cert::Role::Guest));
    let mut spki = hex::decode("302a300506032b6570032100").unwrap();
    spki.extend_from_slice(&mesh_a);
    assert_eq!(
        cert.key_hash.to_vec(),
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki).as_ref(),
        "the certificate is for the key the report bound"
    );
    assert!(cert.not_after <= t + 3600);
    mesh::cert::verify(&[cert], std::slice::from_ref(&ca.cert), t).unwrap();

    // Bound A, sent B; bound A, sent none; bound none, sent A: all denied as mismatches.
    for (bound, sent) in [
        (Some(mesh_a), mesh_b.to_vec()),
        (Some(mesh_a), vec![]),
        (None, mesh_a.to_vec()),
    ] {
        let r = round("vm-m", bound, sent).await;
        let Decision::Denial(d) = decision(&r) else {
            panic!("released: {r:?}")
        };
        assert_eq!(d.reasons, vec!["report_data_mismatch".to_string()]);
    }
    // A malformed mesh key is not even considered.
    let r = round("vm-m", Some(mesh_a), vec![1; 31]).await;
    assert!(
        matches!(r, Response::Error { ref code, .. } if code == "bad_request"),
        "{r:?}"
    );
    // No overlay address in the order: the key is released, no certificate.
    let r = round("vm-plain", Some(mesh_a), mesh_a.to_vec()).await;
    let Decision::Release(body) = decision(&r) else {
        panic!("{r:?}")
    };
    assert!(body.mesh_cert.is_empty());
    // Without a mesh key the release is as before.
    let r = round("vm-m", None, vec![]).await;
    let Decision::Release(body) = decision(&r) else {
        panic!("{r:?}")
    };
    assert!(body.mesh_cert.is_empty());
}

/// Admission: no more than `max_sessions` connections are served at once — a burst of boots
/// all succeed, queued at the door — and a connection that idles past `session_limit` is
/// closed (code 0x11), freeing its slot for the next guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_time_limited() {
    let limit = std::time::Duration::from_secs(2);
    let Setup {
        dir: _dir,
        chip,
        operator,
        response_pub,
        kbs,
        ..
    } = setup_with(|k| {
        k.max_sessions = 2;
        k.session_limit = limit;
    })
    .await;
    for i in 0..8 {
        let o = order_on(&format!("vm-{i}"), &chip);
        kbs.register(&o.sign(&operator), now()).await.unwrap();
    }
    let broker = Arc::new(serve_on_loopback(&kbs, response_pub));
    let addr = broker.addr;
    // Boots run as tasks of their own, so the simulated chip lives as long as the test.
    let chip: &'static Chip = Box::leak(Box::new(chip));
    let guest = Arc::new(chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    }));

    // Eight boots at once through two slots: every one released.
    let boots: Vec<_> = (0..8)
        .map(|i| {
            let (broker, guest) = (broker.clone(), guest.clone());
            tokio::spawn(async move { fetch(&broker, &format!("vm-{i}"), &*guest).await })
        })
        .collect();
    for b in boots {
        assert_eq!(b.await.unwrap().unwrap().volume_key.len(), 64);
    }
    let peak = kbs
        .metrics
        .sessions_peak
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=2).contains(&peak), "peak sessions {peak}");

    // Two clients take both slots and idle; the broker closes them at the limit…
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let t = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        let cfg = guest_agent::client::client_config(&broker).unwrap();
        idle.push(
            client
                .connect_with(cfg, addr, "kbs.attesta.test")
                .unwrap()
                .await
                .unwrap(),
        );
    }
    // …and a boot that arrived meanwhile is served once a slot is free.
    let waiting = {
        let (broker, guest) = (broker.clone(), guest.clone());
        tokio::spawn(async move { fetch(&broker, "vm-0", &*guest).await })
    };
    for c in &idle {
        match tokio::time::timeout(limit * 5, c.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(a)) => {
                assert_eq!(a.error_code, kbs::service::CLOSE_TIME_LIMIT.into())
            }
            other => panic!("expected the broker to close an idle session: {other:?}"),
        }
    }
    assert!(t.elapsed() >= limit, "closed before the limit");
    let r = waiting.await.unwrap().unwrap();
    assert_eq!(r.boot_counter, 2);
    assert!(t.elapsed() >= limit, "served while both slots were held");
}

/// One connection gets a few challenges, not a flood (the nonce book is shared by every guest),
/// and only for VM ids an order could carry.
#[tokio::test]
async fn challenges_are_bounded_per_connection_and_checked() {
    let Setup {
        dir: _dir,
        response_pub,
        kbs,
        ..
    } = setup().await;
    let broker = serve_on_loopback(&kbs, response_pub);
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connect = || connect(&client, &broker);
    let challenge = |vm_id: String| Request::Challenge { v: VERSION, vm_id };
    let code = |r: Response| match r {
        Response::Challenge { .. } => "challenge".to_string(),
        Response::Error { code, .. } => code,
        other => panic!("unexpected answer {other:?}"),
    };
    let conn = connect().await;
    for i in 0..kbs::service::MAX_CHALLENGES_PER_SESSION {
        let r = guest_agent::client::exchange(&conn, &challenge(format!("vm-{i}")))
            .await
            .unwrap();
        assert_eq!(code(r), "challenge", "challenge {i}");
    }
    let r = guest_agent::client::exchange(&conn, &challenge("vm-0".into()))
        .await
        .unwrap();
    assert_eq!(code(r), "too_many_challenges");
    // A new connection starts afresh; an id no order could carry is refused.
    let conn = connect().await;
    for bad in ["x".repeat(129), String::new(), "vm 1".into()] {
        let r = guest_agent::client::exchange(&conn, &challenge(bad))
            .await
            .unwrap();
        assert_eq!(code(r), "bad_request");
    }
    let r = guest_agent::client::exchange(&conn, &challenge("x".repeat(128)))
        .await
        .unwrap();
    assert_eq!(code(r), "challenge");
}

/// A KEK that wraps but cannot unwrap (a PKCS#11 token gone, a KEK file replaced): the key
/// cannot be sealed for the guest.
struct UnwrapFails(FileKek);

impl kbs::keys::Kek for UnwrapFails {
    fn wrap(
        &self,
        vm_id: &str,
        generation: u64,
        key: &kbs::keys::VolumeKey,
    ) -> Result<Vec<u8>, kbs::keys::KeyError> {
        self.0.wrap(vm_id, generation, key)
    }
    fn unwrap_key(
        &self,
        _: &str,
        _: u64,
        _: &[u8],
    ) -> Result<kbs::keys::VolumeKey, kbs::keys::KeyError> {
        Err(kbs::keys::KeyError::Unwrap)
    }
}

/// The release is sealed before it is committed: when the key cannot be unwrapped the decision
/// is committed and answered as a `key_unavailable` denial, the audit log records a denial (not
/// a release) and the VM's boot counter does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_cannot_be_sealed_is_recorded_as_a_denial() {
    let kek_dir = tempfile::tempdir().unwrap();
    let failing = UnwrapFails(FileKek::create(&kek_dir.path().join("kek")).unwrap());
    let Setup {
        dir: _dir,
        chip,
        operator,
        response_pub,
        kbs,
        ..
    } = setup_with(|k| k.kek = Box::new(failing)).await;
    let order = Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: "vm-1".into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
        not_after: now() + 3600,
        boot_config: ByteBuf::from(b"ssh-ed25519 AAAA tenant".to_vec()),
        billing: None,
        mesh_ip: None,
        split: None,
    };
    kbs.register(&order.sign(&operator), now()).await.unwrap();
    let broker = serve_on_loopback(&kbs, response_pub);
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    match fetch(&broker, "vm-1", &guest).await {
        Err(ClientError::Denied(reasons)) => assert_eq!(reasons, ["key_unavailable"]),
        other => panic!("expected a key_unavailable denial, got {other:?}"),
    }
    let log = kbs.store.audit_entries().await.unwrap();
    let last = log.last().unwrap();
    assert_eq!(
        (last.kind.as_str(), last.vm_id.as_str()),
        ("denial", "vm-1")
    );
    assert_eq!(
        last.detail["reasons"],
        serde_json::json!(["key_unavailable"])
    );
    assert!(
        !log.iter().any(|e| e.kind == "release"),
        "no release recorded"
    );
    let vm = kbs.store.vm("vm-1").await.unwrap().unwrap();
    assert_eq!(vm.state.boot_counter, 0, "the boot counter did not move");
}

/// The connection is the challenge: evidence sent with no nonce binds its connection's TLS
/// exporter and is released at once (one round trip after the handshake); each connection takes
/// one; replayed or relayed onto another connection (another replica's, or a host's own) it
/// matches nothing; nothing is kept for it. The issued-nonce flow still works beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_bound_to_its_connection_needs_no_challenge() {
    let Setup {
        dir: _dir,
        chip,
        operator,
        response_pub,
        kbs,
        ..
    } = setup().await;
    kbs.register(&order_on("vm-c", &chip).sign(&operator), now())
        .await
        .unwrap();
    let broker = serve_on_loopback(&kbs, response_pub);
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connect = || connect(&client, &broker);
    let exporter_of = |c: &quinn::Connection| {
        let mut x = [0u8; 32];
        c.export_keying_material(&mut x, proto::msg::EXPORTER_LABEL, b"")
            .unwrap();
        x
    };
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    // Evidence for `nonce` on a connection with `exporter`; `sent` is the request's nonce field.
    let evidence = |nonce: [u8; 32], exporter: [u8; 32], sent: Vec<u8>| {
        let key = proto::GuestKey::generate().unwrap();
        let rd = proto::report_data(&nonce, &key.public(), &exporter);
        let (report, cert_table) = guest.get_ext_report(&rd, 0).unwrap();
        let req = Request::Evidence {
            v: VERSION,
            vm_id: "vm-c".into(),
            nonce: sent,
            report,
            cert_table,
            guest_public_key: key.public().to_vec(),
            mesh_key: vec![],
        };
        (req, key)
    };
    use proto::msg::Decision;
    let decide = |r: &Response| proto::msg::verify_decision(&response_pub, r).unwrap();
    let error = |r: Response| match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    };

    // The first request is the evidence: released, sealed to this connection's nonce.
    let conn = connect().await;
    let nonce = proto::connection_nonce(&exporter_of(&conn));
    let (req, key) = evidence(nonce, exporter_of(&conn), vec![]);
    let r = guest_agent::client::exchange(&conn, &req).await.unwrap();
    let Decision::Release(body) = decide(&r) else {
        panic!("{r:?}")
    };
    assert_eq!(body.nonce, nonce);
    assert_eq!(body.boot_counter, 1);
    let ctx = proto::SealContext {
        vm_id: "vm-c",
        generation: body.generation,
        nonce,
        measurement: GOOD,
    };
    assert!(
        proto::open(&key, &ctx, &body.sealed().unwrap())
            .unwrap()
            .len()
            >= 64
    );
    assert_eq!(
        kbs.store.prune_nonces(u64::MAX).await.unwrap(),
        0,
        "nothing is kept for a connection's evidence"
    );
    // The same evidence again, or a new one, on this connection: it has had its one.
    assert_eq!(
        error(guest_agent::client::exchange(&conn, &req).await.unwrap()),
        "too_many_evidence"
    );
    let (fresh, _) = evidence(nonce, exporter_of(&conn), vec![]);
    assert_eq!(
        error(guest_agent::client::exchange(&conn, &fresh).await.unwrap()),
        "too_many_evidence"
    );

    // Replayed onto another connection (what a host that kept the bytes, or a relay to another
    // replica, would try): it binds the first connection, so it matches nothing here.
    let other = connect().await;
    let r = guest_agent::client::exchange(&other, &req).await.unwrap();
    let Decision::Denial(d) = decide(&r) else {
        panic!("{r:?}")
    };
    assert_eq!(d.reasons, ["report_data_mismatch"]);
    assert_eq!(d.nonce, proto::connection_nonce(&exporter_of(&other)));
    // Evidence that names the connection's nonce as if it had been issued: never issued here.
    let conn = connect().await;
    let n = proto::connection_nonce(&exporter_of(&conn));
    let (named, _) = evidence(n, exporter_of(&conn), n.to_vec());
    let r = guest_agent::client::exchange(&conn, &named).await.unwrap();
    let Decision::Denial(d) = decide(&r) else {
        panic!("{r:?}")
    };
    assert_eq!(d.reasons, ["unknown_nonce"]);

    // The issued-nonce flow, for clients that want it: challenge, then evidence on that nonce.
    let conn = connect().await;
    let Response::Challenge { nonce: issued, .. } = guest_agent::client::exchange(
        &conn,
        &Request::Challenge {
            v: VERSION,
            vm_id: "vm-c".into(),
        },
    )
    .await
    .unwrap() else {
        panic!("no challenge")
    };
    let issued: [u8; 32] = issued.try_into().unwrap();
    let (req, _) = evidence(issued, exporter_of(&conn), issued.to_vec());
    let r = guest_agent::client::exchange(&conn, &req).await.unwrap();
    let Decision::Release(body) = decide(&r) else {
        panic!("{r:?}")
    };
    assert_eq!((body.nonce, body.boot_counter), (issued.to_vec(), 2));
    assert_eq!(kbs.store.prune_nonces(u64::MAX).await.unwrap(), 1);

    // The log says which freshness each release had.
    let entries = kbs.store.audit_entries().await.unwrap();
    let bound: Vec<&str> = entries
        .iter()
        .filter(|e| e.kind == "release")
        .filter_map(|e| e.detail["bound"].as_str())
        .collect();
    assert_eq!(bound, ["connection", "nonce"]);
}
