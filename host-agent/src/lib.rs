//! The host agent: runs on a miner's machine and turns operators' VM orders into SEV-SNP
//! domains with libvirt, keeps their lifecycle, and bills their running time to the chain.
//!
//! Pure (no sockets, files or clocks):
//! - [`spec`]: the VM spec (TOML) and every check that needs no machine (guest policy: no
//!   debug, no migration agent; ids; absolute paths; values XML can carry).
//! - [`domain`]: the libvirt domain XML, a pure function of a checked spec and the platform's
//!   SEV parameters (`<launchSecurity type='sev-snp'>`, kernel hashes for direct boot, memfd
//!   memory, limits, vsock), every value escaped.
//! - [`caps`]: the SEV parameters (cbitpos, reducedPhysBits) from the driver's domain
//!   capabilities, with a configured fallback where the driver cannot tell.
//! - [`lifecycle`]: the lifecycle state machine (create → running → stop → reboot → terminate).
//! - [`gate`]: the launch gate — a signed register order whose measurements include the digest
//!   of exactly what the spec starts; terminate only on a signed terminate order.
//! - [`usage`]: metering per UTC hour and the canonical usage document with its hash.
//! - [`capacity`]: whether one more VM fits (vCPUs, memory, disk, VMs per tenant).
//! - [`intake`]: VM tasks from the chain — the versioned remark encoding of validators'
//!   assignments and of the miner's answers, and which remarks are this miner's.
//! - [`refusal`]: why a create did not happen, as the closed vocabulary answers carry.
//! - [`agent`]: the daemon's decisions (reconcile with libvirt, hours to close, usage from
//!   recorded events, whom the credit check stops, retry backoff).
//!
//! IO shells: [`host`] (libvirt), [`billing`] (the durable outbox and `subxt` submission),
//! [`chain`] (finalized blocks' remarks, with `subxt`),
//! [`state`] (the agent's database), [`credit`] (chain balance or a command), [`platform`]
//! (chip id and TCB), [`control`] (the local socket protocol) and [`daemon`]
//! (`attesta-host serve`); with the `simulator` feature, `sim_psp` (the simulated PSP of a
//! host without SEV-SNP, `[snp] mode = "simulated"`).
//!
//! Not here: the host never sees a volume key (guests format their disks with the key the
//! broker releases to them), and never decides what may run — the operator's signed orders do.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backup;
pub mod billing;
pub mod capacity;
pub mod caps;
pub mod chain;
pub mod config;
pub mod control;
pub mod credit;
pub mod daemon;
pub mod domain;
pub mod gate;
pub mod host;
pub mod intake;
pub mod lifecycle;
pub mod platform;
pub mod refusal;
#[cfg(feature = "simulator")]
pub mod sim_psp;
pub mod spec;
pub mod state;
pub mod usage;
