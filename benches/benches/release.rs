//! What one key release costs the broker besides the verification, piece by piece, against the
//! verifier's warm verification of a simulated report in the same run: the budget behind the
//! issue's "releases ≥ 50% of the verifier's rate" (a release may cost at most two
//! verifications). The QUIC + TLS handshake is measured by `attesta-sim load` ("handshakes
//! alone"), where only the broker's half runs on the broker's core.
//!
//! Run: `cargo bench -p attesta-benches --bench release`

use attesta_benches::{AT, Simulated};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto::msg::{ReleaseBody, Response};
use proto::{GuestKey, ResponseKey, SealContext};
use snp::Product;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let sim = Simulated::new(Product::Milan);
    let (verifier, ev) = (&sim.verifier, sim.evidence());

    let guest_key = GuestKey::generate().expect("guest key");
    let ctx = SealContext {
        vm_id: "vm-123",
        generation: 1,
        nonce: [7; 32],
        measurement: [3; 48],
    };
    // A volume key and a small boot configuration (SSH keys), as released.
    let secret = vec![0x42u8; 64 + 200];
    let sealed = proto::seal(&guest_key.public(), &ctx, &secret).expect("seal");
    let response_key = ResponseKey::generate().expect("response key");
    let body = ReleaseBody {
        vm_id: ctx.vm_id.into(),
        generation: 1,
        boot_counter: 2,
        nonce: ctx.nonce.to_vec(),
        measurement: ctx.measurement.to_vec(),
        enc: sealed.enc.to_vec(),
        sealed: sealed.ciphertext.clone(),
        mesh_cert: Vec::new(),
        mesh_chain: Vec::new(),
    };

    let mut g = c.benchmark_group("release_budget");
    g.throughput(Throughput::Elements(1));
    g.bench_function("report_verify_warm (baseline)", |b| {
        b.iter(|| verifier.verify(black_box(&ev), AT).accepted())
    });
    g.bench_function("hpke_seal", |b| {
        b.iter(|| proto::seal(black_box(&guest_key.public()), &ctx, &secret).map(|s| s.enc))
    });
    g.bench_function("aws_lc_x25519_keygen_agree", |b| {
        use aws_lc_rs::agreement;
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, guest_key.public());
        b.iter(|| {
            let k = agreement::EphemeralPrivateKey::generate(
                &agreement::X25519,
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .expect("key");
            let p = k.compute_public_key().expect("public");
            agreement::agree_ephemeral(k, peer, (), |s| Ok::<_, ()>(s[0] ^ p.as_ref()[0]))
        })
    });
    g.bench_function("signed_release_response", |b| {
        b.iter(|| Response::release(&response_key, black_box(&body)))
    });
    g.bench_function("expected_report_data", |b| {
        b.iter(|| proto::expected_report_data(black_box(&[1; 32]), &[2; 32], &[3; 32], &[]))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
