//! `attesta-guest`: the in-guest agent. Runs from the initramfs before the root filesystem is
//! mounted; see `guest-agent/dist/` for the dracut module, the initramfs-tools hook and the
//! systemd unit.
#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use guest_agent::config::GuestConfig;
use guest_agent::unlock::{UnlockError, harden, run};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "attesta-guest",
    version,
    about = "Attesta's in-guest agent: attest to the key broker, receive the disk key, format or unlock LUKS2"
)]
struct Cli {
    /// Log as JSON lines (for a log collector) instead of text.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attest, receive the key, and format (first boot) or unlock the disk.
    ///
    /// Exit status: 0 unlocked; 1 refused or failed (the boot must stop); 2 unusable
    /// configuration; 3 the key opens the disk but device-mapper is unavailable, so it was not
    /// activated.
    Unlock {
        #[arg(long, value_name = "FILE", default_value = "/etc/attesta/guest.toml")]
        config: PathBuf,
    },
    /// In the running system: renew the VM's lease (its short-lived mesh certificate) with a
    /// fresh report every `[keepalive] interval_secs`, replacing `node.crt` in `[mesh] dir`.
    /// Runs until stopped (attesta-keepalive.service); refusals are logged and tried again.
    ///
    /// Exit status (with --once): 0 renewed; 1 refused or unreachable; 2 unusable configuration.
    Keepalive {
        #[arg(long, value_name = "FILE", default_value = "/etc/attesta/guest.toml")]
        config: PathBuf,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATTESTA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.json_logs {
        logs.json().init();
    } else {
        logs.init();
    }
    let (config, keepalive) = match cli.cmd {
        Cmd::Unlock { config } => (config, None),
        Cmd::Keepalive { config, once } => (config, Some(once)),
    };
    let name = if keepalive.is_some() {
        "keepalive"
    } else {
        "unlock"
    };
    let cfg = match GuestConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("attesta-guest {name}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = harden(cfg.require_mlock) {
        eprintln!("attesta-guest {name}: {e}");
        return ExitCode::from(e.exit_code());
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("attesta-guest unlock: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(once) = keepalive {
        return match rt.block_on(guest_agent::keepalive::run(&cfg, once)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("attesta-guest keepalive: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    match rt.block_on(run(&cfg)) {
        Ok(u) => {
            println!(
                "attesta-guest: {} {} (generation {}, boot {}) as /dev/mapper/{}",
                u.vm_id,
                if u.formatted {
                    "formatted and unlocked"
                } else {
                    "unlocked"
                },
                u.generation,
                u.boot_counter,
                cfg.disk.name
            );
            ExitCode::SUCCESS
        }
        Err(UnlockError::NoDeviceMapper(u)) => {
            println!(
                "attesta-guest: {} key verified{} (generation {}, boot {}); not activated: device-mapper is unavailable",
                u.vm_id,
                if u.formatted { ", disk formatted" } else { "" },
                u.generation,
                u.boot_counter
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("attesta-guest unlock: FAILED (fail closed): {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
