//! `guest.toml`: what the in-guest agent needs, all of it part of the measured image (the
//! initramfs is covered by the launch measurement through the kernel hashes), so a miner cannot
//! point the guest at another broker or make it trust another key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// This VM's id, as in its order.
    pub vm_id: String,
    pub broker: BrokerConfig,
    /// Brokers run by other parties (the tenant's own, say), each holding a share of the
    /// volume key: see [`SplitConfig`].
    #[serde(default)]
    pub split: Option<SplitConfig>,
    pub disk: DiskConfig,
    #[serde(default)]
    pub boot_config: BootConfig,
    #[serde(default)]
    pub device: DeviceConfig,
    /// Lock all of the agent's memory (mlockall) so key material never reaches swap; refuse to
    /// run if that fails. Only a test without CAP_IPC_LOCK turns this off.
    #[serde(default = "yes")]
    pub require_mlock: bool,
    /// Ask the broker for a mesh identity: a key born here, bound in the report, certified by
    /// the broker after the release; certificate and key go to `dir` (tmpfs only).
    #[serde(default)]
    pub mesh: Option<MeshIdentity>,
    /// The running VM's lease (`attesta-guest keepalive`).
    #[serde(default)]
    pub keepalive: KeepaliveConfig,
    /// After unlocking, also time an argon2id passphrase unlock of the same disk (see
    /// [`crate::bench`]). Only in builds with the `simulator` feature: a production agent
    /// refuses the setting as unknown.
    #[cfg(feature = "simulator")]
    #[serde(default)]
    pub bench_passphrase: bool,
}

/// How often the running VM re-attests to renew its lease (its short-lived mesh certificate).
/// The broker's certificate lifetime is the lease; renewing at a quarter of it leaves three
/// more tries before the VM drops off the mesh.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Seconds between renewals (default 900: a quarter of the default one-hour lease).
    #[serde(default = "default_keepalive")]
    pub interval_secs: u64,
    /// Seconds before trying again after a failed renewal (default 60).
    #[serde(default = "default_keepalive_retry")]
    pub retry_secs: u64,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval_secs: default_keepalive(),
            retry_secs: default_keepalive_retry(),
        }
    }
}

fn default_keepalive() -> u64 {
    900
}

fn default_keepalive_retry() -> u64 {
    60
}

/// Where the guest's attestation-bound mesh identity is placed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshIdentity {
    /// A tmpfs folder: `node.crt` and `node.key` (mode 0600) are written there.
    #[serde(default = "default_mesh_dir")]
    pub dir: PathBuf,
}

fn default_mesh_dir() -> PathBuf {
    PathBuf::from("/run/attesta/mesh")
}

fn yes() -> bool {
    true
}

/// The key broker and how the guest recognises it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// UDP address of the broker (or its mesh address). Give this or `addresses`.
    #[serde(default)]
    pub address: Option<SocketAddr>,
    /// Several brokers on one database (replicas), tried in turn: when one is unreachable or
    /// cannot reach its store, the exchange starts afresh on the next (a nonce is only good on
    /// the replica and connection that issued it). All share the pins below.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
    /// The DNS name in the broker's TLS certificate.
    pub server_name: String,
    /// PEM of the CA that issued the broker's TLS certificate (pinned: no other root is trusted).
    pub ca: PathBuf,
    /// The broker's Ed25519 response key, 64 hex digits (pinned).
    pub response_key: String,
    /// How long to keep retrying an unreachable broker before failing closed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

/// A volume key split across independent brokers. `[broker]` holds the first share and each
/// `[[split.brokers]]` another; each broker verifies this guest's evidence on its own (its own
/// report, bound to its own connection) and releases only its share. The key is the XOR of all
/// the shares, combined in this process's locked memory, and checked against the volume by the
/// header's key binding. So no single broker's operator, and not the miner, can open the disk.
///
/// With `threshold` = n the key is the XOR of every share. With k < n the guest deals the key on
/// the first boot (every share needed then) and keeps it sealed on the disk once per set of k
/// brokers (`crate::split`); any k open it on later boots.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Shares needed to open the disk: 2 to n, the number of brokers (`[broker]` included).
    pub threshold: usize,
    /// The other brokers, with their own pins.
    pub brokers: Vec<BrokerConfig>,
}

impl SplitConfig {
    /// n: every broker holding a share, `[broker]` included.
    pub fn shares(&self) -> usize {
        1 + self.brokers.len()
    }

