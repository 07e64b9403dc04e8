//! Helpers shared by the host agent's integration tests.
#![allow(dead_code)]

use std::path::Path;

/// Boot artifacts and a spec for `vm_id` in `dir`.
pub fn spec(dir: &Path, vm_id: &str) -> String {
    let ovmf = dir.join("ovmf.fd");
    if !ovmf.exists() {
        std::fs::write(&ovmf, simulator::measure::synthetic_ovmf(262_144, 9)).unwrap();
        std::fs::write(dir.join("vmlinuz"), vec![0x5a; 100_000]).unwrap();
        std::fs::write(dir.join("initrd.img"), vec![0xa5; 50_000]).unwrap();
    }
    include_str!("../../../examples/vm.toml")
        .replace("vm_id = \"vm-7\"", &format!("vm_id = \"{vm_id}\""))
        .replace(
            "/usr/share/ovmf/OVMF.amdsev.fd",
            &ovmf.display().to_string(),
        )
        .replace(
            "/var/lib/attesta/images/vmlinuz",
            &dir.join("vmlinuz").display().to_string(),
        )
        .replace(
            "/var/lib/attesta/images/initrd.img",
            &dir.join("initrd.img").display().to_string(),
        )
        .replace(
            "/var/lib/attesta/disks/vm-7.img",
            &dir.join(format!("{vm_id}.img")).display().to_string(),
        )
        .replace("size_gib = 20", "size_gib = 1")
        .replace("vsock_cid = 107\n", "")
}

pub fn digest(spec: &str) -> [u8; 48] {
    host_agent::gate::launch_digest(&host_agent::spec::VmSpec::parse(spec).unwrap()).unwrap()
}
