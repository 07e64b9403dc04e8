//! `attesta-mesh` exactly as scripted: a CA, node certificates within its constraints (and
//! refusals outside them), intermediates, CAs scoped by role and name, `cert print --json`,
//! and `cert verify` with its exit codes — valid, expired, not yet valid, wrong CA, tampered,
//! outside the constraints.

use std::path::Path;
use std::process::{Command, Output};

fn mesh(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attesta-mesh"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_sign_print_verify() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(mesh(
        &[
            "ca",
            "new",
            "--name",
            "attesta-root",
            "--groups",
            "kbs,hosts,tenant:a",
            "--networks",
            "10.42.0.0/16",
            "--duration",
            "8760h",
            "--out",
            "ca",
        ],
        d,
    ));
    assert_eq!(mode(&d.join("ca/ca.key")), 0o600);
    assert_eq!(mode(&d.join("ca/ca.crt")), 0o644);
    ok(mesh(
        &[
            "cert",
            "sign",
            "--ca",
            "ca",
            "--name",
            "kbs-1",
            "--ip",
            "10.42.0.1/16",
            "--groups",
            "kbs",
            "--role",
            "kbs",
            "--duration",
            "720h",
            "--out",
            "kbs",
        ],
        d,
    ));
    assert_eq!(mode(&d.join("kbs/node.key")), 0o600);
    let j: serde_json::Value =
        serde_json::from_str(&ok(mesh(&["cert", "print", "kbs/node.crt", "--json"], d))).unwrap();
    assert_eq!(j["name"], "kbs-1");
    assert_eq!(j["ips"], serde_json::json!(["10.42.0.1/16"]));
    assert_eq!(j["groups"], serde_json::json!(["kbs"]));
    assert_eq!(j["role"], "kbs");
    assert_eq!(j["issuer"], "attesta-root");
    assert!(j["not_before"].as_str().unwrap().ends_with('Z'));
    assert!(j["not_after"].as_str().unwrap() > j["not_before"].as_str().unwrap());
    assert!(ok(mesh(&["cert", "print", "kbs/node.crt"], d)).contains("kbs-1"));

    // Valid now; expired after its 720 h; not yet valid before today.
    assert!(
        ok(mesh(
            &["cert", "verify", "--ca", "ca/ca.crt", "kbs/node.crt"],
            d
        ))
        .contains("valid")
    );
    let late = mesh(
        &[
            "cert",
            "verify",
            "--ca",
            "ca/ca.crt",
            "kbs/node.crt",
            "--at",
            "2099-01-01T00:00:00Z",
        ],
        d,
    );
    assert_eq!(late.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&late.stdout).contains("expired"));
    let early = mesh(
        &[
            "cert",
            "verify",
            "--ca",
            "ca/ca.crt",
            "kbs/node.crt",
            "--at",
            "2020-01-01T00:00:00Z",
        ],
        d,
    );
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stdout).contains("not valid before"));

    // Outside the CA's groups or networks, or longer than the CA: refused at signing.
    for (args, why) in [
        (
            vec!["--ip", "10.42.0.2/16", "--groups", "admins"],
            "outside",
        ),
        (vec!["--ip", "192.168.1.2/24"], "outside"),
        (
            vec!["--ip", "10.42.0.2/16", "--duration", "100000h"],
            "validity",
        ),
        (vec!["--ip", "not-an-ip"], "--ip"),
    ] {
        let mut a = vec!["cert", "sign", "--ca", "ca", "--name", "x", "--out", "x"];
        a.extend(args);
        let o = mesh(&a, d);
        assert_eq!(o.status.code(), Some(1), "{a:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{a:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!d.join("x/node.crt").exists());
    }

    // An intermediate within the root; its nodes verify against the root alone.
    ok(mesh(
        &[
            "ca",
            "new",
            "--name",
            "tenant-a-ca",
            "--parent",
            "ca",
            "--groups",
            "tenant:a",
            "--networks",
            "10.42.7.0/24",
            "--out",
            "inter",
        ],
        d,
    ));
    ok(mesh(
        &[
            "cert",
            "sign",
            "--ca",
            "inter",
            "--name",
            "guest-1",
            "--ip",
            "10.42.7.9/24",
            "--groups",
            "tenant:a",
            "--role",
            "guest",
            "--out",
            "g1",
        ],
        d,
    ));
    ok(mesh(
        &["cert", "verify", "--ca", "ca/ca.crt", "g1/node.crt"],
        d,
    ));
    let wide = mesh(
        &[
            "ca", "new", "--name", "greedy", "--parent", "ca", "--groups", "admins", "--out",
            "greedy",
        ],
        d,
    );
    assert_eq!(
        wide.status.code(),
        Some(1),
        "an intermediate cannot widen its parent"
    );
    let unconstrained = mesh(
        &[
            "ca", "new", "--name", "loose", "--parent", "ca", "--out", "loose",
        ],
        d,
    );
    assert_eq!(
        unconstrained.status.code(),
        Some(1),
        "nor drop its constraints"
    );

    // Another CA does not vouch for it; a tampered certificate does not verify.
    ok(mesh(&["ca", "new", "--name", "other", "--out", "other"], d));
    let foreign = mesh(
        &["cert", "verify", "--ca", "other/ca.crt", "kbs/node.crt"],
        d,
    );
    assert_eq!(foreign.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&foreign.stdout).contains("no trusted CA"));
    let pem = std::fs::read_to_string(d.join("kbs/node.crt")).unwrap();
    let der: Vec<u8> = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .unwrap();
    let mut bad = der.clone();
    let i = bad.len() / 2;
    bad[i] ^= 1;
    std::fs::write(d.join("bad.der"), &bad).unwrap();
    assert_eq!(
        mesh(&["cert", "verify", "--ca", "ca/ca.crt", "bad.der"], d)
            .status
            .code(),
        Some(1)
    );
    // Usage errors: exit 2.
    assert_eq!(
        mesh(
            &["cert", "verify", "--ca", "missing.crt", "kbs/node.crt"],
            d
        )
        .status
        .code(),
        Some(2)
    );
    // P-256 works too.
    ok(mesh(
        &[
            "ca",
            "new",
            "--name",
            "p256-root",
            "--curve",
            "p256",
            "--out",
            "p",
        ],
        d,
    ));
    ok(mesh(
        &[
            "cert",
            "sign",
            "--ca",
            "p",
            "--name",
            "n",
            "--ip",
            "10.1.0.1/16",
            "--curve",
            "p256",
            "--out",
            "pn",
        ],
        d,
    ));
    ok(mesh(
        &["cert", "verify", "--ca", "p/ca.crt", "pn/node.crt"],
        d,
    ));
}

