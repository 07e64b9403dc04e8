//! The simulated PSP of a host without SEV-SNP (`[snp] mode = "simulated"`): for each domain
//! it starts, it measures what the domain's definition launches — firmware, kernel, initrd,
//! command line, vCPUs, with the same [`measure`] code the image builder and the launch gate
//! use — and answers the guest's report requests over the domain's virtio-serial channel,
//! signing with this host's simulated chip. A host that swaps the initrd or edits the command
//! line gets another measurement, and the broker denies it.
//!
//! Debian's OVMF has no SEV hashes table: such a firmware is measured as if it had edk2
//! AmdSev's ([`measure::Firmware::AssumeHashesTable`]). Compiled only with the `simulator`
//! feature; a production attesta-host has no simulated chip to sign with.

use crate::config::PlatformConfig;
use crate::domain::SimulatedLaunch;
use crate::host::SimulatedPsp;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// This host's simulated chip and the PSP servers of its running launches.
pub struct SimPsp {
    pki: Arc<Pki>,
    chip: ChipConfig,
    servers: Mutex<HashMap<String, simulator::psp::Server>>,
}

impl SimPsp {
    /// The chip `[platform] kind = "simulator"` names (the one the agent reports).
    pub fn new(platform: &PlatformConfig) -> Result<SimPsp, String> {
        let PlatformConfig::Simulator {
            seed,
            product,
            chip,
            state_dir,
        } = platform
        else {
            return Err("the simulated PSP needs [platform] kind = \"simulator\"".into());
        };
        let product = product
            .parse()
            .map_err(|e| format!("platform.product: {e}"))?;
        let (pki, chip) =
            ChipConfig::typical_cached(product, seed, *chip, state_dir.as_deref(), |_| {})?;
        Ok(SimPsp {
            pki,
            chip,
            servers: Mutex::new(HashMap::new()),
        })
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<String, simulator::psp::Server>> {
        // A panic elsewhere cannot leave the map half-updated: use it as it is.
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SimulatedPsp for SimPsp {
    fn launch(&self, l: &SimulatedLaunch) -> Result<[u8; 48], String> {
        // The earlier launch's server goes first: its socket is this one's.
        self.servers().remove(&l.vm_id);
        // Files that read the same for the agent and for QEMU: regular files, not a FIFO or a
        // reader-dependent /proc or /dev path that could hand each of them other bytes.
        for f in [Some(&l.firmware), l.kernel.as_ref(), l.initrd.as_ref()]
            .into_iter()
            .flatten()
        {
            let regular = std::fs::metadata(f).is_ok_and(|m| m.is_file());
            if !regular || f.starts_with("/proc") || f.starts_with("/dev") {
                return Err(format!("{}: not a regular file", f.display()));
            }
        }
        let measurement = measure::digest_of_files_with(
            &measure::LaunchFiles {
                ovmf: &l.firmware,
                kernel: l.kernel.as_deref(),
                initrd: l.initrd.as_deref(),
                append: l.cmdline.as_deref(),
                vcpus: l.vcpus,
                vcpu_type: &l.vcpu_type,
                guest_features: l.guest_features,
            },
            measure::Firmware::AssumeHashesTable,
        )?;
        let chip = Chip::new(self.pki.clone(), self.chip.clone()).map_err(|e| e.to_string())?;
        let launch = GuestLaunch {
            measurement,
            policy: l.policy,
            host_data: l.host_data,
            ..Default::default()
        };
        let server = simulator::psp::Server::start(chip, launch, &l.psp_socket)?;
        self.servers().insert(l.vm_id.clone(), server);
        tracing::info!(vm_id = %l.vm_id, measurement = %hex::encode(measurement), "simulated PSP measured the launch");
        Ok(measurement)
    }

    fn stop(&self, vm_id: &str) {
        self.servers().remove(vm_id);
    }
}
