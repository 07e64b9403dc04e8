//! Checks that need certificates the corpus cannot provide (other roots, CRLs, expired or
//! malformed certificates), using the simulator's AMD-profile key hierarchy.

use simulator::Pki;
use simulator::pki::Ext;
use snp::certtable::{CertTable, GUID_ARK, GUID_ASK, GUID_VCEK};
use snp::reason::{CertRole, Reason};
use snp::report::{Cpuid, KeyInfo, ReportBody, SigningKey};
use snp::{Evidence, Product, Revocation, Tcb, Verifier, VerifierConfig};
use std::sync::OnceLock;

const NOW: u64 = 1_780_272_000; // 2026-06-01
const DAY: u64 = 86_400;

fn pki(product: Product) -> &'static Pki {
    static MILAN: OnceLock<Pki> = OnceLock::new();
    static TURIN: OnceLock<Pki> = OnceLock::new();
    let cell = if product == Product::Turin {
        &TURIN
    } else {
        &MILAN
    };
    cell.get_or_init(|| Pki::generate(product).expect("generate"))
}

fn tcb(product: Product) -> Tcb {
    Tcb {
        fmc: product.has_fmc().then_some(2),
        bootloader: 4,
        tee: 0,
        snp: 22,
        microcode: 213,
    }
}

fn chip(product: Product) -> [u8; 64] {
    let mut c = [0u8; 64];
    for (i, b) in c.iter_mut().enumerate().take(product.hwid_len()) {
        *b = 0x40 + i as u8;
    }
    c
}

fn body(product: Product) -> ReportBody {
    let t = tcb(product).encode(product);
    ReportBody {
        version: if product == Product::Turin { 5 } else { 3 },
        cpuid: Some(match product {
            Product::Milan => Cpuid {
                family: 0x19,
                model: 0x01,
                stepping: 1,
            },
            Product::Genoa => Cpuid {
                family: 0x19,
                model: 0x11,
                stepping: 1,
            },
            Product::Turin => Cpuid {
                family: 0x1a,
                model: 0x02,
                stepping: 1,
            },
        }),
        launch_mit_vector: (product == Product::Turin).then_some(0),
        current_mit_vector: (product == Product::Turin).then_some(0),
        policy: snp::report::GuestPolicy(0x3_0000),
        chip_id: chip(product),
        reported_tcb: t,
        current_tcb: t,
        committed_tcb: t,
        launch_tcb: t,
        measurement: [0x11; 48],
        ..Default::default()
    }
}

struct Case {
    report: Vec<u8>,
    vcek: Vec<u8>,
    ask: Vec<u8>,
    ark: Vec<u8>,
}

fn case(product: Product) -> Case {
    let p = pki(product);
    let v = p
        .issue_vcek(&chip(product), &tcb(product), NOW - 30 * DAY)
        .expect("vcek");
    let report = v.sign_report(&mut body(product)).expect("sign").to_vec();
    Case {
        report,
        vcek: v.cert,
        ask: p.ask.cert.clone(),
        ark: p.ark.cert.clone(),
    }
}

fn trusting(product: Product, revocation: Revocation) -> Verifier {
    Verifier::new(VerifierConfig {
        trust_roots: vec![pki(product).ark.cert.clone()],
        revocation,
        ..Default::default()
    })
}

fn ev<'a>(c: &'a Case, crls: &'a [&'a [u8]]) -> Evidence<'a> {
    Evidence {
        report: &c.report,
        vcek: Some(&c.vcek),
        ask: Some(&c.ask),
        ark: Some(&c.ark),
        crls,
    }
}

#[test]
fn simulator_root_needs_explicit_trust_and_is_flagged() {
    for product in [Product::Milan, Product::Turin] {
        let c = case(product);
        let plain = Verifier::new(VerifierConfig {
            revocation: Revocation::IfAvailable,
            ..Default::default()
        });
        let v = plain.verify(&ev(&c, &[]), NOW);
        assert_eq!(v.reasons, vec![Reason::ArkNotTrusted], "{product}");
        // Without a supplied chain the built-in AMD roots are used, and the simulated VCEK fails.
        let v = plain.verify(
            &Evidence {
                report: &c.report,
                vcek: Some(&c.vcek),
                ..Default::default()
            },
            NOW,
        );
        assert!(
            v.reasons
                .contains(&Reason::CertSignatureInvalid(CertRole::Vcek)),
            "{:?}",
            v.reasons
        );

        let v = trusting(product, Revocation::IfAvailable).verify(&ev(&c, &[]), NOW);
        assert!(v.accepted(), "{product}: {:?}", v.reasons);
        assert!(!v.amd_rooted());
        assert!(matches!(v.root, Some(snp::Root::Configured(_))));
        assert_eq!(v.product, Some(product));
    }
}

