//! # guest-agent — Attesta inside the VM
//!
//! Runs in the VM's initramfs: attests over the mesh, receives the disk key sealed to a key born
//! in the guest, formats the LUKS2 disk on first boot and unlocks it on every boot. The key
//! lives only in guest memory (zeroized, never written, never logged); any failure fails closed.
//!
//! This crate so far holds the disk side ([`luks`]); attestation and the key-release client come
//! with the key broker's protocol.
// No unsafe code of our own; the one exception is the C logging callback that libcryptsetup-rs's
// macro generates (see `luks::quiet_libcryptsetup`).
#![deny(unsafe_code)]

pub mod client;
pub mod device;
pub mod luks;
