//! `host.toml`: the daemon's configuration (`attesta-host serve --config`). Every field is
//! documented in `examples/host.toml`; relative paths are relative to the file.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The host agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// libvirt URI: `qemu:///system` on a miner, `test:///default` for tests.
    #[serde(default = "default_uri")]
    pub libvirt_uri: String,
    /// The agent's database (VMs it manages, their orders, lifecycle events).
    pub state_dir: PathBuf,
    /// Unix socket for `attesta-host vm …` (mode 0600 unless `control_group` is set).
    #[serde(default = "default_socket")]
    pub control_socket: PathBuf,
    /// A group allowed to use the control socket (mode 0660); none: root only.
    #[serde(default)]
    pub control_group: Option<u32>,
    /// Operators' order-signing public keys (hex Ed25519): the launch gate's trust.
    pub operator_keys: Vec<String>,
    /// C-bit position and reduced physical bits where the driver cannot tell.
    #[serde(default)]
    pub sev: Option<SevOverride>,
    /// How long a graceful shutdown may take before the domain is destroyed.
    #[serde(default = "default_grace")]
    pub stop_grace_secs: u64,
    /// How often libvirt is polled for state changes the agent did not make (a guest that
    /// powered itself off, a crash).
    #[serde(default = "default_poll")]
    pub poll_secs: u64,
    /// How VMs are isolated: SEV-SNP hardware (the default), or simulated for tests.
    #[serde(default)]
    pub snp: SnpConfig,
    /// Where this host's chip id and TCB come from.
    #[serde(default)]
    pub platform: PlatformConfig,
    /// The key broker the agent registers VMs with (and relays terminate orders to).
    pub kbs: Option<KbsConfig>,
    /// Billing to the chain; none: usage is metered and kept, nothing is submitted.
    pub billing: Option<BillingConfig>,
    /// The credit check before each hour; none: no VM is stopped for credit.
    pub credit: Option<CreditConfig>,
    /// What this host takes: vCPUs, memory, disk, VMs per tenant (see [`crate::capacity`]);
    /// none: no limit beyond libvirt's.
    #[serde(default)]
    pub capacity: crate::capacity::CapacityConfig,
    /// VM tasks from the chain (see [`crate::intake`]); none: only the control socket creates.
    pub chain: Option<ChainConfig>,
    /// Backups of VMs' disks to S3-compatible storage (see [`crate::backup`]); none: no
    /// backups, and `attesta-host backup` / `restore` are refused.
    pub backup: Option<BackupConfig>,
}

/// `[backup]`: where disk backups go. Only ciphertext does: a disk is the guest's LUKS2 volume.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// The S3 endpoint, e.g. `https://s3.example.net` (`http://` only to a loopback address).
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key_id: String,
    /// A file (mode 0600) holding the secret access key.
    pub secret_key_file: PathBuf,
    /// Object names begin `<prefix>/<vm_id>/`.
    #[serde(default = "default_backup_prefix")]
    pub prefix: String,
    /// Chunk size in MiB (5–128): the unit of change between backups and one multipart part;
    /// larger, automatically, for a disk of more than 10,000 chunks.
    #[serde(default = "default_chunk_mib")]
    pub chunk_mib: u64,
    /// Backups kept per VM: after each backup, older ones go (and every pack only they read).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_backup_prefix() -> String {
    "attesta".into()
}
fn default_chunk_mib() -> u64 {
    8
}
fn default_keep() -> usize {
    7
}

/// `[chain]`: following finalized blocks for validators' VM assignments to this miner. Answers
/// go through the billing outbox (`[billing]` is required), signed by the billing key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// Accounts (SS58 or 0x hex) whose assignments count.
    pub validators: Vec<String>,
    /// This miner's account, as assignments name it; default: the billing key's.
    pub miner: Option<String>,
    /// The first block read on the very first start; default: the finalized head then (what
    /// was assigned before the agent existed is not its business).
    pub from_block: Option<u64>,
    /// Seconds between looks at the finalized head.
    #[serde(default = "default_chain_poll")]
    pub poll_secs: u64,
    /// Lifecycle transitions go on chain in one batch per this many seconds at most.
    #[serde(default = "default_lifecycle_interval")]
    pub lifecycle_interval_secs: u64,
    /// Folders a task's boot files (OVMF, kernel, initrd) must be in: a spec from the chain is
    /// written by a validator, so it reads nothing of this host's but these images.
    pub image_dirs: Vec<PathBuf>,
    /// The folder a task's disk goes in, as `<disk_dir>/<vm_id>.img` (nowhere else).
    pub disk_dir: PathBuf,
}

fn default_lifecycle_interval() -> u64 {
    60
}

fn default_chain_poll() -> u64 {
    6
}

