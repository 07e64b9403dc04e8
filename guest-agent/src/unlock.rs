//! `attesta-guest unlock`: harden the process, attest, receive the key, format or unlock the disk,
//! and place the boot configuration on tmpfs. Every step either succeeds or the whole run fails
//! with a reason; nothing is written anywhere but the LUKS2 header (first boot) and the tmpfs file.

use crate::client::{Broker, ClientError, Released, fetch, fetch_within};
use crate::config::{BrokerConfig, GuestConfig};
use crate::header::HeaderError;
use crate::luks::{self, DiskLabel, DiskState, LuksError, VolumeKey};
use proto::brokers::HANDSHAKE_PER_TRY;
use snp::device::GuestDevice;
use std::path::Path;
use std::time::{Duration, Instant};

/// What a successful run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unlocked {
    pub vm_id: String,
    pub generation: u64,
    pub boot_counter: u64,
    /// The disk was blank and has been formatted (a first boot).
    pub formatted: bool,
    /// `/dev/mapper/<name>` exists now. `false` only with [`UnlockError::NoDeviceMapper`].
    pub activated: bool,
}

/// Why the disk was not unlocked. Every variant fails the boot.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    #[error("cannot lock memory ({0}); refusing to hold a key that could be swapped out")]
    Mlock(String),
    #[error("the boot configuration path {0} is not on tmpfs; refusing to write secrets to disk")]
    NotTmpfs(String),
    #[error("{0}")]
    Config(String),
    #[error("the guest device: {0}")]
    Device(String),
    #[error("no key released: {0}")]
    Release(#[from] ClientError),
    #[error("the broker was unreachable for {0} s")]
    Timeout(u64),
    #[error("the disk has no LUKS header and format_if_blank is off")]
    BlankRefused,
    #[error(
        "the disk is blank on boot {0} of this key: it was formatted on the first boot, so it has been wiped; refusing to format it again under the same key"
    )]
    BlankAfterFirstBoot(u64),
    #[error("the disk belongs to VM {found:?}, not {expected:?}")]
    ForeignDisk { found: String, expected: String },
    #[error("the disk: {0}")]
    Disk(#[from] LuksError),
    #[error(
        "the released key opens the disk, but device-mapper is not available here, so it was not activated"
    )]
    NoDeviceMapper(Unlocked),
    #[error("the brokers' key shares do not fit together: {0}")]
    Shares(String),
    #[error("cannot write the boot configuration {path}: {why}")]
    BootConfig { path: String, why: String },
}

impl UnlockError {
    /// The process exit status: 3 when only activation was impossible, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            UnlockError::NoDeviceMapper(_) => 3,
            UnlockError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Keeps this process's memory out of swap and core dumps, and away from ptrace by other users.
pub fn harden(require_mlock: bool) -> Result<(), UnlockError> {
    use nix::sys::mman::{MlockAllFlags, mlockall};
    // Not dumpable: no core files, and /proc/<pid>/mem only for root.
    let _ = nix::sys::prctl::set_dumpable(false);
    match mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        Ok(()) => Ok(()),
        Err(e) if require_mlock => Err(UnlockError::Mlock(e.to_string())),
        Err(_) => Ok(()),
    }
}

/// Refuses a boot-configuration path whose directory is not on tmpfs or ramfs.
pub fn check_tmpfs(path: &Path) -> Result<(), UnlockError> {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let dir = path.parent().unwrap_or(Path::new("/"));
    // The directory may not exist yet: judge the nearest existing ancestor.
    let probe = dir
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let not = || UnlockError::NotTmpfs(path.display().to_string());
    let fs = statfs(probe).map_err(|_| not())?;
    let t = fs.filesystem_type();
    if t == TMPFS_MAGIC || t == RAMFS_MAGIC {
        Ok(())
    } else {
        Err(not())
    }
}

fn write_boot_config(path: &Path, bytes: &[u8]) -> Result<(), UnlockError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let err = |e: std::io::Error| UnlockError::BootConfig {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    // Never through a symlink planted in the folder, and 0600 even if the file was there.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(err)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(err)?;
    f.write_all(bytes).map_err(err)
}

/// The guest's mesh key: Ed25519, generated in memory; its PKCS#8 PEM is zeroized on drop.
pub struct MeshKey {
    public: [u8; 32],
    pem: zeroize::Zeroizing<String>,
}

