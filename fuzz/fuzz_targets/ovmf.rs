//! The OVMF parser and the launch-measurement code never panic on any image.
#![no_main]
use libfuzzer_sys::fuzz_target;
use measure::{LaunchSpec, Ovmf, launch_digest};

fuzz_target!(|data: &[u8]| {
    // Images must be page multiples; pad so the fuzzer's bytes reach the footer parser.
    let mut img = data.to_vec();
    img.resize(img.len().div_ceil(4096).max(1) * 4096, 0);
    let tail = data.len().min(4096);
    let n = img.len();
    img[n - tail..].copy_from_slice(&data[data.len() - tail..]);
    if let Ok(o) = Ovmf::parse(&img) {
        let _ = (o.gpa(), o.reset_eip(), o.hashes_table_gpa());
    }
    let spec = LaunchSpec {
        ovmf: &img,
        kernel: Some(b"k"),
        initrd: None,
        cmdline: Some("c"),
        vcpus: 2,
        vcpu_sig: 0,
        guest_features: 1,
    };
    let _ = launch_digest(&spec);
});
