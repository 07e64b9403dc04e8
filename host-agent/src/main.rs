//! `attesta-host`: the miner's host agent.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use host_agent::domain::{SevParams, domain_xml};
use host_agent::spec::VmSpec;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "attesta-host",
    version,
    about = "Provision SEV-SNP VMs with libvirt for Attesta"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// VM specs and their libvirt domains.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Compute the SEV-SNP launch measurement of the artifacts and VM shape about to be
    /// launched (the same digest as `sev-snp-measure --mode snp`); lowercase hex, last line.
    Measure(MeasureArgs),
}

#[derive(Subcommand)]
enum VmCmd {
    /// Check a VM spec and print the domain XML the agent would define for it.
    Xml(XmlArgs),
}

#[derive(Args)]
struct XmlArgs {
    /// The VM spec (TOML; see examples/vm.toml).
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// C-bit position, where it cannot be read from a driver here (default 51: Milan/Genoa/Turin).
    #[arg(long, default_value_t = 51)]
    cbitpos: u32,
    /// Physical address bits SEV takes (default 1).
    #[arg(long, default_value_t = 1)]
    reduced_phys_bits: u32,
}

#[derive(Args)]
struct MeasureArgs {
    /// The OVMF firmware image (must carry SEV metadata).
    #[arg(long, value_name = "F")]
    ovmf: PathBuf,
    /// Kernel for direct boot, measured through OVMF's SEV hashes table.
    #[arg(long, value_name = "K")]
    kernel: Option<PathBuf>,
    /// Initrd for direct boot (requires --kernel).
    #[arg(long, value_name = "I", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for direct boot (requires --kernel).
    #[arg(long, value_name = "S", requires = "kernel")]
    append: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: u32,
    /// vCPU model as QEMU names it (EPYC-Milan, EPYC-Genoa, EPYC-Turin, EPYC-v4, ...).
    #[arg(long, value_name = "T")]
    vcpu_type: String,
    /// SEV features of the VMSAs, hex (default 0x1: SNP active).
    #[arg(long, value_name = "HEX", default_value = "0x1")]
    guest_features: String,
}

fn xml(a: &XmlArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&a.spec)
        .map_err(|e| format!("cannot read {}: {e}", a.spec.display()))?;
    let c = VmSpec::parse(&text).map_err(|e| format!("{}: {e}", a.spec.display()))?;
    print!(
        "{}",
        domain_xml(
            &c,
            SevParams {
                cbitpos: a.cbitpos,
                reduced_phys_bits: a.reduced_phys_bits,
            }
        )
    );
    Ok(())
}

fn measure(a: &MeasureArgs) -> Result<(), String> {
    let d = simulator::measure::digest_of_files(&simulator::measure::LaunchFiles {
        ovmf: &a.ovmf,
        kernel: a.kernel.as_deref(),
        initrd: a.initrd.as_deref(),
        append: a.append.as_deref(),
        vcpus: a.vcpus,
        vcpu_type: &a.vcpu_type,
        guest_features: &a.guest_features,
    })?;
    println!("{}", hex::encode(d));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Vm(VmCmd::Xml(a)) => xml(a),
        Cmd::Measure(a) => measure(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attesta-host: {e}");
            ExitCode::from(2)
        }
    }
}
