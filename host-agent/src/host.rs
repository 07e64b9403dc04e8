//! The IO shell over libvirt (the `virt` crate): defines, starts, stops, reboots and
//! terminates SEV-SNP domains, asking [`crate::lifecycle`] first; finds its own domains again
//! after a restart by the metadata element it writes into each.

use crate::caps::{self, CapsError};
use crate::domain::{self, METADATA_NS, SevParams};
use crate::lifecycle::{self, Action, InvalidTransition, State};
use crate::spec::{Checked, SpecError, domain_name};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

/// Why a host operation failed. Nothing was changed unless the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("libvirt {op}: {why}")]
    Libvirt { op: &'static str, why: String },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("VM {0} is already defined on this host")]
    Exists(String),
    #[error("no VM {0} on this host")]
    Unknown(String),
    #[error("disk {path}: {why}")]
    Disk { path: PathBuf, why: String },
}

fn lv(op: &'static str) -> impl Fn(virt::error::Error) -> HostError {
    move |e| HostError::Libvirt {
        op,
        why: e.to_string(),
    }
}

/// One of the agent's VMs as libvirt has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub vm_id: String,
    pub domain: String,
    pub state: State,
}

/// The simulated PSP a host without SEV-SNP runs for its domains (`[snp] mode = "simulated"`;
/// implemented in [`crate::sim_psp`], compiled only with the `simulator` feature).
pub trait SimulatedPsp: Send + Sync {
    /// Measures what `launch` starts and serves its reports on `launch.psp_socket` (replacing
    /// an earlier launch of the same VM); returns the measurement.
    fn launch(&self, launch: &domain::SimulatedLaunch) -> Result<[u8; 48], String>;
    /// Stops serving `vm_id`.
    fn stop(&self, vm_id: &str);
}

/// How this host isolates its domains.
pub enum Isolation {
    /// SEV-SNP hardware, with the platform's parameters.
    Snp(SevParams),
    /// No SEV-SNP (tests and demos): plain QEMU domains and a simulated PSP.
    Simulated {
        /// `kvm` or TCG.
        kvm: bool,
        /// Each VM's PSP socket and console log (`<domain>.psp`, `<domain>.console`).
        run_dir: PathBuf,
        psp: Box<dyn SimulatedPsp>,
        /// The QEMU binary the driver runs for new domains: the only one a launch may use.
        emulator: PathBuf,
    },
}

/// A libvirt connection and how the host isolates its domains.
pub struct Host {
    conn: Connect,
    iso: Isolation,
    /// How long a graceful shutdown may take before the domain is destroyed.
    pub stop_grace: Duration,
}

/// The first bytes of a disk overwritten at terminate: the whole LUKS2 header and keyslot
/// area at cryptsetup's defaults, so no keyslot survives even before the file is removed.
const WIPE_BYTES: u64 = 16 << 20;

impl Host {
    /// Connects to `uri` (`qemu:///system` on a miner; `test:///default` in tests) and settles
    /// the SEV parameters from the driver's domain capabilities and `configured`.
    pub fn open(uri: &str, configured: Option<SevParams>) -> Result<Host, HostError> {
        // Errors are returned as values; libvirt's default handler would also print them.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(lv("connect"))?;
        let caps_xml = conn
            .domain_capabilities(None, Some("x86_64"), None, None, 0)
            .or_else(|_| conn.domain_capabilities(None, None, None, None, 0))
            .map_err(lv("domain capabilities"))?;
        let sev = caps::settle(caps::reported(&caps_xml)?, configured)?;
        Ok(Host {
            conn,
            iso: Isolation::Snp(sev),
            stop_grace: Duration::from_secs(60),
        })
    }

