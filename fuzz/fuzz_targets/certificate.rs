//! Certificate parsing (DER or PEM) and AMD extension decoding never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snp::{AmdCert, Product};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = AmdCert::from_der_or_pem(data) {
        for p in Product::ALL {
            let _ = c.hwid(p);
        }
        let _ = c.product();
        let _ = c.signature_valid(&c);
    }
    let _ = snp::certs::pem_blocks(data);
});
