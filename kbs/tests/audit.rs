//! The audit log verifies when intact, and every kind of tampering is caught with its reason;
//! `attesta-kbs audit verify` reports it with the right exit status.

use aws_lc_rs::signature::Ed25519KeyPair;
use kbs::audit::{AuditError, Chain, Line, verify};
use serde_json::json;
use std::process::Command;

fn key() -> Ed25519KeyPair {
    Ed25519KeyPair::generate().unwrap()
}

/// A log of `n` decisions with a checkpoint every 4 entries (and none after the last 2).
fn log(k: &Ed25519KeyPair, n: u64) -> Vec<String> {
    let mut chain = Chain::default();
    let mut lines = Vec::new();
    for i in 0..n {
        let (kind, detail) = if i % 3 == 0 {
            (
                "denial",
                json!({"reasons": ["measurement_not_allowed"], "nonce": format!("{i:064x}")}),
            )
        } else {
            (
                "release",
                json!({"boot_counter": i, "nonce": format!("{i:064x}")}),
            )
        };
        let e = chain.append(1_780_000_000 + i, kind, &format!("vm-{}", i % 5), detail);
        lines.push(serde_json::to_string(&Line::Entry(e)).unwrap());
        if i % 4 == 3 {
            let c = chain.checkpoint(k).unwrap();
            lines.push(serde_json::to_string(&Line::Checkpoint { checkpoint: c }).unwrap());
        }
    }
    lines
}

fn text(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

#[test]
fn intact_logs_verify() {
    let k = key();
    let pk = kbs::audit::public_key(&k);
    let v = verify(&text(&log(&k, 10)), &pk).unwrap();
    assert_eq!((v.entries, v.checkpoints, v.unsigned_tail), (10, 2, 2));
    assert_eq!(verify("", &pk), Err(AuditError::NoCheckpoint));
}

/// An entry shown elided verifies in a segment (a tenant's bundle) but never in a whole log:
/// the broker's own log must show every entry.
#[test]
fn elided_entries_only_in_a_segment() {
    let k = key();
    let pk = kbs::audit::public_key(&k);
    let mut lines: Vec<Line> = log(&k, 8)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    if let Line::Entry(e) = &lines[2] {
        lines[2] = Line::Elided { elided: e.elide() };
    }
    let v = kbs::audit::verify_segment(&lines[1..], &pk).unwrap();
    assert_eq!((v.first_seq, v.entries, v.unsigned_tail), (1, 7, 0));
    let whole: String = lines
        .iter()
        .map(|l| serde_json::to_string(l).unwrap() + "\n")
        .collect();
    assert_eq!(verify(&whole, &pk), Err(AuditError::Elided { seq: 2 }));
}

#[test]
fn tampering_is_caught() {
    let k = key();
    let pk = kbs::audit::public_key(&k);
    let lines = log(&k, 10);
    // lines: e0 e1 e2 e3 c3 e4 e5 e6 e7 c7 e8 e9
    let changed = {
        let mut l = lines.clone();
        l[1] = l[1].replace("\"boot_counter\":1", "\"boot_counter\":99");
        l
    };
    assert_eq!(
        verify(&text(&changed), &pk),
        Err(AuditError::Hash { seq: 1 })
    );
    let removed = {
        let mut l = lines.clone();
        l.remove(2);
        l
    };
    assert_eq!(
        verify(&text(&removed), &pk),
        Err(AuditError::Sequence {
            seq: 3,
            expected: 2
        })
    );
    let reordered = {
        let mut l = lines.clone();
        l.swap(1, 2);
        l
    };
    assert!(matches!(
        verify(&text(&reordered), &pk),
        Err(AuditError::Sequence { .. })
    ));
    // A rewritten history, internally consistent, does not match the signed checkpoint.
    let rewritten = {
        let mut chain = Chain::default();
        let mut l = Vec::new();
        for i in 0..4u64 {
            let e = chain.append(1, "release", "vm-x", json!({"forged": i}));
            l.push(serde_json::to_string(&Line::Entry(e)).unwrap());
        }
        l.push(lines[4].clone()); // the genuine signed checkpoint at entry 3
        l
    };
    assert_eq!(
        verify(&text(&rewritten), &pk),
        Err(AuditError::CheckpointMismatch { seq: 3 })
    );
    // Truncated below a checkpoint that survives.
    let truncated = {
        let mut l = lines[..5].to_vec();
        l.push(lines[9].clone()); // checkpoint at entry 7, entries 4..7 gone
        l
    };
    assert_eq!(
        verify(&text(&truncated), &pk),
        Err(AuditError::Truncated { seq: 7 })
    );
    // A checkpoint signed by another key.
    let other = key();
    assert_eq!(
        verify(&text(&lines), &kbs::audit::public_key(&other)),
        Err(AuditError::Signature { seq: 3 })
    );
    assert!(matches!(
        verify("not json\n", &pk),
        Err(AuditError::Malformed { line: 1, .. })
    ));
}

#[test]
fn the_cli_reports_it() {
    let k = key();
    let dir = tempfile::tempdir().unwrap();
    let (log_path, key_path) = (dir.path().join("audit.log"), dir.path().join("audit.pub"));
    std::fs::write(&log_path, text(&log(&k, 6))).unwrap();
    std::fs::write(&key_path, hex::encode(kbs::audit::public_key(&k))).unwrap();
    let run = |log: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_attesta-kbs"))
            .args(["audit", "verify"])
            .arg(log)
            .arg("--key")
            .arg(&key_path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&log_path);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("6 entries"), "{out}");
    let mut t = std::fs::read_to_string(&log_path).unwrap();
    t = t.replacen("vm-1", "vm-9", 1);
    std::fs::write(&log_path, t).unwrap();
    let (code, out) = run(&log_path);
    assert_eq!(code, Some(1));
    assert!(out.contains("NOT intact"), "{out}");
    assert_eq!(run(&dir.path().join("missing.log")).0, Some(2));
}

mod props {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn verify_never_panics(text in "(\\PC|\\n){0,400}") {
            let _ = kbs::audit::verify(&text, &[0u8; 32]);
        }

        #[test]
        fn any_single_byte_change_is_caught(pos in 0usize..2000, bit in 0u8..8) {
            let k = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
            let pk = kbs::audit::public_key(&k);
            let original = super::text(&super::log(&k, 8));
            let mut bytes = original.clone().into_bytes();
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            // Any change must be rejected, unless it leaves the log saying exactly the same thing
            // (a signature's hex digit changing case decodes to the same bytes).
            if let Ok(s) = String::from_utf8(bytes)
                && let Ok(v) = kbs::audit::verify(&s, &pk)
            {
                prop_assert_eq!(v.entries, 8);
                // Accepted: then it says exactly what the original said (hex case aside).
                let norm = |t: &str| -> Vec<serde_json::Value> {
                    t.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| serde_json::from_str(&l.to_lowercase()).unwrap())
                        .collect()
                };
                prop_assert_eq!(norm(&s), norm(&original));
            }
        }
    }
}
