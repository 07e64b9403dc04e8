//! The wire-message and signed-document decoders never panic, and whatever message decodes
//! re-encodes to an equal message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::msg::{Request, Response, frame};

fuzz_target!(|data: &[u8]| {
    let mut framed = (data.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(data);
    let _ = proto::order::Order::verify(data, &[[7u8; 32]], 0);
    let _ = proto::order::Allowlist::verify(data, &[7u8; 32], 0);
    let _ = proto::order::Order::decode_stored(data);
    for bytes in [data, framed.as_slice()] {
        if let Ok(r) = Request::decode_frame(bytes) {
            assert_eq!(Request::decode_frame(&frame(&r)).ok(), Some(r));
        }
        if let Ok(r) = Response::decode_frame(bytes) {
            assert_eq!(Response::decode_frame(&frame(&r)).ok(), Some(r));
        }
    }
});