#[test]
fn crl_checks() {
    let p = pki(Product::Milan);
    let c = case(Product::Milan);
    let v = trusting(Product::Milan, Revocation::Require);

    // No CRL and revocation required: fail closed.
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::CrlUnavailable]
    );

    // A current CRL that revokes nothing: accepted, and revocation was checked.
    let clean = p.ark.sign_crl(&[], NOW - DAY, Some(NOW + 7 * DAY)).unwrap();
    let out = v.verify(&ev(&c, &[&clean]), NOW);
    assert!(out.accepted(), "{:?}", out.reasons);
    assert!(out.revocation_checked);

    // The ASK revoked.
    let ask_serial = snp::AmdCert::from_der_or_pem(&c.ask).unwrap().serial;
    let revoked_ask = p
        .ark
        .sign_crl(&[ask_serial], NOW - DAY, Some(NOW + 7 * DAY))
        .unwrap();
    assert_eq!(
        v.verify(&ev(&c, &[&revoked_ask]), NOW).reasons,
        vec![Reason::CertRevoked(CertRole::Ask)]
    );

    // The VCEK's serial (0) revoked.
    let revoked_vcek = p
        .ark
        .sign_crl(&[vec![0]], NOW - DAY, Some(NOW + 7 * DAY))
        .unwrap();
    assert_eq!(
        v.verify(&ev(&c, &[&revoked_vcek]), NOW).reasons,
        vec![Reason::CertRevoked(CertRole::Vcek)]
    );

    // Past nextUpdate: stale.
    let stale = p
        .ark
        .sign_crl(&[], NOW - 30 * DAY, Some(NOW - DAY))
        .unwrap();
    assert!(matches!(
        v.verify(&ev(&c, &[&stale]), NOW).reasons[..],
        [Reason::CrlStale { .. }]
    ));

    // Signed by someone else (the ASK): cannot be used, so reject even when not required.
    let forged = p.ask.sign_crl(&[], NOW - DAY, Some(NOW + 7 * DAY)).unwrap();
    let lax = trusting(Product::Milan, Revocation::IfAvailable);
    let out = lax.verify(&ev(&c, &[&forged]), NOW);
    assert!(
        matches!(out.reasons[..], [Reason::CrlInvalid(_)]),
        "{:?}",
        out.reasons
    );
    let mut tampered = clean.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(
        lax.verify(&ev(&c, &[&tampered]), NOW).reasons[..],
        [Reason::CrlInvalid(_)]
    ));
    assert!(matches!(
        lax.verify(&ev(&c, &[b"garbage"]), NOW).reasons[..],
        [Reason::CrlInvalid(_)]
    ));

    // CRLs held by the verifier (as fetched from the key server) count too.
    let held = trusting(Product::Milan, Revocation::Require);
    assert!(held.add_crl(&forged, Product::Milan).is_err());
    held.add_crl(&revoked_ask, Product::Milan).unwrap();
    assert_eq!(
        held.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::CertRevoked(CertRole::Ask)]
    );
    // A CRL dated in the future (a skewed clock) does not push out the current one, and every
    // current CRL's revocations apply.
    let future = p
        .ark
        .sign_crl(&[], NOW + 3 * DAY, Some(NOW + 30 * DAY))
        .unwrap();
    held.add_crl(&future, Product::Milan).unwrap();
    assert_eq!(
        held.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::CertRevoked(CertRole::Ask)]
    );
    // Once the newer CRL is current and the old one stale, the newer one decides (it does not
    // list the ASK in this test).
    assert!(held.verify(&ev(&c, &[]), NOW + 8 * DAY).accepted());
    // A held CRL past its nextUpdate, and nothing newer: stale.
    let only_old = trusting(Product::Milan, Revocation::Require);
    only_old.add_crl(&revoked_ask, Product::Milan).unwrap();
    assert!(matches!(
        only_old.verify(&ev(&c, &[]), NOW + 8 * DAY).reasons[..],
        [Reason::CrlStale { .. }]
    ));
}

#[test]
fn validity_is_checked_at_the_given_instant() {
    let c = case(Product::Milan);
    let v = trusting(Product::Milan, Revocation::IfAvailable);
    let early = v.verify(&ev(&c, &[]), NOW - 31 * DAY);
    assert!(
        matches!(
            early.reasons[..],
            [Reason::CertNotYetValid {
                role: CertRole::Vcek,
                ..
            }]
        ),
        "{:?}",
        early.reasons
    );
    let late = v.verify(&ev(&c, &[]), NOW + 8 * 365 * DAY);
    assert!(
        matches!(
            late.reasons[..],
            [Reason::CertExpired {
                role: CertRole::Vcek,
                ..
            }]
        ),
        "{:?}",
        late.reasons
    );
    let very_late = v.verify(&ev(&c, &[]), 2_400_000_000);
    assert_eq!(
        very_late.reasons.len(),
        3,
        "ARK, ASK and VCEK all expired: {:?}",
        very_late.reasons
    );
}

