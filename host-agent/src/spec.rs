//! The VM spec: what a miner's host is asked to run, as TOML (see `examples/vm.toml`). Parsing
//! checks everything that can be checked without the machine: ids, sizes, the SEV-SNP guest
//! policy (no debug, no migration agent), absolute paths, no control characters anywhere a value
//! ends up in libvirt's XML.

use serde::Deserialize;
use snp::report::GuestPolicy;
use std::path::{Path, PathBuf};

/// Why a spec was refused. Closed vocabulary: each names the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec is not valid TOML for a VM spec: {0}")]
    Parse(String),
    #[error("vm_id {0:?}: 1–64 characters of A–Z a–z 0–9 . _ -, not starting with . or -")]
    VmId(String),
    #[error("vcpus must be 1–{max}, not {got}")]
    Vcpus { got: u32, max: u32 },
    #[error("memory_mib must be {min}–{max}, not {got}")]
    Memory { got: u64, min: u64, max: u64 },
    #[error("disk.size_gib must be 1–65536, not {0}")]
    DiskSize(u64),
    #[error("unknown vcpu_type {0:?} (EPYC-Milan, EPYC-Genoa, EPYC-Turin, EPYC-v4, …)")]
    VcpuType(String),
    #[error("{field}: {value:?} is not hex")]
    Hex { field: &'static str, value: String },
    #[error("snp.host_data must be 32 bytes (64 hex digits)")]
    HostData,
    #[error("snp.policy sets DEBUG (bit 19): the host could read and change guest memory")]
    PolicyDebug,
    #[error("snp.policy sets MIGRATE_MA (bit 18): a migration agent could export guest memory")]
    PolicyMigrationAgent,
    #[error("snp.policy must set bit 17 (reserved, must be one)")]
    PolicyReserved17,
    #[error("snp.policy sets reserved bits {0:#x}")]
    PolicyReservedBits(u64),
    #[error("{field}: {path:?} must be an absolute path")]
    RelativePath { field: &'static str, path: PathBuf },
    #[error("{field} contains a control character or a character XML cannot carry")]
    ControlCharacter { field: &'static str },
    #[error("boot.initrd and boot.cmdline need boot.kernel")]
    InitrdWithoutKernel,
    #[error("vsock_cid must be ≥ 3 (0–2 are reserved), not {0}")]
    VsockCid(u32),
    #[error("limits.cpu_percent must be 1–{max}, not {got}")]
    CpuPercent { got: u32, max: u32 },
    #[error("network and user_network exclude each other")]
    TwoNetworks,
}

/// One VM, as the operator's order and the miner's machine shape it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's id at the key broker (its order's `vm_id`).
    pub vm_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// QEMU's CPU model; part of the launch measurement (each vCPU's VMSA carries its CPUID).
    pub vcpu_type: String,
    pub boot: Boot,
    pub disk: Disk,
    #[serde(default)]
    pub snp: Snp,
    #[serde(default)]
    pub limits: Limits,
    /// A libvirt network to attach to (none: no network interface).
    #[serde(default)]
    pub network: Option<String>,
    /// QEMU's user-mode networking instead (no bridge; the guest reaches the host's loopback
    /// at 10.0.2.2): for simulated hosts and tests. Not with `network`.
    #[serde(default)]
    pub user_network: bool,
    /// The guest's vsock context id (none: no vsock device).
    #[serde(default)]
    pub vsock_cid: Option<u32>,
}

/// Firmware and, for direct kernel boot, the kernel, initrd and command line — all measured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// The SEV-SNP OVMF build (for direct boot, one with the SEV hashes table).
    pub ovmf: PathBuf,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The VM's disk image (raw). Created blank if missing; the guest formats LUKS2 itself.
    pub path: PathBuf,
    pub size_gib: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snp {
    /// The SEV-SNP guest policy (hex). Default 0x30000: SMT allowed, bit 17, ABI 0.0.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// 32 bytes (hex) the host binds into every report: the tenant's HOST_DATA.
    #[serde(default)]
    pub host_data: Option<String>,
    /// SEV features of the VMSAs, hex (default 0x1: SNP active); part of the measurement.
    #[serde(default = "default_features")]
    pub guest_features: String,
}

impl Default for Snp {
    fn default() -> Snp {
        Snp {
            policy: default_policy(),
            host_data: None,
            guest_features: default_features(),
        }
    }
}

fn default_policy() -> String {
    "0x30000".into()
}

fn default_features() -> String {
    "0x1".into()
}

/// Resource limits libvirt enforces.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time as a percentage of one host CPU per vCPU… summed: 100 × vcpus = unlimited.
    #[serde(default)]
    pub cpu_percent: Option<u32>,
    #[serde(default)]
    pub disk_iops: Option<u64>,
    #[serde(default)]
    pub disk_bytes_per_sec: Option<u64>,
    /// Network bandwidth, each direction, KiB/s.
    #[serde(default)]
    pub net_kib_per_sec: Option<u64>,
}

