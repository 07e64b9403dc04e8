//! `attesta-image build`: gathers the inputs, assembles the initramfs ([`crate::cpio`]) and
//! writes the image folder with its manifest. Every input is named on the command line (the
//! agent and busybox default to fixed paths), and nothing of the build host (time, host name,
//! user, file order) reaches the output, so the same inputs always give the same bytes.

use crate::cpio::{Archive, CpioError};
use crate::modules::{self, ModuleError};
use guest_agent::config::GuestConfig;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The kernel command line every image starts with; `--append` adds to it.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 net.ifnames=0";

/// What to build from.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub kernel: PathBuf,
    /// The kernel's module folder, `lib/modules/<version>`.
    pub modules: PathBuf,
    pub guest_config: PathBuf,
    pub broker_ca: PathBuf,
    pub append: Option<String>,
    /// The `attesta-guest` binary to embed.
    pub agent: PathBuf,
    /// A statically linked busybox (Debian's busybox-static).
    pub busybox: PathBuf,
    /// With these, the manifest carries the SNP launch measurement.
    pub launch: Option<Launch>,
    /// Accept a guest.toml whose `[device]` is not the real `/dev/sev-guest` (the simulator's
    /// devices: tests and demos only). The manifest names the device either way.
    pub allow_simulator: bool,
}

/// The VM shape the measurement is for.
#[derive(Clone, Debug)]
pub struct Launch {
    pub ovmf: PathBuf,
    pub vcpus: u32,
    pub vcpu_type: String,
    pub guest_features: u64,
}

/// Why an image cannot be built. Each says which input was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {what} {path}: {why}")]
    Read {
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("cannot write {path}: {why}")]
    Write { path: String, why: String },
    #[error("--guest-config {path}: {why}")]
    GuestConfig { path: String, why: String },
    #[error("--broker-ca {0}: no PEM certificate in it")]
    BrokerCa(String),
    #[error("--kernel {path}: {why}")]
    Kernel { path: String, why: String },
    #[error("--modules {path}: {why}")]
    Modules { path: String, why: String },
    #[error("{0}")]
    Module(#[from] ModuleError),
    #[error("{what} {path}: {why}")]
    Tool {
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("initramfs: {0}")]
    Cpio(#[from] CpioError),
    #[error("measurement: {0}")]
    Measure(String),
    #[error(
        "--guest-config {0}: [device] kind = {1:?} is a simulated device (tests and demos only): pass --allow-simulator to build such an image"
    )]
    SimulatedDevice(String, &'static str),
}

fn read(what: &'static str, p: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(p).map_err(|e| ImageError::Read {
        what,
        path: p.display().to_string(),
        why: e.to_string(),
    })
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The version string a bzImage carries (`kernel_version` in its setup header), e.g.
/// `6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP …`.
pub fn bzimage_version(k: &[u8]) -> Option<String> {
    if k.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes(k.get(0x20e..0x210)?.try_into().ok()?) as usize + 0x200;
    let rest = k.get(off..)?;
    let end = rest.iter().take(512).position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// The shared libraries `ldd` lists for `bin` (absolute paths; the dynamic loader included);
/// empty for a static binary.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let tool = |why: String| ImageError::Tool {
        what: "ldd",
        path: bin.display().to_string(),
        why,
    };
    let out = std::process::Command::new("ldd")
        .arg(bin)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| tool(format!("cannot run ldd: {e}")))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(tool(text.trim().to_string()));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(tool(format!("a library is missing: {line}")));
        }
        // "libx.so.1 => /lib/…/libx.so.1 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
        // "linux-vdso.so.1 (0x…)" (in the kernel, nothing to copy).
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split(" (").next().unwrap_or(""),
            None => line.split(" (").next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// The `--version` line of the agent: `attesta-guest X.Y.Z` → `X.Y.Z`.
