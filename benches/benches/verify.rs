//! Report verifications per second with a warm cache, against the raw ECDSA P-384 verify of
//! the same library (aws-lc-rs) over the same bytes, in the same run.
//!
//! Run: `cargo bench -p attesta-benches --bench verify`

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, ParsedPublicKey, UnparsedPublicKey};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use snp::certs::PublicKey;
use snp::{AmdCert, AttestationReport, Evidence, Policy, Revocation, Verifier, VerifierConfig};
use std::hint::black_box;

/// 2026-06-01T00:00:00Z.
const AT: u64 = 1_780_272_000;

fn bench(c: &mut Criterion) {
    let Some(dir) = attesta_benches::corpus_dir() else {
        eprintln!("SKIP: SNP corpus not found (set ATTESTA_SNP_CORPUS)");
        return;
    };
    for item in ["virtee-milan", "msft-genoa-v3", "msft-turin-v5"] {
        let d = dir.join(item);
        let report = std::fs::read(d.join("report.bin")).expect("report");
        let vcek = std::fs::read(d.join("vcek.der"))
            .or_else(|_| std::fs::read(d.join("vcek.pem")))
            .expect("vcek");
        let parsed = AttestationReport::from_bytes(&report).expect("parses");
        let rs = parsed.signature.to_fixed_be().expect("signature");
        let cert = AmdCert::from_der_or_pem(&vcek).expect("vcek parses");
        let PublicKey::EcP384(_) = &cert.key else {
            panic!("not P-384")
        };
        // The raw primitive: the point from the certificate, parsed once, verifying the signed bytes.
        let spki_point = {
            let der = snp::certs::to_der(&vcek).unwrap();
            // The uncompressed point is the last 97 bytes of the SPKI BIT STRING; find it.
            let pos = der
                .windows(3)
                .position(|w| w == [0x03, 0x62, 0x00])
                .expect("P-384 SPKI");
            der[pos + 3..pos + 3 + 97].to_vec()
        };
        let raw_key = ParsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &spki_point).expect("point");

        let verifier = Verifier::new(VerifierConfig {
            revocation: Revocation::IfAvailable,
            ..Default::default()
        });
        let ev = Evidence {
            report: &report,
            vcek: Some(&vcek),
            ..Default::default()
        };
        assert!(verifier.verify(&ev, AT).accepted());
        let policy = Policy {
            any_vmpl: true,
            ..Policy::default()
        };

        let mut g = c.benchmark_group(format!("verify/{item}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("raw_p384_verify_parsed_key", |b| {
            b.iter(|| {
                raw_key
                    .verify_sig(black_box(parsed.signed_bytes()), black_box(&rs))
                    .is_ok()
            })
        });
        g.bench_function("raw_p384_verify_unparsed_key", |b| {
            b.iter(|| {
                UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, black_box(&spki_point))
                    .verify(black_box(parsed.signed_bytes()), black_box(&rs))
                    .is_ok()
            })
        });
        g.bench_function("report_verify_warm", |b| {
            b.iter(|| verifier.verify(black_box(&ev), AT).accepted())
        });
        g.bench_function("report_verify_and_appraise_warm", |b| {
            b.iter(|| {
                verifier
                    .verify_with_policy(black_box(&ev), &policy, AT)
                    .reasons
                    .len()
            })
        });
        g.bench_function("report_verify_cold_chain", |b| {
            b.iter(|| {
                let cold = Verifier::new(VerifierConfig {
                    revocation: Revocation::IfAvailable,
                    ..Default::default()
                });
                cold.verify(black_box(&ev), AT).accepted()
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
