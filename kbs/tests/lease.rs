//! A running VM's lease over real QUIC on loopback: the release that certifies the guest's mesh
//! key starts it; `renew` with a fresh report and the key's proof gives a new certificate; an
//! older instance's key, a withdrawn image and a terminated VM are not renewed; the VM's key
//! attesting from another chip revokes the lease for good — recorded, counted, audited.

mod common;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use common::inproc::{GOOD, Setup, now, order_on, pk, serve_on_loopback, setup, setup_with};
use guest_agent::client::{Broker, ClientError, fetch_with_mesh_key, renew};
use kbs::store::Store;
use proto::order::{Allowlist, ORDER_VERSION};
use serde_bytes::ByteBuf;
use simulator::GuestLaunch;
use snp::device::GuestDevice;
use std::sync::atomic::Ordering;

fn denied(r: Result<guest_agent::client::Renewed, ClientError>) -> Vec<String> {
    match r {
        Err(ClientError::Denied(reasons)) => reasons,
        Err(e) => panic!("expected a signed denial, got {e}"),
        Ok(_) => panic!("expected a denial, got a renewal"),
    }
}

/// The broker certifying guests' mesh keys for 600 s (the lease) under a fresh guest CA, `vm`
/// registered on `setup`'s chip with overlay address `ip`, served on loopback.
async fn leasing(s: &Setup, vm: &str, ip: &str) -> (Broker, mesh::cert::LocalCa, Vec<u8>) {
    let t = now();
    let ca =
        mesh::cert::LocalCa::root("guest-ca", &["10.42.0.0/16"], t - 86_400, t + 86_400).unwrap();
    assert!(
        s.kbs
            .guest_issuer
            .set(kbs::service::GuestIssuer::new(
                ca.cert.clone(),
                vec![],
                ca.key.clone(),
                600
            ))
            .is_ok()
    );
    let mut order = order_on(vm, &s.chip);
    order.mesh_ip = Some(ip.into());
    let signed = order.sign(&s.operator);
    s.kbs.register(&signed, t).await.unwrap();
    (serve_on_loopback(&s.kbs, s.response_pub), ca, signed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_refused_and_revoked_for_its_reasons() {
    let s = setup_with(|k| k.lease_min_interval = 0).await;
    let (broker, ca, _) = leasing(&s, "vm-l", "10.42.7.9/16").await;
    let Setup {
        chip,
        elsewhere,
        offline,
        response_pub,
        kbs,
        ..
    } = &s;
    let t = now();
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let key = Ed25519KeyPair::generate().unwrap();
    let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();

    // Before any release: no lease.
    assert_eq!(
        denied(renew(&broker, "vm-l", &guest, &key).await),
        ["no_lease"]
    );
    let released = fetch_with_mesh_key(&broker, "vm-l", &guest, &public)
        .await
        .unwrap();
    assert!(!released.mesh_cert.is_empty());

    // Renewed: a new certificate for the same key, ending a lease from now.
    let r = renew(&broker, "vm-l", &guest, &key).await.unwrap();
    let cert = mesh::cert::MeshCert::parse(&r.mesh_cert).unwrap();
    assert_eq!(cert.name, "vm-l");
    assert_eq!(r.not_after, t + 600);
    mesh::cert::verify(&[cert], std::slice::from_ref(&ca.cert), t).unwrap();
    assert_eq!(kbs.metrics.lease_renewals.load(Ordering::Relaxed), 1);

    // A key no release certified (an earlier instance, say): not renewed, nothing revoked.
    let other = Ed25519KeyPair::generate().unwrap();
    assert_eq!(
        denied(renew(&broker, "vm-l", &guest, &other).await),
        ["lease_other_mesh_key"]
    );

    // The image withdrawn: not renewed (the VM drops off the mesh when its certificate ends);
    // listed again: renewed again — a withdrawal does not revoke.
    let list = |epoch: u64, images: &[[u8; 48]]| {
        Allowlist {
            v: ORDER_VERSION,
            epoch,
            measurements: images.iter().map(|m| ByteBuf::from(m.to_vec())).collect(),
        }
        .sign(offline)
    };
    kbs.set_allowlist(&list(2, &[[0x0e; 48]]), &pk(offline), t)
        .await
        .unwrap();
    assert_eq!(
        denied(renew(&broker, "vm-l", &guest, &key).await),
        ["measurement_withdrawn"]
    );
    kbs.set_allowlist(&list(3, &[GOOD]), &pk(offline), t)
        .await
        .unwrap();
    renew(&broker, "vm-l", &guest, &key).await.unwrap();

    // The VM's key on another chip (a clone, or a key taken out of the VM): revoked, whatever
    // the order says of that chip — and from then on the genuine VM is not renewed either.
    let clone = elsewhere.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let reasons = denied(renew(&broker, "vm-l", &clone, &key).await);
    assert!(
        reasons.contains(&"lease_other_chip".to_string()),
        "{reasons:?}"
    );
    assert_eq!(
        denied(renew(&broker, "vm-l", &guest, &key).await),
        ["lease_revoked"]
    );
    assert_eq!(kbs.metrics.lease_revocations.load(Ordering::Relaxed), 1);
    let lease = kbs.store.lease("vm-l").await.unwrap().unwrap();
    assert!(
        lease
            .revoked
            .is_some_and(|r| r.contains("lease_other_chip"))
    );

    // Another image under the VM's key, from a VM booted again (a new lease): revoked too.
    let released = fetch_with_mesh_key(&broker, "vm-l", &guest, &public)
        .await
        .unwrap();
    assert!(!released.mesh_cert.is_empty());
    renew(&broker, "vm-l", &guest, &key).await.unwrap();
    kbs.set_allowlist(&list(4, &[GOOD, [0x11; 48]]), &pk(offline), t)
        .await
        .unwrap();
    let other_image = chip.launch(GuestLaunch {
        measurement: [0x11; 48],
        ..Default::default()
    });
    let reasons = denied(renew(&broker, "vm-l", &other_image, &key).await);
    assert!(
        reasons.contains(&"lease_other_measurement".to_string()),
        "{reasons:?}"
    );
    assert_eq!(kbs.metrics.lease_revocations.load(Ordering::Relaxed), 2);

    // A proof by another key than the one named: decided nothing, recorded nothing.
    let exporter = [5u8; 32];
    let (report, cert_table) = guest
        .get_ext_report(&proto::renew_report_data(&exporter, &public), 0)
        .unwrap();
    let before = kbs.store.audit_log().await.unwrap();
    let r = kbs
        .handle(
            proto::msg::Request::Renew {
                v: proto::msg::VERSION,
                vm_id: "vm-l".into(),
                report,
                cert_table,
                mesh_key: public.to_vec(),
                proof: other
                    .sign(&proto::renew_proof_message(&exporter))
                    .as_ref()
                    .to_vec(),
            },
            kbs::service::Role::Guest,
            exporter,
            t,
        )
        .await;
    let proto::msg::Decision::Denial(d) = proto::msg::verify_decision(response_pub, &r).unwrap()
    else {
        panic!("{r:?}")
    };
    assert_eq!(d.reasons, ["bad_mesh_key_proof"]);
    assert_eq!(kbs.store.audit_log().await.unwrap(), before);

    let metrics = kbs.metrics.render(&Default::default());
    assert!(
        metrics.contains("attesta_kbs_lease_renewals_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("attesta_kbs_lease_revocations_total 2"),
        "{metrics}"
    );

    // Every decision is in the audit log.
    let log = kbs.store.audit_log().await.unwrap();
    for kind in ["lease_renewed", "lease_refused", "lease_revoked"] {
        assert!(log.contains(&format!("\"kind\":\"{kind}\"")), "{kind}");
    }
}

/// With an intermediate guest CA, a clone's revocation reaches the mesh at once: the broker's
/// list (here installed on its gate) names the VM's key as soon as the lease is revoked, and
/// still does after the VM boots again with a new key, which is not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_revokes_the_vms_certificates_at_once() {
    let s = setup_with(|k| k.lease_min_interval = 0).await;
    let t = now();
    let root = mesh::cert::LocalCa::root("mesh-ca", &["10.42.0.0/16"], t - 60, t + 86_400).unwrap();
    let guests = root
        .intermediate(
            "guest-ca",
            &["10.42.0.0/16"],
            &[mesh::cert::Role::Guest],
            &["*"],
            t - 60,
            t + 86_400,
        )
        .unwrap();
    assert!(
        s.kbs
            .guest_issuer
            .set(kbs::service::GuestIssuer::new(
                guests.cert.clone(),
                vec![],
                guests.key.clone(),
                3600
            ))
            .is_ok()
    );
    let mut order = order_on("vm-r", &s.chip);
    order.mesh_ip = Some("10.42.7.10/16".into());
    s.kbs.register(&order.sign(&s.operator), t).await.unwrap();
    let broker = serve_on_loopback(&s.kbs, s.response_pub);
    let gate = mesh::transport::Trust::new(vec![root.cert.clone()]);
    tokio::spawn(kbs::guest_revocation::follow(
        s.kbs.clone(),
        kbs::guest_revocation::Outlets {
            gate: Some(gate.clone()),
            node: None,
        },
        std::time::Duration::from_secs(600),
        now,
    ));
    let guest = s.chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let key = Ed25519KeyPair::generate().unwrap();
    let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
    let released = fetch_with_mesh_key(&broker, "vm-r", &guest, &public)
        .await
        .unwrap();
    let cert = mesh::cert::MeshCert::parse(&released.mesh_cert).unwrap();
    assert_eq!(cert.issuer, "guest-ca");
    let renewed = renew(&broker, "vm-r", &guest, &key).await.unwrap();
    let renewed = mesh::cert::MeshCert::parse(&renewed.mesh_cert).unwrap();
    // Renewals and releases revoke nothing.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!gate.is_revoked(&cert) && !gate.is_revoked(&renewed));
    assert!(
        gate.list_summary().is_empty(),
        "no list before a revocation"
    );

    let clone = s.elsewhere.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let reasons = denied(renew(&broker, "vm-r", &clone, &key).await);
    assert!(
        reasons.contains(&"lease_other_chip".to_string()),
        "{reasons:?}"
    );
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !gate.is_revoked(&renewed) {
        assert!(std::time::Instant::now() < until, "never revoked");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        gate.is_revoked(&cert),
        "every certificate for the key, by key"
    );

    // The VM boots again with a new key: its new lease is not revoked, the old key still is.
    let key2 = Ed25519KeyPair::generate().unwrap();
    let public2: [u8; 32] = key2.public_key().as_ref().try_into().unwrap();
    let again = fetch_with_mesh_key(&broker, "vm-r", &guest, &public2)
        .await
        .unwrap();
    let new_cert = mesh::cert::MeshCert::parse(&again.mesh_cert).unwrap();
    let listed = s.kbs.store.revoked_mesh_keys(0).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].mesh_key, public.to_vec());
    assert_eq!(listed[0].vm_id, "vm-r");
    assert!(
        listed[0].why.contains("lease_other_chip"),
        "{:?}",
        listed[0]
    );
    assert!(gate.is_revoked(&renewed) && !gate.is_revoked(&new_cert));
    // The mesh's list is still what the store says (the boot removed nothing from it): nothing
    // to publish.
    let outlets = kbs::guest_revocation::Outlets {
        gate: Some(gate.clone()),
        node: None,
    };
    assert_eq!(
        kbs::guest_revocation::publish_once(&s.kbs, &outlets, now()).await,
        Ok(false)
    );
    // The list is the guest CA's, delegated: one list, from the intermediate.
    let lists = gate.list_summary();
    assert_eq!(lists.len(), 1);
    assert_eq!((lists[0].0.as_str(), lists[0].3), ("guest-ca", 1));
    // A list the mesh lost (here: a gate that never had it) is published again.
    let fresh = mesh::transport::Trust::new(vec![root.cert.clone()]);
    let outlets = kbs::guest_revocation::Outlets {
        gate: Some(fresh.clone()),
        node: None,
    };
    assert_eq!(
        kbs::guest_revocation::publish_once(&s.kbs, &outlets, now()).await,
        Ok(true)
    );
    assert!(fresh.is_revoked(&renewed) && fresh.is_revoked(&cert));
}

