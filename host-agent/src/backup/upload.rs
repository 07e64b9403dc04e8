//! One backup: read the disk, plan against the last backup, upload the changed chunks as the
//! parts of one pack (resuming a recorded attempt), then the manifest, then retention.

use super::disk::{read_chunk, scan_disk};
use super::plan;
use super::{BackupError, Backups, Done, Resume, store};
use crate::state::StateDb;
use futures::StreamExt as _;
use object_store::multipart::{MultipartStore as _, PartId};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt as _, PutPayload};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// An error from the store that means it has forgotten the multipart upload (expired, aborted
/// by a bucket rule, or already completed).
fn forgotten(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) || e.to_string().contains("NoSuchUpload")
}

impl Backups {
    /// Backs up the VM's disk (which must not be in use): the chunks that changed since its
    /// last backup, as one pack; then its manifest; then retention. Picks up an unfinished
    /// attempt recorded in `db` if the disk is still what it planned; `cancel` (terminate)
    /// stops it between chunks.
    pub async fn backup(
        &self,
        db: &StateDb,
        vm_id: &str,
        disk_path: &Path,
        now: u64,
        cancel: Arc<AtomicBool>,
    ) -> Result<Done, BackupError> {
        if self.terminated(vm_id).await? {
            return Err(BackupError::Terminated(vm_id.into()));
        }
        let (manifests, packs) = self.scan_bucket(vm_id).await?;
        // Built on only if every pack it reads is still there (else: everything again).
        let previous = match manifests.last() {
            Some(s) => match self.manifest(vm_id, *s).await {
                Ok(m) if m.packs().is_subset(&packs) => Some(m),
                Ok(_) | Err(BackupError::Plan(_)) => {
                    tracing::warn!(
                        vm_id,
                        backup = s,
                        "backup: the last backup is incomplete in the store; uploading every chunk"
                    );
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let next = manifests
            .iter()
            .chain(&packs)
            .max()
            .copied()
            .unwrap_or(0)
            .saturating_add(1);
        // Object names carry 10 digits: a number past them would be invisible to listing.
        if next > 9_999_999_999 {
            return Err(plan::PlanError::Shape(format!("numbers run out at backup {next}")).into());
        }
        let size = std::fs::metadata(disk_path)
            .map_err(super::disk(disk_path))?
            .len();
        let chunk = plan::chunk_for(size, self.chunk)?;
        let (p, c) = (disk_path.to_path_buf(), cancel.clone());
        let (disk_bytes, scan, root) =
            tokio::task::spawn_blocking(move || scan_disk(&p, chunk, &c))
                .await
                .map_err(|e| BackupError::State(e.to_string()))??;
        tracing::info!(vm_id, disk_bytes, "backup: disk read");
        let fresh = |seq: u64, at: u64| {
            plan::plan(
                vm_id,
                seq,
                at,
                disk_bytes,
                chunk,
                root,
                &scan,
                previous.as_ref(),
            )
        };
        let recorded = match db.backup_resume(vm_id).await.map_err(BackupError::State)? {
            Some(j) => match serde_json::from_str::<Resume>(&j) {
                // Finished but for forgetting it (a crash after its manifest was written).
                Ok(r) if previous.as_ref() == Some(&r.manifest) => {
                    db.set_backup_resume(vm_id, None)
                        .await
                        .map_err(BackupError::State)?;
                    None
                }
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(vm_id, error = %e, "backup: unfinished record unreadable; starting over");
                    None
                }
            },
            None => None,
        };
        let mut r = match recorded {
            Some(r)
                if fresh(r.manifest.seq, r.manifest.created_at)?.manifest == r.manifest
                    && r.manifest.seq + 1 >= next =>
            {
                tracing::info!(vm_id, parts = r.parts.len(), "backup: resuming");
                r
            }
            other => {
                if let Some(stale) = other {
                    tracing::info!(vm_id, "backup: the unfinished one is stale; starting over");
                    self.abort(vm_id, &stale).await?;
                    db.set_backup_resume(vm_id, None)
                        .await
                        .map_err(BackupError::State)?;
                }
                let p = fresh(next, now)?;
                Resume {
                    manifest: p.manifest,
                    upload: p.upload,
                    upload_id: None,
                    parts: Vec::new(),
                    completed: false,
                }
            }
        };
        let parts_resumed = r.parts.len();
        let uploaded = self
            .upload_pack(db, vm_id, disk_path, &mut r, &cancel)
            .await;
        if let Err(BackupError::StaleUpload) = uploaded {
            db.set_backup_resume(vm_id, None)
                .await
                .map_err(BackupError::State)?;
        }
        uploaded?;
        if cancel.load(Ordering::SeqCst) {
            return Err(BackupError::Cancelled);
        }
        let seq = r.manifest.seq;
        // Terminated meanwhile (by another host, whose deletion listed the bucket before this
        // pack existed): this backup's own objects go, and no manifest stays after the marker.
        if self.terminated(vm_id).await? {
            return Err(self.undo(db, vm_id, seq, false).await);
        }
        let json =
            serde_json::to_vec(&r.manifest).map_err(|e| BackupError::State(e.to_string()))?;
        let mpath = ObjPath::from(self.names.manifest(vm_id, seq));
        self.s3
            .put(&mpath, PutPayload::from(json))
            .await
            .map_err(store(format!("put {mpath}")))?;
        if self.terminated(vm_id).await? {
            return Err(self.undo(db, vm_id, seq, true).await);
        }
        db.set_backup_resume(vm_id, None)
            .await
            .map_err(BackupError::State)?;
        let removed = self.sweep(vm_id).await?;
        tracing::info!(
            vm_id,
            backup = seq,
            bytes = r.manifest.uploaded_bytes,
            "backup: done"
        );
        Ok(Done {
            vm_id: vm_id.into(),
            backup: seq,
            disk_bytes,
            chunks: r.manifest.chunks.len(),
            chunks_uploaded: r.upload.len(),
            bytes_uploaded: r.manifest.uploaded_bytes,
            parts_resumed,
            removed,
        })
    }

    /// The pack: created, its remaining parts uploaded (each recorded), completed and its size
    /// checked. Nothing to do for a backup that changed nothing.
    async fn upload_pack(
        &self,
        db: &StateDb,
        vm_id: &str,
        disk_path: &Path,
        r: &mut Resume,
        cancel: &AtomicBool,
    ) -> Result<(), BackupError> {
        let pack = ObjPath::from(self.names.pack(vm_id, r.manifest.seq));
        if r.upload.is_empty() || r.completed {
            return Ok(());
        }
        let id = match &r.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self
                    .s3
                    .create_multipart(&pack)
                    .await
                    .map_err(store(format!("create multipart {pack}")))?;
                r.upload_id = Some(id.clone());
                self.save(db, vm_id, r).await?;
                id
            }
        };
        let (disk_bytes, chunk) = (r.manifest.disk_bytes, r.manifest.chunk_bytes);
        let todo: Vec<(usize, u64, Option<String>)> = r
            .upload
            .iter()
            .copied()
            .enumerate()
            .skip(r.parts.len())
            .map(|(k, i)| {
                let want = r
                    .manifest
                    .chunks
                    .get(i as usize)
                    .and_then(|c| c.as_ref())
                    .map(|c| c.sha256.clone());
                (k, i, want)
            })
            .collect();
        let total = r.upload.len();
        let mut parts = futures::stream::iter(todo)
            .map(|(k, i, want)| {
                let (p, pack, id) = (disk_path.to_path_buf(), pack.clone(), id.clone());
                async move {
                    let bytes =
                        tokio::task::spawn_blocking(move || read_chunk(&p, disk_bytes, chunk, i))
                            .await
                            .map_err(|e| BackupError::State(e.to_string()))??;
                    if Some(hex::encode(Sha256::digest(&bytes))) != want {
                        return Err(BackupError::Changed(i));
                    }
                    match self
                        .s3
                        .put_part(&pack, &id, k, PutPayload::from(bytes))
                        .await
                    {
                        Ok(part) => Ok(part.content_id),
                        Err(e) if forgotten(&e) => Err(BackupError::StaleUpload),
                        Err(e) => Err(store(format!("upload part {k} of {pack}"))(e)),
                    }
                }
            })
            .buffered(super::plan::in_flight(chunk));
        while let Some(part) = parts.next().await {
            if cancel.load(Ordering::SeqCst) {
                drop(parts);
                self.abort(vm_id, r).await?;
                db.set_backup_resume(vm_id, None)
                    .await
                    .map_err(BackupError::State)?;
                return Err(BackupError::Cancelled);
            }
            r.parts.push(part?);
            self.save(db, vm_id, r).await?;
            let done = r.parts.len();
            if done.is_multiple_of(16) || done == total {
                tracing::info!(vm_id, parts = done, of = total, "backup: uploading");
            }
        }
        drop(parts);
        let ids = r
            .parts
            .iter()
            .map(|c| PartId {
                content_id: c.clone(),
            })
            .collect();
        if let Err(e) = self.s3.complete_multipart(&pack, &id, ids).await {
            // Completed already (a crash right after), or forgotten: the pack's size tells.
            if self.pack_size(&pack).await? != Some(r.manifest.uploaded_bytes) {
                return Err(if forgotten(&e) {
                    BackupError::StaleUpload
                } else {
                    store(format!("complete {pack}"))(e)
                });
            }
        }
        let found = self.pack_size(&pack).await?.unwrap_or(0);
        if found != r.manifest.uploaded_bytes {
            return Err(BackupError::PackSize {
                found,
                wanted: r.manifest.uploaded_bytes,
            });
        }
        r.completed = true;
        self.save(db, vm_id, r).await
    }

    /// Deletes this backup's pack (and its manifest, if written) and forgets it: the VM was
    /// terminated while it ran. `Terminated`, or why the undoing failed.
    async fn undo(&self, db: &StateDb, vm_id: &str, seq: u64, manifest: bool) -> BackupError {
        let mut names = vec![ObjPath::from(self.names.pack(vm_id, seq))];
        if manifest {
            names.push(ObjPath::from(self.names.manifest(vm_id, seq)));
        }
        for p in names {
            match self.s3.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return store(format!("delete {p} (the VM was terminated)"))(e),
            }
        }
        if let Err(e) = db.set_backup_resume(vm_id, None).await {
            return BackupError::State(e);
        }
        BackupError::Terminated(vm_id.into())
    }

    async fn pack_size(&self, pack: &ObjPath) -> Result<Option<u64>, BackupError> {
        match self.s3.head(pack).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store(format!("head {pack}"))(e)),
        }
    }
}
