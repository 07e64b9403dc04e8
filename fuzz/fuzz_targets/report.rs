//! The report parser never panics, and whatever parses re-encodes to the same fields.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snp::{AttestationReport, Policy, Product};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = AttestationReport::from_bytes(data) {
        let again =
            AttestationReport::from_bytes(&r.body().encode()).expect("re-encoded report parses");
        assert_eq!(again.body(), r.body());
        let _ = r.product_hint();
        let _ = r.reserved_nonzero();
        for p in Product::ALL {
            let _ = Policy::default().appraise(r.body(), p);
        }
    }
});