/// What parsing proved about a spec, in the types the rest of the agent uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub spec: VmSpec,
    pub policy: u64,
    pub guest_features: u64,
    pub host_data: Option<[u8; 32]>,
    /// The vCPU signature (CPUID family/model/stepping) the measurement uses.
    pub vcpu_sig: u32,
}

impl Checked {
    /// The libvirt domain name: `attesta-<vm_id>`.
    pub fn domain_name(&self) -> String {
        domain_name(&self.spec.vm_id)
    }
}

/// The libvirt domain name of a VM id.
pub fn domain_name(vm_id: &str) -> String {
    format!("attesta-{vm_id}")
}

const MAX_VCPUS: u32 = 512;
const MIN_MEMORY_MIB: u64 = 128;
const MAX_MEMORY_MIB: u64 = 16 << 20;

fn hex_u64(field: &'static str, s: &str) -> Result<u64, SpecError> {
    let t = s.trim();
    u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).map_err(|_| SpecError::Hex {
        field,
        value: s.into(),
    })
}

/// A VM id the broker, libvirt and file names all accept.
pub fn valid_vm_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn no_control(field: &'static str, s: &str) -> Result<(), SpecError> {
    if s.chars()
        .any(|c| c.is_control() || matches!(c, '\u{FFFE}' | '\u{FFFF}'))
    {
        return Err(SpecError::ControlCharacter { field });
    }
    Ok(())
}

fn absolute(field: &'static str, p: &Path) -> Result<(), SpecError> {
    if !p.is_absolute() {
        return Err(SpecError::RelativePath {
            field,
            path: p.into(),
        });
    }
    no_control(field, &p.to_string_lossy())
}

/// Checks a guest policy: debug and migration agent refused, bit 17 set, no reserved bits.
pub fn check_policy(policy: u64) -> Result<(), SpecError> {
    if policy & GuestPolicy::DEBUG != 0 {
        return Err(SpecError::PolicyDebug);
    }
    if policy & GuestPolicy::MIGRATE_MA != 0 {
        return Err(SpecError::PolicyMigrationAgent);
    }
    if policy & GuestPolicy::RESERVED_MBO == 0 {
        return Err(SpecError::PolicyReserved17);
    }
    let reserved = policy & !((1u64 << 26) - 1);
    if reserved != 0 {
        return Err(SpecError::PolicyReservedBits(reserved));
    }
    Ok(())
}

