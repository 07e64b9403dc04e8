//! Reports the simulator signs per second, against the raw ECDSA P-384 sign of the same library
//! and the verifier's warm verification, in the same run: the simulator must not be the
//! bottleneck of a key-broker load test.
//!
//! Run: `cargo bench -p attesta-benches --bench simulator`

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::device::GuestDevice;
use snp::{Evidence, Product, Revocation, Verifier, VerifierConfig};
use std::hint::black_box;
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let pki = Arc::new(Pki::from_seed(Product::Genoa, Seed::from_text("bench")).expect("pki"));
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).expect("chip");
    let guest = chip.launch(GuestLaunch {
        measurement: [3; 48],
        ..Default::default()
    });
    let raw = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("key");
    let msg = [0x5au8; 0x2A0];
    let rng = SystemRandom::new();
    let report = guest.get_report(&[1; 64], 0).expect("report");
    let verifier = Verifier::new(VerifierConfig {
        trust_roots: vec![pki.ark.cert.clone()],
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    let ev = Evidence {
        report: &report,
        vcek: Some(&chip.vcek().cert),
        ask: Some(&pki.ask.cert),
        ark: Some(&pki.ark.cert),
        crls: &[],
    };
    assert!(verifier.verify(&ev, 1_780_272_000).accepted());

    let mut g = c.benchmark_group("simulator");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_p384_sign", |b| {
        b.iter(|| raw.sign(&rng, black_box(&msg)).map(|s| s.as_ref().len()))
    });
    g.bench_function("sim_report_signed", |b| {
        b.iter(|| guest.get_report(black_box(&[1; 64]), 0).map(|r| r.len()))
    });
    g.bench_function("kbs_report_verify_warm", |b| {
        b.iter(|| verifier.verify(black_box(&ev), 1_780_272_000).accepted())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