fn with_exts(exts: Vec<Ext>, cn: &str) -> Case {
    let p = pki(Product::Milan);
    let v = p
        .issue_endorsement(&p.ask, cn, exts, NOW - DAY, NOW + DAY)
        .unwrap();
    let report = v.sign_report(&mut body(Product::Milan)).unwrap().to_vec();
    Case {
        report,
        vcek: v.cert,
        ask: p.ask.cert.clone(),
        ark: p.ark.cert.clone(),
    }
}

#[test]
fn binding_and_profile_checks() {
    let p = pki(Product::Milan);
    let v = trusting(Product::Milan, Revocation::IfAvailable);
    let t = tcb(Product::Milan);

    // hwID of another chip.
    let mut other = chip(Product::Milan);
    other[5] ^= 0xff;
    let c = with_exts(p.endorsement_exts(&t, Some(&other), None), "SEV-VCEK");
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::HwidMismatch]
    );

    // No hwID at all.
    let c = with_exts(p.endorsement_exts(&t, None, None), "SEV-VCEK");
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::HwidMissing]
    );

    // A VCEK for another TCB.
    let newer = Tcb {
        snp: t.snp + 1,
        ..t
    };
    let c = with_exts(
        p.endorsement_exts(&newer, Some(&chip(Product::Milan)), None),
        "SEV-VCEK",
    );
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::TcbMismatch {
            component: snp::tcb::Component::Snp,
            report: t.snp,
            cert: t.snp + 1
        }]
    );

    // An SPL extension missing.
    let mut exts = p.endorsement_exts(&t, Some(&chip(Product::Milan)), None);
    exts.retain(|(o, _, _)| o != "1.3.6.1.4.1.3704.1.3.8");
    let c = with_exts(exts, "SEV-VCEK");
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::TcbExtensionMissing(snp::tcb::Component::Microcode)]
    );

    // An unknown critical extension.
    let mut exts = p.endorsement_exts(&t, Some(&chip(Product::Milan)), None);
    exts.push(("1.2.3.4".into(), true, vec![0x05, 0x00]));
    let c = with_exts(exts, "SEV-VCEK");
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::UnknownCriticalExtension {
            role: CertRole::Vcek,
            oid: "1.2.3.4".into()
        }]
    );

    // A certificate that is not named like a VCEK.
    let c = with_exts(
        p.endorsement_exts(&t, Some(&chip(Product::Milan)), None),
        "SEV-VCEX",
    );
    assert!(matches!(
        v.verify(&ev(&c, &[]), NOW).reasons[..],
        [Reason::UnexpectedCertName {
            role: CertRole::Vcek,
            ..
        }]
    ));
}

#[test]
fn turin_hwid_is_eight_bytes_and_the_rest_must_be_zero() {
    let p = pki(Product::Turin);
    let v = trusting(Product::Turin, Revocation::IfAvailable);
    let vcek = p
        .issue_vcek(&chip(Product::Turin), &tcb(Product::Turin), NOW - DAY)
        .unwrap();
    let mut b = body(Product::Turin);
    b.chip_id[9] = 1; // beyond the 8 bytes the hwID covers
    let report = vcek.sign_report(&mut b).unwrap().to_vec();
    let c = Case {
        report,
        vcek: vcek.cert,
        ask: p.ask.cert.clone(),
        ark: p.ark.cert.clone(),
    };
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::HwidMismatch]
    );
}

