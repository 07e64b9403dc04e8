//! The guest's side of the simulated PSP (`attesta-sim psp`): reports over a virtio-serial
//! port, for real VMs on machines without SEV-SNP. Only in builds with the `simulator` feature:
//! a production agent has no way to take its evidence from the host.

use simulator::psp::{self, Request};
use snp::device::{DerivedKeyRequest, DeviceError, GuestDevice};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The virtio-serial port to the host's simulated PSP.
pub struct VirtioPsp(Mutex<File>);

/// The device node of the virtio-serial port named `name` (`/sys/class/virtio-ports/vportNpM/
/// name` holds the name; the node is `/dev/vportNpM`: no udev needed).
fn find_port(sys: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let mut ports: Vec<_> = std::fs::read_dir(sys).ok()?.flatten().collect();
    ports.sort_by_key(|e| e.file_name());
    ports.into_iter().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim() == name).then(|| dev.join(e.file_name()))
    })
}

impl VirtioPsp {
    /// Opens the port named `name`, waiting up to five seconds for it to appear.
    pub fn open(name: &str) -> Result<VirtioPsp, DeviceError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Some(node) = find_port(
                Path::new("/sys/class/virtio-ports"),
                Path::new("/dev"),
                name,
            ) {
                let f = File::options()
                    .read(true)
                    .write(true)
                    .open(&node)
                    .map_err(|e| DeviceError::Unavailable(format!("{}: {e}", node.display())))?;
                return Ok(VirtioPsp(Mutex::new(f)));
            }
            if std::time::Instant::now() > deadline {
                return Err(DeviceError::Unavailable(format!(
                    "no virtio-serial port named {name} (is the VM launched with the simulated PSP, and virtio_console loaded?)"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn ask(
        &self,
        extended: bool,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), DeviceError> {
        if vmpl > 3 {
            return Err(DeviceError::InvalidVmpl(vmpl));
        }
        let mut port = self.0.lock().unwrap_or_else(|e| e.into_inner());
        psp::ask(
            &mut *port,
            &Request {
                extended,
                vmpl,
                report_data: *report_data,
            },
        )
        .map_err(|e| DeviceError::Firmware(format!("simulated PSP: {e}")))
    }
}

impl GuestDevice for VirtioPsp {
    fn get_report(&self, report_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, DeviceError> {
        self.ask(false, report_data, vmpl).map(|(r, _)| r)
    }

    fn get_ext_report(
        &self,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), DeviceError> {
        self.ask(true, report_data, vmpl)
    }

    fn get_derived_key(
        &self,
        _: &DerivedKeyRequest,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, DeviceError> {
        Err(DeviceError::Firmware(
            "the simulated PSP offers no derived keys".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_found_by_its_name() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport1p1", "org.attesta.psp.0"),
        ] {
            std::fs::create_dir_all(sys.join(port)).unwrap();
            std::fs::write(sys.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(&sys, Path::new("/dev"), "org.attesta.psp.0"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_port(&sys, Path::new("/dev"), "other"), None);
    }
}