impl MeshKey {
    pub fn generate() -> Result<MeshKey, UnlockError> {
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
        let bad = || UnlockError::Config("cannot generate the mesh key".into());
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| bad())?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| bad())?;
        let public = pair.public_key().as_ref().try_into().map_err(|_| bad())?;
        Ok(MeshKey {
            public,
            pem: zeroize::Zeroizing::new(pem("PRIVATE KEY", pkcs8.as_ref())),
        })
    }

    /// What the report binds and the broker certifies.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The private key as PKCS#8 PEM, for the mesh node's `node.key` (on tmpfs only).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

/// Places a guest's mesh identity in `dir`, which must be on tmpfs: `node.key` (0600, the key
/// born in this guest) and `node.crt` (what the broker certified), as the mesh node reads them.
pub fn place_mesh_identity(
    dir: &Path,
    key: &MeshKey,
    cert_der: &[u8],
    chain: &[Vec<u8>],
) -> Result<(), UnlockError> {
    check_tmpfs(&dir.join("node.key"))?;
    write_boot_config(&dir.join("node.key"), key.pem.as_bytes())?;
    place_mesh_identity_cert(dir, cert_der, chain)
}

/// Writes (or replaces, for a renewed lease) `node.crt` in `dir`, which must be on tmpfs:
/// written beside it and renamed over it, so a mesh node reloading it never reads half a file.
pub fn place_mesh_identity_cert(
    dir: &Path,
    cert_der: &[u8],
    chain: &[Vec<u8>],
) -> Result<(), UnlockError> {
    check_tmpfs(&dir.join("node.crt"))?;
    // Leaf first, then the issuer and up: what `attesta-mesh cert sign` writes and a node loads.
    let bundle: String = std::iter::once(cert_der)
        .chain(chain.iter().map(Vec::as_slice))
        .map(|der| pem("CERTIFICATE", der))
        .collect();
    let next = dir.join("node.crt.next");
    write_boot_config(&next, bundle.as_bytes())?;
    std::fs::rename(&next, dir.join("node.crt")).map_err(|e| UnlockError::BootConfig {
        path: dir.join("node.crt").display().to_string(),
        why: e.to_string(),
    })
}

use snp::certs::pem_encode as pem;

/// Fetches the secrets, retrying only while the brokers are unreachable or briefly unable to
/// decide; a denial on the evidence or a bad signature ends the attempt at once.
///
/// With several brokers (replicas on one database) each try goes to the next one, starting
/// where the VM's id points so that a fleet spreads over them; a handshake to one that does
/// not answer is given up after [`HANDSHAKE_PER_TRY`], a connection lost before the answer at
/// once. The answer to the evidence is waited for: leaving a slow broker then could spend a
/// release unseen. Each try is a whole new exchange (its own connection, guest key and report):
/// nothing from one broker is shown to another.
pub async fn fetch_with_retry(
    brokers: &[Broker],
    vm_id: &str,
    device: &impl GuestDevice,
    timeout: Duration,
    mesh_key: Option<&[u8; 32]>,
) -> Result<Released, UnlockError> {
    if brokers.is_empty() {
        return Err(UnlockError::Config("no broker to ask".into()));
    }
    let start = Instant::now();
    let mut pause = Duration::from_millis(200);
    let mut next = first_broker(vm_id, brokers.len());
    loop {
        for _ in 0..brokers.len() {
            let broker = &brokers[next];
            next = (next + 1) % brokers.len();
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(UnlockError::Timeout(timeout.as_secs()));
            }
            // Alone, a broker is waited for as long as the timeout allows (a storm queues at
            // its door); with others to try, one that does not answer is moved past.
            let attempt = async {
                match (brokers.len(), mesh_key) {
                    (1, Some(m)) => {
                        crate::client::fetch_with_mesh_key(broker, vm_id, device, m).await
                    }
                    (1, None) => fetch(broker, vm_id, device).await,
                    _ => {
                        let handshake = left.min(HANDSHAKE_PER_TRY);
                        fetch_within(broker, vm_id, device, mesh_key, handshake).await
                    }
                }
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(ClientError::Connect(why))) => {
                    tracing::warn!(broker = %broker.addr, %why, "the key broker is unreachable");
                }
                Ok(Err(ClientError::Protocol(code))) if code == "unavailable" => {
                    tracing::warn!(broker = %broker.addr, "the key broker is temporarily unavailable");
                }
                // Signed, and nothing was released: the broker could not decide now.
                Ok(Err(ClientError::Denied(reasons))) if is_worth_asking_again(&reasons) => {
                    tracing::warn!(broker = %broker.addr, ?reasons, "the key broker could not decide now");
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    tracing::warn!(broker = %broker.addr, "the key broker did not answer in time");
                }
            }
        }
        if start.elapsed() + pause >= timeout {
            return Err(UnlockError::Timeout(timeout.as_secs()));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// A denial that says only that nothing could be decided now, so asking again may release:
/// the decision could not be stored (`storage_unavailable`), or this VM's boot counter moved
/// under it (`vm_changed`: an earlier attempt of this boot, given up on after its evidence was
/// sent, was committed meanwhile). Signed, and nothing was released by it.
fn is_worth_asking_again(reasons: &[String]) -> bool {
    matches!(reasons, [r] if r == "storage_unavailable" || r == "vm_changed")
}

/// Where a VM starts in the broker list: spread by its id (FNV-1a), stable across boots.
pub fn first_broker(vm_id: &str, n: usize) -> usize {
    let h = vm_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(h % n.max(1) as u64).unwrap_or(0)
}

/// The brokers of `[broker]` as the configuration pins them, in the order given.
pub fn brokers(cfg: &GuestConfig) -> Result<Vec<Broker>, UnlockError> {
    pins(&cfg.broker)
}

/// Every share's brokers: `[broker]`'s first, then each of `[[split.brokers]]`'s.
pub fn share_groups(cfg: &GuestConfig) -> Result<Vec<Vec<Broker>>, UnlockError> {
    let mut groups = vec![pins(&cfg.broker)?];
    for b in cfg.split.iter().flat_map(|s| &s.brokers) {
        groups.push(pins(b)?);
    }
    Ok(groups)
}

/// One broker's addresses (replicas), each with the broker's pins.
pub fn pins(b: &BrokerConfig) -> Result<Vec<Broker>, UnlockError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca = CertificateDer::from_pem_file(&b.ca)
        .map_err(|e| UnlockError::Config(format!("{}: {e}", b.ca.display())))?;
    let response_key = b.response_key().map_err(UnlockError::Config)?;
    Ok(b.addresses()
        .map_err(UnlockError::Config)?
        .into_iter()
        .map(|addr| Broker {
            addr,
            server_name: b.server_name.clone(),
            ca_der: ca.to_vec(),
            response_key,
        })
        .collect())
}

