//! A fleet of 10,000 VMs on 60 chips of three products: cheap to build, every VM's report
//! verifies, and each binds its own chip and order.

use simulator::{Fleet, Seed};
use snp::{AttestationReport, Evidence, Product, Revocation, Verifier, VerifierConfig};
use std::time::Instant;

#[test]
fn ten_thousand_vms() {
    let seed = Seed::from_text("fleet-test");
    let t0 = Instant::now();
    let fleet = Fleet::new(&seed, &Product::ALL, 60, 10_000, [0x5a; 48]).unwrap();
    eprintln!(
        "fleet of {} chips and {} VMs built in {:?}",
        fleet.chips.len(),
        fleet.vms.len(),
        t0.elapsed()
    );
    assert_eq!((fleet.chips.len(), fleet.vms.len()), (60, 10_000));
    let trust_roots = fleet.pkis.iter().map(|p| p.ark.cert.clone()).collect();
    let v = Verifier::new(VerifierConfig {
        trust_roots,
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    // A sample across the fleet (every 97th VM) verifies and carries its own chip and host data.
    for vm in (0..10_000).step_by(97) {
        let report = fleet.report(vm, &[1; 64]).unwrap();
        let chip = fleet.chip_of(vm).unwrap();
        let pki = chip.pki();
        let e = Evidence {
            report: &report,
            vcek: Some(&chip.vcek().cert),
            ask: Some(&pki.ask.cert),
            ark: Some(&pki.ark.cert),
            crls: &[],
        };
        let verdict = v.verify(&e, 1_780_272_000);
        assert!(verdict.accepted(), "vm {vm}: {:?}", verdict.reasons);
        let r = AttestationReport::from_bytes(&report).unwrap();
        assert_eq!(r.chip_id, chip.config.chip_id);
        assert_eq!(r.host_data, fleet.vms[vm].launch.host_data);
    }
    assert!(fleet.report(10_000, &[0; 64]).is_err());
}
