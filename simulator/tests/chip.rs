//! Simulated chips and guests: reports in the product's layout, extended reports with AMD's
//! certificate-table GUIDs, derived keys that seal to the selected identity, firmware updates.

use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::certtable::{CertTable, GUID_ARK, GUID_ASK, GUID_VCEK};
use snp::device::{DerivedKeyRequest, DeviceError, FieldSelect, GuestDevice};
use snp::reason::Reason;
use snp::{AttestationReport, Evidence, Product, Revocation, Tcb, Verifier, VerifierConfig};
use std::sync::Arc;

const NOW: u64 = 1_780_272_000;

fn pki(p: Product) -> Arc<Pki> {
    Arc::new(Pki::from_seed(p, Seed::from_text("chip-tests")).unwrap())
}

fn verifier(pki: &Pki) -> Verifier {
    Verifier::new(VerifierConfig {
        trust_roots: vec![pki.ark.cert.clone()],
        revocation: Revocation::IfAvailable,
        ..Default::default()
    })
}

#[test]
fn reports_follow_the_product_and_verify_from_the_extended_report_alone() {
    for product in Product::ALL {
        let pki = pki(product);
        let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 3)).unwrap();
        let guest = chip.launch(GuestLaunch {
            measurement: [7; 48],
            ..Default::default()
        });
        let (report, table) = guest.get_ext_report(&[9; 64], 0).unwrap();
        let r = AttestationReport::from_bytes(&report).unwrap();
        assert_eq!(r.product_hint(), Some(product));
        assert_eq!(r.version, if product == Product::Turin { 5 } else { 3 });
        assert_eq!((r.report_data, r.measurement), ([9; 64], [7; 48]));
        if product == Product::Turin {
            assert!(r.chip_id[8..].iter().all(|&b| b == 0));
        }
        let t = CertTable::parse(&table).unwrap();
        let e = Evidence {
            report: &report,
            vcek: t.get(&GUID_VCEK),
            ask: t.get(&GUID_ASK),
            ark: t.get(&GUID_ARK),
            crls: &[],
        };
        let v = verifier(&pki).verify(&e, NOW);
        assert!(v.accepted(), "{product}: {:?}", v.reasons);
        assert_eq!(
            guest.get_report(&[0; 64], 4).unwrap_err(),
            DeviceError::InvalidVmpl(4)
        );
        assert_eq!(
            AttestationReport::from_bytes(&guest.get_report(&[0; 64], 2).unwrap())
                .unwrap()
                .vmpl,
            2
        );
    }
}

#[test]
fn derived_keys_seal_to_the_selected_identity() {
    let pki = pki(Product::Milan);
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let other_chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 1)).unwrap();
    let image = GuestLaunch {
        measurement: [1; 48],
        ..Default::default()
    };
    let updated = GuestLaunch {
        measurement: [2; 48],
        ..Default::default()
    };
    let by_measurement = DerivedKeyRequest {
        fields: FieldSelect {
            measurement: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let by_chip_only = DerivedKeyRequest::default();
    let k = |c: &Chip, g: &GuestLaunch, r: &DerivedKeyRequest| {
        *c.launch(g.clone()).get_derived_key(r).unwrap()
    };
    // Deterministic.
    assert_eq!(
        k(&chip, &image, &by_measurement),
        k(&chip, &image, &by_measurement)
    );
    // Selecting the measurement separates images; not selecting it does not.
    assert_ne!(
        k(&chip, &image, &by_measurement),
        k(&chip, &updated, &by_measurement)
    );
    assert_eq!(
        k(&chip, &image, &by_chip_only),
        k(&chip, &updated, &by_chip_only)
    );
    // Another chip never derives the same key.
    assert_ne!(
        k(&chip, &image, &by_chip_only),
        k(&other_chip, &image, &by_chip_only)
    );
    // The VMPL and the root key are mixed in.
    let vmpl1 = DerivedKeyRequest {
        vmpl: 1,
        ..by_chip_only
    };
    let vmrk = DerivedKeyRequest {
        use_vmrk: true,
        ..by_chip_only
    };
    assert_ne!(k(&chip, &image, &by_chip_only), k(&chip, &image, &vmpl1));
    assert_ne!(k(&chip, &image, &by_chip_only), k(&chip, &image, &vmrk));
    let bad = DerivedKeyRequest {
        vmpl: 7,
        ..by_chip_only
    };
    assert!(chip.launch(image).get_derived_key(&bad).is_err());
}

#[test]
fn a_firmware_update_reissues_the_vcek() {
    let pki = pki(Product::Genoa);
    let mut chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let old_vcek = chip.vcek().cert.clone();
    let old_tcb = chip.config.current_tcb;
    let new_tcb = Tcb {
        snp: old_tcb.snp + 1,
        microcode: old_tcb.microcode + 2,
        ..old_tcb
    };
    let fw = snp::report::FirmwareVersion {
        major: 1,
        minor: 55,
        build: 41,
    };
    chip.update_firmware(new_tcb, fw).unwrap();
    assert_ne!(chip.vcek().cert, old_vcek);
    let guest = chip.launch(GuestLaunch::default());
    let report = guest.get_report(&[0; 64], 0).unwrap();
    let r = AttestationReport::from_bytes(&report).unwrap();
    assert_eq!(Tcb::decode(r.reported_tcb, Product::Genoa), new_tcb);
    assert_eq!(r.current_version, fw);
    let v = verifier(&pki);
    let ok = v.verify(
        &Evidence {
            report: &report,
            vcek: Some(&chip.vcek().cert),
            ask: Some(&pki.ask.cert),
            ark: Some(&pki.ark.cert),
            crls: &[],
        },
        NOW,
    );
    assert!(ok.accepted(), "{:?}", ok.reasons);
    // The old VCEK no longer matches the chip's TCB.
    let stale = v.verify(
        &Evidence {
            report: &report,
            vcek: Some(&old_vcek),
            ask: Some(&pki.ask.cert),
            ark: Some(&pki.ark.cert),
            crls: &[],
        },
        NOW,
    );
    assert!(
        stale
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::TcbMismatch { .. })),
        "{:?}",
        stale.reasons
    );
}

#[test]
fn a_launch_is_measured_from_its_artifacts() {
    use simulator::measure::{LaunchSpec, launch_digest, synthetic_ovmf, vcpu_sig};
    let ovmf = synthetic_ovmf(64 * 1024, 3);
    let spec = LaunchSpec {
        ovmf: &ovmf,
        kernel: Some(b"kernel"),
        initrd: Some(b"initrd"),
        cmdline: Some("console=ttyS0"),
        vcpus: 2,
        vcpu_sig: vcpu_sig("EPYC-Genoa").unwrap(),
        guest_features: 1,
    };
    let launch = GuestLaunch::measured(&spec, 0x3_001f).unwrap();
    assert_eq!(launch.measurement, launch_digest(&spec).unwrap());
    let pki = pki(Product::Genoa);
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let report = chip.launch(launch).get_report(&[0; 64], 0).unwrap();
    assert_eq!(
        AttestationReport::from_bytes(&report).unwrap().measurement,
        launch_digest(&spec).unwrap()
    );
}