    fn check(&self) -> Result<(), String> {
        let n = self.shares();
        if self.brokers.is_empty() || n > proto::brokers::MAX_BROKERS {
            return Err(format!(
                "split.brokers: 1 to {} brokers besides [broker], {} given",
                proto::brokers::MAX_BROKERS - 1,
                self.brokers.len()
            ));
        }
        if self.threshold < 2 || self.threshold > n {
            return Err(format!(
                "split.threshold = {}: between 2 (no broker alone) and {n} (every broker)",
                self.threshold
            ));
        }
        if self.threshold < n && !crate::split::fits(self.threshold, n) {
            return Err(format!(
                "split.threshold = {}: {}-of-{n} has more sets of brokers than the disk's header can hold wraps for (at most {})",
                self.threshold,
                self.threshold,
                crate::split::MAX_WRAPS
            ));
        }
        for (i, b) in self.brokers.iter().enumerate() {
            b.response_key()
                .map_err(|e| format!("split.brokers[{i}].{e}"))?;
            b.addresses()
                .map_err(|e| format!("split.brokers[{i}]: {e}"))?;
        }
        Ok(())
    }
}

impl BrokerConfig {
    /// The pinned response key.
    pub fn response_key(&self) -> Result<[u8; 32], String> {
        hex::decode(self.response_key.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
            .ok_or_else(|| "response_key: expected 64 hex digits".to_string())
    }

    /// The brokers to try, in order: `address` or `addresses` (exactly one of them), 1 to
    /// [`proto::brokers::MAX_BROKERS`] of them, none twice.
    pub fn addresses(&self) -> Result<Vec<SocketAddr>, String> {
        proto::brokers::broker_list("broker", self.address.as_ref(), &self.addresses)
    }
}

fn default_timeout() -> u64 {
    60
}

/// The encrypted disk.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Block device or image file.
    pub path: PathBuf,
    /// Name under /dev/mapper.
    #[serde(default = "default_name")]
    pub name: String,
    /// Format a disk that has no LUKS header (the first boot). With `false` a blank disk is an
    /// error (for images whose disk is always pre-formatted).
    #[serde(default = "yes")]
    pub format_if_blank: bool,
}

fn default_name() -> String {
    "attesta-root".into()
}

/// Where the released boot configuration (e.g. SSH keys) goes: a tmpfs path, never disk.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    #[serde(default = "default_boot_config")]
    pub path: PathBuf,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            path: default_boot_config(),
        }
    }
}

fn default_boot_config() -> PathBuf {
    PathBuf::from("/run/attesta/boot-config")
}

/// Which SEV-SNP guest device produces the report.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum DeviceConfig {
    /// The real `/dev/sev-guest`.
    #[default]
    SevGuest,
    /// The simulator's device (testing without SNP hardware): a simulated chip of the given
    /// product, derived from `seed`, running a guest with `measurement`.
    Simulator {
        #[serde(default = "default_seed")]
        seed: String,
        #[serde(default = "default_product")]
        product: String,
        /// Which chip of the simulated fleet (as `attesta-sim` numbers them).
        #[serde(default)]
        chip: u64,
        /// The guest's launch measurement, 96 hex digits.
        measurement: String,
        /// The guest policy (default: the simulator's typical non-debug policy).
        #[serde(default)]
        policy: Option<u64>,
        /// Where simulated hierarchies are cached (default: `attesta-sim`'s).
        #[serde(default)]
        state_dir: Option<PathBuf>,
    },
    /// A real VM on a machine without SEV-SNP: reports from the host's simulated PSP
    /// (`attesta-sim psp`) over the virtio-serial port named `port` (testing only).
    VirtioPsp {
        #[serde(default = "default_psp_port")]
        port: String,
    },
}

fn default_psp_port() -> String {
    "org.attesta.psp.0".into()
}

fn default_seed() -> String {
    "attesta-sim".into()
}

fn default_product() -> String {
    "milan".into()
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
}

