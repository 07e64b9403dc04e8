//! Helpers shared by the host agent's integration tests.
#![allow(dead_code)]

pub mod chain;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use proto::order::{Billing, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use std::path::Path;

/// Boot artifacts and a spec for `vm_id` in `dir`.
pub fn spec(dir: &Path, vm_id: &str) -> String {
    let ovmf = dir.join("ovmf.fd");
    if !ovmf.exists() {
        std::fs::write(&ovmf, measure::synthetic_ovmf(262_144, 9)).unwrap();
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

fn in_30_days() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 30 * 86_400
}

/// The operator's signed register order for `vm_id` running `spec` on `chip`.
pub fn register_order(
    op: &Ed25519KeyPair,
    vm_id: &str,
    spec: &str,
    chip: &[u8],
    billing: Option<Billing>,
) -> Vec<u8> {
    register_order_on(op, vm_id, spec, &[chip], billing)
}

/// `register_order` allowing several chips.
pub fn register_order_on(
    op: &Ed25519KeyPair,
    vm_id: &str,
    spec: &str,
    chips: &[&[u8]],
    billing: Option<Billing>,
) -> Vec<u8> {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm_id.into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(digest(spec).to_vec())],
        policy: String::new(),
        chip_ids: chips.iter().map(|c| ByteBuf::from(c.to_vec())).collect(),
        not_after: in_30_days(),
        boot_config: ByteBuf::new(),
        billing,
        mesh_ip: None,
        split: None,
    }
    .sign(op)
}

/// The operator's signed terminate order for `vm_id`.
pub fn terminate_order(op: &Ed25519KeyPair, vm_id: &str) -> Vec<u8> {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Terminate,
        vm_id: vm_id.into(),
        tenant: "tenant-a".into(),
        measurements: vec![],
        policy: String::new(),
        chip_ids: vec![],
        not_after: in_30_days(),
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
    .sign(op)
}

/// A host.toml on libvirt's test driver trusting `op`'s orders, with `extra` appended.
pub fn host_toml(op: &Ed25519KeyPair, extra: &str) -> String {
    format!(
        "libvirt_uri = \"test:///default\"\nstate_dir = \"state\"\ncontrol_socket = \"run/control.sock\"\n\
         operator_keys = [\"{}\"]\nstop_grace_secs = 1\npoll_secs = 1\n\
         [sev]\ncbitpos = 51\nreduced_phys_bits = 1\n{extra}",
        hex::encode(op.public_key().as_ref())
    )
}

/// A simulated machine's chip id (as `[platform] kind = "simulator"` reads it).
pub fn chip_id(product: &str, chip: u64) -> Vec<u8> {
    host_agent::platform::read(&host_agent::config::PlatformConfig::Simulator {
        seed: "attesta-sim".into(),
        product: product.into(),
        chip,
        state_dir: None,
    })
    .unwrap()
    .chip_id
}