/// Overrides for the platform's SEV parameters.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SevOverride {
    pub cbitpos: u32,
    pub reduced_phys_bits: u32,
}

/// `[snp]`: how VMs are isolated.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpConfig {
    /// `hardware` (default) or `simulated`.
    #[serde(default)]
    pub mode: SnpMode,
    /// Simulated mode: `auto` (KVM where it runs a stock guest kernel, else TCG), `kvm`, `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// Simulated mode: where each VM's PSP socket and console log live. Made mode 0711, so
    /// QEMU (libvirt's unprivileged user) reaches the files libvirt hands it and lists nothing.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
}

impl Default for SnpConfig {
    fn default() -> SnpConfig {
        SnpConfig {
            mode: SnpMode::default(),
            accel: Accel::default(),
            run_dir: default_run_dir(),
        }
    }
}

/// How VMs are isolated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnpMode {
    /// SEV-SNP launch security on this host's processor.
    #[default]
    Hardware,
    /// No SEV-SNP: plain QEMU domains whose reports come from a simulated PSP run by the agent
    /// (needs `[platform] kind = "simulator"` and a build with the `simulator` feature; refused
    /// where `/dev/sev` exists). For tests and demos only: the host can read such guests.
    Simulated,
}

/// Which accelerator a simulated domain uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// KVM where `/dev/kvm` runs stock kernels (not PVM, which needs a PVM guest kernel), else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    /// Whether to use KVM, given whether `/dev/kvm` exists and whether it is PVM's.
    pub fn kvm(self, dev_kvm: bool, pvm: bool) -> bool {
        match self {
            Accel::Auto => dev_kvm && !pvm,
            Accel::Kvm => true,
            Accel::Tcg => false,
        }
    }
}

/// Whether simulated mode may run here: never where SEV hardware is present (a miner must not
/// run tenants' VMs unprotected by mistake), and only in a build that has the simulated PSP.
pub fn check_simulated(
    mode: SnpMode,
    dev_sev: bool,
    built_with_simulator: bool,
    platform: &PlatformConfig,
) -> Result<(), String> {
    if mode != SnpMode::Simulated {
        return Ok(());
    }
    if dev_sev {
        return Err("[snp] mode = \"simulated\" is refused on a host with /dev/sev: run real SEV-SNP guests here (mode = \"hardware\")".into());
    }
    if !built_with_simulator {
        return Err(
            "[snp] mode = \"simulated\": this attesta-host was built without the simulator feature"
                .into(),
        );
    }
    if !matches!(platform, PlatformConfig::Simulator { .. }) {
        return Err("[snp] mode = \"simulated\" needs [platform] kind = \"simulator\": the simulated PSP signs with that chip".into());
    }
    Ok(())
}

/// The source of the chip id and TCB.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum PlatformConfig {
    /// The real `/dev/sev` (SNP_PLATFORM_STATUS and GET_ID).
    #[default]
    Sev,
    /// A simulated chip (as `attesta-sim` numbers them), for test fleets.
    Simulator {
        #[serde(default = "default_seed")]
        seed: String,
        #[serde(default = "default_product")]
        product: String,
        #[serde(default)]
        chip: u64,
        #[serde(default)]
        state_dir: Option<PathBuf>,
    },
}

/// How to reach the broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbsConfig {
    /// `host:port` (UDP, QUIC). Give this or `addresses`.
    #[serde(default)]
    pub address: Option<String>,
    /// Several brokers on one database (replicas), tried in turn until one can be reached.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The name in the broker's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The broker's TLS CA (PEM).
    pub ca: PathBuf,
    /// This host's client certificate (role host, from `attesta-kbs cert issue`) and key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl KbsConfig {
    /// The brokers to try, in order: `address` or `addresses` (exactly one of them), up to
    /// [`proto::brokers::MAX_BROKERS`], none twice.
    pub fn addresses(&self) -> Result<Vec<String>, String> {
        proto::brokers::broker_list("kbs", self.address.as_ref(), &self.addresses)
    }
}

/// Where usage records go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// The node's WebSocket RPC, e.g. `ws://127.0.0.1:9944`.
    pub chain: String,
    /// A file (mode 0600) holding the billing key's secret URI or phrase (used by this outbox
    /// only: the outbox owns the key's nonces).
    pub signer_file: PathBuf,
    /// `Pallet.call` taking (period, account, amount, usage_hash), or
    /// `System.remark_with_event` to record the document itself.
    #[serde(default = "default_call")]
    pub call: String,
    /// The longest wait between retries after the chain could not be reached.
    #[serde(default = "default_backoff")]
    pub max_backoff_secs: u64,
}

