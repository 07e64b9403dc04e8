//! The extended-report certificate-table parser never panics and round-trips what it accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snp::CertTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = CertTable::parse(data) {
        assert_eq!(CertTable::parse(&t.encode()).as_ref(), Ok(&t));
        let _ = t.signing_cert();
    }
});
