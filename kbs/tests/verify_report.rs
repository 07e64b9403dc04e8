//! The `attesta-kbs verify-report` interface exactly as external checks script it, run as the
//! real binary against the real-hardware corpus.

#[path = "../../snp/tests/common/mod.rs"]
mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_attesta-kbs"));
    c.arg("verify-report");
    c
}

fn run(args: &[&str]) -> (i32, Value, String) {
    let out = bin().args(args).output().expect("run attesta-kbs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn item_args(dir: &Path) -> Vec<String> {
    let mut a = vec![s(&dir.join("report.bin"))];
    for f in ["vcek.der", "vcek.pem", "vlek.der"] {
        if dir.join(f).exists() {
            a.extend(["--vcek".into(), s(&dir.join(f))]);
        }
    }
    if dir.join("cert_chain.pem").exists() {
        a.extend(["--chain".into(), s(&dir.join("cert_chain.pem"))]);
    } else {
        a.extend([
            "--ask".into(),
            s(&dir.join("ask.pem")),
            "--ark".into(),
            s(&dir.join("ark.pem")),
        ]);
    }
    a
}

fn items(corpus: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(corpus)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("report.bin").exists())
        .collect();
    v.sort();
    v
}

#[test]
fn corpus_verdicts_and_exit_codes() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let mut genuine = 0;
    for dir in items(&corpus) {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut args = item_args(&dir);
        args.extend(["--json".into(), "--at".into()]);
        args.push(
            if name.contains("vlek") {
                "2025-06-01T00:00:00Z"
            } else {
                "2026-06-01T00:00:00Z"
            }
            .into(),
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, j, err) = run(&refs);
        if dir.join("EXPECT").exists() {
            assert_eq!(code, 1, "{name}: {j} {err}");
            assert_eq!(j["verdict"], "rejected");
            assert!(!j["reasons"].as_array().unwrap().is_empty());
        } else {
            genuine += 1;
            assert_eq!(code, 0, "{name}: {j} {err}");
            assert_eq!(j["verdict"], "accepted");
            assert_eq!(j["reasons"], serde_json::json!([]));
            assert_eq!(j["amd_rooted"], true);
            for k in [
                "product",
                "version",
                "measurement",
                "report_data",
                "chip_id",
                "tcb",
                "policy",
                "vmpl",
            ] {
                assert!(!j[k].is_null(), "{name}: missing {k}");
            }
            assert_eq!(j["measurement"].as_str().unwrap().len(), 96);
            assert_eq!(j["chip_id"].as_str().unwrap().len(), 128);
            if name.contains("turin") {
                assert_eq!(j["product"], "turin");
                assert_eq!(j["tcb"]["reported"]["fmc"], 1);
                assert_eq!(j["tcb"]["reported"]["snp"], 4);
                assert_eq!(j["tcb"]["reported"]["microcode"], 81);
            }
        }
    }
    assert_eq!(genuine, 15);
}

#[test]
fn builtin_roots_store_and_expiry() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let d = corpus.join("msft-genoa-v3");
    // Built-in AMD roots: no --ask/--ark.
    let (code, j, _) = run(&[
        &s(&d.join("report.bin")),
        "--vcek",
        &s(&d.join("vcek.pem")),
        "--json",
        "--at",
        "2026-06-01T00:00:00Z",
    ]);
    assert_eq!((code, j["product"].as_str()), (0, Some("genoa")));

    // Offline store in trustee's layout, filled with the corpus's VCEKs.
    let store = tempfile::tempdir().unwrap();
    let s_store = snp_kds_free_store(&corpus, store.path());
    for dir in items(&corpus)
        .iter()
        .filter(|d| !d.join("EXPECT").exists() && !d.to_string_lossy().contains("vlek"))
    {
        let (code, j, e) = run(&[
            &s(&dir.join("report.bin")),
            "--vcek-store",
            &s_store,
            "--json",
            "--at",
            "2026-06-01T00:00:00Z",
        ]);
        assert_eq!(code, 0, "{}: {j} {e}", dir.display());
    }
    let empty = tempfile::tempdir().unwrap();
    let (code, j, _) = run(&[
        &s(&d.join("report.bin")),
        "--vcek-store",
        &s(empty.path()),
        "--json",
    ]);
    assert_eq!(code, 1);
    assert!(
        j["reason_codes"]
            .as_array()
            .unwrap()
            .contains(&"missing_certificate".into()),
        "{j}"
    );

    // The VLEK expired on 2025-12-10.
    let v = corpus.join("trustee-milan-vlek");
    let base = [
        s(&v.join("report.bin")),
        "--vcek".into(),
        s(&v.join("vlek.der")),
        "--chain".into(),
        s(&v.join("cert_chain.pem")),
    ];
    let mut late: Vec<&str> = base.iter().map(String::as_str).collect();
    late.extend(["--json", "--at", "2026-01-01T00:00:00Z"]);
    let (code, j, _) = run(&late);
    assert_eq!(code, 1);
    assert_eq!(
        j["reason_codes"],
        serde_json::json!(["certificate_expired"])
    );
}

