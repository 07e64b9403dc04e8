//! Backups through the daemon (`[backup]`): `attesta-host backup`, `restore`, and the deletion
//! of every backup of a terminated VM.
//!
//! - A backup runs outside the operation lock (it can take minutes), on a VM that is not
//!   running; until it ends the VM cannot be started (its disk would change under it).
//! - Terminate commits the deletion with the termination, cancels a running backup and waits
//!   for it (outside the operation lock), then deletes every object of the VM's. If the
//!   storage cannot be reached, the deletion stays in the agent's database and is retried
//!   after each poll; the journal records `backups_deleted` (with the number of objects)
//!   when it is done, and that goes on chain with the rest of the lifecycle (`[chain]`).
//! - A restore checks the backup's size and the launch gate and chip before it downloads,
//!   then creates the VM through the same checks as a create, on the restored disk instead of
//!   a blank one.

use super::Daemon;
use crate::lifecycle::State;
use crate::spec::VmSpec;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One running backup: terminate sets `cancel` and waits on `done` (held by the backup).
struct Slot {
    cancel: Arc<AtomicBool>,
    done: Arc<tokio::sync::Mutex<()>>,
}

/// The backups running now, by VM, and the VMs whose backups are being deleted.
#[derive(Default)]
pub(super) struct Running(
    Mutex<HashMap<String, Arc<Slot>>>,
    Mutex<std::collections::HashSet<String>>,
);

impl Running {
    /// Tells a running backup of the VM's to stop (terminate, as early as it can).
    pub(super) fn cancel(&self, vm_id: &str) {
        if let Some(slot) = self.get(vm_id) {
            slot.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Claims the VM's deletion; None if another is under way.
    fn deleting(&self, vm_id: &str) -> Option<Deleting<'_>> {
        let mut d = self.1.lock().ok()?;
        d.insert(vm_id.to_string())
            .then(|| Deleting(self, vm_id.to_string()))
    }

    pub(super) fn refuse_start(&self, vm_id: &str) -> Result<(), String> {
        match self.0.lock() {
            Ok(m) if m.contains_key(vm_id) => Err(format!(
                "VM {vm_id} is being backed up; start it when the backup ends"
            )),
            Ok(_) => Ok(()),
            Err(_) => Err("backup bookkeeping poisoned".into()),
        }
    }

    fn get(&self, vm_id: &str) -> Option<Arc<Slot>> {
        self.0.lock().ok()?.get(vm_id).cloned()
    }
}

/// The claim on a VM's deletion, released when dropped.
struct Deleting<'a>(&'a Running, String);
impl Drop for Deleting<'_> {
    fn drop(&mut self) {
        if let Ok(mut d) = self.0.1.lock() {
            d.remove(&self.1);
        }
    }
}

/// Removes the VM's slot when its backup ends, however it ends.
struct Leave<'a>(&'a Running, String);
impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.0.lock() {
            m.remove(&self.1);
        }
    }
}

impl Daemon {
    fn storage(&self) -> Result<&crate::backup::Backups, String> {
        self.backups
            .as_ref()
            .ok_or_else(|| "no [backup] storage is configured on this host".to_string())
    }

    /// Backs the VM's disk up (see [`crate::backup`]).
    pub(super) async fn backup(&self, vm_id: &str) -> Result<serde_json::Value, String> {
        let store = self.storage()?;
        let (slot, _running, disk) = {
            let _g = self.ops.lock().await;
            let rec = self.record(vm_id).await?;
            let c = VmSpec::parse(&rec.spec).map_err(|e| format!("spec on record: {e}"))?;
            let id = vm_id.to_string();
            if self.libvirt(move |h| h.state(&id)).await? == State::Running {
                return Err(format!(
                    "VM {vm_id} is running: stop it first (a copy of a disk in use is torn)"
                ));
            }
            let slot = Arc::new(Slot {
                cancel: Arc::new(AtomicBool::new(false)),
                done: Arc::new(tokio::sync::Mutex::new(())),
            });
            // Held before the slot is visible, so a terminate always waits for this backup.
            let running = slot
                .done
                .clone()
                .try_lock_owned()
                .map_err(|_| "backup bookkeeping".to_string())?;
            let mut m = self
                .backing_up
                .0
                .lock()
                .map_err(|_| "backup bookkeeping poisoned".to_string())?;
            if m.contains_key(vm_id) {
                return Err(format!("VM {vm_id} is already being backed up"));
            }
            m.insert(vm_id.to_string(), slot.clone());
            (slot, running, c.spec.disk.path)
        };
        let _leave = Leave(&self.backing_up, vm_id.to_string());
        let done = store
            .backup(&self.db, vm_id, &disk, self.now(), slot.cancel.clone())
            .await
            .map_err(|e| format!("backup of {vm_id}: {e}"))?;
        serde_json::to_value(done).map_err(|e| e.to_string())
    }

    /// The VM's backups in storage (of any VM id: also one this host does not run).
    pub(super) async fn backups_of(&self, vm_id: &str) -> Result<serde_json::Value, String> {
        if !crate::spec::valid_vm_id(vm_id) {
            return Err(format!("{vm_id:?} is not a VM id"));
        }
        let list = self
            .storage()?
            .list(vm_id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({"vm_id": vm_id, "backups": list}))
    }

