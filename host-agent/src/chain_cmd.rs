//! `attesta-host chain status`: what the agent has taken from the chain and what it still has
//! to put there — the last finalized block processed, each assignment's outcome, lifecycle
//! transitions not yet batched, and the answers and lifecycle batches in the outbox.

use host_agent::billing::{Outbox, State};
use host_agent::config::HostConfig;
use host_agent::intake::{ANSWERS_ACCOUNT, LIFECYCLE_ACCOUNT};
use host_agent::state::StateDb;
use std::path::Path;

pub fn status(config: &Path, json: bool) -> Result<(), String> {
    let cfg = HostConfig::load(config).map_err(|e| e.to_string())?;
    if !cfg.state_db().exists() {
        return Err(format!(
            "no agent database at {} (has `attesta-host serve` run?)",
            cfg.state_db().display()
        ));
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let db = StateDb::open(&cfg.state_db()).await?;
        let outbox = Outbox::open(&cfg.outbox())
            .await
            .map_err(|e| e.to_string())?;
        let records: Vec<_> = outbox
            .records()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| r.account == ANSWERS_ACCOUNT || r.account == LIFECYCLE_ACCOUNT)
            .collect();
        let through = host_agent::daemon::lifecycle_through(&records);
        let unbatched = db.lifecycle_after(through, u64::MAX >> 1).await?;
        let assignments = db.assignments().await?;
        let cursor = db.cursor().await?;
        let state = |s: &State| match s {
            State::Pending => "pending".to_string(),
            State::Signed { nonce } => format!("signed (nonce {nonce})"),
            State::Done => "done".into(),
            State::Failed => "FAILED".into(),
        };
        if json {
            let v = serde_json::json!({
                "following": cfg.chain.is_some(),
                "cursor": cursor.map(|(n, h)| serde_json::json!({"block": n, "hash": hex::encode(h)})),
                "assignments": assignments.iter().map(|(id, block, vm, code)| serde_json::json!({
                    "assignment": hex::encode(id), "block": block, "vm_id": vm,
                    "outcome": code.clone().unwrap_or_else(|| "created".into()),
                })).collect::<Vec<_>>(),
                "lifecycle": {"batched_through": through, "unbatched": unbatched.len()},
                "outbox": records.iter().map(|r| serde_json::json!({
                    "kind": r.account.trim_start_matches('#'), "period": r.period,
                    "state": state(&r.state), "attempts": r.attempts, "last_error": r.last_error,
                    "tx_hash": r.tx_hash,
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            return Ok(());
        }
        if cfg.chain.is_none() {
            println!("no [chain] in {}: tasks come from the control socket only", config.display());
        }
        match cursor {
            Some((n, h)) => println!("last finalized block processed: {n} ({})", hex::encode(h)),
            None => println!("no block processed yet"),
        }
        let refused = assignments.iter().filter(|a| a.3.is_some()).count();
        println!(
            "assignments: {} ({} created, {refused} refused)",
            assignments.len(),
            assignments.len() - refused
        );
        for (id, block, vm, code) in &assignments {
            println!(
                "  block {block:<8} {vm:<24} {:<20} {}",
                code.as_deref().unwrap_or("created"),
                hex::encode(id)
            );
        }
        println!(
            "lifecycle: batched through journal entry {through}; {} not yet batched",
            unbatched.len()
        );
        println!("on the way to the chain:");
        let pending: Vec<_> = records.iter().filter(|r| r.state != State::Done).collect();
        if pending.is_empty() {
            println!("  nothing ({} record(s) done)", records.len());
        }
        for r in pending {
            println!(
                "  {:<10} {:<10} {:<18} attempts {}{}",
                r.account.trim_start_matches('#'),
                r.period,
                state(&r.state),
                r.attempts,
                r.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    })
}
