//! Reports the simulator signs per second, against the raw ECDSA P-384 sign of the same library
//! and the verifier's warm verification, in the same run: the simulator must not be the
//! bottleneck of a key-broker load test.
//!
//! Run: `cargo bench -p attesta-benches --bench simulator`

use attesta_benches::{AT, Simulated};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use snp::Product;
use snp::device::GuestDevice;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let sim = Simulated::new(Product::Genoa);
    let guest = sim.chip.launch(Simulated::launch());
    let raw = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("key");
    let msg = [0x5au8; 0x2A0];
    let rng = SystemRandom::new();
    let (verifier, ev) = (&sim.verifier, sim.evidence());

    let mut g = c.benchmark_group("simulator");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_p384_sign", |b| {
        b.iter(|| raw.sign(&rng, black_box(&msg)).map(|s| s.as_ref().len()))
    });
    g.bench_function("sim_report_signed", |b| {
        b.iter(|| guest.get_report(black_box(&[1; 64]), 0).map(|r| r.len()))
    });
    g.bench_function("kbs_report_verify_warm", |b| {
        b.iter(|| verifier.verify(black_box(&ev), AT).accepted())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