    /// Creates the spec's VM on its disk restored from backup `seq` (default: the newest).
    pub(super) async fn restore(
        &self,
        spec: &str,
        order_b64: &str,
        seq: Option<u64>,
        start: bool,
    ) -> Result<serde_json::Value, String> {
        let store = self.storage()?;
        let c = VmSpec::parse(spec).map_err(|e| format!("spec: {e}"))?;
        let vm_id = c.spec.vm_id.clone();
        // Everything that would refuse the create, before the download.
        if self.db.vms().await?.iter().any(|v| v.vm_id == vm_id) {
            return Err(format!("VM id {vm_id} was used on this host before"));
        }
        if c.spec.disk.path.exists() {
            return Err(format!(
                "disk {} already exists (refusing to reuse another VM's disk)",
                c.spec.disk.path.display()
            ));
        }
        let m = store
            .pick(&vm_id, seq)
            .await
            .map_err(|e| format!("restore of {vm_id}: {e}"))?;
        if m.disk_bytes != c.spec.disk.size_gib << 30 {
            return Err(format!(
                "backup {} of {vm_id} is a disk of {} bytes; the spec's is {} GiB",
                m.seq, m.disk_bytes, c.spec.disk.size_gib
            ));
        }
        self.admissible(&c, order_b64)?;
        let mut prepared = c.spec.disk.path.clone().into_os_string();
        prepared.push(".restoring");
        let prepared = PathBuf::from(prepared);
        store
            .restore(&vm_id, &m, &prepared)
            .await
            .map_err(|e| format!("restore of {vm_id}: {e}"))?;
        let _remove = RemoveOnDrop(prepared.clone());
        let mut v = self
            .create_on(spec, order_b64, start, Some(&prepared))
            .await
            .map_err(String::from)?;
        v["restored_from"] = serde_json::json!(m.seq);
        v["disk_bytes"] = serde_json::json!(m.disk_bytes);
        tracing::info!(vm_id, backup = m.seq, "VM restored from backup");
        Ok(v)
    }

    /// The launch gate and this host's chip, as the create will judge them (a restore asks
    /// first, so that nothing is downloaded for a VM that may not run here).
    fn admissible(&self, c: &crate::spec::Checked, order_b64: &str) -> Result<(), String> {
        use base64::Engine as _;
        let order = base64::engine::general_purpose::STANDARD
            .decode(order_b64.trim())
            .map_err(|_| "the order is not base64".to_string())?;
        let ok = crate::gate::admit_with(c, &order, &self.keys, self.now(), self.firmware)
            .map_err(|e| format!("launch gate: {e}"))?;
        self.chip_allowed(&ok.order).map_err(String::from)?;
        Ok(())
    }

    /// Terminate's part: cancels a running backup, waits for it, deletes every backup of the
    /// VM's; what happened, for terminate's answer.
    pub(super) async fn delete_backups(&self, vm_id: &str) -> String {
        if self.backups.is_none() {
            return "no [backup] storage configured".into();
        }
        if let Some(slot) = self.backing_up.get(vm_id) {
            slot.cancel.store(true, Ordering::SeqCst);
            let _ = slot.done.lock().await;
        }
        // A retry of the same deletion may hold the claim: its outcome is this one's.
        let claim = loop {
            if let Some(c) = self.backing_up.deleting(vm_id) {
                break c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let pending = match self.db.backup_deletions().await {
            Ok(p) => p.iter().any(|v| v == vm_id),
            Err(e) => return format!("deletion pending (retried after each poll): {e}"),
        };
        if !pending {
            return "deleted (by the retry that ran meanwhile)".into();
        }
        match self.delete_backups_now(vm_id, claim).await {
            Ok(n) => format!("{n} objects deleted"),
            Err(e) => format!("deletion pending (retried after each poll): {e}"),
        }
    }

    async fn delete_backups_now(&self, vm_id: &str, _claim: Deleting<'_>) -> Result<u64, String> {
        let n = self
            .storage()?
            .delete_all(&self.db, vm_id)
            .await
            .map_err(|e| e.to_string())?;
        self.db.backups_deleted(vm_id, self.now(), n).await?;
        tracing::info!(vm_id, objects = n, "backups deleted");
        Ok(n)
    }

    /// After each poll (and for tests): deletions that could not be done at terminate.
    pub async fn retry_backup_deletions(&self) {
        if self.backups.is_none() {
            return;
        }
        let pending = match self.db.backup_deletions().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "backup deletions not read");
                return;
            }
        };
        for vm_id in pending {
            // A backup still stopping is waited for by its terminate, which deletes after it.
            if self.backing_up.get(&vm_id).is_some() {
                continue;
            }
            // Terminate's own deletion of it holds the claim: not ours to try now.
            let Some(claim) = self.backing_up.deleting(&vm_id) else {
                continue;
            };
            let attempt = tokio::time::timeout(
                std::time::Duration::from_secs(120),
                self.delete_backups_now(&vm_id, claim),
            )
            .await
            .unwrap_or_else(|_| Err("timed out after 120 s".into()));
            if let Err(e) = attempt {
                tracing::warn!(vm_id, error = %e, "backups still not deleted");
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        // Gone already when the create moved it into place.
        let _ = std::fs::remove_file(&self.0);
    }
}
