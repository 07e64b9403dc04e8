//! Every genuine report from real Milan, Genoa and Turin hardware verifies; the negative
//! fixtures and every mutation are rejected.

mod common;

use snp::reason::{CertRole, Reason};
use snp::report::SIGNED_LEN;
use snp::{Evidence, Product, Revocation, Verifier, VerifierConfig};

fn verifier() -> Verifier {
    Verifier::new(VerifierConfig {
        revocation: Revocation::IfAvailable,
        ..Default::default()
    })
}

fn ev<'a>(it: &'a common::Item, report: &'a [u8]) -> Evidence<'a> {
    Evidence {
        report,
        vcek: Some(&it.vcek),
        ask: it.ask.as_deref(),
        ark: it.ark.as_deref(),
        crls: &[],
    }
}

#[test]
fn genuine_items_verify_and_negatives_fail() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let items = common::items(&dir);
    assert!(
        items.len() >= 17,
        "expected the whole corpus, found {}",
        items.len()
    );
    let v = verifier();
    let mut genuine = 0;
    for it in &items {
        let verdict = v.verify(&ev(it, &it.report), common::at_for(&it.name));
        if it.expect_fail {
            assert!(
                !verdict.accepted(),
                "{}: negative fixture accepted",
                it.name
            );
            assert!(
                verdict
                    .reasons
                    .contains(&Reason::CertSignatureInvalid(CertRole::Vcek)),
                "{}: {:?}",
                it.name,
                verdict.reasons
            );
        } else {
            assert!(
                verdict.accepted(),
                "{}: rejected: {:?}",
                it.name,
                verdict.reasons
            );
            assert!(verdict.amd_rooted(), "{}", it.name);
            assert!(!verdict.revocation_checked);
            genuine += 1;
        }
    }
    assert_eq!(genuine, 15);
}

#[test]
fn builtin_roots_suffice() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let v = verifier();
    for it in common::items(&dir).iter().filter(|i| !i.expect_fail) {
        let e = Evidence {
            report: &it.report,
            vcek: Some(&it.vcek),
            ..Default::default()
        };
        let verdict = v.verify(&e, common::at_for(&it.name));
        assert!(verdict.accepted(), "{}: {:?}", it.name, verdict.reasons);
    }
}

#[test]
fn products_and_turin_layout() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let v = verifier();
    for it in common::items(&dir).iter().filter(|i| !i.expect_fail) {
        let verdict = v.verify(&ev(it, &it.report), common::at_for(&it.name));
        let want = if it.name.contains("genoa") {
            Product::Genoa
        } else if it.name.contains("turin") {
            Product::Turin
        } else {
            Product::Milan
        };
        assert_eq!(verdict.product, Some(want), "{}", it.name);
        if want == Product::Turin {
            let t = verdict.reported_tcb().unwrap();
            assert_eq!(
                (t.fmc, t.bootloader, t.tee, t.snp, t.microcode),
                (Some(1), 1, 1, 4, 81)
            );
            // The Milan layout must not verify this report.
            let forced = Verifier::new(VerifierConfig {
                product: Some(Product::Milan),
                revocation: Revocation::IfAvailable,
                ..Default::default()
            });
            let bad = forced.verify(&ev(it, &it.report), common::AT);
            assert!(!bad.accepted());
            assert!(
                bad.reasons
                    .iter()
                    .any(|r| matches!(r, Reason::ProductMismatch { .. })),
                "{:?}",
                bad.reasons
            );
        }
    }
}

#[test]
fn vlek_only_inside_its_validity() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let it = common::items(&dir)
        .into_iter()
        .find(|i| i.name == "trustee-milan-vlek")
        .expect("VLEK item");
    let v = verifier();
    let ok = v.verify(&ev(&it, &it.report), common::AT_VLEK);
    assert!(ok.accepted(), "{:?}", ok.reasons);
    assert_eq!(ok.signer, Some(snp::SignerKind::Vlek));
    let late = v.verify(&ev(&it, &it.report), common::AT);
    assert!(
        late.reasons.iter().any(|r| matches!(
            r,
            Reason::CertExpired {
                role: CertRole::Vcek,
                ..
            }
        )),
        "{:?}",
        late.reasons
    );
    assert_eq!(late.reasons.len(), 1);
}

#[test]
fn every_bit_flip_in_signed_bytes_and_signature_is_rejected() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let v = verifier();
    for it in common::items(&dir).iter().filter(|i| !i.expect_fail) {
        let at = common::at_for(&it.name);
        // Every byte of the signed area, and the significant signature bytes (r, s), one bit each.
        let positions = (0..SIGNED_LEN)
            .chain(0x2A0..0x2A0 + 48)
            .chain(0x2E8..0x2E8 + 48);
        for pos in positions {
            let mut m = it.report.clone();
            m[pos] ^= 1 << (pos % 8);
            let verdict = v.verify(&ev(it, &m), at);
            assert!(
                !verdict.accepted(),
                "{}: flip at {pos:#x} accepted",
                it.name
            );
        }
        // Non-zero bytes past the 48 significant ones.
        for pos in [0x2A0 + 48, 0x2A0 + 71, 0x2E8 + 48, 0x2E8 + 71] {
            let mut m = it.report.clone();
            m[pos] = 1;
            let verdict = v.verify(&ev(it, &m), at);
            assert!(
                verdict.reasons.contains(&Reason::SignaturePaddingNonZero),
                "{}: {pos:#x}",
                it.name
            );
        }
    }
}

#[test]
fn another_chips_vcek_is_not_bound() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let items = common::items(&dir);
    let get = |n: &str| items.iter().find(|i| i.name == n).expect(n);
    // Same product, different chip: the hwID binding fails on its own (besides the signature).
    let report_of = get("virtee-milan");
    let other = get("gosev-milan");
    let e = Evidence {
        report: &report_of.report,
        vcek: Some(&other.vcek),
        ..Default::default()
    };
    let verdict = verifier().verify(&e, common::AT);
    assert!(
        verdict.reasons.contains(&Reason::HwidMismatch),
        "{:?}",
        verdict.reasons
    );
    assert!(verdict.reasons.contains(&Reason::ReportSignatureInvalid));
    // And TCB: the other VCEK certifies other SPLs.
    assert!(
        verdict
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::TcbMismatch { .. })),
        "{:?}",
        verdict.reasons
    );
}

#[test]
fn a_different_ark_is_not_trusted_without_configuration() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let items = common::items(&dir);
    let it = items.iter().find(|i| i.name == "virtee-milan").unwrap();
    let genoa_ark = snp::roots::der(Product::Genoa, snp::roots::Builtin::Ark);
    let e = Evidence {
        report: &it.report,
        vcek: Some(&it.vcek),
        ask: it.ask.as_deref(),
        ark: Some(genoa_ark),
        crls: &[],
    };
    let verdict = verifier().verify(&e, common::AT);
    assert!(!verdict.accepted());
    assert!(
        verdict
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::ProductMismatch { .. }))
    );
}