/// A node certificate signed with the CA directory's key by hand, past `cert sign`'s checks:
/// what a careless or compromised signer could produce. Chained with the CA's file.
fn hand_signed(d: &Path, ca: &str, name: &str, role: mesh::cert::Role, out: &str) {
    let ca_pem = std::fs::read_to_string(d.join(ca).join("ca.crt")).unwrap();
    let issuer_cert = mesh::cert::parse_bundle(ca_pem.as_bytes())
        .unwrap()
        .remove(0);
    let key = std::fs::read_to_string(d.join(ca).join("ca.key")).unwrap();
    let mut ip = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.distinguished_name = rcgen::DistinguishedName::new();
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, issuer_cert.name.as_str());
    let issuer = rcgen::Issuer::new(ip, rcgen::KeyPair::from_pem(&key).unwrap());
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let t = |s: u64| rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(s);
    p.not_before = t(issuer_cert.not_before);
    p.not_after = t(issuer_cert.not_after);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    let claims = mesh::cert::Claims {
        v: 1,
        ips: vec!["10.42.7.50/16".into()],
        role: Some(role),
        ..Default::default()
    };
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        mesh::cert::CLAIMS_OID,
        serde_json::to_vec(&claims).unwrap(),
    )];
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = p.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(d.join(out), cert.pem() + &ca_pem).unwrap();
}

