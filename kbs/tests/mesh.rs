//! The real `attesta-kbs serve` on the mesh: its TLS identity is a mesh certificate (role kbs),
//! hosts relay orders with their mesh certificates and are admitted by role through the mesh
//! firewall, a guest-role certificate cannot register, certificates of a foreign CA are refused
//! at the handshake, a hot-reloaded rules file and a revocation list dropped beside the broker
//! each shut a host out without a restart, and a guest without any certificate still reaches
//! attestation (its evidence gets a signed answer). The broker certifies guests with an
//! intermediate CA (role guest only) and hands them the whole chain up to the root; when a
//! guest's key attests from another chip, the list the broker signs with that intermediate
//! reaches a real lighthouse at once.

mod common;

use common::{KillOnDrop, free_port, guest, kbs, ok, sign_allowlist, start};
use mesh::cert::{LocalCa, MeshCert, Role, parse_bundle};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ca(name: &str) -> LocalCa {
    LocalCa::root(name, &[], now() - 3600, now() + 86_400).unwrap()
}

/// Writes NAME.crt and NAME.key into `dir`; returns the certificate.
fn issue(dir: &Path, ca: &LocalCa, name: &str, ip: &str, role: Role) -> MeshCert {
    let n = ca
        .issue(name, ip, &["infra"], role, now() - 60, now() + 3600)
        .unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), &n.issued.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), n.issued.key_pem.as_bytes()).unwrap();
    n.cert
}

/// The documented example rules: hosts and guests by role, nobody else.
const RULES: &str = include_str!("../../examples/kbs-mesh-rules.toml");

