//! A deployment for storm tests: a broker folder from `init`, an allowlist, VMs registered on
//! one simulated chip, the guests' pins — and the checks a storm must pass afterwards (the
//! audit log verifies, no nonce or boot released twice, every answered release is in the log).

use super::{kbs, ok};
use guest_agent::client::Broker;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

/// The image every VM of the fleet runs.
pub const IMAGE: [u8; 48] = [0x4d; 48];

pub struct Fleet {
    pub dir: tempfile::TempDir,
    /// The broker's folder (`init --dir`).
    pub d: PathBuf,
    /// Its `kbs.toml`.
    pub cfg: PathBuf,
    pub chip: Arc<Chip>,
    /// The pins of the broker `init` configured (its address is the first listener's).
    pub broker: Broker,
}

impl Fleet {
    /// `init` on `listen`, `edit` applied to `kbs.toml`, then `vms` VMs (`vm-0`…) registered.
    pub fn new(seed: &str, listen: &str, vms: usize, edit: impl FnOnce(String) -> String) -> Fleet {
        Fleet::with_orders(seed, listen, vms, edit, &[])
    }

    /// As [`Fleet::new`], each register order signed with `order_args` added.
    pub fn with_orders(
        seed: &str,
        listen: &str,
        vms: usize,
        edit: impl FnOnce(String) -> String,
        order_args: &[&str],
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("kbs");
        let pki = Arc::new(
            Pki::cached(
                snp::Product::Milan,
                &Seed::from_text(seed),
                &dir.path().join("state"),
                |_| {},
            )
            .unwrap(),
        );
        let chip = Arc::new(Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap());
        std::fs::write(dir.path().join("ark.der"), &pki.ark.cert).unwrap();
        let init = kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args([
                "--listen",
                listen,
                "--metrics-listen",
                "none",
                "--trust-root",
            ])
            .arg(dir.path().join("ark.der"))
            .output()
            .unwrap();
        ok(init, "init");
        let image = hex::encode(IMAGE);
        super::sign_allowlist(&d, &image);
        let cfg = d.join("kbs.toml");
        let mut toml = std::fs::read_to_string(&cfg).unwrap();
        toml.push_str("allowlist = \"allowlist.signed\"\n");
        std::fs::write(&cfg, edit(toml)).unwrap();
        for i in 0..vms {
            let order = dir.path().join(format!("order-{i}"));
            let sign = kbs()
                .args(["order", "register", "--key"])
                .arg(d.join("operator.key"))
                .args(["--vm-id", &format!("vm-{i}"), "--tenant", "t"])
                .args(["--measurement", &image])
                .args(["--chip-id", &hex::encode(chip.config.chip_id)])
                .args(order_args)
                .arg("--out")
                .arg(&order)
                .output()
                .unwrap();
            ok(sign, "order register");
            let reg = kbs()
                .args(["vm", "register"])
                .arg(&order)
                .arg("--config")
                .arg(&cfg)
                .output()
                .unwrap();
            ok(reg, "vm register");
        }
        let broker = super::broker_pins(&d, listen);
        Fleet {
            dir,
            d,
            cfg,
            chip,
            broker,
        }
    }

    /// The same pins at another address (another replica).
    pub fn broker_at(&self, addr: std::net::SocketAddr) -> Broker {
        Broker {
            addr,
            ..self.broker.clone()
        }
    }

    /// A copy of `kbs.toml` beside it that listens on `listen` instead, without a metrics
    /// endpoint (another replica).
    pub fn replica_config(&self, n: usize, listen: &str) -> PathBuf {
        let toml: String = std::fs::read_to_string(&self.cfg)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("metrics_listen = "))
            .map(|l| match l.starts_with("listen = ") {
                true => format!("listen = \"{listen}\"\n"),
                false => format!("{l}\n"),
            })
            .collect();
        let path = self.d.join(format!("kbs-{n}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    }

    /// Exports the audit log and checks it after a storm: it verifies with `audit verify`, no
    /// nonce and no (VM, boot) was released twice, and every release in `answered` (VM, boot
    /// counter) is in it. How many releases it holds.
    pub fn check_audit(&self, answered: &[(String, u64)]) -> usize {
        let export = self.dir.path().join("audit.jsonl");
        let out = kbs()
            .args(["audit", "export", "--config"])
            .arg(&self.cfg)
            .arg("--out")
            .arg(&export)
            .output()
            .unwrap();
        ok(out, "audit export");
        let out = kbs()
            .args(["audit", "verify"])
            .arg(&export)
            .arg("--key")
            .arg(self.d.join("audit.pub"))
            .output()
            .unwrap();
        ok(out, "audit verify");
        let mut nonces = HashSet::new();
        let mut boots = HashSet::new();
        for line in std::fs::read_to_string(&export).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["kind"] == "release" {
                let nonce = v["detail"]["nonce"].as_str().unwrap().to_string();
                assert!(nonces.insert(nonce.clone()), "nonce {nonce} released twice");
                let boot = (
                    v["vm_id"].as_str().unwrap().to_string(),
                    v["detail"]["boot_counter"].as_u64().unwrap(),
                );
                assert!(boots.insert(boot.clone()), "boot {boot:?} released twice");
            }
        }
        for (vm, boot) in answered {
            assert!(
                boots.contains(&(vm.clone(), *boot)),
                "{vm} boot {boot} was answered but is not in the audit log"
            );
        }
        boots.len()
    }
}

/// A fresh boot of a fleet VM on `chip` (a new guest each time).
pub fn guest(chip: &Chip) -> simulator::SimGuest<'_> {
    chip.launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    })
}