/// How to decide that an account can pay for its next hour.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum CreditConfig {
    /// The account's free balance on the billing chain (`System.Account`) must cover the next
    /// hour of all its running VMs.
    ChainBalance {
        /// What to do when the chain cannot be asked: "keep" (default) or "stop".
        #[serde(default)]
        on_error: OnError,
    },
    /// Run `argv` with the account and the next hour's amount appended; exit 0: can pay;
    /// otherwise the first line of its output is the reason.
    Command {
        argv: Vec<String>,
        #[serde(default = "default_command_timeout")]
        timeout_secs: u64,
        #[serde(default)]
        on_error: OnError,
    },
}

/// A credit check that could not be made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Keep the account's VMs running (the miner's outage is not the tenant's fault).
    #[default]
    Keep,
    /// Stop them.
    Stop,
}

fn default_uri() -> String {
    "qemu:///system".into()
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/attesta-host/simulated")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/attesta-host/control.sock")
}
fn default_grace() -> u64 {
    60
}
fn default_poll() -> u64 {
    5
}
fn default_seed() -> String {
    "attesta-sim".into()
}
fn default_product() -> String {
    "milan".into()
}
fn default_server_name() -> String {
    "kbs".into()
}
fn default_call() -> String {
    "Marketplace.submit_compute_usage".into()
}
fn default_backoff() -> u64 {
    600
}
fn default_command_timeout() -> u64 {
    30
}