/// Writes each genuine VCEK as DER under `vcek/{hwid}/bl.._vcek.der`, computing names with
/// an independent formatter (not the crate's), to check layout compatibility.
fn snp_kds_free_store(corpus: &Path, root: &Path) -> String {
    for it in common::items(corpus)
        .iter()
        .filter(|i| !i.expect_fail && !i.name.contains("vlek"))
    {
        let r = &it.report;
        let turin = it.name.contains("turin");
        let tcb = u64::from_le_bytes(r[0x180..0x188].try_into().unwrap()).to_le_bytes();
        let chip = &r[0x1A0..0x1E0];
        let (hwid, name) = if turin {
            (
                hex::encode(&chip[..8]),
                format!(
                    "bl{:02}_tee{:02}_snp{:02}_ucode{:02}_fmc{:02}_vcek.der",
                    tcb[1], tcb[2], tcb[3], tcb[7], tcb[0]
                ),
            )
        } else {
            (
                hex::encode(chip),
                format!(
                    "bl{:02}_tee{:02}_snp{:02}_ucode{:02}_vcek.der",
                    tcb[0], tcb[1], tcb[6], tcb[7]
                ),
            )
        };
        let dir = root.join("vcek").join(hwid);
        std::fs::create_dir_all(&dir).unwrap();
        let der = snp::certs::to_der(&it.vcek).unwrap();
        std::fs::write(dir.join(name), der).unwrap();
    }
    s(root)
}