#[test]
fn the_broker_on_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let p = |n: &str| dir.path().join(n);
    let listen = format!("127.0.0.1:{}", free_port());
    // The simulated platform the guests run on (its ARK is a test trust root).
    let state = dir.path().join("sim");
    let pki = Arc::new(
        simulator::Pki::cached(
            snp::Product::Genoa,
            &simulator::Seed::from_text("mesh-test"),
            &state,
            |_| {},
        )
        .unwrap(),
    );
    let chip = simulator::Chip::new(pki.clone(), simulator::ChipConfig::typical(&pki, 0)).unwrap();
    std::fs::write(p("sim-ark.der"), &pki.ark.cert).unwrap();
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &listen])
            .arg("--trust-root")
            .arg(p("sim-ark.der"))
            .output()
            .unwrap(),
        "init",
    );
    let image = hex::encode([0x4d; 48]);
    sign_allowlist(&d, &image);
    ok(
        kbs()
            .args(["order", "register", "--key"])
            .arg(d.join("operator.key"))
            .args([
                "--vm-id",
                "vm-g",
                "--tenant",
                "tenant-a",
                "--mesh-ip",
                "10.42.7.9/16",
            ])
            .args([
                "--measurement",
                &image,
                "--chip-id",
                &hex::encode(chip.config.chip_id),
            ])
            .arg("--out")
            .arg(p("vm-g.signed"))
            .output()
            .unwrap(),
        "order register with a mesh address",
    );
    for vm in ["vm-1", "vm-2"] {
        ok(
            kbs()
                .args(["order", "register", "--key"])
                .arg(d.join("operator.key"))
                .args(["--vm-id", vm, "--tenant", "tenant-a"])
                .args([
                    "--measurement",
                    &image,
                    "--chip-id",
                    &hex::encode([7u8; 64]),
                ])
                .arg("--out")
                .arg(p(&format!("{vm}.signed")))
                .output()
                .unwrap(),
            "order register",
        );
    }

    // The mesh: a CA, the broker's certificate (role kbs, named as guests dial it), a host,
    // a guest-role node, and a host of another CA.
    let root = ca("mesh-ca");
    let other = ca("mesh-ca");
    std::fs::write(d.join("mesh-ca.crt"), &root.pem).unwrap();
    issue(&d, &root, "kbs.attesta.local", "10.42.0.10/16", Role::Kbs);
    let host = issue(dir.path(), &root, "miner-1", "10.42.2.1/16", Role::Host);
    issue(dir.path(), &root, "guest-1", "10.42.3.1/16", Role::Guest);
    issue(dir.path(), &other, "rogue", "10.42.2.9/16", Role::Host);
    std::fs::write(d.join("mesh-rules.toml"), RULES).unwrap();
    // The broker certifies attested guests with an intermediate of the mesh CA that may issue
    // role guest only, under plain names (VM ids), in the guests' network: the broker never
    // holds the root's key, and guests get the whole chain.
    let sub = mesh::cert::sign(
        &root.cert,
        &root.key,
        &mesh::cert::Request {
            name: "guest-ca",
            claims: mesh::cert::Claims {
                v: 1,
                role: Some(Role::Ca),
                networks: vec!["10.42.0.0/16".into()],
                roles: vec![Role::Guest],
                names: vec!["*".into()],
                ..Default::default()
            },
            is_ca: true,
            // Within the root's validity (made a moment earlier).
            not_before: root.cert.not_before,
            not_after: root.cert.not_after,
            curve: mesh::cert::Curve::Ed25519,
        },
    )
    .unwrap();
    std::fs::create_dir_all(d.join("guest-ca")).unwrap();
    std::fs::write(d.join("guest-ca/ca.crt"), sub.cert_pem.clone() + &root.pem).unwrap();
    std::fs::write(d.join("guest-ca/ca.key"), sub.key_pem.as_bytes()).unwrap();
    let toml = std::fs::read_to_string(d.join("kbs.toml"))
        .unwrap()
        .replace(
            "tls_cert = \"tls.crt\"",
            "tls_cert = \"kbs.attesta.local.crt\"",
        )
        .replace(
            "tls_key = \"tls.key\"",
            "tls_key = \"kbs.attesta.local.key\"",
        )
        .replace("client_ca = \"tls-ca.crt\"\n", "");
    assert!(toml.contains("kbs.attesta.local.crt") && !toml.contains("client_ca"));
    // A lighthouse of the mesh, through which the broker publishes its guests' revocations.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lh_listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let lh = {
        let l = p("lighthouse");
        std::fs::create_dir_all(&l).unwrap();
        issue(&l, &root, "lighthouse", "10.42.0.1/16", Role::Lighthouse);
        std::fs::write(l.join("ca.crt"), &root.pem).unwrap();
        std::fs::write(l.join("rules.toml"), "version = 1\n").unwrap();
        let cfg = format!(
            "cert = \"lighthouse.crt\"\nkey = \"lighthouse.key\"\nca = \"ca.crt\"\n\
             rules = \"rules.toml\"\nlisten = \"{lh_listen}\"\nlighthouse = true\nreload_ms = 200\n"
        );
        std::fs::write(l.join("node.toml"), cfg).unwrap();
        let cfg = mesh::node::NodeConfig::load(&l.join("node.toml")).unwrap();
        rt.block_on(mesh::node::Node::start(cfg, vec![])).unwrap()
    };
    std::fs::write(
        d.join("kbs.toml"),
        format!(
            "{toml}allowlist = \"allowlist.signed\"\nlease_min_interval_secs = 0\n[mesh]\nca = \"mesh-ca.crt\"\n\
             rules = \"mesh-rules.toml\"\nrevocation = \"mesh-revocation.json\"\nreload_secs = 1\n\
             guest_ca = \"guest-ca\"\nguest_cert_secs = 3600\n\
             lighthouses = {{ \"10.42.0.1\" = [\"{lh_listen}\"] }}\n"
        ),
    )
    .unwrap();

    let log = Arc::new(Mutex::new(String::new()));
    // Stopped even when an assertion fails (an orphan would hold the test's output open).
    let _server = KillOnDrop(start(&d.join("kbs.toml"), log.clone()));
    let register = |vm: &str, who: &str| {
        kbs()
            .args(["vm", "register"])
            .arg(p(&format!("{vm}.signed")))
            .args(["--kbs", &listen, "--ca"])
            .arg(d.join("mesh-ca.crt"))
            .arg("--cert")
            .arg(p(&format!("{who}.crt")))
            .arg("--key")
            .arg(p(&format!("{who}.key")))
            .output()
            .unwrap()
    };
    // A host, by its mesh role: accepted.
    assert!(ok(register("vm-1", "miner-1"), "host registers").contains("vm-1"));
    // A guest-role certificate passes the firewall but may not register.
    let g = register("vm-2", "guest-1");
    assert_eq!(g.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&g.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&g.stderr)
    );
    // Another CA's host is refused at the handshake.
    let r = register("vm-2", "rogue");
    assert_ne!(r.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&r.stdout).contains("vm-2"));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("no trusted CA issued it"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );

    assert!(ok(register("vm-g", "miner-1"), "host registers vm-g").contains("vm-g"));

    // The real guest agent, asking for a mesh identity: its key is born in the guest, bound in
    // the report, certified by the broker, and placed on tmpfs with the certificate.
    // On tmpfs (secrets never on disk), removed even when an assertion fails.
    let shm_dir = tempfile::Builder::new()
        .prefix("attesta-mesh-test-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let shm = shm_dir.path().to_path_buf();
    let mesh_dir = shm.join("mesh");
    std::fs::File::create(p("disk.img"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    std::fs::write(
        p("guest.toml"),
        format!(
            "vm_id = \"vm-g\"\nrequire_mlock = false\n\
             [broker]\naddress = \"{listen}\"\nserver_name = \"kbs.attesta.local\"\nca = {ca:?}\n\
             response_key = \"{rk}\"\ntimeout_secs = 20\n\
             [disk]\npath = \"disk.img\"\nname = \"attesta-mesh-{pid}\"\n\
             [boot_config]\npath = {bc:?}\n\
             [mesh]\ndir = {md:?}\n\
             [device]\nkind = \"simulator\"\nseed = \"mesh-test\"\nproduct = \"genoa\"\nchip = 0\n\
             measurement = \"{image}\"\nstate_dir = {state:?}\n",
            ca = d.join("mesh-ca.crt").display().to_string(),
            rk = std::fs::read_to_string(d.join("response.pub"))
                .unwrap()
                .trim(),
            pid = std::process::id(),
            bc = shm.join("boot-config").display().to_string(),
            md = mesh_dir.display().to_string(),
            state = state.display().to_string(),
        ),
    )
    .unwrap();
    let out = guest()
        .args(["unlock", "--config"])
        .arg(p("guest.toml"))
        .output()
        .unwrap();
    let _ = std::process::Command::new("cryptsetup")
        .args(["close", &format!("attesta-mesh-{}", std::process::id())])
        .output();
    // 0: activated; 3: the key opened the disk but this machine has no device-mapper.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "guest: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let crt = std::fs::read(mesh_dir.join("node.crt")).unwrap();
    let key = std::fs::read_to_string(mesh_dir.join("node.key")).unwrap();
    let lease_key = guest_agent::keepalive::mesh_key(&mesh_dir).unwrap();
    drop(shm_dir);
    let chain = parse_bundle(&crt).unwrap();
    // Leaf, the broker's intermediate, the root.
    assert_eq!(
        chain.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["vm-g", "guest-ca", "mesh-ca"]
    );
    let cert = chain[0].clone();
    assert_eq!(cert.name, "vm-g");
    assert_eq!(cert.claims.groups, vec!["tenant:tenant-a".to_string()]);
    assert_eq!(cert.claims.ips, vec!["10.42.7.9/16".to_string()]);
    assert_eq!(cert.claims.role, Some(Role::Guest));
    // The root alone verifies it; the leaf without its intermediate does not.
    mesh::cert::verify(&chain, std::slice::from_ref(&root.cert), now()).unwrap();
    assert!(
        mesh::cert::verify(
            std::slice::from_ref(&cert),
            std::slice::from_ref(&root.cert),
            now()
        )
        .is_err()
    );
    // The key on tmpfs is the certified one.
    mesh::cert::sign_with(&cert, &key, b"probe").unwrap();

    // A guest with no certificate reaches attestation: an unknown VM gets a signed denial.
    let response_pub = std::fs::read_to_string(d.join("response.pub")).unwrap();
    let mut rk = [0u8; 32];
    hex::decode_to_slice(response_pub.trim(), &mut rk).unwrap();
    let broker = guest_agent::client::Broker {
        addr: listen.parse().unwrap(),
        server_name: "kbs.attesta.local".into(),
        ca_der: root.cert.der.clone(),
        response_key: rk,
    };
    let guest = chip.launch(simulator::GuestLaunch::default());
    let denied = rt.block_on(guest_agent::client::fetch(&broker, "vm-unknown", &guest));
    let why = denied.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        why.contains("unknown_vm"),
        "a signed denial for an unknown VM, got {why:?}"
    );

    // The VM's mesh key attests from another chip (a clone): the lease is revoked, and the
    // broker's list — signed by its intermediate — reaches the lighthouse at once, where a
    // certificate valid for another hour is revoked.
    let other = simulator::Chip::new(pki.clone(), simulator::ChipConfig::typical(&pki, 1)).unwrap();
    let clone = other.launch(simulator::GuestLaunch {
        measurement: [0x4d; 48],
        ..Default::default()
    });
    let got = rt.block_on(guest_agent::client::renew(
        &broker, "vm-g", &clone, &lease_key,
    ));
    let why = got.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(why.contains("lease_other_chip"), "{why}");
    let end = Instant::now() + Duration::from_secs(10);
    while !lh.trust().is_revoked(&cert) {
        assert!(
            Instant::now() < end,
            "the lighthouse never learnt: {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cert.not_after > now() + 3000, "revoked long before it ends");
    // The lighthouse holds it as the broker's intermediate's list, beside nothing else.
    let held = lh.trust().list_summary();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].0.as_str(), held[0].3), ("guest-ca", 1));
    assert!(
        log.lock()
            .unwrap()
            .contains("guest revocation list published")
    );
    rt.block_on(lh.shutdown());

    // From here, vm-1 again is the probe: an admitted host hears `vm_exists`, a refused one
    // never reaches the broker's order handling.
    let admitted = || {
        let out = register("vm-1", "miner-1");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (err.contains("vm_exists"), err)
    };
    let until = |want: bool, what: &str| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let (got, err) = admitted();
            if got == want {
                return err;
            }
            assert!(Instant::now() < end, "{what}: {err}");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    assert!(admitted().0);
    // Rules reloaded without the host role: the host is shut out, no restart.
    std::fs::write(
        d.join("mesh-rules.toml"),
        "version = 1\n[[inbound]]\nfrom = { role = \"guest\" }\nservice = \"attesta-kbs/1\"\n",
    )
    .unwrap();
    let why = until(false, "the rules were not reloaded");
    assert!(why.contains("firewall"), "{why}");
    // A rules file whose own tests fail is refused; the current rules stay.
    std::fs::write(
        d.join("mesh-rules.toml"),
        RULES.replace("expect = \"deny\"", "expect = \"allow\""),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!admitted().0, "a failing rules file must not be loaded");
    std::fs::write(d.join("mesh-rules.toml"), RULES).unwrap();
    until(true, "the rules were not restored");

    // The mesh CA revokes the host: the broker refuses it from the next handshake on.
    let body = mesh::revocation::Body {
        v: 1,
        ca: "mesh-ca".into(),
        number: 1,
        issued_at: now(),
        serials: vec![],
        keys: vec![hex::encode(host.key_hash)],
    };
    mesh::watch::write_atomic(
        &d.join("mesh-revocation.json"),
        &mesh::revocation::sign(&root.cert, &root.key, &body).unwrap(),
    )
    .unwrap();
    until(false, "the revocation list was not installed");
    assert!(
        log.lock()
            .unwrap()
            .contains("mesh revocation list installed")
    );
}
