//! # guest-agent — Attesta inside the VM
//!
//! Runs in the VM's initramfs: attests over the mesh, receives the disk key sealed to a key born
//! in the guest, formats the LUKS2 disk on first boot and unlocks it on every boot. The key
//! lives only in guest memory (zeroized, never written, never logged); any failure fails closed.
//!
//! Modules: [`client`] (the release protocol over QUIC), [`device`] (`/dev/sev-guest`),
//! [`luks`] (the disk), [`config`] (`guest.toml`), [`unlock`] (the whole boot-time run that
//! the `attesta-guest unlock` binary performs) and [`keepalive`] (the running VM's lease).
// No unsafe code of our own; the one exception is the C logging callback that libcryptsetup-rs's
// macro generates (see `luks::quiet_libcryptsetup`).
#![deny(unsafe_code)]

#[cfg(feature = "simulator")]
pub mod bench;
pub mod client;
pub mod config;
pub mod device;
pub mod header;
pub mod keepalive;
pub mod luks;
#[cfg(feature = "simulator")]
pub mod psp;
pub mod shares;
pub mod split;
pub mod unlock;
mod with_device;
