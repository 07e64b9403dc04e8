//! A k-of-n split's wraps as the host leaves them in the disk's token (guest-agent's split):
//! whatever JSON it is, the shape check and the opening answer without a panic, and nothing
//! opens with shares that did not deal it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = guest_agent::split::check(&v);
    let shares: [(usize, &[u8]); 2] = [(0, &[1u8; 64]), (1, &[2u8; 64])];
    assert!(
        guest_agent::split::open(&v, 2, 3, &shares, "vm-f", 1).is_err(),
        "wraps nobody dealt with these shares opened"
    );
});
