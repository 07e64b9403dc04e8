//! # attesta-image — measured, reproducible guest images
//!
//! Builds what a VM boots: the kernel as given, an initramfs holding `attesta-guest` (with its
//! shared libraries), the guest configuration and the broker CA it pins, the kernel modules
//! the boot needs and a small `/init`, the kernel command line, and a manifest with the
//! SHA-256 of each file and — given the OVMF and the VM shape — the SEV-SNP launch measurement
//! ([`measure`]), the value a tenant's order allows.
//!
//! **Reproducible:** the same inputs give byte-identical outputs on any machine (sorted,
//! uncompressed `newc` cpio with fixed owners and times; no host names, users, times or file
//! order), so a tenant can rebuild the image and recompute the measurement. The inputs are
//! the named files and, for the agent, the shared libraries `ldd` finds on the build machine:
//! the manifest lists the modules loaded; rebuild on the same Debian release to compare.
//!
//! **Not here:** compression (the kernel takes the cpio as it is), a service manager or SSH
//! server in the root file system (the root the image makes on first boot is a minimal
//! busybox system that holds the tenant's keys on tmpfs; distribution images use the dracut
//! module or the initramfs-tools hook in `guest-agent/dist/` instead).
#![forbid(unsafe_code)]

pub mod build;
pub mod cpio;
pub mod modules;
pub mod qemu;
