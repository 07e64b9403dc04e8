//! The real `attesta-kbs` binary: `init` writes a working configuration, `vm register` takes an
//! operator-signed order, `serve` answers a simulated SEV-SNP guest over QUIC.

use aws_lc_rs::signature::Ed25519KeyPair;
use guest_agent::client::{Broker, fetch};
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

fn kbs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attesta-kbs"))
}

#[test]
fn init_register_serve_release() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let pki = Arc::new(Pki::from_seed(snp::Product::Genoa, Seed::from_text("serve-test")).unwrap());
    let ark = dir.path().join("sim-ark.der");
    std::fs::write(&ark, &pki.ark.cert).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let st = kbs()
        .args(["init", "--dir"])
        .arg(&d)
        .args(["--listen", &listen, "--trust-root"])
        .arg(&ark)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .status()
            .unwrap()
            .code(),
        Some(2),
        "never overwrites keys"
    );
    #[cfg(unix)]
    for secret in [
        "tls.key",
        "response.key",
        "kek",
        "operator.key",
        "allowlist.key",
    ] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.join(secret))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{secret}"
        );
    }

    // The operator signs an allowlist and an order for a VM on this chip.
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let operator =
        Ed25519KeyPair::from_pkcs8(&std::fs::read(d.join("operator.key")).unwrap()).unwrap();
    let offline =
        Ed25519KeyPair::from_pkcs8(&std::fs::read(d.join("allowlist.key")).unwrap()).unwrap();
    let image = [0x4d; 48];
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(image.to_vec())],
    };
    std::fs::write(d.join("allowlist.signed"), allow.sign(&offline)).unwrap();
    let mut toml = std::fs::read_to_string(d.join("kbs.toml")).unwrap();
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(d.join("kbs.toml"), toml).unwrap();
    let order = Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: "vm-7".into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(image.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
        not_after: u64::MAX / 2,
        boot_config: ByteBuf::from(b"ssh-ed25519 AAAA".to_vec()),
    };
    std::fs::write(dir.path().join("order.signed"), order.sign(&operator)).unwrap();
    let cfg = d.join("kbs.toml");
    let out = kbs()
        .args(["vm", "register"])
        .arg(dir.path().join("order.signed"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = kbs()
        .args(["vm", "register"])
        .arg(dir.path().join("order.signed"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "a VM id is registered once");

    // Serve, and let a simulated guest fetch its key.
    let mut server = kbs()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    loop {
        let l = lines.next().expect("server output").unwrap();
        if l.contains("serving on") {
            break;
        }
    }
    let ca_pem = std::fs::read(d.join("tls-ca.crt")).unwrap();
    let ca_der = snp::certs::pem_blocks(&ca_pem).unwrap().remove(0);
    let response_key: [u8; 32] = hex::decode(
        std::fs::read_to_string(d.join("response.pub"))
            .unwrap()
            .trim(),
    )
    .unwrap()
    .try_into()
    .unwrap();
    let broker = Broker {
        addr: listen.parse().unwrap(),
        server_name: "kbs.attesta.local".into(),
        ca_der,
        response_key,
    };
    let guest = chip.launch(GuestLaunch {
        measurement: image,
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let released = rt.block_on(fetch(&broker, "vm-7", &guest));
    let _ = server.kill();
    let _ = server.wait();
    let released = released.unwrap();
    assert_eq!(released.volume_key.len(), 64);
    assert_eq!(released.boot_config, b"ssh-ed25519 AAAA");
}