fn agent_version(agent: &Path) -> Result<String, ImageError> {
    let out = std::process::Command::new(agent)
        .arg("--version")
        .output()
        .map_err(|e| ImageError::Tool {
            what: "--agent",
            path: agent.display().to_string(),
            why: format!("cannot run it: {e}"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().strip_prefix("attesta-guest ") {
        Some(v) if out.status.success() => Ok(v.to_string()),
        _ => Err(ImageError::Tool {
            what: "--agent",
            path: agent.display().to_string(),
            why: format!("not attesta-guest (it says {:?})", text.trim()),
        }),
    }
}

/// The guest configuration, checked as the agent will read it; its paths are guest paths,
/// so they must be absolute.
fn guest_config(path: &Path, text: &str) -> Result<GuestConfig, ImageError> {
    let bad = |why: String| ImageError::GuestConfig {
        path: path.display().to_string(),
        why,
    };
    let c: GuestConfig = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    c.response_key().map_err(bad)?;
    for (key, p) in [
        ("broker.ca", &c.broker.ca),
        ("disk.path", &c.disk.path),
        ("boot_config.path", &c.boot_config.path),
    ] {
        if !p.is_absolute() {
            return Err(bad(format!(
                "{key} = {:?}: paths are the guest's, so they must be absolute",
                p.display()
            )));
        }
    }
    Ok(c)
}

/// Every `.ko` under `dir`, by module name → path relative to `dir`. Symbolic links are not
/// followed (`build`, `source`), and a name found twice is an error: which one the image
/// holds must not depend on the order a file system lists them in.
fn module_index(dir: &Path) -> Result<BTreeMap<String, String>, ImageError> {
    let bad = |p: &Path, why: String| ImageError::Modules {
        path: p.display().to_string(),
        why,
    };
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| bad(&d, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&d, e.to_string()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let kind = e.file_type().map_err(|x| bad(&p, x.to_string()))?;
            if kind.is_dir() {
                stack.push(p);
            } else if kind.is_file()
                && let Ok(rel) = p.strip_prefix(dir)
            {
                let rel = rel.to_string_lossy().replace('\\', "/");
                if let Some(name) = modules::name_of(&rel)
                    && let Some(other) = index.insert(name.clone(), rel.clone())
                {
                    return Err(bad(
                        dir,
                        format!("module {name} is there twice: {other} and {rel}"),
                    ));
                }
            }
        }
    }
    Ok(index)
}

/// What a build wrote.
pub struct Built {
    pub manifest: serde_json::Value,
    pub initrd_files: usize,
}

/// Builds the image into `out` (created if needed): `vmlinuz`, `initrd.img`, `cmdline`,
/// `manifest.json`. `progress` hears about each step.
pub fn build(i: &Inputs, out: &Path, progress: &dyn Fn(&str)) -> Result<Built, ImageError> {
    let kernel = read("--kernel", &i.kernel)?;
    let version = bzimage_version(&kernel).ok_or_else(|| ImageError::Kernel {
        path: i.kernel.display().to_string(),
        why: "not a bzImage (no setup header with a version)".into(),
    })?;
    let kver = version.split_whitespace().next().unwrap_or("").to_string();
    let mdir_name = i
        .modules
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if mdir_name != kver {
        return Err(ImageError::Modules {
            path: i.modules.display().to_string(),
            why: format!(
                "is for kernel {mdir_name:?}, but --kernel is {kver:?} (pass its lib/modules/{kver})"
            ),
        });
    }

    let text = String::from_utf8(read("--guest-config", &i.guest_config)?).map_err(|_| {
        ImageError::GuestConfig {
            path: i.guest_config.display().to_string(),
            why: "not UTF-8".into(),
        }
    })?;
    let cfg = guest_config(&i.guest_config, &text)?;
    let device = match &cfg.device {
        guest_agent::config::DeviceConfig::SevGuest => "sev-guest",
        guest_agent::config::DeviceConfig::Simulator { .. } => "simulator",
        guest_agent::config::DeviceConfig::VirtioPsp { .. } => "virtio-psp",
    };
    if device != "sev-guest" && !i.allow_simulator {
        return Err(ImageError::SimulatedDevice(
            i.guest_config.display().to_string(),
            device,
        ));
    }
    let ca = read("--broker-ca", &i.broker_ca)?;
    if !String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ImageError::BrokerCa(i.broker_ca.display().to_string()));
    }

    let mut a = Archive::new();
    progress("adding the agent and its libraries");
    let version_of_agent = agent_version(&i.agent)?;
    let agent = read("--agent", &i.agent)?;
    let mut binaries: BTreeMap<String, String> = BTreeMap::new();
    binaries.insert("/usr/bin/attesta-guest".into(), sha256_hex(&agent));
    a.file("usr/bin/attesta-guest", agent, true)?;
    for lib in shared_libraries(&i.agent)? {
        let data = read("a library of the agent", &lib)?;
        binaries.insert(lib.to_string_lossy().into_owned(), sha256_hex(&data));
        a.file(&lib.to_string_lossy(), data, true)?;
    }
    if !shared_libraries(&i.busybox)?.is_empty() {
        return Err(ImageError::Tool {
            what: "--busybox",
            path: i.busybox.display().to_string(),
            why: "is dynamically linked; a static busybox is needed (Debian: busybox-static)"
                .into(),
        });
    }
    let busybox = read("--busybox", &i.busybox)?;
    binaries.insert("/bin/busybox".into(), sha256_hex(&busybox));
    a.file("bin/busybox", busybox, true)?;
    a.file("init", include_bytes!("init.sh").to_vec(), true)?;
    a.file(
        "etc/attesta/root-init",
        include_bytes!("root-init.sh").to_vec(),
        true,
    )?;
    a.file("etc/attesta/guest.toml", text.into_bytes(), false)?;
    a.file(
        "etc/attesta/name",
        cfg.disk.name.clone().into_bytes(),
        false,
    )?;
    a.file(&cfg.broker.ca.to_string_lossy(), ca, false)?;

    progress("resolving kernel modules");
    let index = module_index(&i.modules)?;
    let builtin = match std::fs::read_to_string(i.modules.join("modules.builtin")) {
        Ok(t) => modules::builtin(&t),
        Err(_) => Default::default(),
    };
    let order = modules::load_order(modules::NEEDED, &index, &builtin, |rel| {
        let data = std::fs::read(i.modules.join(rel)).map_err(|e| ModuleError::Unreadable {
            path: rel.to_string(),
            why: e.to_string(),
        })?;
        modules::depends(rel, &data)
    })?;
    let mut list = String::new();
    for rel in &order {
        a.file(
            &format!("lib/modules/{kver}/{rel}"),
            read("a module", &i.modules.join(rel))?,
            false,
        )?;
        list.push_str(&format!("{kver}/{rel}\n"));
    }
    a.file("etc/attesta/modules", list.into_bytes(), false)?;

    progress("writing the image");
    let initrd = a.to_bytes();
    let cmdline = match i.append.as_deref().map(str::trim) {
        Some(x) if !x.is_empty() => format!("{BASE_CMDLINE} {x}"),
        _ => BASE_CMDLINE.to_string(),
    };
    let measurement = match &i.launch {
        None => None,
        Some(l) => {
            progress("computing the launch measurement");
            let ovmf = read("--ovmf", &l.ovmf)?;
            let spec = measure::LaunchSpec {
                ovmf: &ovmf,
                kernel: Some(&kernel),
                initrd: Some(&initrd),
                cmdline: Some(&cmdline),
                vcpus: l.vcpus,
                vcpu_sig: measure::vcpu_sig(&l.vcpu_type)
                    .map_err(|e| ImageError::Measure(format!("--vcpu-type: {e}")))?,
                guest_features: l.guest_features,
            };
            // A simulation image may be measured with a firmware that has no hashes table
            // (Debian's OVMF under TCG), as the simulated PSP measures it.
            let fw = if device != "sev-guest" {
                measure::Firmware::AssumeHashesTable
            } else {
                measure::Firmware::AsBuilt
            };
            let d = measure::launch_digest_with(&spec, fw)
                .map_err(|e| ImageError::Measure(format!("{}: {e}", l.ovmf.display())))?;
            Some((l, hex::encode(d), sha256_hex(&ovmf)))
        }
    };

    let files: BTreeMap<&str, String> = [
        ("vmlinuz", sha256_hex(&kernel)),
        ("initrd.img", sha256_hex(&initrd)),
        ("cmdline", sha256_hex(cmdline.as_bytes())),
    ]
    .into_iter()
    .collect();
    let mut manifest = serde_json::json!({
        "format": 1,
        "attesta_guest_version": version_of_agent,
        "kernel_version": kver,
        "vm_id": cfg.vm_id,
        "device": device,
        "sha256": files,
        "binaries": binaries,
        "cmdline": cmdline,
        "modules": order,
    });
    if let Some((l, m, ovmf_sha)) = measurement {
        manifest["measurement"] = m.into();
        manifest["launch"] = serde_json::json!({
            "ovmf_sha256": ovmf_sha,
            "vcpus": l.vcpus,
            "vcpu_type": l.vcpu_type,
            "guest_features": format!("0x{:x}", l.guest_features),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| ImageError::Write {
        path: out.display().to_string(),
        why: e.to_string(),
    })?;
    let mut body = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    body.push('\n');
    for (name, data) in [
        ("vmlinuz", kernel.as_slice()),
        ("initrd.img", initrd.as_slice()),
        ("cmdline", cmdline.as_bytes()),
        ("manifest.json", body.as_bytes()),
    ] {
        let p = out.join(name);
        write_atomic(&p, data)?;
    }
    Ok(Built {
        manifest,
        initrd_files: a.paths().count(),
    })
}

/// Writes `data` to `p` through a temporary file and a rename, so a reader never sees half.
fn write_atomic(p: &Path, data: &[u8]) -> Result<(), ImageError> {
    let err = |e: std::io::Error| ImageError::Write {
        path: p.display().to_string(),
        why: e.to_string(),
    };
    let tmp = p.with_extension("partial");
    std::fs::write(&tmp, data).map_err(err)?;
    std::fs::rename(&tmp, p).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bzimage_version_is_read_from_the_setup_header() {
        let mut k = vec![0u8; 0x600];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let v = b"6.1.0-57-cloud-amd64 (debian) #1 SMP\0";
        k[0x300..0x300 + v.len()].copy_from_slice(v);
        assert_eq!(
            bzimage_version(&k).as_deref(),
            Some("6.1.0-57-cloud-amd64 (debian) #1 SMP")
        );
        assert_eq!(bzimage_version(&k[..0x250]), None);
        k[0x202] = b'X';
        assert_eq!(bzimage_version(&k), None);
    }

    #[test]
    fn guest_paths_must_be_absolute() {
        let base =
            "vm_id = \"vm-1\"\n[broker]\naddress = \"10.0.2.2:7443\"\nserver_name = \"kbs\"\n\
                    response_key = \""
                .to_string()
                + &"ab".repeat(32)
                + "\"\n";
        let ok = base.clone() + "ca = \"/etc/attesta/kbs-ca.crt\"\n[disk]\npath = \"/dev/vda\"\n";
        assert!(guest_config(Path::new("g.toml"), &ok).is_ok());
        let rel = base.clone() + "ca = \"kbs-ca.crt\"\n[disk]\npath = \"/dev/vda\"\n";
        let e = guest_config(Path::new("g.toml"), &rel).unwrap_err();
        assert!(e.to_string().contains("broker.ca"), "{e}");
        let typo = ok.clone() + "formatt_if_blank = true\n";
        assert!(guest_config(Path::new("g.toml"), &typo).is_err());
    }
}
