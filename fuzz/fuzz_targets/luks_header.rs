//! The LUKS2 header check (guest-agent): any bytes the host puts on the disk are judged without
//! a panic, and nothing but a header bound to the key passes.
#![no_main]
use guest_agent::header::{self, Expect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut meta = data.to_vec();
    if meta.len() < 2 * header::HDR_SIZE {
        meta.resize(2 * header::HDR_SIZE, 0);
    }
    let _ = header::is_blank(&meta);
    let _ = header::json_of(&meta);
    if let Ok(c) = header::check(
        &meta,
        &Expect {
            vm_id: "vm-f",
            generation: 1,
        },
    ) {
        assert!(
            c.verify_mac(&[7u8; 64]).is_err(),
            "no input is bound to a key it never saw"
        );
    }
});
