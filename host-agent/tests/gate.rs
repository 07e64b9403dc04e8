//! The launch gate: a VM is launched only on an operator-signed register order for it whose
//! measurements include the digest of exactly what the spec starts; terminate needs a signed
//! terminate order for that VM.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use host_agent::gate::{GateError, admit, launch_digest, terminate_order};
use host_agent::spec::{Checked, VmSpec};
use proto::order::{DocumentError, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use std::path::Path;

const NOW: u64 = 1_790_000_000;

fn spec(dir: &Path) -> Checked {
    let ovmf = dir.join("ovmf.fd");
    std::fs::write(&ovmf, measure::synthetic_ovmf(262_144, 9)).unwrap();
    std::fs::write(dir.join("vmlinuz"), vec![0x5a; 100_000]).unwrap();
    std::fs::write(dir.join("initrd.img"), vec![0xa5; 50_000]).unwrap();
    let mut s: VmSpec = toml::from_str(include_str!("../../examples/vm.toml")).unwrap();
    s.boot.ovmf = ovmf;
    s.boot.kernel = Some(dir.join("vmlinuz"));
    s.boot.initrd = Some(dir.join("initrd.img"));
    s.disk.path = dir.join("vm-7.img");
    s.check().unwrap()
}

fn order(kind: OrderKind, vm_id: &str, measurements: Vec<[u8; 48]>, not_after: u64) -> Order {
    Order {
        v: ORDER_VERSION,
        kind,
        vm_id: vm_id.into(),
        tenant: "tenant-a".into(),
        measurements: measurements
            .iter()
            .map(|m| ByteBuf::from(m.to_vec()))
            .collect(),
        policy: String::new(),
        chip_ids: if kind == OrderKind::Register {
            vec![ByteBuf::from(vec![0x11; 64])]
        } else {
            vec![]
        },
        not_after,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
}

#[test]
fn launch_only_what_the_order_measured() {
    let dir = tempfile::tempdir().unwrap();
    let c = spec(dir.path());
    let op = Ed25519KeyPair::generate().unwrap();
    let keys: [[u8; 32]; 1] = [op.public_key().as_ref().try_into().unwrap()];
    let digest = launch_digest(&c).unwrap();

    // The right order admits, and says which digest.
    let good = order(
        OrderKind::Register,
        "vm-7",
        vec![[1; 48], digest],
        NOW + 600,
    )
    .sign(&op);
    assert_eq!(admit(&c, &good, &keys, NOW).unwrap().digest, digest);

    // A spec that drifted from the order (another command line) is refused on the host.
    let mut drifted = c.spec.clone();
    drifted.boot.cmdline = Some("console=ttyS0 init=/bin/sh".into());
    let drifted = drifted.check().unwrap();
    match admit(&drifted, &good, &keys, NOW) {
        Err(GateError::NotAllowed {
            digest: d,
            allowed: 2,
        }) => assert_ne!(d, hex::encode(digest)),
        other => panic!("{other:?}"),
    }
    // More vCPUs than measured: refused too.
    let mut wider = c.spec.clone();
    wider.vcpus += 1;
    assert!(matches!(
        admit(&wider.check().unwrap(), &good, &keys, NOW),
        Err(GateError::NotAllowed { .. })
    ));

    // Another VM's order, an expired one, a foreign key, a terminate order: refused.
    let other = order(OrderKind::Register, "vm-8", vec![digest], NOW + 600).sign(&op);
    assert!(matches!(
        admit(&c, &other, &keys, NOW),
        Err(GateError::VmMismatch { .. })
    ));
    let expired = order(OrderKind::Register, "vm-7", vec![digest], NOW - 1).sign(&op);
    assert!(matches!(
        admit(&c, &expired, &keys, NOW),
        Err(GateError::Order(DocumentError::Expired { .. }))
    ));
    let stranger = Ed25519KeyPair::generate().unwrap();
    let forged = order(OrderKind::Register, "vm-7", vec![digest], NOW + 600).sign(&stranger);
    assert!(matches!(
        admit(&c, &forged, &keys, NOW),
        Err(GateError::Order(DocumentError::BadSignature))
    ));
    let term = order(OrderKind::Terminate, "vm-7", vec![], NOW + 600).sign(&op);
    assert!(matches!(
        admit(&c, &term, &keys, NOW),
        Err(GateError::WrongKind { .. })
    ));

    // Terminate: only a signed terminate order for this VM.
    assert!(terminate_order("vm-7", &term, &keys, NOW).is_ok());
    assert!(matches!(
        terminate_order("vm-8", &term, &keys, NOW),
        Err(GateError::VmMismatch { .. })
    ));
    assert!(matches!(
        terminate_order("vm-7", &good, &keys, NOW),
        Err(GateError::WrongKind { .. })
    ));

    // A missing artifact cannot be measured: refused, naming it.
    let mut gone = c.spec.clone();
    gone.boot.initrd = Some(dir.path().join("missing.img"));
    match admit(&gone.check().unwrap(), &good, &keys, NOW) {
        Err(GateError::Measure(m)) => assert!(m.contains("missing.img"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn vm_admit_cli() {
    let dir = tempfile::tempdir().unwrap();
    let c = spec(dir.path());
    let spec_file = dir.path().join("vm.toml");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/vm.toml"))
        .unwrap()
        .replace(
            "/usr/share/ovmf/OVMF.amdsev.fd",
            &c.spec.boot.ovmf.to_string_lossy(),
        )
        .replace(
            "/var/lib/attesta/images/vmlinuz",
            &dir.path().join("vmlinuz").to_string_lossy(),
        )
        .replace(
            "/var/lib/attesta/images/initrd.img",
            &dir.path().join("initrd.img").to_string_lossy(),
        );
    std::fs::write(&spec_file, text).unwrap();
    let op = Ed25519KeyPair::generate().unwrap();
    let key = hex::encode(op.public_key().as_ref());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let digest = launch_digest(&c).unwrap();
    let run = |measurement: [u8; 48]| {
        let f = dir.path().join("order.signed");
        std::fs::write(
            &f,
            order(OrderKind::Register, "vm-7", vec![measurement], now + 600).sign(&op),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_attesta-host"))
            .args(["vm", "admit", "--spec"])
            .arg(&spec_file)
            .arg("--order")
            .arg(&f)
            .args(["--operator-key", &key])
            .output()
            .unwrap()
    };
    let ok = run(digest);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(out.lines().last(), Some(hex::encode(digest).as_str()));
    let no = run([3; 48]);
    assert_eq!(no.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no.stderr).contains("refusing to launch"));
}
