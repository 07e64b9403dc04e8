//! The simulated key hierarchy is deterministic from its seed, persistable, in AMD's profile,
//! and accepted by the verifier only with its root configured.

use simulator::{Pki, Seed};
use snp::report::{Cpuid, GuestPolicy, ReportBody};
use snp::{AmdCert, Evidence, Product, Revocation, Tcb, Verifier, VerifierConfig};

const NOW: u64 = 1_780_272_000;

#[test]
fn same_seed_same_bytes_and_persistence() {
    let a = Pki::from_seed(Product::Genoa, Seed::from_text("fleet-1")).unwrap();
    let b = Pki::from_seed(Product::Genoa, Seed::from_text("fleet-1")).unwrap();
    assert_eq!(a.ark.cert, b.ark.cert);
    assert_eq!(a.ask.cert, b.ask.cert);
    assert_eq!(a.asvk.cert, b.asvk.cert);
    let tcb = Tcb {
        fmc: None,
        bootloader: 9,
        tee: 0,
        snp: 23,
        microcode: 72,
    };
    let chip = [7u8; 64];
    let va = a.issue_vcek(&chip, &tcb, NOW).unwrap();
    assert_eq!(va.cert, b.issue_vcek(&chip, &tcb, NOW).unwrap().cert);
    // A firmware update (new TCB) re-issues the VCEK with another key.
    let newer = Tcb { snp: 24, ..tcb };
    let vn = a.issue_vcek(&chip, &newer, NOW).unwrap();
    assert_ne!(
        AmdCert::from_der(vn.cert.clone()).unwrap().fingerprint(),
        AmdCert::from_der(va.cert.clone()).unwrap().fingerprint()
    );

    let other = Pki::from_seed(Product::Genoa, Seed::from_text("fleet-2")).unwrap();
    assert_ne!(a.ark.cert, other.ark.cert);

    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ark.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = Pki::load(dir.path()).unwrap();
    assert_eq!(loaded.ark.cert, a.ark.cert);
    assert_eq!(loaded.product, Product::Genoa);
    assert_eq!(loaded.issue_vcek(&chip, &tcb, NOW).unwrap().cert, va.cert);
    assert!(Pki::load(&dir.path().join("missing")).is_err());
}

#[test]
fn amd_profile() {
    let pki = Pki::from_seed(Product::Turin, Seed::from_text("profile")).unwrap();
    let ark = AmdCert::from_der(pki.ark.cert.clone()).unwrap();
    let ask = AmdCert::from_der(pki.ask.cert.clone()).unwrap();
    let asvk = AmdCert::from_der(pki.asvk.cert.clone()).unwrap();
    assert_eq!(ark.subject_cn.as_deref(), Some("ARK-Turin"));
    assert_eq!(ask.subject_cn.as_deref(), Some("SEV-Turin"));
    assert_eq!(asvk.subject_cn.as_deref(), Some("SEV-VLEK-Turin"));
    assert!(ark.is_ca && ark.key_cert_sign && ark.crl_sign && ask.is_ca && ask.key_cert_sign);
    assert!(ask.signature_valid(&ark) && asvk.signature_valid(&ark) && ark.signature_valid(&ark));
    let tcb = Tcb {
        fmc: Some(3),
        bootloader: 1,
        tee: 1,
        snp: 4,
        microcode: 81,
    };
    let mut chip = [0u8; 64];
    chip[..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let v = pki.issue_vcek(&chip, &tcb, NOW).unwrap();
    let vc = AmdCert::from_der(v.cert.clone()).unwrap();
    assert_eq!(vc.subject_cn.as_deref(), Some("SEV-VCEK"));
    assert_eq!(vc.serial, vec![0]);
    assert_eq!(vc.hwid(Product::Turin), Some(chip[..8].to_vec()));
    assert_eq!(vc.amd.fmc_spl, Some(3));
    assert_eq!(vc.amd.ucode_spl, Some(81));
    assert_eq!(vc.product(), Some(Product::Turin));
    assert!(vc.signature_valid(&ask));
    let vl = AmdCert::from_der(pki.issue_vlek("csp", &tcb, NOW).unwrap().cert).unwrap();
    assert_eq!(vl.subject_cn.as_deref(), Some("SEV-VLEK"));
    assert!(
        vl.signature_valid(&asvk)
            && vl.amd.hwid_raw.is_none()
            && vl.amd.csp_id.as_deref() == Some("csp")
    );
}

#[test]
fn verifier_accepts_only_with_the_simulator_root() {
    let pki = Pki::from_seed(Product::Milan, Seed::from_text("verify")).unwrap();
    let tcb = Tcb {
        fmc: None,
        bootloader: 4,
        tee: 0,
        snp: 22,
        microcode: 213,
    };
    let chip = [9u8; 64];
    let v = pki.issue_vcek(&chip, &tcb, NOW - 86_400).unwrap();
    let t = tcb.encode(Product::Milan);
    let mut body = ReportBody {
        version: 3,
        cpuid: Some(Cpuid {
            family: 0x19,
            model: 0x01,
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
    let report = v.sign_report(&mut body).unwrap();
    let ev = Evidence {
        report: &report,
        vcek: Some(&v.cert),
        ask: Some(&pki.ask.cert),
        ark: Some(&pki.ark.cert),
        crls: &[],
    };
    let plain = Verifier::new(VerifierConfig {
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    assert_eq!(
        plain.verify(&ev, NOW).reasons,
        vec![snp::Reason::ArkNotTrusted]
    );
    let trusting = Verifier::new(VerifierConfig {
        trust_roots: vec![pki.ark.cert.clone()],
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    let verdict = trusting.verify(&ev, NOW);
    assert!(verdict.accepted(), "{:?}", verdict.reasons);
    assert!(!verdict.amd_rooted());
}
