//! The real-VM scene's machines: a host agent on the system libvirt with simulated SEV-SNP
//! (`[snp] mode = "simulated"`), and a real boot of one of its VMs watched through libvirt and
//! the serial console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// One boot: the console, how the domain ended, and when the agent said "unlocked".
pub(super) struct Boot {
    pub(super) console: String,
    /// libvirt's reason for the shut-off: "shutdown" (powered off) or "crashed" (pvpanic:
    /// the image's `/init` failed closed).
    pub(super) ended: String,
    pub(super) init_ms: Option<f64>,
    pub(super) unlocked_ms: Option<f64>,
    pub(super) whole_ms: f64,
}

impl Boot {
    pub(super) fn failed_closed(&self, reason: &str) -> bool {
        self.ended == "crashed"
            && self.console.contains(reason)
            && self.console.contains("attesta-init: FAILED (fail closed)")
            && !self.console.contains("ATTESTA-ROOT-UP")
    }
}

pub(super) const URI: &str = "qemu:///system";
/// Debian's OVMF (package `ovmf`): no SEV hashes table, measured as if it had one.
pub(super) const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

pub(super) fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The scene's host agent and the domains it made; dropping it removes any domain left
/// behind by a failed run (the system libvirt outlives the demo).
pub(super) struct Agent {
    pub(super) daemon: Arc<host_agent::daemon::Daemon>,
    pub(super) domains: Vec<String>,
    pub(super) run_dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
        }
    }
}

impl Agent {
    pub(super) async fn ask(&self, req: host_agent::control::ControlRequest) -> Result<(), String> {
        self.answer(req).await.map(|_| ())
    }

    pub(super) async fn answer(
        &self,
        req: host_agent::control::ControlRequest,
    ) -> Result<serde_json::Value, String> {
        let r = self.daemon.handle(req).await;
        match r.ok {
            true => Ok(r.result.unwrap_or_default()),
            false => Err(r.error.unwrap_or_default()),
        }
    }

    /// Waits for `vm`'s domain (started through the agent) to shut off, timing its console.
    pub(super) async fn boot(&self, vm: &str, start: Instant) -> Result<Boot, String> {
        let domain = host_agent::spec::domain_name(vm);
        let log = self.run_dir.join(format!("{domain}.console"));
        let ms = || start.elapsed().as_secs_f64() * 1000.0;
        let (mut init_ms, mut unlocked_ms) = (None, None);
        let ended = loop {
            let state = virsh(&["domstate", "--reason", &domain])?;
            let console = std::fs::read_to_string(&log).unwrap_or_default();
            if init_ms.is_none() && console.contains("attesta-init: ") {
                init_ms = Some(ms());
            }
            if unlocked_ms.is_none() && console.contains(" unlocked (generation ") {
                unlocked_ms = Some(ms());
            }
            if let Some(reason) = state.strip_prefix("shut off (") {
                break reason.trim_end_matches(')').to_string();
            }
            if start.elapsed().as_secs() > 600 {
                let _ = virsh(&["destroy", &domain]);
                return Err(format!("{vm}: still running after 600 s:\n{console}"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        Ok(Boot {
            console: std::fs::read_to_string(&log).unwrap_or_default(),
            ended,
            init_ms,
            unlocked_ms,
            whole_ms: ms(),
        })
    }

    pub(super) async fn start(&self, vm: &str) -> Result<Boot, String> {
        let t = Instant::now();
        self.ask(host_agent::control::ControlRequest::Start { vm_id: vm.into() })
            .await
            .map_err(|x| format!("{vm}: host agent: start: {x}"))?;
        self.boot(vm, t).await
    }
}

/// A host agent in `home` on the system libvirt, simulated SEV-SNP, its PSP signing as chip
/// `chip` of the hierarchy the broker trusts; `extra` is appended to its configuration.
pub(super) async fn host_agent(
    home: &Path,
    op_hex: &str,
    seed: &str,
    state: &Path,
    chip: u64,
    extra: &str,
) -> Result<Agent, String> {
    let config = home.join("host.toml");
    let text = format!(
        "libvirt_uri = \"{URI}\"\nstate_dir = \"state\"\ncontrol_socket = \"host.sock\"\n\
         operator_keys = [\"{op_hex}\"]\nstop_grace_secs = 5\n\
         [snp]\nmode = \"simulated\"\nrun_dir = \"run\"\n\
         [platform]\nkind = \"simulator\"\nseed = \"{seed}\"\nproduct = \"milan\"\nchip = {chip}\n\
         state_dir = \"{state}\"\n{extra}",
        state = std::path::absolute(state)
            .unwrap_or_else(|_| state.to_path_buf())
            .display(),
    );
    std::fs::write(&config, &text).map_err(|x| x.to_string())?;
    let cfg = host_agent::config::HostConfig::parse(&text, &config).map_err(|x| x.to_string())?;
    let run_dir = cfg.snp.run_dir.clone();
    let daemon = host_agent::daemon::Daemon::open(cfg, host_agent::daemon::system_clock())
        .await
        .map_err(|x| format!("host agent: {x}"))?;
    Ok(Agent {
        daemon,
        domains: Vec::new(),
        run_dir,
    })
}
