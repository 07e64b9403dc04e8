//! `check_bundle` on bundles a broker would export: around a report from a simulated chip (whose
//! REPORT_DATA binds the key the release was sealed to, as a guest's does; its chain named with
//! `trust_chain`) the whole check passes, and every edit a broker's operator (who holds the
//! response and audit keys) or anyone else could make is a finding, each for its reason; around
//! a REAL Milan report from the corpus, AMD's built-in roots alone accept the report.

use attesta_verify::{Expect, check_bundle};
use aws_lc_rs::signature::Ed25519KeyPair;
use proto::ResponseKey;
use proto::audit::{Chain, Line, public_key};
use proto::bundle::{BUNDLE_VERSION, Bundle, STATEMENT_KIND, sha256, statement};
use proto::order::{Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::device::GuestDevice;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The corpus report's guest runs with debugging allowed, at VMPL 0 or not.
const POLICY: &str = "version = 1\nany_vmpl = true\n[guest_policy]\nallow_debug = true\n";
/// 2026-06-01T00:00:00Z: inside the corpus VCEKs' validity.
const AT: u64 = 1_780_272_000;

fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("ATTESTA_SNP_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/snp-corpus")
        });
    if dir.join("MANIFEST.md").is_file() {
        return Some(dir);
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "SNP corpus not found at {} (set ATTESTA_SNP_CORPUS); required when CI=true",
        dir.display()
    );
    eprintln!("SKIP: SNP corpus not found at {}", dir.display());
    None
}

/// A broker's keys, and what it would export. Everything is rebuilt from `Parts`, so a test can
/// play a dishonest operator who re-hashes and re-signs after an edit.
struct Parts {
    report: Vec<u8>,
    vcek: Vec<u8>,
    order: Vec<u8>,
    policy: &'static str,
    /// What the release was sealed to: nonce, guest key, exporter (hex), bound by the report.
    binding: serde_json::Value,
    trust_chain: Option<(Vec<u8>, Vec<u8>)>,
    response: ResponseKey,
    audit: Ed25519KeyPair,
}

/// The simulated guest's policy (not debug, VMPL 0).
const SIM_POLICY: &str = "version = 1\n";
const IMAGE: [u8; 48] = [0x4d; 48];

fn sim() -> &'static (Arc<Pki>, Chip) {
    static SIM: OnceLock<(Arc<Pki>, Chip)> = OnceLock::new();
    SIM.get_or_init(|| {
        let state = std::env::temp_dir().join("attesta-verify-test-pki");
        let pki = Arc::new(
            Pki::cached(
                snp::Product::Milan,
                &Seed::from_text("verify-test"),
                &state,
                |_| {},
            )
            .unwrap(),
        );
        let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
        (pki, chip)
    })
}

fn order(measurement: [u8; 48], chip: [u8; 64], policy: &str) -> Vec<u8> {
    Order {
        v: proto::order::ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: "vm-7".into(),
        tenant: "acme".into(),
        measurements: vec![ByteBuf::from(measurement.to_vec())],
        policy: policy.into(),
        chip_ids: vec![ByteBuf::from(chip.to_vec())],
        not_after: u64::MAX,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
    .sign(&Ed25519KeyPair::generate().unwrap())
}

/// A release as a guest on the simulated chip gets it: its report binds a fresh nonce, guest
/// key and connection exporter.
fn parts(chip_in_order: bool) -> Parts {
    let (pki, chip) = sim();
    let (nonce, guest_key, exporter) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    let guest = chip.launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    });
    let report = guest
        .get_report(&proto::report_data(&nonce, &guest_key, &exporter), 0)
        .unwrap();
    let chip_id = if chip_in_order {
        chip.config.chip_id
    } else {
        [7; 64]
    };
    Parts {
        report,
        vcek: chip.vcek().cert.clone(),
        order: order(IMAGE, chip_id, SIM_POLICY),
        policy: SIM_POLICY,
        binding: serde_json::json!({"nonce": hex::encode(nonce),
            "guest_key": hex::encode(guest_key), "exporter": hex::encode(exporter)}),
        trust_chain: Some((pki.ask.cert.clone(), pki.ark.cert.clone())),
        response: ResponseKey::generate().unwrap(),
        audit: Ed25519KeyPair::generate().unwrap(),
    }
}

