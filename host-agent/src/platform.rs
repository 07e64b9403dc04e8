//! This host's chip id and TCB, for the operator's placement: an order names the chip ids its
//! VM may run on, and its policy the minimum TCB, so the operator needs both before writing one.
//! Read from `/dev/sev` (SNP_PLATFORM_STATUS, GET_ID) or from a simulated chip.

use crate::config::PlatformConfig;
use snp::{Product, Tcb};

/// What the operator needs to place VMs on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub product: Product,
    /// 64 bytes (Turin: the first 8 significant, the rest zero).
    pub chip_id: Vec<u8>,
    /// The TCB the VCEK is issued for (REPORTED_TCB): what reports of guests here carry.
    pub reported_tcb: Tcb,
    /// The TCB installed now.
    pub current_tcb: Tcb,
    /// `sev` or `simulator`.
    pub source: &'static str,
}

impl Platform {
    /// As JSON for `attesta-host platform --json` and the control socket.
    pub fn to_json(&self) -> serde_json::Value {
        let tcb = |t: &Tcb| {
            serde_json::json!({
                "fmc": t.fmc, "bootloader": t.bootloader, "tee": t.tee, "snp": t.snp,
                "microcode": t.microcode, "raw": format!("{:016x}", t.encode(self.product)),
            })
        };
        serde_json::json!({
            "product": self.product.to_string(),
            "chip_id": hex::encode(&self.chip_id),
            "reported_tcb": tcb(&self.reported_tcb),
            "current_tcb": tcb(&self.current_tcb),
            "source": self.source,
        })
    }
}

/// Reads the platform as configured.
pub fn read(c: &PlatformConfig) -> Result<Platform, String> {
    match c {
        PlatformConfig::Sev => read_sev(),
        PlatformConfig::Simulator {
            seed,
            product,
            chip,
            state_dir,
        } => {
            let product: Product = product
                .parse()
                .map_err(|e| format!("platform.product: {e}"))?;
            simulated(product, seed, *chip, state_dir.as_deref())
        }
    }
}

#[cfg(feature = "simulator")]
fn simulated(
    product: Product,
    seed: &str,
    chip: u64,
    state_dir: Option<&std::path::Path>,
) -> Result<Platform, String> {
    let (_, cfg) = simulator::ChipConfig::typical_cached(product, seed, chip, state_dir, |_| {})
        .map_err(|e| format!("simulated platform: {e}"))?;
    Ok(Platform {
        product,
        chip_id: cfg.chip_id.to_vec(),
        reported_tcb: cfg.reported_tcb.unwrap_or(cfg.current_tcb),
        current_tcb: cfg.current_tcb,
        source: "simulator",
    })
}

/// A production build has no simulated chip to read.
#[cfg(not(feature = "simulator"))]
fn simulated(_: Product, _: &str, _: u64, _: Option<&std::path::Path>) -> Result<Platform, String> {
    Err("[platform] kind = \"simulator\": this attesta-host was built without the simulator feature, so it never reads a simulated chip (build with --features simulator for a test fleet)".into())
}

fn read_sev() -> Result<Platform, String> {
    let mut fw = sev::firmware::host::Firmware::open().map_err(|e| {
        format!(
            "/dev/sev: {e} (is this an SEV-SNP host with the ccp driver loaded, and are we root?)"
        )
    })?;
    let status = fw
        .snp_platform_status()
        .map_err(|e| format!("SNP_PLATFORM_STATUS: {e}"))?;
    let id = fw.get_identifier().map_err(|e| format!("GET_ID: {e}"))?;
    let generation = sev::Generation::identify_host_generation()
        .map_err(|e| format!("cannot identify the processor: {e}"))?;
    let product = match generation {
        sev::Generation::Milan => Product::Milan,
        sev::Generation::Genoa => Product::Genoa,
        sev::Generation::Turin => Product::Turin,
        #[allow(unreachable_patterns)]
        _ => return Err("this processor generation does not run SEV-SNP guests we verify".into()),
    };
    let tcb = |t: sev::firmware::host::TcbVersion| Tcb {
        fmc: t.fmc,
        bootloader: t.bootloader,
        tee: t.tee,
        snp: t.snp,
        microcode: t.microcode,
    };
    Ok(Platform {
        product,
        chip_id: id.0.clone(),
        reported_tcb: tcb(status.reported_tcb_version),
        current_tcb: tcb(status.platform_tcb_version),
        source: "sev",
    })
}
