//! Many chips and VMs in one process, cheap enough to drive load tests of 10,000 VMs: chips
//! share their product's key hierarchy, and a VM is only its launch parameters and a chip index.

use crate::chip::{Chip, ChipConfig, GuestLaunch};
use crate::pki::{Pki, SimError};
use crate::seed::{Seed, hash};
use snp::Product;
use snp::device::{DeviceError, GuestDevice};
use std::sync::Arc;

/// A VM placed on a chip.
#[derive(Clone, Debug)]
pub struct Vm {
    pub chip: usize,
    pub launch: GuestLaunch,
}

/// A simulated fleet.
pub struct Fleet {
    pub pkis: Vec<Arc<Pki>>,
    pub chips: Vec<Chip>,
    pub vms: Vec<Vm>,
}

impl Fleet {
    /// `chips` chips spread over `products` (round robin), and `vms` VMs spread over the chips,
    /// all running the image `measurement`. Everything follows from `seed`.
    pub fn new(
        seed: &Seed,
        products: &[Product],
        chips: usize,
        vms: usize,
        measurement: [u8; 48],
    ) -> Result<Fleet, SimError> {
        let pkis: Vec<Arc<Pki>> = products
            .iter()
            .map(|&p| Pki::from_seed(p, *seed).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Fleet::with_pkis(pkis, chips, vms, measurement)
    }

    /// As [`new`](Self::new) with hierarchies already at hand (generating RSA-4096 keys is the
    /// slow part, so callers keep them).
    pub fn with_pkis(
        pkis: Vec<Arc<Pki>>,
        chips: usize,
        vms: usize,
        measurement: [u8; 48],
    ) -> Result<Fleet, SimError> {
        let mut out = Vec::with_capacity(chips);
        for i in 0..chips {
            let Some(pki) = pkis.get(i % pkis.len().max(1)) else {
                break;
            };
            out.push(Chip::new(pki.clone(), ChipConfig::typical(pki, i as u64))?);
        }
        let vms = (0..vms)
            .map(|i| {
                let mut launch = GuestLaunch {
                    measurement,
                    ..Default::default()
                };
                // Each VM's order is bound through HOST_DATA, as the host agent does.
                launch.host_data = hash(&[b"vm", &(i as u64).to_le_bytes()]);
                Vm {
                    chip: if out.is_empty() { 0 } else { i % out.len() },
                    launch,
                }
            })
            .collect();
        Ok(Fleet {
            pkis,
            chips: out,
            vms,
        })
    }

    /// A signed report from VM `vm` binding `report_data`.
    pub fn report(&self, vm: usize, report_data: &[u8; 64]) -> Result<Vec<u8>, DeviceError> {
        let v = self
            .vms
            .get(vm)
            .ok_or_else(|| DeviceError::Unavailable(format!("no VM {vm}")))?;
        let chip = self
            .chips
            .get(v.chip)
            .ok_or_else(|| DeviceError::Unavailable(format!("no chip {}", v.chip)))?;
        chip.launch(v.launch.clone()).get_report(report_data, 0)
    }

    /// The chip VM `vm` runs on.
    pub fn chip_of(&self, vm: usize) -> Option<&Chip> {
        self.vms.get(vm).and_then(|v| self.chips.get(v.chip))
    }
}