impl GuestConfig {
    /// Reads the file; relative paths are relative to it.
    pub fn load(path: &Path) -> Result<GuestConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let invalid = |why: String| ConfigError::Invalid {
            path: path.display().to_string(),
            why,
        };
        let mut c: GuestConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let split_cas = c
            .split
            .iter_mut()
            .flat_map(|s| s.brokers.iter_mut().map(|b| &mut b.ca));
        for p in [&mut c.broker.ca, &mut c.disk.path, &mut c.boot_config.path]
            .into_iter()
            .chain(split_cas)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        c.response_key().map_err(invalid)?;
        c.broker.addresses().map_err(invalid)?;
        if let Some(s) = &c.split {
            s.check().map_err(invalid)?;
            // The same broker twice would give the same share twice (cancelled by the XOR, or
            // one broker counted as two toward k).
            let mut keys = vec![c.broker.response_key.trim().to_lowercase()];
            for b in &s.brokers {
                let k = b.response_key.trim().to_lowercase();
                if keys.contains(&k) {
                    return Err(invalid(format!(
                        "split.brokers: the broker with response key {k} is listed twice"
                    )));
                }
                keys.push(k);
            }
        }
        Ok(c)
    }

    /// The pinned response key of `[broker]`.
    pub fn response_key(&self) -> Result<[u8; 32], String> {
        self.broker
            .response_key()
            .map_err(|e| format!("broker.{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(lines: &str) -> Result<Vec<SocketAddr>, String> {
        let text = format!(
            "{lines}\nserver_name = \"kbs\"\nca = \"ca.pem\"\nresponse_key = \"{}\"\n",
            "00".repeat(32)
        );
        toml::from_str::<BrokerConfig>(&text)
            .map_err(|e| e.to_string())?
            .addresses()
    }

    #[test]
    fn one_address_or_a_list_of_distinct_ones() {
        let a: SocketAddr = "10.0.2.2:7443".parse().unwrap();
        let b: SocketAddr = "10.0.2.2:7444".parse().unwrap();
        assert_eq!(broker("address = \"10.0.2.2:7443\""), Ok(vec![a]));
        assert_eq!(
            broker("addresses = [\"10.0.2.2:7444\", \"10.0.2.2:7443\"]"),
            Ok(vec![b, a]),
            "kept in the order given"
        );
        for (lines, why) in [
            ("", "give `address` or `addresses`"),
            ("addresses = []", "give `address` or `addresses`"),
            (
                "address = \"10.0.2.2:7443\"\naddresses = [\"10.0.2.2:7444\"]",
                "not both",
            ),
            (
                "addresses = [\"10.0.2.2:7443\", \"10.0.2.2:7443\"]",
                "listed twice",
            ),
            (
                "addresses = [\"kbs.example:7443\"]",
                "invalid socket address",
            ),
        ] {
            let err = broker(lines).expect_err(lines);
            assert!(err.contains(why), "{lines}: {err}");
        }
        let nine: Vec<String> = (0..9)
            .map(|p| format!("\"10.0.2.2:{}\"", 7000 + p))
            .collect();
        let err = broker(&format!("addresses = [{}]", nine.join(", "))).unwrap_err();
        assert!(err.contains("at most 8"), "{err}");
    }

    #[test]
    fn a_split_needs_two_shares_at_least_and_pins_each_broker() {
        let b = |key: &str| {
            format!(
                "[[split.brokers]]\naddress = \"10.0.2.2:7444\"\nserver_name = \"t\"\nca = \"t.pem\"\nresponse_key = \"{key}\"\n"
            )
        };
        let check = |text: String| {
            toml::from_str::<GuestConfig>(&format!(
                "vm_id = \"v\"\n[broker]\naddress = \"10.0.2.2:7443\"\nserver_name = \"k\"\nca = \"k.pem\"\nresponse_key = \"{}\"\n[disk]\npath = \"d\"\n{text}",
                "00".repeat(32)
            ))
            .map_err(|e| e.to_string())
            .and_then(|c| c.split.map_or(Ok(0), |s| s.check().map(|()| s.shares())))
        };
        let good = b(&"11".repeat(32));
        assert_eq!(check(format!("[split]\nthreshold = 2\n{good}")), Ok(2));
        assert_eq!(
            check(format!("[split]\nthreshold = 3\n{good}{good}")),
            Ok(3)
        );
        assert_eq!(
            check(format!("[split]\nthreshold = 2\n{good}{good}")),
            Ok(3)
        );
        for (text, why) in [
            (
                format!("[split]\nthreshold = 1\n{good}"),
                "between 2 (no broker alone) and 2",
            ),
            (
                format!("[split]\nthreshold = 4\n{good}{good}"),
                "between 2 (no broker alone) and 3",
            ),
            (
                "[split]\nthreshold = 1\nbrokers = []\n".to_string(),
                "1 to 7 brokers",
            ),
            (
                format!("[split]\nthreshold = 2\n{}", b("zz")),
                "split.brokers[0].response_key",
            ),
        ] {
            let e = check(text.clone()).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