/// The disk half. A blank disk is formatted only on the VM's first release (boot counter 1):
/// blank on a later boot means the host wiped it, to have the guest write fresh ciphertext under
/// the same key, and is refused. Then the header is judged and the disk activated from the
/// judged copy ([`luks::unlock`]): it must be exactly what the agent writes, for this VM and
/// generation, bound to the key.
pub fn open_disk(cfg: &GuestConfig, released: &Released) -> Result<Unlocked, UnlockError> {
    open_disk_with(cfg, released, None)
}

/// [`open_disk`]; a first boot of a k-of-n split also writes the split's wraps (`split`) into
/// the token.
pub fn open_disk_with(
    cfg: &GuestConfig,
    released: &Released,
    split: Option<&serde_json::Value>,
) -> Result<Unlocked, UnlockError> {
    let key = VolumeKey::from_bytes(&released.volume_key)?;
    let path = &cfg.disk.path;
    let label = DiskLabel {
        vm_id: cfg.vm_id.clone(),
        generation: released.generation,
    };
    let formatted = match luks::probe(path)? {
        DiskState::Blank if !cfg.disk.format_if_blank => return Err(UnlockError::BlankRefused),
        DiskState::Blank if released.boot_counter != 1 => {
            return Err(UnlockError::BlankAfterFirstBoot(released.boot_counter));
        }
        DiskState::Blank => {
            luks::format_with(path, &key, &label, split)?;
            true
        }
        DiskState::Luks2 { .. } => false,
    };
    let mut done = Unlocked {
        vm_id: cfg.vm_id.clone(),
        generation: released.generation,
        boot_counter: released.boot_counter,
        formatted,
        activated: false,
    };
    match luks::unlock(path, &cfg.disk.name, &key, &label) {
        Ok(()) => {
            done.activated = true;
            #[cfg(feature = "simulator")]
            if cfg.bench_passphrase {
                bench(path, &key, &label, &cfg.disk.name);
            }
            Ok(done)
        }
        Err(LuksError::DeviceMapperUnavailable) => Err(UnlockError::NoDeviceMapper(done)),
        Err(LuksError::Header(HeaderError::ForeignVm { found, expected })) => {
            Err(UnlockError::ForeignDisk { found, expected })
        }
        Err(e) => Err(e.into()),
    }
}