/// The broker's guest CA scoped to role guest and single-label names (VM ids): it signs
/// guests, and neither `cert sign` nor `cert verify` lets it make a broker, by role or by name;
/// its intermediates cannot widen that.
#[test]
fn a_ca_scoped_by_role_and_name() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let help = ok(mesh(&["ca", "new", "--help"], d));
    assert!(
        help.contains("--roles") && help.contains("--names"),
        "{help}"
    );
    ok(mesh(&["ca", "new", "--name", "root", "--out", "root"], d));
    ok(mesh(
        &[
            "ca", "new", "--name", "guest-ca", "--parent", "root", "--roles", "guest", "--names",
            "*", "--out", "guests",
        ],
        d,
    ));
    let j: serde_json::Value =
        serde_json::from_str(&ok(mesh(&["cert", "print", "guests/ca.crt", "--json"], d))).unwrap();
    assert_eq!(j["roles"], serde_json::json!(["guest"]));
    assert_eq!(j["names"], serde_json::json!(["*"]));

    let sign = |name: &str, role: Option<&str>, out: &str| {
        let mut a = vec![
            "cert",
            "sign",
            "--ca",
            "guests",
            "--name",
            name,
            "--ip",
            "10.42.7.9/16",
            "--out",
            out,
        ];
        if let Some(r) = role {
            a.extend(["--role", r]);
        }
        mesh(&a, d)
    };
    let verify = |file: &str| mesh(&["cert", "verify", "--ca", "root/ca.crt", file], d);
    ok(sign("vm-1", Some("guest"), "vm1"));
    assert!(ok(verify("vm1/node.crt")).contains("valid: vm-1"));
    for (name, role, why) in [
        (
            "vm-2",
            Some("kbs"),
            "role kbs is outside issuer guest-ca's roles",
        ),
        ("vm-2", None, "role (none) is outside"),
        (
            "kbs.attesta.local",
            Some("guest"),
            "outside issuer guest-ca's names",
        ),
        (
            "vm-2.tenant",
            Some("guest"),
            "outside issuer guest-ca's names",
        ),
    ] {
        let o = sign(name, role, "refused");
        assert_eq!(o.status.code(), Some(1), "{name} {role:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{name} {role:?}: {err}");
        assert!(!d.join("refused/node.crt").exists());
    }

    // Signed by hand with the guest CA's key: verification refuses it all the same.
    hand_signed(d, "guests", "vm-3", mesh::cert::Role::Guest, "hand-ok.crt");
    assert!(ok(verify("hand-ok.crt")).contains("valid: vm-3"));
    for (file, name, role, why) in [
        (
            "hand-kbs.crt",
            "vm-4",
            mesh::cert::Role::Kbs,
            "role kbs is outside",
        ),
        (
            "hand-name.crt",
            "kbs.attesta.local",
            mesh::cert::Role::Guest,
            "names",
        ),
    ] {
        hand_signed(d, "guests", name, role, file);
        let o = verify(file);
        assert_eq!(o.status.code(), Some(1), "{file}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("invalid") && out.contains(why),
            "{file}: {out}"
        );
    }

    // An intermediate under it may narrow, never widen nor drop, its roles and names.
    for (args, why) in [
        (vec!["--roles", "guest,kbs", "--names", "*"], "roles"),
        (vec!["--names", "*"], "roles"),
        (
            vec!["--roles", "guest", "--names", "*.attesta.local"],
            "names",
        ),
        (vec!["--roles", "guest"], "names"),
        (vec!["--roles", "guest", "--names", "a*b"], "--names"),
    ] {
        let mut a = vec![
            "ca", "new", "--name", "sub", "--parent", "guests", "--out", "sub",
        ];
        a.extend(args);
        let o = mesh(&a, d);
        assert_eq!(o.status.code(), Some(1), "{a:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{a:?}: {err}");
        assert!(!d.join("sub/ca.crt").exists());
    }
    // Only node roles are granted: `ca` is not one (a usage error).
    let o = mesh(
        &[
            "ca", "new", "--name", "sub", "--parent", "guests", "--roles", "ca", "--out", "sub",
        ],
        d,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid value 'ca'"));
    ok(mesh(
        &[
            "ca", "new", "--name", "sub", "--parent", "guests", "--roles", "guest", "--names",
            "vm-5", "--out", "sub",
        ],
        d,
    ));
}

mod props {
    use proptest::prelude::*;

    proptest! {
        /// The certificate parser never panics, whatever the bytes.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = mesh::cert::MeshCert::parse(&bytes);
            let _ = mesh::cert::parse_bundle(&bytes);
        }
    }
}
