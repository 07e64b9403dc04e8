//! `attesta-sim report` as external checks script it: the files it writes, determinism, and
//! that both our verifier and an independent one (virtee's `snpguest`) accept its output, which
//! ours does only with the simulator's root configured.

use snp::reason::Reason;
use snp::{Evidence, Revocation, Verifier, VerifierConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn sim(args: &[&str], state: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
        .args(args)
        .env("ATTESTA_SIM_STATE", state)
        .output()
        .expect("run attesta-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn state() -> PathBuf {
    // One state directory shared by test runs (the hierarchies are deterministic from the seed).
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attesta-sim-state");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(dir: &Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
}

fn verify(dir: &Path, trust: bool) -> snp::Verdict {
    let (report, vcek, ask, ark) = (
        read(dir, "report.bin"),
        read(dir, "vcek.der"),
        read(dir, "ask.pem"),
        read(dir, "ark.pem"),
    );
    let trust_roots = if trust { vec![ark.clone()] } else { vec![] };
    let v = Verifier::new(VerifierConfig {
        trust_roots,
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    v.verify(
        &Evidence {
            report: &report,
            vcek: Some(&vcek),
            ask: Some(&ask),
            ark: Some(&ark),
            crls: &[],
        },
        1_780_272_000,
    )
}

/// `snpguest verify certs` and `verify attestation` on a directory the simulator wrote.
fn snpguest(dir: &Path, product: &str) -> Option<bool> {
    let found = Command::new("snpguest").arg("--version").output().is_ok();
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("snpguest not found (cargo install snpguest); required when CI=true");
        }
        eprintln!("SKIP: snpguest not installed (cargo install snpguest)");
        return None;
    }
    let certs = dir.join("snpguest-certs");
    std::fs::create_dir_all(&certs).unwrap();
    for f in ["ark.pem", "ask.pem", "vcek.der"] {
        std::fs::copy(dir.join(f), certs.join(f)).unwrap();
    }
    let ok = |args: &[&str]| {
        Command::new("snpguest")
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let c = certs.to_string_lossy().into_owned();
    let r = dir.join("report.bin").to_string_lossy().into_owned();
    Some(ok(&["verify", "certs", &c]) && ok(&["verify", "attestation", "-p", product, &c, &r]))
}

#[test]
fn every_product_verifies_here_and_with_snpguest() {
    let st = state();
    for product in ["milan", "genoa", "turin"] {
        let out = tempfile::tempdir().unwrap();
        let o = out.path().to_string_lossy().into_owned();
        let rd = "ab".repeat(64);
        let (code, stdout, err) = sim(
            &[
                "report",
                "--product",
                product,
                "--report-data",
                &rd,
                "--out",
                &o,
            ],
            &st,
        );
        assert_eq!(code, 0, "{err}");
        assert!(stdout.contains("simulated"), "{stdout}");
        let report = read(out.path(), "report.bin");
        assert_eq!(report.len(), 1184);
        assert_eq!(&report[0x50..0x90], &[0xab; 64]);
        for f in [
            "vcek.der",
            "ask.pem",
            "ark.pem",
            "cert_chain.pem",
            "certs.bin",
        ] {
            assert!(out.path().join(f).is_file(), "{f}");
        }
        assert_eq!(
            verify(out.path(), false).reasons,
            vec![Reason::ArkNotTrusted],
            "{product}"
        );
        let v = verify(out.path(), true);
        assert!(v.accepted(), "{product}: {:?}", v.reasons);
        assert_eq!(
            v.product.map(|p| p.name().to_lowercase()).as_deref(),
            Some(product)
        );
        if let Some(ok) = snpguest(out.path(), product) {
            assert!(ok, "snpguest rejected the simulated {product} report");
            // And snpguest is not a rubber stamp: a flipped measurement bit fails it.
            let mut bad = report.clone();
            bad[0x90] ^= 1;
            std::fs::write(out.path().join("report.bin"), bad).unwrap();
            assert_eq!(snpguest(out.path(), product), Some(false));
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let st = state();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&a, &b] {
        let o = d.path().to_string_lossy().into_owned();
        let (code, _, err) = sim(
            &[
                "report",
                "--product",
                "genoa",
                "--seed",
                "same",
                "--out",
                &o,
            ],
            &st,
        );
        assert_eq!(code, 0, "{err}");
    }
    for f in ["vcek.der", "ask.pem", "ark.pem", "certs.bin"] {
        assert_eq!(read(a.path(), f), read(b.path(), f), "{f}");
    }
    // The signed part is identical; the ECDSA signature itself is randomised.
    assert_eq!(
        read(a.path(), "report.bin")[..0x2A0],
        read(b.path(), "report.bin")[..0x2A0]
    );
    // Without the cache (another state dir), generation is deterministic too.
    let other_state = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let o = c.path().to_string_lossy().into_owned();
    assert_eq!(
        sim(
            &[
                "report",
                "--product",
                "genoa",
                "--seed",
                "same",
                "--out",
                &o
            ],
            other_state.path()
        )
        .0,
        0
    );
    assert_eq!(read(a.path(), "ark.pem"), read(c.path(), "ark.pem"));
    let d = tempfile::tempdir().unwrap();
    let o = d.path().to_string_lossy().into_owned();
    assert_eq!(
        sim(
            &[
                "report",
                "--product",
                "genoa",
                "--seed",
                "other",
                "--out",
                &o
            ],
            &st
        )
        .0,
        0
    );
    assert_ne!(read(a.path(), "ark.pem"), read(d.path(), "ark.pem"));
}

#[test]
fn options_reach_the_report() {
    let st = state();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_string_lossy().into_owned();
    let m = "11".repeat(48);
    let args = [
        "report",
        "--product",
        "milan",
        "--version",
        "2",
        "--measurement",
        &m,
        "--policy",
        "0x3001f",
        "--vmpl",
        "2",
        "--chip-id",
        &"cd".repeat(64),
        "--out",
        &o,
    ];
    let (code, _, err) = sim(&args, &st);
    assert_eq!(code, 0, "{err}");
    let r = snp::AttestationReport::from_bytes(&read(out.path(), "report.bin")).unwrap();
    assert_eq!(
        (r.version, r.vmpl, r.policy.0, r.cpuid),
        (2, 2, 0x3001f, None)
    );
    assert_eq!(r.measurement, [0x11; 48]);
    assert_eq!(r.chip_id, [0xcd; 64]);
    assert!(verify(out.path(), true).accepted());

    // Turin: an 8-byte chip id.
    let (code, _, err) = sim(
        &[
            "report",
            "--product",
            "turin",
            "--chip-id",
            "0102030405060708",
            "--out",
            &o,
        ],
        &st,
    );
    assert_eq!(code, 0, "{err}");
    let r = snp::AttestationReport::from_bytes(&read(out.path(), "report.bin")).unwrap();
    assert_eq!(&r.chip_id[..9], &[1, 2, 3, 4, 5, 6, 7, 8, 0]);
    assert!(verify(out.path(), true).accepted());

    // A masked chip id cannot be bound to the chip.
    let (code, _, _) = sim(
        &[
            "report",
            "--product",
            "milan",
            "--mask-chip-id",
            "--out",
            &o,
        ],
        &st,
    );
    assert_eq!(code, 0);
    assert_eq!(verify(out.path(), true).reasons, vec![Reason::HwidMismatch]);

    for bad in [
        vec!["report", "--product", "rome", "--out", &o],
        vec!["report", "--product", "milan", "--vmpl", "4", "--out", &o],
        vec![
            "report",
            "--product",
            "milan",
            "--version",
            "6",
            "--out",
            &o,
        ],
        vec![
            "report",
            "--product",
            "milan",
            "--measurement",
            "11",
            "--out",
            &o,
        ],
        vec![
            "report",
            "--product",
            "milan",
            "--report-data",
            &"00".repeat(65),
            "--out",
            &o,
        ],
        vec![
            "report",
            "--product",
            "turin",
            "--chip-id",
            &"01".repeat(64),
            "--out",
            &o,
        ],
        vec!["report", "--product", "milan"],
    ] {
        let (code, _, err) = sim(&bad, &st);
        assert_eq!(code, 2, "{bad:?}: {err}");
    }
}

#[test]
fn attacks_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
        .args(["attacks", "--json"])
        .env("ATTESTA_SIM_STATE", state())
        .output()
        .expect("run attesta-sim attacks");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = v.as_array().expect("an array");
    assert!(rows.len() >= 30);
    for r in rows {
        assert!(
            r["name"].is_string() && !r["reason"].as_str().unwrap_or("").is_empty(),
            "{r}"
        );
        assert_eq!(r["denied"], true, "{r}");
    }
}

#[test]
fn demo_json() {
    // One real VM where its parts are at hand (always on CI: the test script fetches the
    // guest kernel, and the workspace build makes attesta-guest with the simulator feature).
    let real = std::env::var_os("ATTESTA_GUEST_KERNEL").is_some()
        || std::env::var("CI").is_ok_and(|v| v == "true");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
        .args(["demo", "--vms", "3", "--json", "--real-vms"])
        .arg(if real { "1" } else { "0" })
        .arg("--dir")
        .arg(dir.path())
        .env("ATTESTA_SIM_STATE", state())
        .output()
        .expect("run attesta-sim demo");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (
            j["vms"].as_u64(),
            j["unlocked"].as_u64(),
            j["denied"].as_u64()
        ),
        (Some(3), Some(3), Some(1)),
        "{j}"
    );
    // Every VM was created by a host agent (two simulated machines), through the launch gate
    // and the broker.
    assert_eq!(
        (j["hosts"].as_u64(), j["domains"].as_u64()),
        (Some(2), Some(3)),
        "{j}"
    );
    let attacks = j["attacks"].as_array().unwrap();
    assert_eq!(j["ok"], true, "{j}");
    if real {
        // A real VM booted through the whole system, and the host's attacks on it failed.
        let r = &j["real_vms"];
        assert_eq!(
            (
                r["booted"]
                    .as_u64()
                    .map(|n| n - u64::from(j["backup"].is_object())),
                r["unlocked_in_guest"].as_u64(),
                r["second_boot_unlocked"].as_u64()
            ),
            (Some(5), Some(1), Some(1)),
            "{r}"
        );
        for f in [
            "terminated_failed_closed",
            "swapped_initrd_denied",
            "tampered_header_refused",
        ] {
            assert_eq!(r[f], true, "{f}: {r}");
        }
        assert!(
            r["boot_to_unlocked_ms"]["p50"]
                .as_f64()
                .is_some_and(|ms| ms > 0.0)
        );
        // Where Garage is installed (always on CI): the first real VM backed up to S3,
        // restored on the other host, unlocked there, and every object deleted on terminate.
        if testkit::garage::binary().is_some() || std::env::var("CI").is_ok_and(|v| v == "true") {
            let b = &j["backup"];
            assert!(b["bytes"].as_u64().is_some_and(|n| n > 0), "{b}");
            for f in [
                "restored_on_other_host",
                "unlocked_after_restore",
                "deleted_on_terminate",
            ] {
                assert_eq!(b[f], true, "{f}: {b}");
            }
            assert_eq!(
                r["booted"], 6,
                "two boots, the restored one, three attacks: {r}"
            );
        }
    } else {
        eprintln!("SKIP: no real VMs in the demo (ATTESTA_GUEST_KERNEL not set)");
        assert!(j["real_vms"].is_null());
        assert!(j["backup"].is_null());
    }
    // The chain (Chopsticks; always on CI): vm-0 taken from a validator's assignment, a task
    // for another chip refused with its reason on chain, the lifecycle recorded there.
    let chain_here = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/chain/node_modules/.bin/chopsticks")
            .exists();
    if chain_here {
        let c = &j["chain"];
        assert_eq!(c["assignments_taken"], 1, "{c}");
        assert_eq!(c["refused_with_reason"], 1, "{c}");
        assert!(
            c["lifecycle_records"].as_u64().is_some_and(|n| n >= 2),
            "{c}"
        );
        assert_eq!(c["all_on_chain"], true, "{c}");
    }
    // The tenant in control: a 2-of-2 split, the evidence checked by attesta-verify, and what
    // an outsider needs to run that check again.
    let t = &j["tenant"];
    assert_eq!(t["split"], "2-of-2", "{t}");
    for f in [
        "unlocked",
        "one_broker_alone_denied",
        "bundle_verified",
        "tampered_bundle_rejected",
    ] {
        assert_eq!(t[f], true, "{f}: {t}");
    }
    // The lease: renewed with fresh reports, then, with the image withdrawn, not renewed and
    // off the mesh within the scene's lease.
    assert!(t["lease_renewals"].as_u64().is_some_and(|n| n >= 2), "{t}");
    let lease_ms = t["lease_secs"].as_u64().unwrap() * 1000;
    assert!(
        t["withdrawn_vm_dropped_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= lease_ms + 2000),
        "{t}"
    );
    // A clone's keepalive revokes the lease, and the broker's list closes the VM's connection
    // well before its freshly renewed certificate (a full lease) could have run out.
    assert!(
        t["revoked_vm_dropped_ms"]
            .as_u64()
            .is_some_and(|ms| ms < lease_ms / 2),
        "{t}"
    );
    let evidence = dir.path().join("evidence");
    for f in [
        "bundle",
        "order.signed",
        "broker.pub",
        "audit.pub",
        "verify.sh",
    ] {
        assert!(
            evidence.join(f).is_file(),
            "{f} missing in {}",
            evidence.display()
        );
    }
    let again = Command::new("sh")
        .arg(evidence.join("verify.sh"))
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    for name in [
        "broker operator opens a split VM's disk alone",
        "broker operator edits a release in an exported bundle",
        "keepalive from a cloned VM on another chip",
    ] {
        assert!(attacks.iter().any(|a| a["name"] == name), "{name}");
    }
    assert!(attacks.iter().all(|a| a["denied"] == true), "{j}");
    // Every attack is denied for the reason it names…
    for a in attacks {
        let (reason, expected) = (
            a["reason"].as_str().unwrap(),
            a["expected"].as_str().unwrap(),
        );
        assert!(!expected.is_empty() && reason.contains(expected), "{a}");
    }
    // …and the whole catalogue ran against the live brokers, for the live reasons.
    let catalogue = simulator::attacks::catalogue();
    assert!(catalogue.len() >= 46);
    for s in &catalogue {
        assert!(
            attacks
                .iter()
                .any(|a| a["name"] == s.name && a["expected"] == s.expected_live()),
            "{} missing from the live run: {j}",
            s.name
        );
    }
    for (name, reason) in [
        ("report-data-unbound", "report_data_mismatch"),
        ("forged-crl", "crl_unavailable"),
        ("revoked-vcek", "certificate_revoked"),
        ("guest-svn-too-low", "guest_svn_too_low"),
    ] {
        assert!(
            attacks
                .iter()
                .any(|a| a["name"] == name && a["reason"] == reason),
            "{name}: {j}"
        );
    }
    assert!(attacks.iter().any(|a| a["name"] == "live-moved-to-another-chip" && a["reason"] == "chip_not_allowed"));
    // An operator-signed order asking for debug guests, relayed by a genuine host: below the
    // broker's policy floor, refused at registration.
    assert!(
        attacks.iter().any(|a| a["name"] == "live-policy-floor-bypass"
            && a["reason"] == "policy_below_floor"),
        "{j}"
    );
    // An image withdrawn from the allowlist (a newer epoch installed into the running broker)
    // stops the next boot of a VM registered and released before.
    assert!(
        attacks
            .iter()
            .any(|a| a["name"] == "live-image-withdrawn-from-the-allowlist"
                && a["reason"] == "measurement_withdrawn"),
        "{j}"
    );
    // A flood from one address: refused beyond its cap, its bogus evidence refused without a
    // trace, and a genuine guest released meanwhile (the audit grows by that release only).
    let flood = attacks
        .iter()
        .find(|a| a["name"] == "live-flood-from-one-address")
        .unwrap_or_else(|| panic!("no flood attack: {j}"));
    assert_eq!(flood["denied"], true, "{flood}");
    let why = flood["reason"].as_str().unwrap_or_default();
    for part in [
        "per_address_cap: 8 of 12 connections",
        "(cap 4, 4 held)",
        "unknown_nonce / unknown_nonce / unknown_nonce / unknown_nonce",
        "the genuine guest: released",
        "audit entries added: 1",
    ] {
        assert!(why.contains(part), "{part:?} not in {why:?}");
    }
    // The host's edits of a booted VM's LUKS2 header: the key is released, the disk refused.
    for (name, code) in [
        ("live-luks-header-cipher-null", "header_cipher:"),
        (
            "live-luks-header-shifted-data-offset",
            "header_data_offset:",
        ),
        ("live-luks-header-another-vms-token", "header_foreign_vm:"),
    ] {
        assert!(
            attacks.iter().any(|a| a["name"] == name
                && a["denied"] == true
                && a["reason"].as_str().unwrap().starts_with(code)),
            "{name}: {j}"
        );
    }
    for (name, reason) in [
        (
            "live-bound-evidence-replayed-on-another-connection",
            "report_data_mismatch",
        ),
        ("live-bound-evidence-sent-twice", "too_many_evidence"),
        ("live-connection-nonce-named-as-issued", "unknown_nonce"),
        (
            "live-mesh-key-not-bound-in-the-report",
            "report_data_mismatch",
        ),
        (
            "live-evidence-replayed-on-another-connection",
            "report_data_mismatch",
        ),
        ("live-nonce-used-twice", "spent_nonce"),
        ("live-nonce-for-another-vm", "nonce_for_another_vm"),
        ("live-order-from-a-guest", "forbidden"),
    ] {
        assert!(
            attacks
                .iter()
                .any(|a| a["name"] == name && a["reason"] == reason),
            "{name}: {j}"
        );
    }
    // Everything ran on the mesh: two lighthouses, the host agents by their mesh role, every
    // guest with the identity the broker issued it after attestation. Three VMs are two tenants
    // ({vm-0, vm-2} and {vm-1}): the pairs of a tenant reach each other, every cross-tenant try
    // is denied by the target's firewall, and terminated vm-0 is revoked and cut off.
    let m = &j["mesh"];
    assert_eq!(
        (
            m["lighthouses"].as_u64(),
            m["hosts"].as_u64(),
            m["guests"].as_u64()
        ),
        (Some(2), Some(2), Some(3)),
        "{m}"
    );
    assert_eq!(
        m["same_tenant"],
        serde_json::json!({"reached": 2, "tried": 2}),
        "{m}"
    );
    assert_eq!(
        m["cross_tenant"],
        serde_json::json!({"denied": 3, "tried": 3}),
        "{m}"
    );
    for p in m["pairs"].as_array().unwrap() {
        let same = (p["from"] == "vm-1") == (p["to"] == "vm-1");
        let want = if same {
            "reached"
        } else {
            "denied by its firewall"
        };
        assert_eq!(p["outcome"], want, "{p}");
    }
    let cut = m["revocation"]["cut_off_ms"]
        .as_f64()
        .expect("vm-0 was cut off");
    assert!(cut <= 5000.0, "{m}");
    // Two lighthouses, vm-1, vm-2 and the broker hold vm-0's certificates as revoked.
    assert_eq!(m["revocation"]["nodes"], 5, "{m}");
    assert_eq!(m["revocation"]["nodes_revoked"], 5, "{m}");
    assert!(m["revocation"]["everywhere_ms"].as_f64().unwrap() <= 5000.0);
    assert!(
        m["revocation"]["reconnect"]
            .as_str()
            .unwrap()
            .starts_with("refused"),
        "{m}"
    );
    assert_eq!(m["ok"], true, "{m}");
    for (name, reason) in [
        (
            "mesh-host-certificate-from-a-foreign-ca",
            "no trusted CA issued it",
        ),
        ("mesh-guest-identity-sends-an-order", "forbidden"),
        ("mesh-revoked-guest-identity-at-the-broker", "is revoked"),
        (
            "live-mesh-key-not-bound-in-the-report",
            "report_data_mismatch",
        ),
    ] {
        assert!(
            attacks
                .iter()
                .any(|a| a["name"] == name && a["reason"].as_str().unwrap().contains(reason)),
            "{name}: {j}"
        );
    }
    let p50 = j["release_latency_ms"]["p50"].as_f64().unwrap();
    let p99 = j["release_latency_ms"]["p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50);
}

/// `load`: a small storm completes with every VM released, the broker pinned to the CPUs asked
/// for (guests on the others) when there are two or more, and a CPU that is not online refused.
#[test]
fn load_json_places_broker_and_guests() {
    let (code, out, err) = sim(&["load", "--vms", "20", "--chips", "2", "--json"], &state());
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!("stdout is not one JSON document ({e}):\n{out}\nstderr:\n{err}")
    });
    assert_eq!(
        (j["released"].as_u64(), j["failed"].as_u64()),
        (Some(20), Some(0)),
        "{j}"
    );
    assert!(j["releases_per_sec"].as_f64().unwrap() > 0.0);
    assert!(j["verifier_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(j["max_sessions"], 64, "the broker's default admission: {j}");
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus >= 2 {
        assert_eq!(j["broker_cpus"], serde_json::json!([0]), "{j}");
        let guests: Vec<u64> = (1..cpus as u64).collect();
        assert_eq!(j["guest_cpus"], serde_json::json!(guests), "{j}");
    } else {
        assert_eq!(j["broker_cpus"], serde_json::json!([]), "{j}");
    }
    // Each command has its own lower bound: a storm of one VM is fine, the demo needs two.
    let (code, _, err) = sim(&["load", "--vms", "0"], &state());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 1"), "{err}");
    let (code, _, err) = sim(&["demo", "--vms", "1"], &state());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("between 2"), "{err}");
    let (code, _, err) = sim(&["load", "--vms", "2", "--max-sessions", "0"], &state());
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = sim(&["load", "--vms", "2", "--broker-cpus", "4096"], &state());
    assert_ne!(code, 0);
    assert!(err.contains("not online"), "{err}");
}