/// A release around a real Milan report (whose REPORT_DATA no one here can choose).
fn corpus_parts() -> Option<Parts> {
    let dir = corpus()?.join("gosev-milan");
    let report = std::fs::read(dir.join("report.bin")).unwrap();
    let r = snp::AttestationReport::from_bytes(&report).unwrap();
    Some(Parts {
        vcek: std::fs::read(dir.join("vcek.der")).unwrap(),
        order: order(r.measurement, r.chip_id, POLICY),
        report,
        policy: POLICY,
        binding: serde_json::json!({"nonce": "00".repeat(32), "guest_key": "00".repeat(32),
            "exporter": "00".repeat(32)}),
        trust_chain: None,
        response: ResponseKey::generate().unwrap(),
        audit: Ed25519KeyPair::generate().unwrap(),
    })
}

/// The log a broker writes: another VM's register, ours, its release, a denial, a checkpoint.
fn log(
    p: &Parts,
    edit: impl Fn(&mut Vec<(u64, &'static str, &'static str, serde_json::Value)>),
) -> Vec<Line> {
    let order_hash = hex::encode(sha256(&p.order));
    let mut entries = vec![
        (
            AT - 10,
            "register",
            "other",
            serde_json::json!({"tenant": "x"}),
        ),
        (
            AT - 9,
            "register",
            "vm-7",
            serde_json::json!({"tenant": "acme", "order_sha256": order_hash}),
        ),
        (AT - 8, "release", "vm-7", {
            let mut d = serde_json::json!({
                "boot_counter": 1, "report": hex::encode(&p.report), "vcek": hex::encode(&p.vcek),
                "order_sha256": order_hash, "policy": p.policy});
            for (k, v) in p.binding.as_object().unwrap() {
                d[k] = v.clone();
            }
            d
        }),
        (
            AT - 7,
            "release",
            "other",
            serde_json::json!({"boot_counter": 1}),
        ),
        (
            AT - 6,
            "denial",
            "vm-7",
            serde_json::json!({"reasons": ["spent_nonce"]}),
        ),
    ];
    edit(&mut entries);
    let mut c = Chain::default();
    let mut out: Vec<Line> = entries
        .into_iter()
        .map(|(t, k, vm, d)| {
            let e = c.append(t, k, vm, d);
            if vm == "vm-7" {
                Line::Entry(e)
            } else {
                Line::Elided { elided: e.elide() }
            }
        })
        .collect();
    out.push(Line::Checkpoint {
        checkpoint: c.checkpoint(&p.audit).unwrap(),
    });
    // What precedes our register entry is not exported.
    out.remove(0);
    out
}

fn bundle(p: &Parts, log: Vec<Line>) -> Vec<u8> {
    let mut b = Bundle {
        v: BUNDLE_VERSION,
        vm_id: "vm-7".into(),
        exported_at: AT,
        order: hex::encode(&p.order),
        audit_key: hex::encode(public_key(&p.audit)),
        log,
        signature: String::new(),
    };
    let msg = statement(
        "vm-7",
        AT,
        &sha256(&p.order),
        &public_key(&p.audit),
        b.closing_checkpoint().unwrap(),
    );
    b.signature = hex::encode(p.response.sign(STATEMENT_KIND, &msg));
    serde_json::to_vec(&b).unwrap()
}

fn expect(p: &Parts) -> Expect<'_> {
    Expect {
        order: &p.order,
        broker_key: p.response.public(),
        audit_key: None,
        measurements: Vec::new(),
        at: Some(AT),
        trust_chain: p.trust_chain.clone(),
    }
}

