//! The whole verifier on hostile evidence: a report followed by certificate bytes. Never
//! panics, and never accepts (no fuzzer can forge AMD's signatures).
#![no_main]
use libfuzzer_sys::fuzz_target;
use snp::{Evidence, Verifier, VerifierConfig};
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static V: OnceLock<Verifier> = OnceLock::new();
    let v = V.get_or_init(|| Verifier::new(VerifierConfig::default()));
    let split = data.len().min(snp::report::REPORT_LEN);
    let (report, rest) = data.split_at(split);
    let mid = rest.len() / 2;
    let (vcek, crl) = rest.split_at(mid);
    let crls = [crl];
    let ev = Evidence {
        report,
        vcek: Some(vcek),
        ask: None,
        ark: None,
        crls: &crls,
    };
    let verdict = v.verify(&ev, 1_780_272_000);
    assert!(!verdict.accepted());
});
