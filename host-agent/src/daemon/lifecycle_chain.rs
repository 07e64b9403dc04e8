//! Lifecycle on chain (`[chain]`): every transition the agent journals (created, running,
//! stopped, rebooted, terminated, credit_stopped, and changes it observed) goes on chain in
//! batches, at most one per `lifecycle_interval_secs`, through the billing outbox — so a tenant
//! or validator can audit what ran where, signed by this miner's key.
//!
//! **Idempotent.** A batch is an outbox record named by its last journal sequence number, and
//! the next batch starts after the highest one the outbox holds: the outbox is the one record
//! of what was batched, so a crash between building and recording a batch re-makes the same
//! batch, and nothing is batched twice. A batch that fails at dispatch is marked failed in the
//! outbox for an operator (as a usage record is) and not sent again.

use super::Daemon;
use crate::intake::{LIFECYCLE_ACCOUNT, lifecycle_doc};

/// Transitions in one batch at most (one remark; a backlog goes over several).
const PER_BATCH: u64 = 500;
const LIFECYCLE_AT: &str = "lifecycle_batched_at";

impl Daemon {
    /// The last journal sequence number batched, from the outbox.
    async fn lifecycle_through(&self) -> Result<u64, String> {
        let records = self.outbox.records().await.map_err(|e| e.to_string())?;
        Ok(lifecycle_through(&records))
    }

    /// Batches the journal into the outbox now (what `tick` does once per interval); the
    /// batch's last sequence number, or None if nothing was new. Does nothing without `[chain]`.
    pub async fn flush_lifecycle(&self) -> Result<Option<u64>, String> {
        if self.cfg.chain.is_none() {
            return Ok(None);
        }
        let through = self.lifecycle_through().await?;
        let records = self.db.lifecycle_after(through, PER_BATCH).await?;
        let Some(doc) = lifecycle_doc(&records) else {
            return Ok(None);
        };
        self.outbox.enqueue(&doc).await.map_err(|e| e.to_string())?;
        tracing::info!(
            first = records.first().map_or(0, |r| r.seq),
            last = doc.period,
            "lifecycle records batched for the chain"
        );
        self.kick.notify_one();
        Ok(Some(doc.period))
    }

    /// [`Daemon::flush_lifecycle`] when the interval has passed since the last batch.
    pub(super) async fn lifecycle_if_due(&self, now: u64) -> Result<(), String> {
        let Some(c) = &self.cfg.chain else {
            return Ok(());
        };
        let last = self.db.meta(LIFECYCLE_AT).await?.unwrap_or(0);
        if now < last.saturating_add(c.lifecycle_interval_secs) {
            return Ok(());
        }
        self.flush_lifecycle().await?;
        self.db.set_meta(LIFECYCLE_AT, now).await
    }

    /// Journals changes seen in libvirt that the agent did not make.
    pub(super) async fn journal_observed(
        &self,
        evs: &[crate::agent::Ev],
        why: &str,
    ) -> Result<(), String> {
        for e in evs {
            let event = if e.running { "running" } else { "stopped" };
            self.db.journal(&e.vm_id, event, e.at, Some(why)).await?;
        }
        Ok(())
    }
}

/// The last journal sequence number the outbox holds in a batch: the highest batch's. A batch
/// that failed at dispatch counts too — its transitions are not sent again (they stay in the
/// journal and in `attesta-host chain status`'s failed records, for an operator), so that one
/// failed batch never holds up every later one.
pub fn lifecycle_through(records: &[crate::billing::Record]) -> u64 {
    records
        .iter()
        .filter(|r| r.account == LIFECYCLE_ACCOUNT)
        .map(|r| r.period)
        .max()
        .unwrap_or(0)
}
