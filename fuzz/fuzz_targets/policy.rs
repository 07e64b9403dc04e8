//! Policy documents: parsing never panics, and an accepted policy appraises any report.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snp::{Policy, Product, ReportBody};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Policy::from_toml(text) {
        let _ = p.appraise(&ReportBody::default(), Product::Turin);
        let _ = Policy::from_toml(&p.to_toml()).expect("a policy's own TOML parses");
    }
});
