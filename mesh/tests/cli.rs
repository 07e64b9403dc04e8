//! `attesta-mesh` exactly as scripted: a CA, node certificates within its constraints (and
//! refusals outside them), intermediates, `cert print --json`, and `cert verify` with its exit
//! codes — valid, expired, not yet valid, wrong CA, tampered, outside the constraints.

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
