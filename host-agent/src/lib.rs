//! The host agent: runs on a miner's machine and turns operators' VM orders into SEV-SNP
//! domains with libvirt.
//!
//! - [`spec`]: the VM spec (TOML) and every check that needs no machine (guest policy: no
//!   debug, no migration agent; ids; absolute paths; values XML can carry).
//! - [`domain`]: the libvirt domain XML, a pure function of a checked spec and the platform's
//!   SEV parameters (`<launchSecurity type='sev-snp'>`, kernel hashes for direct boot, memfd
//!   memory, limits, vsock), every value escaped.
//! - [`caps`]: the SEV parameters (cbitpos, reducedPhysBits) from the driver's domain
//!   capabilities, with a configured fallback where the driver cannot tell.
//! - [`lifecycle`]: the pure lifecycle state machine (create → running → stop → reboot →
//!   terminate); [`host`]: the libvirt shell that asks it first.
//!
//! Not here (yet): the daemon, relaying orders to the key broker, the measurement gate before
//! launch, metering and billing to the chain.
#![forbid(unsafe_code)]

pub mod billing;
pub mod caps;
pub mod domain;
pub mod gate;
pub mod host;
pub mod lifecycle;
pub mod spec;
pub mod usage;