impl VmSpec {
    /// Parses and checks a spec.
    pub fn parse(toml_text: &str) -> Result<Checked, SpecError> {
        let spec: VmSpec =
            toml::from_str(toml_text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.check()
    }

    /// Checks a spec.
    pub fn check(self) -> Result<Checked, SpecError> {
        if !valid_vm_id(&self.vm_id) {
            return Err(SpecError::VmId(self.vm_id));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus {
                got: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Memory {
                got: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            });
        }
        if self.disk.size_gib == 0 || self.disk.size_gib > 65536 {
            return Err(SpecError::DiskSize(self.disk.size_gib));
        }
        no_control("vcpu_type", &self.vcpu_type)?;
        let vcpu_sig = measure::vcpu_sig(&self.vcpu_type)
            .map_err(|_| SpecError::VcpuType(self.vcpu_type.clone()))?;
        absolute("boot.ovmf", &self.boot.ovmf)?;
        if let Some(k) = &self.boot.kernel {
            absolute("boot.kernel", k)?;
        } else if self.boot.initrd.is_some() || self.boot.cmdline.is_some() {
            return Err(SpecError::InitrdWithoutKernel);
        }
        if let Some(i) = &self.boot.initrd {
            absolute("boot.initrd", i)?;
        }
        if let Some(c) = &self.boot.cmdline {
            no_control("boot.cmdline", c)?;
        }
        absolute("disk.path", &self.disk.path)?;
        if let Some(n) = &self.network {
            no_control("network", n)?;
            if self.user_network {
                return Err(SpecError::TwoNetworks);
            }
        }
        if let Some(cid) = self.vsock_cid
            && cid < 3
        {
            return Err(SpecError::VsockCid(cid));
        }
        if let Some(p) = self.limits.cpu_percent
            && (p == 0 || p > 100 * self.vcpus)
        {
            return Err(SpecError::CpuPercent {
                got: p,
                max: 100 * self.vcpus,
            });
        }
        let policy = hex_u64("snp.policy", &self.snp.policy)?;
        check_policy(policy)?;
        let guest_features = hex_u64("snp.guest_features", &self.snp.guest_features)?;
        let host_data = match &self.snp.host_data {
            None => None,
            Some(h) => {
                let b = hex::decode(h.trim()).map_err(|_| SpecError::Hex {
                    field: "snp.host_data",
                    value: h.clone(),
                })?;
                Some(<[u8; 32]>::try_from(b.as_slice()).map_err(|_| SpecError::HostData)?)
            }
        };
        Ok(Checked {
            spec: self,
            policy,
            guest_features,
            host_data,
            vcpu_sig,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../../examples/vm.toml");

    fn with(f: impl Fn(&mut VmSpec)) -> Result<Checked, SpecError> {
        let mut s: VmSpec = toml::from_str(EXAMPLE).unwrap();
        f(&mut s);
        s.check()
    }

    #[test]
    fn the_example_is_valid() {
        let c = VmSpec::parse(EXAMPLE).unwrap();
        assert_eq!(c.policy, 0x30000);
        assert_eq!(c.domain_name(), format!("attesta-{}", c.spec.vm_id));
    }

    #[test]
    fn each_check_refuses_what_it_should() {
        assert_eq!(
            with(|s| s.snp.policy = "0xb0000".into()),
            Err(SpecError::PolicyDebug)
        );
        assert_eq!(
            with(|s| s.snp.policy = "0x70000".into()),
            Err(SpecError::PolicyMigrationAgent)
        );
        assert_eq!(
            with(|s| s.snp.policy = "0x10000".into()),
            Err(SpecError::PolicyReserved17)
        );
        assert_eq!(
            with(|s| s.snp.policy = "0x4030000".into()),
            Err(SpecError::PolicyReservedBits(0x4000000))
        );
        assert!(matches!(
            with(|s| s.snp.policy = "xyz".into()),
            Err(SpecError::Hex { .. })
        ));
        assert!(matches!(
            with(|s| s.vm_id = "../etc".into()),
            Err(SpecError::VmId(_))
        ));
        assert!(matches!(
            with(|s| s.vm_id = "a".repeat(65)),
            Err(SpecError::VmId(_))
        ));
        assert!(matches!(
            with(|s| s.vcpus = 0),
            Err(SpecError::Vcpus { .. })
        ));
        assert!(matches!(
            with(|s| s.memory_mib = 64),
            Err(SpecError::Memory { .. })
        ));
        assert_eq!(with(|s| s.disk.size_gib = 0), Err(SpecError::DiskSize(0)));
        assert!(matches!(
            with(|s| s.vcpu_type = "Pentium-II".into()),
            Err(SpecError::VcpuType(_))
        ));
        assert!(matches!(
            with(|s| s.disk.path = "disk.img".into()),
            Err(SpecError::RelativePath { .. })
        ));
        assert!(matches!(
            with(|s| s.boot.cmdline = Some("quiet\u{7}".into())),
            Err(SpecError::ControlCharacter { .. })
        ));
        assert_eq!(
            with(|s| {
                s.boot.kernel = None;
                s.boot.initrd = None;
            }),
            Err(SpecError::InitrdWithoutKernel)
        );
        assert_eq!(with(|s| s.vsock_cid = Some(2)), Err(SpecError::VsockCid(2)));
        assert_eq!(
            with(|s| s.snp.host_data = Some("ab".into())),
            Err(SpecError::HostData)
        );
        assert!(matches!(
            with(|s| s.limits.cpu_percent = Some(100 * s.vcpus + 1)),
            Err(SpecError::CpuPercent { .. })
        ));
        assert!(matches!(
            VmSpec::parse("vm_id = \"x\"\nsurprise = 1\n"),
            Err(SpecError::Parse(_))
        ));
    }
}