/// Operator order-signing public keys given as hex (configuration or command line).
pub fn parse_operator_keys(keys: &[String]) -> Result<Vec<[u8; 32]>, String> {
    keys.iter()
        .map(|k| {
            hex::decode(k.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| format!("{k:?}: expected 64 hex digits"))
        })
        .collect()
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct ConfigError {
    pub path: String,
    pub why: String,
}

impl HostConfig {
    /// Reads and checks the file; relative paths become relative to it.
    pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        HostConfig::parse(&text, path)
    }

    /// Parses and checks `text`, the contents of `path` (never read here).
    pub fn parse(text: &str, path: &Path) -> Result<HostConfig, ConfigError> {
        let err = |why: String| ConfigError {
            path: path.display().to_string(),
            why,
        };
        let mut c: HostConfig = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        c.operator_keys()
            .map_err(|e| err(format!("operator_keys: {e}")))?;
        if c.operator_keys.is_empty() {
            return Err(err(
                "operator_keys: at least one operator key is needed to launch anything".into(),
            ));
        }
        if let Some(k) = &c.kbs {
            k.addresses().map_err(err)?;
        }
        if let Some(b) = &c.billing {
            crate::billing::CallKind::parse(&b.call)
                .map_err(|e| err(format!("billing.call: {e}")))?;
        }
        if let Some(CreditConfig::Command { argv, .. }) = &c.credit
            && argv.is_empty()
        {
            return Err(err("credit.argv: give the command to run".into()));
        }
        if let Some(ch) = &c.chain {
            if c.billing.is_none() {
                return Err(err(
                    "[chain]: answers go on chain through the billing outbox; configure [billing]"
                        .into(),
                ));
            }
            if ch.validators.is_empty() {
                return Err(err(
                    "chain.validators: name the validators whose assignments count".into(),
                ));
            }
            for a in ch.validators.iter().chain(&ch.miner) {
                crate::billing::account_id(a).map_err(|e| err(format!("[chain]: {e}")))?;
            }
            if ch.image_dirs.is_empty() {
                return Err(err(
                    "chain.image_dirs: name the folders tasks' boot files may come from".into(),
                ));
            }
            let cap = &c.capacity;
            if cap.vcpus.is_none() || cap.memory_mib.is_none() || cap.disk_gib.is_none() {
                return Err(err(
                    "[chain]: validators place VMs here, so [capacity] must set vcpus, memory_mib and disk_gib".into(),
                ));
            }
        }
        if let Some(b) = &c.backup {
            crate::backup::check_config(b).map_err(|e| err(format!("[backup]: {e}")))?;
        }
        if matches!(c.credit, Some(CreditConfig::ChainBalance { .. })) && c.billing.is_none() {
            return Err(err(
                "credit: kind = \"chain-balance\" asks the billing chain; configure [billing]"
                    .into(),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rel(&mut c.state_dir);
        rel(&mut c.control_socket);
        rel(&mut c.snp.run_dir);
        if let Some(k) = &mut c.kbs {
            rel(&mut k.ca);
            rel(&mut k.client_cert);
            rel(&mut k.client_key);
        }
        if let Some(b) = &mut c.billing {
            rel(&mut b.signer_file);
        }
        if let Some(b) = &mut c.backup {
            rel(&mut b.secret_key_file);
        }
        if let Some(ch) = &mut c.chain {
            ch.image_dirs.iter_mut().for_each(&rel);
            rel(&mut ch.disk_dir);
        }
        if let PlatformConfig::Simulator {
            state_dir: Some(d), ..
        } = &mut c.platform
        {
            rel(d);
        }
        Ok(c)
    }

    /// The operator keys as raw Ed25519 public keys.
    pub fn operator_keys(&self) -> Result<Vec<[u8; 32]>, String> {
        parse_operator_keys(&self.operator_keys)
    }

    /// The agent's database.
    pub fn state_db(&self) -> PathBuf {
        self.state_dir.join("host.db")
    }

    /// The billing outbox.
    pub fn outbox(&self) -> PathBuf {
        self.state_dir.join("outbox.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example is a working configuration: every section parses and checks.
    #[test]
    fn the_example_configuration_parses() {
        let path = Path::new("/etc/attesta-host/host.toml");
        let c = HostConfig::parse(include_str!("../../examples/host.toml"), path).unwrap();
        assert_eq!(c.operator_keys().unwrap().len(), 1);
        assert!(c.kbs.is_some() && c.billing.is_some());
        assert!(matches!(c.credit, Some(CreditConfig::ChainBalance { .. })));
        assert_eq!(c.outbox(), Path::new("/var/lib/attesta-host/outbox.db"));
        // The checks run on it: without operator keys it is refused, saying why.
        let text = include_str!("../../examples/host.toml").replace(
            "operator_keys = [\"9f1c0c6c3b1d6a4e2f0e5d8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c\"]",
            "operator_keys = []",
        );
        let e = HostConfig::parse(&text, path).unwrap_err();
        assert!(e.why.contains("operator_keys"), "{e}");
        assert_eq!(c.snp.mode, SnpMode::Hardware, "never simulated by default");
    }

    #[test]
    fn one_broker_or_a_list_of_replicas() {
        let path = Path::new("/etc/attesta-host/host.toml");
        let base = "state_dir = \"/s\"\noperator_keys = [\"9f1c0c6c3b1d6a4e2f0e5d8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c\"]\n[kbs]\nca = \"ca\"\nclient_cert = \"c\"\nclient_key = \"k\"\n";
        let c = HostConfig::parse(
            &format!("{base}addresses = [\"kbs-1:7443\", \"kbs-2:7443\"]\n"),
            path,
        )
        .unwrap();
        assert_eq!(
            c.kbs.unwrap().addresses().unwrap(),
            ["kbs-1:7443", "kbs-2:7443"]
        );
        for (lines, why) in [
            ("", "give `address` or `addresses`"),
            ("address = \"a:1\"\naddresses = [\"b:1\"]\n", "not both"),
            ("addresses = [\"a:1\", \"a:1\"]\n", "twice"),
        ] {
            let e = HostConfig::parse(&format!("{base}{lines}"), path).unwrap_err();
            assert!(e.why.contains(why), "{lines}: {e}");
        }
    }

    #[test]
    fn simulated_mode_is_explicit_and_refused_on_sev_hardware() {
        let path = Path::new("/etc/attesta-host/host.toml");
        let base = "state_dir = \"/s\"\noperator_keys = [\"9f1c0c6c3b1d6a4e2f0e5d8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c\"]\n";
        let c = HostConfig::parse(
            &format!("{base}[snp]\nmode = \"simulated\"\nrun_dir = \"run\"\n[platform]\nkind = \"simulator\"\n"),
            path,
        )
        .unwrap();
        assert_eq!(c.snp.mode, SnpMode::Simulated);
        assert_eq!(c.snp.run_dir, Path::new("/etc/attesta-host/run"));
        assert_eq!(
            check_simulated(c.snp.mode, false, true, &c.platform),
            Ok(())
        );
        let e = check_simulated(c.snp.mode, true, true, &c.platform).unwrap_err();
        assert!(e.contains("/dev/sev"), "{e}");
        let e = check_simulated(c.snp.mode, false, false, &c.platform).unwrap_err();
        assert!(e.contains("without the simulator feature"), "{e}");
        let e = check_simulated(c.snp.mode, false, true, &PlatformConfig::Sev).unwrap_err();
        assert!(e.contains("kind = \"simulator\""), "{e}");
        // Hardware mode is never refused by these checks.
        assert_eq!(
            check_simulated(SnpMode::Hardware, true, false, &PlatformConfig::Sev),
            Ok(())
        );
        assert!(HostConfig::parse(&format!("{base}[snp]\nmode = \"simulate\"\n"), path).is_err());
        // PVM's /dev/kvm cannot run a stock kernel: auto picks TCG there.
        assert!(Accel::Auto.kvm(true, false));
        assert!(!Accel::Auto.kvm(true, true));
        assert!(!Accel::Auto.kvm(false, false));
        assert!(Accel::Kvm.kvm(false, true) && !Accel::Tcg.kvm(true, false));
    }
}
