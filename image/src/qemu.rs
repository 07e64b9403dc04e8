//! How an image boots under QEMU without SNP hardware: direct kernel boot of the image's
//! kernel, initrd and command line, TCG (`-cpu max` emulates AES-NI; KVM on these machines is
//! PVM, which a stock kernel cannot use), the disk on virtio, QEMU's user networking (the
//! guest sees the host's loopback at 10.0.2.2), pvpanic so that a guest panic — every
//! fail-closed path of `/init` — ends QEMU with status 1, and optionally the simulated PSP's
//! virtio-serial port. Shared by the tests and the demo.

use std::path::Path;
use std::process::Command;

/// The virtio-serial port name of the simulated PSP (as `simulator::psp::PORT_NAME`).
pub const PSP_PORT: &str = "org.attesta.psp.0";

/// The kernel and its module folder in an unpacked kernel package `dir` (as
/// `scripts/guest-kernel.sh` leaves it): `boot/vmlinuz-V` and `lib/modules/V`.
pub fn unpacked_kernel(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let version = vmlinuz
        .file_name()
        .map(|n| n.to_string_lossy()["vmlinuz-".len()..].to_string())
        .unwrap_or_default();
    Ok((vmlinuz, dir.join("lib/modules").join(version)))
}

/// `qemu-system-x86_64` for the image in `img` with `disk`, under `timeout SECS`; with
/// `psp`, the simulated PSP's socket on the port [`PSP_PORT`]. Console on stdout.
pub fn command(img: &Path, disk: &Path, psp: Option<&Path>, secs: u32) -> Result<Command, String> {
    let cmdline = std::fs::read_to_string(img.join("cmdline"))
        .map_err(|e| format!("{}: {e}", img.join("cmdline").display()))?;
    Ok(command_for(
        &img.join("vmlinuz"),
        &img.join("initrd.img"),
        cmdline.trim_end(),
        disk,
        psp,
        secs,
    ))
}

/// As [`command`], for any kernel, initrd and command line (a distro's initramfs, say). More
/// drives or a firmware can be appended to the command.
pub fn command_for(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    disk: &Path,
    psp: Option<&Path>,
    secs: u32,
) -> Command {
    let mut c = Command::new("timeout");
    c.arg(secs.to_string())
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "512",
        ])
        .args(["-smp", "1", "-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline, "-drive"])
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .args(["-device", "pvpanic-pci", "-action", "panic=exit-failure"]);
    if let Some(sock) = psp {
        c.arg("-chardev")
            .arg(format!("socket,id=psp,path={}", sock.display()))
            .args(["-device", "virtio-serial-pci", "-device"])
            .arg(format!("virtserialport,chardev=psp,name={PSP_PORT}"));
    }
    c
}
