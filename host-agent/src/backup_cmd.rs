//! `attesta-host backup` and `attesta-host restore`: through the running agent, which holds
//! the `[backup]` storage's credentials and the record of unfinished uploads.

use super::{AgentArgs, file_b64};
use clap::Args;
use host_agent::control::{ControlRequest as R, call};
use std::path::PathBuf;

#[derive(Args)]
pub struct BackupArgs {
    /// The VM whose disk is backed up (it must not be running).
    vm_id: String,
    /// List the VM's backups instead.
    #[arg(long)]
    list: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The VM spec on this host (its disk path must not exist; size as the backup's).
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// The operator-signed register order: it must allow this host's chip.
    #[arg(long, value_name = "FILE")]
    order: PathBuf,
    /// The backup to restore (`attesta-host backup VM_ID --list`); default: the newest.
    #[arg(long, value_name = "N")]
    backup: Option<u64>,
    #[arg(long)]
    start: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

pub fn backup(a: &BackupArgs) -> Result<(), String> {
    let socket = a.agent.socket()?;
    if a.list {
        let v = call(
            &socket,
            &R::Backups {
                vm_id: a.vm_id.clone(),
            },
        )?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            return Ok(());
        }
        println!(
            "{:>8}  {:>12}  {:>14}  {:>14}",
            "backup", "created_at", "disk bytes", "uploaded"
        );
        for b in v["backups"].as_array().into_iter().flatten() {
            println!(
                "{:>8}  {:>12}  {:>14}  {:>14}",
                b["backup"], b["created_at"], b["disk_bytes"], b["bytes_uploaded"]
            );
        }
        return Ok(());
    }
    if !a.json {
        eprintln!("backing up {} (the agent logs its progress) ...", a.vm_id);
    }
    let v = call(
        &socket,
        &R::Backup {
            vm_id: a.vm_id.clone(),
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{}: backup {} — {} of {} chunks uploaded ({} bytes), {} parts resumed, {} old backups removed",
            a.vm_id,
            v["backup"],
            v["chunks_uploaded"],
            v["chunks"],
            v["bytes_uploaded"],
            v["parts_resumed"],
            v["removed"].as_array().map_or(0, Vec::len)
        );
    }
    Ok(())
}

pub fn restore(a: &RestoreArgs) -> Result<(), String> {
    let spec = std::fs::read_to_string(&a.spec)
        .map_err(|e| format!("cannot read {}: {e}", a.spec.display()))?;
    if !a.json {
        eprintln!("restoring (the agent logs its progress) ...");
    }
    let v = call(
        &a.agent.socket()?,
        &R::Restore {
            spec,
            order: file_b64(&a.order)?,
            backup: a.backup,
            start: a.start,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{}: {} from backup {} ({} bytes); {}",
            v["vm_id"].as_str().unwrap_or_default(),
            v["state"].as_str().unwrap_or_default(),
            v["restored_from"],
            v["disk_bytes"],
            v["broker"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}