    /// Connects to `uri` for simulated domains (no SEV parameters are asked of the driver);
    /// `run_dir` is created mode 0711 (QEMU, another user, must reach the sockets in it); an
    /// existing folder keeps the mode its owner gave it.
    pub fn open_simulated(
        uri: &str,
        kvm: bool,
        run_dir: &Path,
        psp: Box<dyn SimulatedPsp>,
    ) -> Result<Host, HostError> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(lv("connect"))?;
        let err = |why: String| HostError::Disk {
            path: run_dir.into(),
            why,
        };
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !run_dir.is_dir() {
            std::fs::create_dir_all(run_dir).map_err(|e| err(e.to_string()))?;
            std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| err(e.to_string()))?;
        }
        // Sockets are made and replaced there: nobody else may write in it.
        let m = std::fs::metadata(run_dir).map_err(|e| err(e.to_string()))?;
        // /proc/self belongs to the process's effective user.
        let me = std::fs::metadata("/proc/self").map_err(|e| err(e.to_string()))?;
        if m.uid() != me.uid() || m.mode() & 0o022 != 0 {
            return Err(err(
                "run_dir must be owned by the agent's user and writable by nobody else".into(),
            ));
        }
        let caps_xml = conn
            .domain_capabilities(
                None,
                Some("x86_64"),
                Some("q35"),
                Some(if kvm { "kvm" } else { "qemu" }),
                0,
            )
            .map_err(lv("domain capabilities"))?;
        let emulator = caps::emulator(&caps_xml)?
            .ok_or_else(|| HostError::Libvirt {
                op: "domain capabilities",
                why: "no emulator path".into(),
            })?
            .into();
        Ok(Host {
            conn,
            iso: Isolation::Simulated {
                kvm,
                run_dir: run_dir.into(),
                psp,
                emulator,
            },
            stop_grace: Duration::from_secs(60),
        })
    }

    /// The SEV parameters; none on a simulated host.
    pub fn sev(&self) -> Option<SevParams> {
        match &self.iso {
            Isolation::Snp(sev) => Some(*sev),
            Isolation::Simulated { .. } => None,
        }
    }

    /// How launches are measured here: as built on hardware; on a simulated host as its PSP
    /// measures them.
    pub fn firmware(&self) -> measure::Firmware {
        match &self.iso {
            Isolation::Snp(_) => measure::Firmware::AsBuilt,
            Isolation::Simulated { .. } => measure::Firmware::AssumeHashesTable,
        }
    }

    /// A simulated domain's console log (the file its serial console is written to).
    pub fn console_log(&self, vm_id: &str) -> Option<PathBuf> {
        match &self.iso {
            Isolation::Simulated { run_dir, .. } => {
                Some(run_dir.join(format!("{}.console", domain_name(vm_id))))
            }
            Isolation::Snp(_) => None,
        }
    }

    fn lookup(&self, vm_id: &str) -> Result<Domain, HostError> {
        let d = self
            .conn
            .lookup_domain_by_name(&domain_name(vm_id))
            .map_err(|_| HostError::Unknown(vm_id.into()))?;
        // Only a domain carrying our metadata for this id is ours to touch.
        match self.vm_id_of(&d) {
            Some(id) if id == vm_id => Ok(d),
            _ => Err(HostError::Unknown(vm_id.into())),
        }
    }

    fn vm_id_of(&self, d: &Domain) -> Option<String> {
        d.metadata(
            virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            0,
        )
        .ok()
        .and_then(|x| domain::vm_id_from_metadata(&x))
    }

    fn state_of(d: &Domain) -> Result<State, HostError> {
        Ok(if d.is_active().map_err(lv("state"))? {
            State::Running
        } else {
            State::Stopped
        })
    }

    /// Defines the VM (blank disk created first); it is then stopped.
    pub fn create(&self, c: &Checked) -> Result<Vm, HostError> {
        self.define(c, None)
    }

    /// Defines the VM on a disk already prepared (a restored backup, `prepared`), which is
    /// moved to the spec's disk path; that path must not exist. It is then stopped.
    pub fn create_on(&self, c: &Checked, prepared: &Path) -> Result<Vm, HostError> {
        self.define(c, Some(prepared))
    }

    fn define(&self, c: &Checked, prepared: Option<&Path>) -> Result<Vm, HostError> {
        let name = c.domain_name();
        if self.conn.lookup_domain_by_name(&name).is_ok() {
            return Err(HostError::Exists(c.spec.vm_id.clone()));
        }
        let xml = match &self.iso {
            Isolation::Snp(sev) => domain::domain_xml(c, *sev),
            Isolation::Simulated { kvm, run_dir, .. } => domain::simulated_domain_xml(
                c,
                &domain::Simulated {
                    kvm: *kvm,
                    psp_socket: run_dir.join(format!("{name}.psp")),
                    console_log: run_dir.join(format!("{name}.console")),
                },
            ),
        };
        match prepared {
            None => blank_disk(&c.spec.disk.path, c.spec.disk.size_gib)?,
            Some(p) => move_disk(p, &c.spec.disk.path)?,
        }
        if let Err(e) = self.conn.define_domain_xml(&xml) {
            let _ = std::fs::remove_file(&c.spec.disk.path);
            return Err(lv("define")(e));
        }
        Ok(Vm {
            vm_id: c.spec.vm_id.clone(),
            domain: name,
            state: State::Stopped,
        })
    }

    /// Every VM of the agent's on this connection (how it re-adopts them after a restart).
    pub fn list(&self) -> Result<Vec<Vm>, HostError> {
        let mut out = Vec::new();
        for d in self.conn.list_all_domains(0).map_err(lv("list"))? {
            let Some(vm_id) = self.vm_id_of(&d) else {
                continue;
            };
            // A domain undefined between the listing and these queries (a terminate racing
            // the list) is gone, not an error.
            let name = d.name();
            let active = d.is_active();
            let (name, active) = match (name, active) {
                (Ok(n), Ok(a)) => (n, a),
                (Err(e), _) | (_, Err(e)) if e.code().is(ErrorNumber::NoDomain) => continue,
                (Err(e), _) => return Err(lv("name")(e)),
                (_, Err(e)) => return Err(lv("state")(e)),
            };
            out.push(Vm {
                domain: name,
                state: if active {
                    State::Running
                } else {
                    State::Stopped
                },
                vm_id,
            });
        }
        out.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(out)
    }

    pub fn state(&self, vm_id: &str) -> Result<State, HostError> {
        Host::state_of(&self.lookup(vm_id)?)
    }

    /// Applies `action` if the lifecycle allows it from the domain's current state.
    pub fn act(&self, vm_id: &str, action: Action) -> Result<State, HostError> {
        let d = self.lookup(vm_id)?;
        let now = Host::state_of(&d)?;
        let next = lifecycle::next(now, action)?;
        match action {
            Action::Start => self.start(vm_id, &d)?,
            Action::Reboot => d.reboot(0).map_err(lv("reboot"))?,
            Action::Stop => self.stop(&d)?,
            Action::Terminate => self.terminate(&d, now)?,
        }
        Ok(next)
    }

    /// Starts the domain; on a simulated host its PSP first measures what the domain's
    /// definition launches (the files as they are now) and listens for it.
    fn start(&self, vm_id: &str, d: &Domain) -> Result<(), HostError> {
        let Isolation::Simulated {
            psp,
            run_dir,
            emulator,
            ..
        } = &self.iso
        else {
            return d.create().map(|_| ()).map_err(lv("start"));
        };
        let xml = d.xml_desc(0).map_err(lv("dumpxml"))?;
        let refused = |why: String| HostError::Libvirt {
            op: "simulated launch",
            why,
        };
        let launch = domain::simulated_launch(&xml).map_err(refused)?;
        // A definition edited behind the agent's back must not make the PSP listen (or
        // replace a socket) anywhere but this VM's own place, nor serve another VM's id, nor
        // run another QEMU.
        let socket = run_dir.join(format!("{}.psp", domain_name(vm_id)));
        if launch.vm_id != vm_id || launch.psp_socket != socket {
            return Err(refused(format!(
                "the definition names VM {} and PSP socket {}; VM {vm_id}'s are {}",
                launch.vm_id,
                launch.psp_socket.display(),
                socket.display()
            )));
        }
        if launch.emulator.as_ref() != Some(emulator) {
            return Err(refused(format!(
                "the definition runs {}, not the driver's {}",
                launch
                    .emulator
                    .as_deref()
                    .unwrap_or(Path::new("no emulator"))
                    .display(),
                emulator.display()
            )));
        }
        psp.launch(&launch).map_err(|why| HostError::Libvirt {
            op: "simulated PSP",
            why,
        })?;
        // Started paused: no guest code runs until the running definition is known to be the
        // one measured (one swapped between the read and the start is destroyed unrun).
        d.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)
            .map_err(|e| {
                psp.stop(&launch.vm_id);
                lv("start")(e)
            })?;
        let running = d
            .xml_desc(0)
            .map_err(lv("dumpxml"))
            .and_then(|x| domain::simulated_launch(&x).map_err(refused));
        let resumed = match running {
            Ok(r) if r == launch => d.resume().map_err(lv("resume")),
            Ok(_) => Err(refused(
                "the running domain is not the definition that was measured".into(),
            )),
            Err(e) => Err(e),
        };
        if let Err(e) = resumed {
            psp.stop(&launch.vm_id);
            if let Err(d_err) = d.destroy() {
                tracing::error!(vm_id, error = %d_err, "could not destroy a domain that must not run");
            }
            return Err(e);
        }
        Ok(())
    }

    fn stop(&self, d: &Domain) -> Result<(), HostError> {
        d.shutdown().map_err(lv("shutdown"))?;
        let t = Instant::now();
        while d.is_active().map_err(lv("state"))? {
            if t.elapsed() >= self.stop_grace {
                return d.destroy().map_err(lv("destroy"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Destroy, undefine, wipe the disk. The caller has checked the operator's terminate order
    /// and relays it to the broker, which shreds the key.
    fn terminate(&self, d: &Domain, now: State) -> Result<(), HostError> {
        let xml = d.xml_desc(0).map_err(lv("dumpxml"))?;
        let vm_id = self.vm_id_of(d);
        if now == State::Running {
            d.destroy().map_err(lv("destroy"))?;
        }
        d.undefine().map_err(lv("undefine"))?;
        if let Isolation::Simulated { psp, run_dir, .. } = &self.iso
            && let Some(id) = vm_id
        {
            psp.stop(&id);
            let _ = std::fs::remove_file(run_dir.join(format!("{}.console", domain_name(&id))));
        }
        if let Some(disk) = disk_path(&xml) {
            wipe(&disk)?;
        }
        Ok(())
    }
}

/// The file of the domain's first disk.
fn disk_path(domain_xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().name() == "disk" && n.attribute("device") == Some("disk"))?
        .children()
        .find(|n| n.tag_name().name() == "source")?
        .attribute("file")
        .map(PathBuf::from)
}

/// A blank raw image of `gib` GiB by `qemu-img create` (sparse), mode 0600; refuses to reuse
/// an existing file (it may hold another VM's data).
fn blank_disk(path: &Path, gib: u64) -> Result<(), HostError> {
    let err = |why: String| HostError::Disk {
        path: path.into(),
        why,
    };
    if path.exists() {
        return Err(err(
            "already exists (refusing to reuse another VM's disk)".into()
        ));
    }
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(format!("{gib}G"))
        .output()
        .map_err(|e| err(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))
}

/// Moves a prepared disk to `path` (same file system), refusing to replace anything there.
fn move_disk(from: &Path, path: &Path) -> Result<(), HostError> {
    let err = |why: String| HostError::Disk {
        path: path.into(),
        why,
    };
    // A hard link fails if `path` exists, where a rename would replace it.
    std::fs::hard_link(from, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            err("already exists (refusing to reuse another VM's disk)".into())
        } else {
            err(format!("from {}: {e}", from.display()))
        }
    })?;
    std::fs::remove_file(from).map_err(|e| err(format!("{}: {e}", from.display())))
}

/// Overwrites the LUKS2 header area with zeros, syncs, removes the file.
fn wipe(path: &Path) -> Result<(), HostError> {
    use std::io::{Seek, Write};
    let err = |why: String| HostError::Disk {
        path: path.into(),
        why,
    };
    let mut f = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e.to_string())),
    };
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let zeros = vec![0u8; 1 << 20];
    let mut left = len.min(WIPE_BYTES);
    f.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| err(e.to_string()))?;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(|e| err(e.to_string()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| err(e.to_string()))?;
    std::fs::remove_file(path).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Terminate's wipe zeroes the LUKS2 header area (both header copies and the keyslots live
    /// in the first 16 MiB) before the file goes; a hard link keeps the inode to look at.
    #[test]
    fn wipe_zeroes_the_header_area_then_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("vm.img");
        let keep = dir.path().join("inode");
        let len = WIPE_BYTES as usize + 4096;
        std::fs::write(&disk, vec![0xa5u8; len]).unwrap();
        std::fs::hard_link(&disk, &keep).unwrap();
        wipe(&disk).unwrap();
        assert!(!disk.exists());
        let left = std::fs::read(&keep).unwrap();
        assert_eq!(left.len(), len);
        assert!(left[..WIPE_BYTES as usize].iter().all(|b| *b == 0));
        assert!(left[WIPE_BYTES as usize..].iter().all(|b| *b == 0xa5));
        // Already gone: nothing to do, not an error.
        wipe(&disk).unwrap();
    }
}