fn codes(bytes: &[u8], e: &Expect<'_>) -> Vec<&'static str> {
    check_bundle(bytes, e)
        .findings
        .iter()
        .map(|f| f.code)
        .collect()
}

#[test]
fn a_genuine_bundle_verifies() {
    let p = parts(true);
    let o = check_bundle(&bundle(&p, log(&p, |_| {})), &expect(&p));
    assert!(o.ok(), "{:?}", o.findings);
    assert!(!o.amd_rooted, "the simulator's chain is not AMD's");
    assert_eq!(o.releases.len(), 1);
    assert_eq!(o.denials.len(), 1);
    assert_eq!(o.releases[0].report["verdict"], "accepted");
    assert_eq!(o.to_json()["verdict"], "ok");
    assert_eq!(o.to_json()["exported_at"], "2026-06-01T00:00:00Z");
    // The tenant's own measurement, and the audit key they hold, agree.
    let mut e = expect(&p);
    e.measurements = vec![IMAGE];
    e.audit_key = Some(public_key(&p.audit).try_into().unwrap());
    assert!(check_bundle(&bundle(&p, log(&p, |_| {})), &e).ok());
    // Without the simulator's chain named, nothing vouches for its reports.
    e.trust_chain = None;
    let c = codes(&bundle(&p, log(&p, |_| {})), &e);
    assert_eq!(c, ["release_rejected"]);
}

#[test]
fn a_real_milan_report_is_accepted_on_amd_roots_alone() {
    let Some(p) = corpus_parts() else { return };
    let o = check_bundle(&bundle(&p, log(&p, |_| {})), &expect(&p));
    assert!(o.amd_rooted);
    assert_eq!(
        o.releases[0].report["verdict"], "accepted",
        "{:#}",
        o.releases[0].report
    );
    assert_eq!(o.releases[0].report["amd_rooted"], true);
    // Its REPORT_DATA binds a key of its own boot, not the one this made-up release names.
    let c: Vec<_> = o.findings.iter().map(|f| f.code).collect();
    assert_eq!(c, ["report_data_mismatch"]);
}

#[test]
fn an_edited_removed_or_hidden_entry_is_found() {
    let p = parts(true);
    let good = log(&p, |_| {});
    // Edited after the fact: the denial's reasons.
    let mut edited = good.clone();
    if let Line::Entry(e) = &mut edited[3] {
        e.detail["reasons"] = serde_json::json!(["measurement_withdrawn"]);
    }
    assert_eq!(
        codes(&bundle(&p, edited), &expect(&p)),
        ["audit_entry_changed"]
    );
    // Removed: the other VM's release.
    let mut removed = good.clone();
    removed.remove(2);
    assert_eq!(
        codes(&bundle(&p, removed), &expect(&p)),
        ["audit_entry_missing"]
    );
    // Our release hidden behind its hash (the chain still verifies).
    let mut hidden = good.clone();
    if let Line::Entry(e) = &hidden[1] {
        hidden[1] = Line::Elided { elided: e.elide() };
    }
    let o = check_bundle(&bundle(&p, hidden), &expect(&p));
    assert_eq!(
        o.findings.iter().map(|f| f.code).collect::<Vec<_>>(),
        ["vm_entry_elided"]
    );
    assert!(o.releases.is_empty());
    // Cut before the checkpoint.
    let mut open = good.clone();
    open.pop();
    let b = Bundle {
        log: open,
        ..serde_json::from_slice(&bundle(&p, good)).unwrap()
    };
    let c = codes(&serde_json::to_vec(&b).unwrap(), &expect(&p));
    assert!(
        c.contains(&"broker_signature_invalid") && c.contains(&"audit_not_closed"),
        "{c:?}"
    );
}

#[test]
fn the_wrong_order_keys_or_measurement_are_findings() {
    let p = parts(true);
    let b = bundle(&p, log(&p, |_| {}));
    let other = parts(true);
    let mut e = expect(&p);
    e.order = &other.order;
    assert!(codes(&b, &e).contains(&"order_mismatch"));
    let mut e = expect(&p);
    e.broker_key = other.response.public();
    assert_eq!(codes(&b, &e), ["broker_signature_invalid"]);
    let mut e = expect(&p);
    e.audit_key = Some(public_key(&other.audit).try_into().unwrap());
    let c = codes(&b, &e);
    assert!(
        c.contains(&"audit_key_mismatch") && c.contains(&"audit_checkpoint_invalid"),
        "{c:?}"
    );
    let mut e = expect(&p);
    e.measurements = vec![[9; 48]];
    assert_eq!(codes(&b, &e), ["measurement_not_expected"]);
    assert_eq!(codes(b"{}", &expect(&p)), ["bundle_malformed"]);
}

#[test]
fn a_dishonest_broker_with_every_key_still_cannot_forge_a_release() {
    let p = parts(true);
    // A report edited (REPORT_DATA, say) and the log re-hashed and re-signed: the AMD
    // signature over the report fails.
    let forged = log(&p, |es| {
        let mut r = p.report.clone();
        r[0x50] ^= 1;
        es[2].3["report"] = hex::encode(r).into();
    });
    let c = check_bundle(&bundle(&p, forged), &expect(&p));
    assert_eq!(c.findings[0].code, "release_rejected", "{:?}", c.findings);
    assert!(
        c.findings[0].detail.contains("report_signature_invalid"),
        "{}",
        c.findings[0].detail
    );
    // Sealed to a key of the operator's, shown with a genuine report of the VM: the report does
    // not bind it.
    let resealed = log(&p, |es| es[2].3["guest_key"] = "66".repeat(32).into());
    assert_eq!(
        codes(&bundle(&p, resealed), &expect(&p)),
        ["report_data_mismatch"]
    );
    // The same genuine report shown for a second release.
    let twice = log(&p, |es| {
        let rel = es[2].clone();
        es.push((AT - 5, rel.1, rel.2, rel.3));
    });
    assert_eq!(codes(&bundle(&p, twice), &expect(&p)), ["report_reused"]);
    // An entry of this VM of a kind the verifier does not know.
    let odd = log(&p, |es| {
        es.push((AT - 5, "Release", "vm-7", serde_json::json!({})))
    });
    assert_eq!(codes(&bundle(&p, odd), &expect(&p)), ["unknown_entry"]);
    // A genuine report from a chip the order does not name.
    let q = parts(false);
    let c = check_bundle(&bundle(&q, log(&q, |_| {})), &expect(&q));
    assert_eq!(c.findings.len(), 1, "{:?}", c.findings);
    assert!(
        c.findings[0].detail.contains("chip"),
        "{}",
        c.findings[0].detail
    );
    // A release entry without its evidence; a stated policy the report does not meet.
    let bare = log(&p, |es| {
        es[2].3 =
            serde_json::json!({"boot_counter": 1, "order_sha256": hex::encode(sha256(&p.order))});
    });
    assert!(codes(&bundle(&p, bare), &expect(&p)).contains(&"release_without_evidence"));
    let strict = log(&p, |es| {
        es[2].3["policy"] = "version = 1\nminimum_guest_svn = 200\n".into()
    });
    assert_eq!(
        codes(&bundle(&p, strict), &expect(&p)),
        ["stated_policy_not_met"]
    );
    // A release after the VM was terminated.
    let late = log(&p, |es| {
        let rel = es[2].clone();
        es.push((AT - 5, "terminate", "vm-7", serde_json::json!({})));
        es.push((AT - 4, rel.1, rel.2, rel.3));
    });
    assert_eq!(
        codes(&bundle(&p, late), &expect(&p)),
        ["release_after_terminate", "report_reused"]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Whatever the bytes, the check answers (never panics); a flipped byte in a genuine bundle
    /// is never silently accepted unless it is a hex digit's case (the same bytes).
    #[test]
    fn any_byte_flip_is_a_finding_or_the_same_bytes(at in 0usize..100_000, bit in 0u8..8) {
        let p = parts(true);
        let good = bundle(&p, log(&p, |_| {}));
        let mut b = good.clone();
        let i = at % b.len();
        b[i] ^= 1 << bit;
        let o = check_bundle(&b, &expect(&p));
        if o.ok() {
            proptest::prop_assert!(good[i].is_ascii_hexdigit() && b[i].eq_ignore_ascii_case(&good[i]),
                "flip at {} ({} -> {}) accepted", i, good[i] as char, b[i] as char);
        }
    }
}

/// `check_report`: a running VM's answer to the tenant's own challenge.
#[test]
fn a_challenge_answer_is_checked_against_the_nonce_key_and_order() {
    use attesta_verify::{ReportExpect, check_report};
    let (pki, chip) = sim();
    let (nonce, mesh_key) = ([0x5a; 32], [0x33; 32]);
    let guest = chip.launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    });
    let (report, table) = guest
        .get_ext_report(&proto::tenant_report_data(&nonce, &mesh_key, "vm-7"), 0)
        .unwrap();
    let signed = order(IMAGE, chip.config.chip_id, SIM_POLICY);
    let e = ReportExpect {
        order: &signed,
        nonce,
        mesh_key,
        measurements: vec![IMAGE],
        at: AT,
        trust_chain: Some((pki.ask.cert.clone(), pki.ark.cert.clone())),
    };
    let codes = |r: &[u8], e: &ReportExpect<'_>| -> Vec<&'static str> {
        check_report(r, &table, e)
            .findings
            .iter()
            .map(|f| f.code)
            .collect()
    };
    assert_eq!(codes(&report, &e), Vec::<&str>::new());
    assert_eq!(
        codes(
            &report,
            &ReportExpect {
                nonce: [1; 32],
                ..e.clone()
            }
        ),
        ["report_data_mismatch"]
    );
    // Another VM's key (a second instance of the image, say): not this VM's answer.
    assert_eq!(
        codes(
            &report,
            &ReportExpect {
                mesh_key: [0x44; 32],
                ..e.clone()
            }
        ),
        ["report_data_mismatch"]
    );
    assert_eq!(
        codes(
            &report,
            &ReportExpect {
                measurements: vec![[9; 48]],
                ..e.clone()
            }
        ),
        ["measurement_not_expected"]
    );
    let mut forged = report.clone();
    forged[0x50] ^= 1;
    assert!(codes(&forged, &e).contains(&"report_rejected"));
    assert_eq!(
        codes(
            &report,
            &ReportExpect {
                trust_chain: None,
                ..e.clone()
            }
        ),
        ["report_rejected"]
    );
    let elsewhere = order(IMAGE, [7; 64], SIM_POLICY);
    assert_eq!(
        codes(
            &report,
            &ReportExpect {
                order: &elsewhere,
                ..e.clone()
            }
        ),
        ["report_rejected"]
    );
}