#[test]
fn report_level_checks() {
    let p = pki(Product::Milan);
    let v = trusting(Product::Milan, Revocation::IfAvailable);
    let vcek = p
        .issue_vcek(&chip(Product::Milan), &tcb(Product::Milan), NOW - DAY)
        .unwrap();
    let sign = |f: &dyn Fn(&mut ReportBody)| {
        let mut b = body(Product::Milan);
        f(&mut b);
        Case {
            report: vcek.sign_report(&mut b).unwrap().to_vec(),
            vcek: vcek.cert.clone(),
            ask: p.ask.cert.clone(),
            ark: p.ark.cert.clone(),
        }
    };
    // The report claims a VLEK signed it, but the certificate is a VCEK.
    let c = sign(&|b| b.key_info = KeyInfo(0).with_signing_key(SigningKey::Vlek));
    let r = v.verify(&ev(&c, &[]), NOW).reasons;
    assert!(
        r.iter()
            .any(|x| matches!(x, Reason::SigningKeyMismatch { .. })),
        "{r:?}"
    );
    // Unsigned report kind.
    let c = sign(&|b| b.key_info = KeyInfo(0).with_signing_key(SigningKey::None));
    assert!(
        v.verify(&ev(&c, &[]), NOW)
            .reasons
            .contains(&Reason::UnsupportedSigningKey(SigningKey::None))
    );
    // Unknown signature algorithm (validly signed nonetheless).
    let c = sign(&|b| b.signature_algo = 2);
    assert_eq!(
        v.verify(&ev(&c, &[]), NOW).reasons,
        vec![Reason::UnknownSignatureAlgorithm(2)]
    );
    // Product in the report contradicts the chain.
    let c = sign(&|b| {
        b.cpuid = Some(Cpuid {
            family: 0x19,
            model: 0x11,
            stepping: 1,
        })
    });
    let r = v.verify(&ev(&c, &[]), NOW).reasons;
    assert!(
        r.iter()
            .any(|x| matches!(x, Reason::ProductMismatch { .. })),
        "{r:?}"
    );
    // Several failures at once are all listed.
    let c = sign(&|b| {
        b.signature_algo = 3;
        b.chip_id[0] ^= 1;
    });
    let r = v.verify(&ev(&c, &[]), NOW).reasons;
    assert!(
        r.contains(&Reason::UnknownSignatureAlgorithm(3)) && r.contains(&Reason::HwidMismatch),
        "{r:?}"
    );
}

#[test]
fn vlek_chain() {
    let p = pki(Product::Milan);
    let vlek = p
        .issue_vlek("acme-cloud", &tcb(Product::Milan), NOW - DAY)
        .unwrap();
    let mut b = body(Product::Milan);
    b.key_info = KeyInfo(0).with_signing_key(SigningKey::Vlek);
    b.chip_id = [0; 64];
    let report = vlek.sign_report(&mut b).unwrap().to_vec();
    let c = Case {
        report,
        vcek: vlek.cert.clone(),
        ask: p.asvk.cert.clone(),
        ark: p.ark.cert.clone(),
    };
    let v = trusting(Product::Milan, Revocation::IfAvailable);
    let out = v.verify(&ev(&c, &[]), NOW);
    assert!(out.accepted(), "{:?}", out.reasons);
    assert_eq!(out.signer, Some(snp::SignerKind::Vlek));
    // The policy chooses which cloud providers' VLEKs count (and refuses VLEKs by default).
    use snp::policy::{Policy, SigningKeyName};
    let vlek_policy = |csps: Option<Vec<String>>| Policy {
        signing_keys: vec![SigningKeyName::Vlek],
        vlek_csp_ids: csps,
        ..Policy::default()
    };
    assert!(
        v.verify_with_policy(&ev(&c, &[]), &Policy::default(), NOW)
            .reasons
            .contains(&Reason::SigningKeyNotAllowed(SigningKey::Vlek))
    );
    assert!(
        v.verify_with_policy(
            &ev(&c, &[]),
            &vlek_policy(Some(vec!["acme-cloud".into()])),
            NOW
        )
        .accepted()
    );
    assert_eq!(
        v.verify_with_policy(&ev(&c, &[]), &vlek_policy(Some(vec!["other".into()])), NOW)
            .reasons,
        vec![Reason::VlekCspNotAllowed("acme-cloud".into())]
    );
    // A VLEK under the ASK (not the ASVK) is refused.
    let c2 = Case {
        ask: p.ask.cert.clone(),
        ..c
    };
    let r = v.verify(&ev(&c2, &[]), NOW).reasons;
    assert!(
        r.contains(&Reason::CertSignatureInvalid(CertRole::Vcek)),
        "{r:?}"
    );
    assert!(
        r.iter().any(|x| matches!(
            x,
            Reason::UnexpectedCertName {
                role: CertRole::Ask,
                ..
            }
        )),
        "{r:?}"
    );
}

#[test]
fn evidence_from_an_extended_report_certificate_table() {
    let c = case(Product::Milan);
    let table = CertTable {
        entries: vec![
            (GUID_VCEK, c.vcek.clone()),
            (GUID_ASK, c.ask.clone()),
            (GUID_ARK, c.ark.clone()),
        ],
    };
    let bytes = table.encode();
    let parsed = CertTable::parse(&bytes).unwrap();
    let e = Evidence {
        report: &c.report,
        vcek: parsed.signing_cert(),
        ask: parsed.get(&GUID_ASK),
        ark: parsed.get(&GUID_ARK),
        crls: &[],
    };
    let out = trusting(Product::Milan, Revocation::IfAvailable).verify(&e, NOW);
    assert!(out.accepted(), "{:?}", out.reasons);
}
