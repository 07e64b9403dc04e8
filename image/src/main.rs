//! `attesta-image`: builds a measured, reproducible guest image. See the crate docs.
#![forbid(unsafe_code)]

use attesta_image::build::{Inputs, Launch, build};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "attesta-image",
    version,
    about = "Build a measured, reproducible Attesta guest image (kernel, initramfs with attesta-guest, command line, manifest)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an image into --out: vmlinuz, initrd.img, cmdline, manifest.json. The same inputs
    /// give byte-identical outputs.
    Build(BuildArgs),
}

#[derive(Args)]
struct BuildArgs {
    /// The kernel (bzImage), e.g. boot/vmlinuz-* of an unpacked linux-image-*-cloud-amd64.
    #[arg(long, value_name = "VMLINUZ")]
    kernel: PathBuf,
    /// That kernel's module folder, lib/modules/<version>.
    #[arg(long, value_name = "DIR")]
    modules: PathBuf,
    /// The agent's configuration (guest.toml), baked in as /etc/attesta/guest.toml.
    #[arg(long, value_name = "FILE")]
    guest_config: PathBuf,
    /// The CA of the broker's TLS certificate, placed where guest.toml's broker.ca says.
    #[arg(long, value_name = "PEM")]
    broker_ca: PathBuf,
    /// More kernel command line (after "console=ttyS0 panic=-1 net.ifnames=0").
    #[arg(long, value_name = "STR")]
    append: Option<String>,
    /// Where the image goes (created if needed).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The attesta-guest binary to embed (default: the one beside this program, else
    /// /usr/bin/attesta-guest).
    #[arg(long, value_name = "FILE")]
    agent: Option<PathBuf>,
    /// A statically linked busybox for /init.
    #[arg(long, value_name = "FILE", default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// The OVMF the VM launches with: with it the manifest carries the launch measurement.
    #[arg(long, value_name = "F", requires_all = ["vcpus", "vcpu_type"])]
    ovmf: Option<PathBuf>,
    /// vCPUs of the VM (for the measurement).
    #[arg(long, value_name = "N", requires = "ovmf")]
    vcpus: Option<u32>,
    /// vCPU type of the VM, e.g. EPYC-Milan (for the measurement).
    #[arg(long, value_name = "T", requires = "ovmf")]
    vcpu_type: Option<String>,
    /// SEV_FEATURES of the VMSAs, hex (for the measurement).
    #[arg(long, value_name = "HEX", default_value = "0x1")]
    guest_features: String,
    /// Accept a guest.toml whose [device] is one of the simulator's (tests and demos only; the
    /// manifest's `device` says which). Such an image is measured as the simulated PSP does:
    /// an --ovmf without a kernel hashes table (Debian's) as if it had edk2 AmdSev's.
    #[arg(long)]
    allow_simulator: bool,
}

fn default_agent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("attesta-guest")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/attesta-guest"))
}

fn main() -> ExitCode {
    let Cli { cmd: Cmd::Build(a) } = Cli::parse();
    let launch = match (&a.ovmf, a.vcpus, &a.vcpu_type) {
        (Some(ovmf), Some(vcpus), Some(t)) => {
            match measure::parse_guest_features(&a.guest_features) {
                Ok(guest_features) => Some(Launch {
                    ovmf: ovmf.clone(),
                    vcpus,
                    vcpu_type: t.clone(),
                    guest_features,
                }),
                Err(e) => {
                    eprintln!("attesta-image build: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    let inputs = Inputs {
        kernel: a.kernel,
        modules: a.modules,
        guest_config: a.guest_config,
        broker_ca: a.broker_ca,
        append: a.append,
        agent: a.agent.unwrap_or_else(default_agent),
        busybox: a.busybox,
        launch,
        allow_simulator: a.allow_simulator,
    };
    let progress = |s: &str| eprintln!("attesta-image: {s}");
    match build(&inputs, &a.out, &progress) {
        Ok(b) => {
            eprintln!(
                "attesta-image: wrote {} ({} files in the initramfs)",
                a.out.display(),
                b.initrd_files
            );
            if let Some(m) = b.manifest.get("measurement").and_then(|m| m.as_str()) {
                println!("{m}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-image build: {e}");
            ExitCode::from(1)
        }
    }
}