/// The real `attesta-guest keepalive --once` in a running guest's place: it reads the mesh key
/// `unlock` left on tmpfs, renews, and replaces `node.crt` with the new certificate for that key;
/// once the image is withdrawn it fails (exit 1) and leaves `node.crt` as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attesta_guest_keepalive_renews_the_certificate_on_tmpfs() {
    let s = setup_with(|k| k.lease_min_interval = 0).await;
    let (broker, _ca, order) = leasing(&s, "vm-k", "10.42.7.10/16").await;
    let Setup {
        dir,
        chip,
        offline,
        response_pub,
        kbs,
        ..
    } = &s;
    let t = now();

    // What `unlock` leaves: the mesh key and its certificate on tmpfs.
    let shm = tempfile::Builder::new()
        .prefix("attesta-keepalive")
        .tempdir_in("/dev/shm")
        .unwrap();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
    std::fs::write(
        shm.path().join("node.key"),
        snp::certs::pem_encode("PRIVATE KEY", pkcs8.as_ref()),
    )
    .unwrap();
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let released = fetch_with_mesh_key(&broker, "vm-k", &guest, &public)
        .await
        .unwrap();
    let first = snp::certs::pem_encode("CERTIFICATE", &released.mesh_cert);
    std::fs::write(shm.path().join("node.crt"), &first).unwrap();

    std::fs::write(
        dir.path().join("ca.crt"),
        snp::certs::pem_encode("CERTIFICATE", &broker.ca_der),
    )
    .unwrap();
    let cfg = dir.path().join("guest.toml");
    std::fs::write(
        &cfg,
        format!(
            "vm_id = \"vm-k\"\nrequire_mlock = false\n\
             [broker]\naddress = \"{}\"\nserver_name = \"{}\"\nca = \"ca.crt\"\nresponse_key = \"{}\"\n\
             [disk]\npath = \"unused.img\"\n[mesh]\ndir = \"{}\"\n\
             [device]\nkind = \"simulator\"\nseed = \"e2e\"\nproduct = \"milan\"\nchip = 0\n\
             measurement = \"{}\"\nstate_dir = \"{}\"\n",
            broker.addr,
            broker.server_name,
            hex::encode(response_pub),
            shm.path().display(),
            hex::encode(GOOD),
            dir.path().join("sim-state").display(),
        ),
    )
    .unwrap();
    let keepalive = || {
        common::guest()
            .args(["keepalive", "--once", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = keepalive();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renewed = std::fs::read_to_string(shm.path().join("node.crt")).unwrap();
    assert_ne!(renewed, first, "node.crt was replaced");
    let der = snp::certs::pem_blocks(renewed.as_bytes())
        .unwrap()
        .remove(0);
    let cert = mesh::cert::MeshCert::parse(&der).unwrap();
    let mut spki = hex::decode("302a300506032b6570032100").unwrap();
    spki.extend_from_slice(&public);
    assert_eq!(
        cert.key_hash.to_vec(),
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki).as_ref(),
        "the renewed certificate is for the key on tmpfs"
    );

    // The tenant's "attest now with my nonce": asked through the broker, passed to the VM with
    // its next renewal, answered by its keepalive, and checked by the tenant offline.
    let asked = dir.path().join("asked");
    let nonce = "5a".repeat(32);
    let tenant = common::kbs()
        .args([
            "challenge",
            "--vm",
            "vm-k",
            "--kbs",
            &broker.addr.to_string(),
        ])
        .arg("--ca")
        .arg(dir.path().join("ca.crt"))
        .args(["--server-name", &broker.server_name, "--nonce", &nonce])
        .args(["--wait", "60", "--poll", "1", "--out"])
        .arg(&asked)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The challenge waits at the broker before the VM renews.
    let t0 = std::time::Instant::now();
    while kbs.challenges.lock().unwrap().waiting("vm-k", t).is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "never asked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = keepalive();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answered = tokio::task::spawn_blocking(move || tenant.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        answered.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&answered.stderr)
    );
    std::fs::write(dir.path().join("order.signed"), &order).unwrap();
    let chain = dir.path().join("sim-chain.pem");
    std::fs::write(
        &chain,
        snp::certs::pem_encode("CERTIFICATE", &s.pki.ask.cert)
            + &snp::certs::pem_encode("CERTIFICATE", &s.pki.ark.cert),
    )
    .unwrap();
    let verify = |nonce: &str| {
        std::process::Command::new(common::sibling("attesta-verify"))
            .arg("report")
            .arg(&asked)
            .args(["--nonce", nonce, "--at", "2026-06-01T00:00:00Z", "--json"])
            .args(["--mesh-key", &hex::encode(public)])
            .arg("--order")
            .arg(dir.path().join("order.signed"))
            .arg("--trust-chain")
            .arg(&chain)
            .output()
            .unwrap()
    };
    let good = verify(&nonce);
    let j: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(good.status.code(), Some(0), "{j:#}");
    assert_eq!(j["report"]["measurement"], hex::encode(GOOD));
    assert_eq!(
        std::fs::read_to_string(asked.join("mesh_key")).unwrap(),
        hex::encode(public)
    );
    // Another nonce: not an answer to that challenge.
    let other = verify(&"6b".repeat(32));
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stdout).contains("report_data_mismatch"));

    // That renewal replaced node.crt again.
    let renewed = std::fs::read_to_string(shm.path().join("node.crt")).unwrap();

    // The image withdrawn: refused, exit 1, node.crt left as it was (it ends with its lease).
    let withdrawn = Allowlist {
        v: ORDER_VERSION,
        epoch: 2,
        measurements: vec![ByteBuf::from(vec![0x0e; 48])],
    };
    kbs.set_allowlist(&withdrawn.sign(offline), &pk(offline), t)
        .await
        .unwrap();
    let out = keepalive();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("measurement_withdrawn"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(shm.path().join("node.crt")).unwrap(),
        renewed
    );
}

/// A lease renewed again sooner than `lease_min_interval` is refused before any verification or
/// audit entry: a VM (or whoever holds its key) renewing in a loop costs the broker nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_too_soon_costs_nothing() {
    let s = setup().await;
    let (broker, _ca, _) = leasing(&s, "vm-s", "10.42.7.11/16").await;
    let Setup { chip, kbs, .. } = &s;
    let guest = chip.launch(GuestLaunch {
        measurement: GOOD,
        ..Default::default()
    });
    let key = Ed25519KeyPair::generate().unwrap();
    let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
    fetch_with_mesh_key(&broker, "vm-s", &guest, &public)
        .await
        .unwrap();
    let before = kbs.store.audit_log().await.unwrap();
    assert_eq!(
        denied(renew(&broker, "vm-s", &guest, &key).await),
        ["renewed_too_soon"]
    );
    assert_eq!(kbs.store.audit_log().await.unwrap(), before);
}