/// The unlock benchmark's line on stdout (the console): the disk stays unlocked whatever it
/// says.
#[cfg(feature = "simulator")]
fn bench(path: &std::path::Path, key: &VolumeKey, label: &DiskLabel, disk_name: &str) {
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0);
    // When this process started, in the kernel's clock ticks since boot (field 22 of
    // /proc/self/stat, counted after the command name's closing parenthesis); 100 per second.
    let agent_start_ms = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(19)?.parse::<f64>().ok()
        })
        .map(|ticks| ticks * 10.0);
    // Any name but the agent's own mapping's.
    let name = if disk_name == "attesta-bench" {
        "attesta-bench-2"
    } else {
        "attesta-bench"
    };
    match crate::bench::passphrase_unlock(path, key, label, name) {
        Ok(p) => println!(
            "attesta-guest: bench: kernel_to_unlocked_ms={:.0} agent_start_ms={:.0} passphrase_unlock_ms={:.0} kdf={} time_cost={} memory_kib={} threads={}",
            uptime_ms.unwrap_or(f64::NAN),
            agent_start_ms.unwrap_or(f64::NAN),
            p.ms,
            p.kdf,
            p.time_cost,
            p.memory_kib,
            p.threads
        ),
        Err(e) => println!("attesta-guest: bench: failed: {e}"),
    }
}

/// The whole run with a given device.
pub async fn run_with(
    cfg: &GuestConfig,
    device: &impl GuestDevice,
) -> Result<Unlocked, UnlockError> {
    check_tmpfs(&cfg.boot_config.path)?;
    // The mesh key is born here, in memory, and bound in the report.
    let mesh = match &cfg.mesh {
        Some(m) => {
            check_tmpfs(&m.dir.join("node.key"))?;
            Some((m.dir.clone(), MeshKey::generate()?))
        }
        None => None,
    };
    let groups = share_groups(cfg)?;
    // The disk must be readable before anything is asked of the broker.
    luks::probe(&cfg.disk.path)?;
    let (released, split) = crate::shares::obtain(
        cfg,
        &groups,
        device,
        Duration::from_secs(cfg.broker.timeout_secs),
        mesh.as_ref().map(|(_, k)| &k.public),
    )
    .await?;
    tracing::info!(
        vm_id = %cfg.vm_id,
        generation = released.generation,
        boot = released.boot_counter,
        "key released"
    );
    let result = open_disk_with(cfg, &released, split.as_ref());
    // The boot configuration is placed only once the disk is known to be this VM's.
    match &result {
        Ok(_) | Err(UnlockError::NoDeviceMapper(_)) => {
            write_boot_config(&cfg.boot_config.path, &released.boot_config)?;
            if let Some((dir, key)) = &mesh {
                if released.mesh_cert.is_empty() {
                    tracing::warn!(
                        "the broker issued no mesh certificate (the order names no mesh_ip, or the broker has no guest_ca)"
                    );
                } else {
                    place_mesh_identity(dir, key, &released.mesh_cert, &released.mesh_chain)?;
                    tracing::info!(dir = %dir.display(), "mesh identity placed");
                }
            }
        }
        Err(_) => {}
    }
    result
}

/// The whole run with the configured device.
pub async fn run(cfg: &GuestConfig) -> Result<Unlocked, UnlockError> {
    crate::with_device!(cfg, dev => run_with(cfg, dev).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_denial_that_decided_nothing_is_asked_again() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_worth_asking_again(&r(&["storage_unavailable"])));
        assert!(is_worth_asking_again(&r(&["vm_changed"])));
        for last in [
            &["vm_terminated"][..],
            &["vm_changed", "measurement_not_allowed"],
            &["report_data_mismatch"],
            &[],
        ] {
            assert!(!is_worth_asking_again(&r(last)), "{last:?}");
        }
    }

    #[test]
    fn a_vm_starts_at_the_broker_its_id_picks() {
        for n in 1..=8 {
            for i in 0..50 {
                assert!(first_broker(&format!("vm-{i}"), n) < n);
            }
        }
        assert_eq!(first_broker("vm-7", 0), 0);
        assert_eq!(first_broker("vm-7", 3), first_broker("vm-7", 3));
        let picked: std::collections::HashSet<usize> = (0..40)
            .map(|i| first_broker(&format!("vm-{i}"), 4))
            .collect();
        assert_eq!(picked.len(), 4, "a fleet spreads over every broker");
    }
}
