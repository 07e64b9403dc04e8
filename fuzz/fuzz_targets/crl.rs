//! CRL parsing never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snp::Crl;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Crl::from_der_or_pem(data) {
        let _ = c.fresh_at(1_780_272_000);
    }
});
