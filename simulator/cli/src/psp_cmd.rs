//! `attesta-sim psp`: a simulated PSP for one real VM, reached by the guest over a
//! virtio-serial port (QEMU `-chardev socket,path=SOCK -device virtserialport,name=
//! org.attesta.psp.0,chardev=…`, libvirt `<channel type='unix'>`). At start it measures the
//! files the VM is launched with — firmware, kernel, initrd, command line, vCPUs — with the
//! same code the host agent and the image builder use, so a host that swaps the initrd or
//! edits the command line gets a different measurement, and the broker denies it. The firmware
//! measured is `--ovmf` (the OVMF the VM would launch with on SNP hardware; under TCG, QEMU
//! may boot its default firmware instead, and no firmware here checks the kernel hashes).

use clap::Args;
use simulator::psp::{self, PORT_NAME};
use simulator::{Chip, ChipConfig, GuestLaunch};
use snp::Product;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

#[derive(Args)]
pub struct PspArgs {
    /// The Unix socket to listen on (QEMU connects to it).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The firmware measured (an OVMF carrying SEV metadata and the hashes table).
    #[arg(long, value_name = "FILE")]
    ovmf: PathBuf,
    /// The kernel the VM is launched with.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// The initrd the VM is launched with.
    #[arg(long, value_name = "FILE")]
    initrd: PathBuf,
    /// The kernel command line the VM is launched with.
    #[arg(long, value_name = "STR")]
    append: String,
    /// vCPUs of the VM.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// vCPU type of the VM.
    #[arg(long, value_name = "TYPE", default_value = "EPYC-Milan")]
    vcpu_type: String,
    /// Guest policy, hex.
    #[arg(long, value_name = "HEX", default_value = "0x30000")]
    policy: String,
    /// Processor generation of the simulated chip.
    #[arg(long, default_value = "milan")]
    product: Product,
    /// Which chip of the simulated fleet (as `attesta-sim` numbers them).
    #[arg(long, default_value_t = 0)]
    chip: u64,
    /// Seed of the simulated key hierarchy.
    #[arg(long, default_value = "attesta-sim")]
    seed: String,
    /// Where generated key hierarchies are kept between runs (see `report --help`).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

pub fn run(a: &PspArgs) -> Result<bool, String> {
    let measurement = measure::digest_of_files(&measure::LaunchFiles {
        ovmf: &a.ovmf,
        kernel: Some(&a.kernel),
        initrd: Some(&a.initrd),
        append: Some(&a.append),
        vcpus: a.vcpus,
        vcpu_type: &a.vcpu_type,
        guest_features: 1,
    })?;
    let policy = u64::from_str_radix(a.policy.trim().trim_start_matches("0x"), 16)
        .map_err(|e| format!("--policy {:?}: {e}", a.policy))?;
    let (pki, config) =
        ChipConfig::typical_cached(a.product, &a.seed, a.chip, a.state.as_deref(), |n| {
            eprintln!("attesta-sim psp: {n}")
        })?;
    let chip = Chip::new(pki, config).map_err(|e| e.to_string())?;
    let guest = chip.launch(GuestLaunch {
        measurement,
        policy,
        ..Default::default()
    });
    let _ = std::fs::remove_file(&a.socket);
    let listener = UnixListener::bind(&a.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", a.socket.display()))?;
    // The measurement on stdout (the last line, as `measure` prints it); the rest on stderr.
    println!("{}", hex::encode(measurement));
    eprintln!(
        "attesta-sim psp: serving {PORT_NAME} on {} for a guest measured {}",
        a.socket.display(),
        hex::encode(measurement)
    );
    for conn in listener.incoming() {
        let mut conn = conn.map_err(|e| format!("accept: {e}"))?;
        match psp::serve(&guest, &mut conn) {
            Ok(n) => eprintln!("attesta-sim psp: the VM disconnected after {n} requests"),
            Err(e) => eprintln!("attesta-sim psp: channel ended: {e}"),
        }
    }
    Ok(true)
}