#[test]
fn malformed_unreadable_and_usage() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let d = corpus.join("virtee-milan");
    let tmp = tempfile::tempdir().unwrap();
    let short = tmp.path().join("short.bin");
    std::fs::write(
        &short,
        &std::fs::read(d.join("report.bin")).unwrap()[..1000],
    )
    .unwrap();
    let (code, j, _) = run(&[&s(&short), "--vcek", &s(&d.join("vcek.der")), "--json"]);
    assert_eq!(code, 1, "a malformed report is a rejection");
    assert_eq!(j["verdict"], "rejected");
    assert!(
        j["reasons"][0].as_str().unwrap().contains("1000 bytes"),
        "{j}"
    );

    let (code, _, err) = run(&[
        &s(&tmp.path().join("missing.bin")),
        "--vcek",
        &s(&d.join("vcek.der")),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read report"), "{err}");
    let (code, _, _) = run(&[&s(&d.join("report.bin"))]);
    assert_eq!(code, 2, "--vcek or --vcek-store is required");
    let (code, _, _) = run(&[
        &s(&d.join("report.bin")),
        "--vcek",
        &s(&d.join("vcek.der")),
        "--ask",
        &s(&d.join("ask.pem")),
    ]);
    assert_eq!(code, 2, "--ask needs --ark");
    let (code, _, err) = run(&[
        &s(&d.join("report.bin")),
        "--vcek",
        &s(&d.join("vcek.der")),
        "--at",
        "yesterday",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, _) = run(&[
        &s(&d.join("report.bin")),
        "--vcek",
        &s(&d.join("vcek.der")),
        "--product",
        "rome",
    ]);
    assert_eq!(code, 2);
}

#[test]
fn chain_bundle_policy_and_crl() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let d = corpus.join("gosev-milan");
    let tmp = tempfile::tempdir().unwrap();
    let chain = tmp.path().join("chain.pem");
    let mut bundle = std::fs::read(d.join("ask.pem")).unwrap();
    bundle.extend(std::fs::read(d.join("ark.pem")).unwrap());
    std::fs::write(&chain, bundle).unwrap();
    let rep = s(&d.join("report.bin"));
    let vcek = s(&d.join("vcek.der"));
    let at = "2026-06-01T00:00:00Z";
    let (code, j, _) = run(&[
        &rep,
        "--vcek",
        &vcek,
        "--chain",
        &s(&chain),
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 0, "{j}");
    let measurement = j["measurement"].as_str().unwrap().to_string();

    // Appraisal. go-sev-guest's sample comes from a debug guest: refused by default.
    assert_eq!(j["policy"]["debug"], true);
    let default = tmp.path().join("default.toml");
    std::fs::write(&default, "version = 1\n").unwrap();
    let (code, j, _) = run(&[
        &rep,
        "--vcek",
        &vcek,
        "--policy",
        &s(&default),
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(
        (code, j["reason_codes"].clone()),
        (1, serde_json::json!(["policy_flag_forbidden"]))
    );
    // Debug explicitly allowed and this measurement allowed: accepted; then another measurement: not.
    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "version = 1\nmeasurements = [\"{measurement}\"]\n[guest_policy]\nallow_debug = true\n"
        ),
    )
    .unwrap();
    let (code, j, e) = run(&[
        &rep,
        "--vcek",
        &vcek,
        "--policy",
        &s(&good),
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 0, "{j} {e}");
    assert_eq!(j["appraised"], true);
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "version = 1\nmeasurements = [\"{}\"]\nminimum_guest_svn = 99\n",
            "00".repeat(48)
        ),
    )
    .unwrap();
    let (code, j, _) = run(&[
        &rep,
        "--vcek",
        &vcek,
        "--policy",
        &s(&bad),
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 1);
    let codes = j["reason_codes"].as_array().unwrap();
    assert!(
        codes.contains(&"measurement_not_allowed".into())
            && codes.contains(&"guest_svn_too_low".into()),
        "{j}"
    );
    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, "version = 1\nno_such_rule = true\n").unwrap();
    let (code, _, err) = run(&[&rep, "--vcek", &vcek, "--policy", &s(&broken)]);
    assert_eq!(code, 2, "an invalid policy is a usage error: {err}");

    // A CRL that does not verify against AMD's ARK: revocation cannot be checked, so reject.
    let pki = simulator::Pki::generate(snp::Product::Milan).unwrap();
    let crl = tmp.path().join("forged.crl");
    std::fs::write(
        &crl,
        pki.ark
            .sign_crl(&[], 1_780_000_000, Some(1_790_000_000))
            .unwrap(),
    )
    .unwrap();
    let (code, j, _) = run(&[
        &rep,
        "--vcek",
        &vcek,
        "--crl",
        &s(&crl),
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 1);
    assert_eq!(j["reason_codes"], serde_json::json!(["crl_invalid"]));
    // Revocation required and no CRL: fail closed.
    let (code, j, _) = run(&[&rep, "--vcek", &vcek, "--require-crl", "--json", "--at", at]);
    assert_eq!(code, 1);
    assert_eq!(j["reason_codes"], serde_json::json!(["crl_unavailable"]));
}

#[test]
fn simulator_root_only_with_trust_root() {
    use snp::report::{Cpuid, GuestPolicy, ReportBody};
    let pki = simulator::Pki::generate(snp::Product::Genoa).unwrap();
    let tcb = snp::Tcb {
        fmc: None,
        bootloader: 9,
        tee: 0,
        snp: 23,
        microcode: 72,
    };
    let mut chip = [0u8; 64];
    chip.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let vcek = pki.issue_vcek(&chip, &tcb, 1_770_000_000).unwrap();
    let t = tcb.encode(snp::Product::Genoa);
    let mut body = ReportBody {
        version: 3,
        cpuid: Some(Cpuid {
            family: 0x19,
            model: 0x11,
            stepping: 1,
        }),
        policy: GuestPolicy(0x3_0000),
        chip_id: chip,
        reported_tcb: t,
        current_tcb: t,
        committed_tcb: t,
        launch_tcb: t,
        ..Default::default()
    };
    let report = vcek.sign_report(&mut body).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let w = |n: &str, b: &[u8]| {
        let p = tmp.path().join(n);
        std::fs::write(&p, b).unwrap();
        s(&p)
    };
    let (rep, vc, ask, ark) = (
        w("report.bin", &report),
        w("vcek.der", &vcek.cert),
        w("ask.der", &pki.ask.cert),
        w("ark.der", &pki.ark.cert),
    );
    let at = "2026-06-01T00:00:00Z";
    let (code, j, _) = run(&[
        &rep, "--vcek", &vc, "--ask", &ask, "--ark", &ark, "--json", "--at", at,
    ]);
    assert_eq!(code, 1);
    assert_eq!(j["reason_codes"], serde_json::json!(["ark_not_trusted"]));
    let (code, j, _) = run(&[
        &rep,
        "--vcek",
        &vc,
        "--ask",
        &ask,
        "--ark",
        &ark,
        "--trust-root",
        &ark,
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["amd_rooted"], false);
    assert!(j["root"].as_str().unwrap().starts_with("configured:"));
    // Text output says so too.
    let out = bin()
        .args([
            &rep,
            "--vcek",
            &vc,
            "--ask",
            &ask,
            "--ark",
            &ark,
            "--trust-root",
            &ark,
            "--at",
            at,
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT AMD-rooted"));
}

/// A minimal HTTP/1.1 server on loopback for the key-server tests: path → body, else 404.
fn http_server(routes: std::collections::HashMap<String, Vec<u8>>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let line = String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let path = line.split(' ').nth(1).unwrap_or_default();
            let (status, body) = match routes.get(path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", b"not here".to_vec()),
            };
            let _ = write!(
                sock,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(&body);
        }
    });
    base
}

#[test]
fn fetches_a_missing_vcek_from_the_key_server_and_keeps_it() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let d = corpus.join("msft-milan-v3");
    let report = std::fs::read(d.join("report.bin")).unwrap();
    let r = snp::AttestationReport::from_bytes(&report).unwrap();
    let tcb = snp::Tcb::decode(r.reported_tcb, snp::Product::Milan);
    let path = snp::kds::vcek_path(snp::Product::Milan, &r.chip_id, &tcb);
    let der = snp::certs::to_der(&std::fs::read(d.join("vcek.pem")).unwrap()).unwrap();
    let base = http_server([(path, der.clone())].into());
    let store = tempfile::tempdir().unwrap();
    let rep = s(&d.join("report.bin"));
    let st = s(store.path());
    let at = "2026-06-01T00:00:00Z";
    let (code, j, e) = run(&[
        &rep,
        "--vcek-store",
        &st,
        "--kds-url",
        &base,
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 0, "{j} {e}");
    assert!(j["notes"][0].as_str().unwrap().contains("fetched"), "{j}");
    // Now in the store: no key server needed.
    let (code, j, _) = run(&[&rep, "--vcek-store", &st, "--json", "--at", at]);
    assert_eq!(code, 0, "{j}");
    // Asking for the CRL, which this server does not have: revocation required, so rejected.
    let (code, j, _) = run(&[
        &rep,
        "--vcek-store",
        &st,
        "--kds-url",
        &base,
        "--fetch-crl",
        "--json",
        "--at",
        at,
    ]);
    assert_eq!(code, 1);
    assert_eq!(j["reason_codes"], serde_json::json!(["crl_unavailable"]));
    // --kds-url needs a store to keep what it fetches.
    let (code, _, _) = run(&[&rep, "--vcek", &s(&d.join("vcek.pem")), "--kds-url", &base]);
    assert_eq!(code, 2);
}

#[test]
fn certificate_table_evidence() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let d = corpus.join("azure-milan-v1");
    let der = |f: &str| snp::certs::to_der(&std::fs::read(d.join(f)).unwrap()).unwrap();
    use snp::certtable::{CertTable, GUID_ARK, GUID_ASK, GUID_VCEK};
    let table = CertTable {
        entries: vec![
            (GUID_VCEK, der("vcek.der")),
            (GUID_ASK, der("ask.pem")),
            (GUID_ARK, der("ark.pem")),
        ],
    };
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("certs.bin");
    std::fs::write(&good, table.encode()).unwrap();
    let rep = s(&d.join("report.bin"));
    let at = "2026-06-01T00:00:00Z";
    let (code, j, _) = run(&[&rep, "--cert-table", &s(&good), "--json", "--at", at]);
    assert_eq!(code, 0, "{j}");
    // A malformed table from the host is a rejection with its reason, not a usage error.
    let bad = tmp.path().join("bad.bin");
    let mut bytes = table.encode();
    bytes.truncate(30);
    std::fs::write(&bad, bytes).unwrap();
    let (code, j, _) = run(&[&rep, "--cert-table", &s(&bad), "--json", "--at", at]);
    assert_eq!(code, 1);
    assert_eq!(
        j["reason_codes"],
        serde_json::json!(["cert_table_invalid", "missing_certificate"])
    );
}
