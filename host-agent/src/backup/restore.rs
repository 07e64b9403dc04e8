//! A restore: the manifest picked and checked first (so a caller can refuse before anything
//! is downloaded), then every chunk fetched, verified and written into a new file.

use super::disk::root_of;
use super::plan::{ChunkRef, Manifest, chunk_len};
use super::{BackupError, Backups, disk, store};
use futures::StreamExt as _;
use futures::TryStreamExt as _;
use object_store::ObjectStoreExt as _;
use object_store::path::Path as ObjPath;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Removes the file it names unless disarmed: a restore leaves nothing behind but a whole,
/// verified disk (and never removes a file it did not create).
struct Partial(Option<PathBuf>);
impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Backups {
    /// Backup `seq` of the VM's (default: the newest), its manifest checked.
    pub async fn pick(&self, vm_id: &str, seq: Option<u64>) -> Result<Manifest, BackupError> {
        if self.terminated(vm_id).await? {
            return Err(BackupError::Terminated(vm_id.into()));
        }
        let seq = match seq {
            Some(s) => s,
            None => *self
                .scan_bucket(vm_id)
                .await?
                .0
                .last()
                .ok_or_else(|| BackupError::None(vm_id.into()))?,
        };
        self.manifest(vm_id, seq).await
    }

    /// Writes the disk `m` describes into a new file `out` (which must not exist), verifying
    /// every chunk against the manifest; on any failure the file it created is removed.
    pub async fn restore(&self, vm_id: &str, m: &Manifest, out: &Path) -> Result<(), BackupError> {
        use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
        // Checked before anything is created or fetched: chunks no larger than this agent
        // would cut for such a disk, and a digest that its chunks' hashes make.
        let largest = super::plan::chunk_for(m.disk_bytes, 128 << 20)?;
        if m.chunk_bytes > largest {
            return Err(super::plan::PlanError::ChunkSize(m.chunk_bytes).into());
        }
        if root_of(m) != Some(m.disk_root.clone()) {
            return Err(BackupError::Digest);
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(disk(out))?;
        let mut partial = Partial(Some(out.to_path_buf()));
        f.set_len(m.disk_bytes).map_err(disk(out))?;
        let f = Arc::new(f);
        let jobs: Vec<(u64, ChunkRef)> = m
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.clone().map(|c| (i as u64, c)))
            .collect();
        let total = jobs.len();
        let mut got = futures::stream::iter(jobs)
            .map(|(i, c)| {
                let len = chunk_len(m.disk_bytes, m.chunk_bytes, i);
                let pack = ObjPath::from(self.names.pack(vm_id, c.pack));
                async move {
                    let range = c.range(len).ok_or(BackupError::Corrupt {
                        chunk: i,
                        pack: c.pack,
                    })?;
                    let bytes = self
                        .s3
                        .get_range(&pack, range)
                        .await
                        .map_err(store(format!("get chunk {i} from {pack}")))?;
                    if bytes.len() as u64 != len || hex::encode(Sha256::digest(&bytes)) != c.sha256
                    {
                        return Err(BackupError::Corrupt {
                            chunk: i,
                            pack: c.pack,
                        });
                    }
                    Ok::<_, BackupError>((i, bytes))
                }
            })
            .buffered(super::plan::in_flight(m.chunk_bytes));
        let mut done = 0usize;
        while let Some((i, bytes)) = got.try_next().await? {
            let at = i.checked_mul(m.chunk_bytes).ok_or(BackupError::Digest)?;
            let f = f.clone();
            tokio::task::spawn_blocking(move || f.write_all_at(&bytes, at))
                .await
                .map_err(|e| BackupError::State(e.to_string()))?
                .map_err(disk(out))?;
            done += 1;
            if done.is_multiple_of(16) || done == total {
                tracing::info!(vm_id, chunks = done, of = total, "restore: downloading");
            }
        }
        f.sync_all().map_err(disk(out))?;
        partial.0 = None;
        Ok(())
    }
}
