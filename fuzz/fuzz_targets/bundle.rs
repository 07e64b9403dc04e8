//! The tenant's verifier never panics on a bundle, whatever its bytes, and neither does the
//! audit log reader on a log.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let e = attesta_verify::Expect {
        order: data,
        ..Default::default()
    };
    let o = attesta_verify::check_bundle(data, &e);
    assert!(!o.ok(), "a bundle signed by no one was accepted");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proto::audit::verify(text, &[7u8; 32]);
        let _ = proto::bundle::cut(text, "vm");
    }
});
