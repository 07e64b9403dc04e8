//! Backups of VMs' disks to S3-compatible storage (`[backup]`): `attesta-host backup VM_ID`
//! and `attesta-host restore`, on any miner with the same bucket.
//!
//! - **Only ciphertext leaves the host.** A disk is the guest's LUKS2 volume; its key is
//!   released by the broker only to an attested VM that the order allows on that chip, so a
//!   restored disk is of no use elsewhere without that.
//! - **Incremental.** Only chunks that changed since the VM's last backup are uploaded (see
//!   [`plan`]): each backup is one pack object, uploaded by S3 multipart, one chunk a part,
//!   each part with its SHA-256 for the server to check (`x-amz-checksum-sha256`).
//! - **Resumable.** The upload's id and each finished part are committed to the agent's
//!   database; a backup that stopped (crash, network, server) goes on where it stopped when
//!   asked again, if the disk is still what it planned. Otherwise the stale upload is
//!   aborted and the backup starts over.
//! - **Verified.** A restore checks every chunk's SHA-256 and the disk's digest against the
//!   manifest before the file is used; a damaged or missing chunk fails it.
//! - **Retention.** After each backup, only the newest `keep` backups stay, with every pack
//!   they read; older manifests go first, then packs no kept backup reads.
//! - **Terminate deletes them all**, with the key's crypto-shred (see the daemon).
//!
//! A VM is backed up while it is not running: a copy of a disk in use is torn.

pub mod plan;

use crate::config::BackupConfig;
use crate::state::StateDb;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore as _, PartId};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore as _, ObjectStoreExt as _, PutPayload};
use plan::{Manifest, Names, PlanError, chunk_len};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Parts in flight at once, up or down.
const IN_FLIGHT: usize = 4;

/// Why a backup, restore or deletion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("[backup]: {0}")]
    Config(String),
    #[error("storage: {op}: {why}")]
    Store { op: String, why: String },
    #[error("disk {path}: {why}")]
    Disk { path: String, why: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("chunk {0} changed while it was backed up (is the VM running?)")]
    Changed(u64),
    #[error("chunk {chunk} from pack {pack} does not match its SHA-256 in the manifest")]
    Corrupt { chunk: u64, pack: u64 },
    #[error("the restored disk's digest is not the manifest's")]
    Digest,
    #[error("VM {0} has no backup")]
    None(String),
    #[error("the uploaded pack is {found} bytes, {wanted} were sent")]
    PackSize { found: u64, wanted: u64 },
    #[error("cancelled: the VM was terminated")]
    Cancelled,
    #[error("agent state: {0}")]
    State(String),
}

fn store(op: impl Into<String>) -> impl FnOnce(object_store::Error) -> BackupError {
    let op = op.into();
    move |e| BackupError::Store {
        op,
        why: e.to_string(),
    }
}

fn disk(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Disk {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

/// The checks `[backup]` must pass, without reading anything.
pub fn check_config(b: &BackupConfig) -> Result<(), String> {
    let rest = if let Some(r) = b.endpoint.strip_prefix("https://") {
        r
    } else if let Some(r) = b.endpoint.strip_prefix("http://") {
        let host = r.split('/').next().unwrap_or_default();
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.split(':').next().unwrap_or_default(),
        };
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(format!(
                "endpoint {}: plain http only to a loopback address; use https",
                b.endpoint
            ));
        }
        r
    } else {
        return Err(format!(
            "endpoint {}: give an https:// (or loopback http://) URL",
            b.endpoint
        ));
    };
    if rest.is_empty() {
        return Err("endpoint: no host".into());
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    };
    if !name_ok(&b.bucket) {
        return Err(format!("bucket {:?}: letters, digits, . _ -", b.bucket));
    }
    if !b.prefix.split('/').all(name_ok) {
        return Err(format!(
            "prefix {:?}: segments of letters, digits, . _ - separated by /",
            b.prefix
        ));
    }
    if !(5..=5120).contains(&b.chunk_mib) {
        return Err(format!("chunk_mib {}: 5 to 5120", b.chunk_mib));
    }
    if b.keep == 0 {
        return Err("keep: at least 1".into());
    }
    if b.access_key_id.is_empty() {
        return Err("access_key_id: empty".into());
    }
    Ok(())
}

/// A backup that has not finished: what it planned, its multipart upload and the parts done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub manifest: Manifest,
    pub upload: Vec<u64>,
    pub upload_id: Option<String>,
    pub parts: Vec<String>,
}

/// What one backup did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Done {
    pub vm_id: String,
    /// This backup's number (`restore --backup N`).
    pub backup: u64,
    pub disk_bytes: u64,
    pub chunks: usize,
    /// Chunks uploaded this time (changed since the last backup, not zeros).
    pub chunks_uploaded: usize,
    pub bytes_uploaded: u64,
    /// Parts an earlier, interrupted attempt had already uploaded.
    pub parts_resumed: usize,
    /// Backups removed by retention.
    pub removed: Vec<u64>,
}

/// The VM's backups in the bucket.
#[derive(Clone, Debug, Serialize)]
pub struct Listed {
    pub backup: u64,
    pub created_at: u64,
    pub disk_bytes: u64,
    pub bytes_uploaded: u64,
}

/// A bucket of backups.
pub struct Backups {
    s3: Arc<AmazonS3>,
    names: Names,
    chunk: u64,
    keep: usize,
}

impl Backups {
    /// Connects nothing yet: reads the secret key and builds the client.
    pub fn open(cfg: &BackupConfig) -> Result<Backups, BackupError> {
        check_config(cfg).map_err(BackupError::Config)?;
        let secret =
            Zeroizing::new(std::fs::read_to_string(&cfg.secret_key_file).map_err(|e| {
                BackupError::Config(format!(
                    "secret_key_file {}: {e}",
                    cfg.secret_key_file.display()
                ))
            })?);
        let s3 = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(secret.trim())
            .with_virtual_hosted_style_request(false)
            .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
            // A few quick retries, then the error: an interrupted backup resumes when asked
            // again, so a dead store should not hold the operator for minutes.
            .with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(30),
                ..Default::default()
            })
            .build()
            .map_err(|e| BackupError::Config(e.to_string()))?;
        Ok(Backups {
            s3: Arc::new(s3),
            names: Names {
                prefix: cfg.prefix.clone(),
            },
            chunk: cfg.chunk_mib << 20,
            keep: cfg.keep,
        })
    }

    /// Sequence numbers of the VM's manifests and packs in the bucket.
    async fn scan_bucket(
        &self,
        vm_id: &str,
    ) -> Result<(BTreeSet<u64>, BTreeSet<u64>), BackupError> {
        let mut manifests = BTreeSet::new();
        let mut packs = BTreeSet::new();
        let mut list = self.s3.list(Some(&ObjPath::from(self.names.vm(vm_id))));
        while let Some(o) = list.next().await {
            let o = o.map_err(store("list"))?;
            let name = o.location.to_string();
            if let Some(s) = self.names.manifest_seq(vm_id, &name) {
                manifests.insert(s);
            } else if let Some(s) = self.names.pack_seq(vm_id, &name) {
                packs.insert(s);
            }
        }
        Ok((manifests, packs))
    }

    /// Backup `seq`'s manifest, checked.
    pub async fn manifest(&self, vm_id: &str, seq: u64) -> Result<Manifest, BackupError> {
        let path = ObjPath::from(self.names.manifest(vm_id, seq));
        let bytes = self
            .s3
            .get(&path)
            .await
            .map_err(store(format!("get {path}")))?
            .bytes()
            .await
            .map_err(store(format!("get {path}")))?;
        Ok(Manifest::parse(&bytes, vm_id)?)
    }

    /// The VM's backups, oldest first (those whose manifest reads).
    pub async fn list(&self, vm_id: &str) -> Result<Vec<Listed>, BackupError> {
        let (manifests, _) = self.scan_bucket(vm_id).await?;
        let mut out = Vec::new();
        for s in manifests {
            let m = self.manifest(vm_id, s).await?;
            out.push(Listed {
                backup: m.seq,
                created_at: m.created_at,
                disk_bytes: m.disk_bytes,
                bytes_uploaded: m.uploaded_bytes,
            });
        }
        Ok(out)
    }

    /// Backs up the VM's disk (which must not be in use): the chunks that changed since its
    /// last backup, as one pack; then its manifest; then retention. Picks up an unfinished
    /// attempt recorded in `db`.
    pub async fn backup(
        &self,
        db: &StateDb,
        vm_id: &str,
        disk_path: &Path,
        now: u64,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<Done, BackupError> {
        let cancelled = || cancel.load(std::sync::atomic::Ordering::SeqCst);
        let (manifests, packs) = self.scan_bucket(vm_id).await?;
        let previous = match manifests.last() {
            Some(s) => Some(self.manifest(vm_id, *s).await?),
            None => None,
        };
        let next = manifests
            .iter()
            .chain(&packs)
            .max()
            .copied()
            .unwrap_or(0)
            .saturating_add(1);
        let chunk = self.chunk;
        let p = disk_path.to_path_buf();
        let (disk_bytes, scan, root) = tokio::task::spawn_blocking(move || scan_disk(&p, chunk))
            .await
            .map_err(|e| BackupError::State(e.to_string()))??;
        tracing::info!(vm_id, disk_bytes, "backup: disk read");
        let resume = db
            .backup_resume(vm_id)
            .await
            .map_err(BackupError::State)?
            .and_then(|j| serde_json::from_str::<Resume>(&j).ok());
        let mut planned = None;
        if let Some(r) = resume {
            let again = plan::plan(
                vm_id,
                r.manifest.seq,
                r.manifest.created_at,
                disk_bytes,
                chunk,
                root,
                &scan,
                previous.as_ref(),
            )?;
            if again.manifest == r.manifest && r.manifest.seq >= next.saturating_sub(1) {
                tracing::info!(vm_id, parts = r.parts.len(), "backup: resuming");
                planned = Some(r);
            } else {
                tracing::info!(vm_id, "backup: the unfinished one is stale; starting over");
                self.abort(vm_id, &r).await;
                db.set_backup_resume(vm_id, None)
                    .await
                    .map_err(BackupError::State)?;
            }
        }
        let mut r = match planned {
            Some(r) => r,
            None => {
                let p = plan::plan(
                    vm_id,
                    next,
                    now,
                    disk_bytes,
                    chunk,
                    root,
                    &scan,
                    previous.as_ref(),
                )?;
                Resume {
                    manifest: p.manifest,
                    upload: p.upload,
                    upload_id: None,
                    parts: Vec::new(),
                }
            }
        };
        let seq = r.manifest.seq;
        let pack = ObjPath::from(self.names.pack(vm_id, seq));
        let parts_resumed = r.parts.len();
        if !r.upload.is_empty() {
            let id = match &r.upload_id {
                Some(id) => id.clone(),
                None => {
                    let id = self
                        .s3
                        .create_multipart(&pack)
                        .await
                        .map_err(store(format!("create multipart {pack}")))?;
                    r.upload_id = Some(id.clone());
                    self.save(db, vm_id, &r).await?;
                    id
                }
            };
            let todo: Vec<(usize, u64)> = r
                .upload
                .iter()
                .copied()
                .enumerate()
                .skip(r.parts.len())
                .collect();
            let total = r.upload.len();
            let mut parts = futures::stream::iter(todo)
                .map(|(k, i)| {
                    let want = r.manifest.chunks[i as usize]
                        .as_ref()
                        .map(|c| c.sha256.clone());
                    let (p, pack, id) = (disk_path.to_path_buf(), pack.clone(), id.clone());
                    async move {
                        let bytes = tokio::task::spawn_blocking(move || {
                            read_chunk(&p, disk_bytes, chunk, i)
                        })
                        .await
                        .map_err(|e| BackupError::State(e.to_string()))??;
                        if Some(hex::encode(Sha256::digest(&bytes))) != want {
                            return Err(BackupError::Changed(i));
                        }
                        let part = self
                            .s3
                            .put_part(&pack, &id, k, PutPayload::from(bytes))
                            .await
                            .map_err(store(format!("upload part {k} of {pack}")))?;
                        Ok::<_, BackupError>(part.content_id)
                    }
                })
                .buffered(IN_FLIGHT);
            while let Some(part) = parts.next().await {
                if cancelled() {
                    drop(parts);
                    self.abort(vm_id, &r).await;
                    return Err(BackupError::Cancelled);
                }
                r.parts.push(part?);
                self.save(db, vm_id, &r).await?;
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
            self.s3
                .complete_multipart(&pack, &id, ids)
                .await
                .map_err(store(format!("complete {pack}")))?;
            let found = self
                .s3
                .head(&pack)
                .await
                .map_err(store(format!("head {pack}")))?
                .size;
            if found != r.manifest.uploaded_bytes {
                return Err(BackupError::PackSize {
                    found,
                    wanted: r.manifest.uploaded_bytes,
                });
            }
        }
        if cancelled() {
            return Err(BackupError::Cancelled);
        }
        let json =
            serde_json::to_vec(&r.manifest).map_err(|e| BackupError::State(e.to_string()))?;
        let mpath = ObjPath::from(self.names.manifest(vm_id, seq));
        self.s3
            .put(&mpath, PutPayload::from(json))
            .await
            .map_err(store(format!("put {mpath}")))?;
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

    async fn save(&self, db: &StateDb, vm_id: &str, r: &Resume) -> Result<(), BackupError> {
        let j = serde_json::to_string(r).map_err(|e| BackupError::State(e.to_string()))?;
        db.set_backup_resume(vm_id, Some(&j))
            .await
            .map_err(BackupError::State)
    }

    async fn abort(&self, vm_id: &str, r: &Resume) {
        if let Some(id) = &r.upload_id {
            let pack = ObjPath::from(self.names.pack(vm_id, r.manifest.seq));
            if let Err(e) = self.s3.abort_multipart(&pack, id).await {
                tracing::warn!(vm_id, error = %e, "backup: aborting a stale upload failed");
            }
        }
    }

    /// Retention: drops all but the newest `keep` backups, then the packs none of them reads.
    async fn sweep(&self, vm_id: &str) -> Result<Vec<u64>, BackupError> {
        let (manifests, packs) = self.scan_bucket(vm_id).await?;
        let mut reads = BTreeMap::new();
        for s in &manifests {
            // A manifest that does not read is kept out of the reckoning, and so not deleted
            // (someone may want to look at it); the packs it names are not protected.
            if let Ok(m) = self.manifest(vm_id, *s).await {
                reads.insert(*s, m.packs());
            }
        }
        let (drop, orphans) = plan::retention(self.keep, &reads, &packs);
        for s in &drop {
            let p = ObjPath::from(self.names.manifest(vm_id, *s));
            self.s3
                .delete(&p)
                .await
                .map_err(store(format!("delete {p}")))?;
        }
        for s in orphans {
            let p = ObjPath::from(self.names.pack(vm_id, s));
            self.s3
                .delete(&p)
                .await
                .map_err(store(format!("delete {p}")))?;
        }
        Ok(drop)
    }

    /// Restores backup `seq` (default: the newest) of the VM into a new file `out` (which must
    /// not exist), verifying every chunk and the disk's digest. On any failure the file is
    /// removed.
    pub async fn restore(
        &self,
        vm_id: &str,
        seq: Option<u64>,
        out: &Path,
    ) -> Result<Manifest, BackupError> {
        let seq = match seq {
            Some(s) => s,
            None => *self
                .scan_bucket(vm_id)
                .await?
                .0
                .last()
                .ok_or_else(|| BackupError::None(vm_id.into()))?,
        };
        let m = self.manifest(vm_id, seq).await?;
        let r = self.restore_into(vm_id, &m, out).await;
        if r.is_err() {
            let _ = std::fs::remove_file(out);
        }
        r.map(|()| m)
    }

    async fn restore_into(&self, vm_id: &str, m: &Manifest, out: &Path) -> Result<(), BackupError> {
        use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(disk(out))?;
        f.set_len(m.disk_bytes).map_err(disk(out))?;
        let f = Arc::new(f);
        let jobs: Vec<(u64, plan::ChunkRef)> = m
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
                    let bytes = self
                        .s3
                        .get_range(&pack, c.offset..c.offset + len)
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
            .buffered(IN_FLIGHT);
        let mut done = 0usize;
        while let Some((i, bytes)) = got.try_next().await? {
            let (f, at) = (f.clone(), i * m.chunk_bytes);
            tokio::task::spawn_blocking(move || f.write_all_at(&bytes, at))
                .await
                .map_err(|e| BackupError::State(e.to_string()))?
                .map_err(disk(out))?;
            done += 1;
            if done.is_multiple_of(16) || done == total {
                tracing::info!(vm_id, chunks = done, of = total, "restore: downloading");
            }
        }
        if root_of(m) != Some(m.disk_root.clone()) {
            return Err(BackupError::Digest);
        }
        f.sync_all().map_err(disk(out))
    }

    /// Deletes every object of the VM's (manifests, packs) and its unfinished upload; the
    /// number of objects deleted.
    pub async fn delete_all(&self, db: &StateDb, vm_id: &str) -> Result<u64, BackupError> {
        if let Some(r) = db
            .backup_resume(vm_id)
            .await
            .map_err(BackupError::State)?
            .and_then(|j| serde_json::from_str::<Resume>(&j).ok())
        {
            self.abort(vm_id, &r).await;
        }
        let names: Vec<ObjPath> = self
            .s3
            .list(Some(&ObjPath::from(self.names.vm(vm_id))))
            .map_ok(|o| o.location)
            .try_collect()
            .await
            .map_err(store("list"))?;
        for p in &names {
            self.s3
                .delete(p)
                .await
                .map_err(store(format!("delete {p}")))?;
        }
        db.set_backup_resume(vm_id, None)
            .await
            .map_err(BackupError::State)?;
        Ok(names.len() as u64)
    }
}

/// The disk's digest as the manifest records it: SHA-256 over every chunk's SHA-256 in disk
/// order, a zero chunk's being that of its zeros. (Cheaper than hashing the disk again, and
/// as binding.)
fn root_of(m: &Manifest) -> Option<String> {
    let mut h = Sha256::new();
    let mut zero: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    for (i, c) in m.chunks.iter().enumerate() {
        match c {
            Some(c) => h.update(hex::decode(&c.sha256).ok()?),
            None => {
                let len = chunk_len(m.disk_bytes, m.chunk_bytes, i as u64);
                let z = zero
                    .entry(len)
                    .or_insert_with(|| Sha256::digest(vec![0u8; len as usize]).into());
                h.update(*z);
            }
        }
    }
    Some(hex::encode(h.finalize()))
}

/// Reads the whole disk once: its size, each chunk's hash (`None` for zeros) and the root.
fn scan_disk(path: &Path, chunk: u64) -> Result<(u64, plan::Scan, [u8; 32]), BackupError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(disk(path))?;
    let size = f.metadata().map_err(disk(path))?.len();
    let n = plan::chunk_count(size, chunk)?;
    let mut scan = Vec::with_capacity(n as usize);
    let mut root = Sha256::new();
    let mut buf = vec![0u8; chunk as usize];
    let mut zero: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    for i in 0..n {
        let len = chunk_len(size, chunk, i) as usize;
        f.read_exact(&mut buf[..len]).map_err(disk(path))?;
        let b = &buf[..len];
        if b.iter().all(|x| *x == 0) {
            scan.push(None);
            let z = zero
                .entry(len as u64)
                .or_insert_with(|| Sha256::digest(&b[..len]).into());
            root.update(*z);
        } else {
            let h: [u8; 32] = Sha256::digest(b).into();
            root.update(h);
            scan.push(Some(h));
        }
    }
    Ok((size, scan, root.finalize().into()))
}

/// Chunk `i` of the disk.
fn read_chunk(path: &Path, size: u64, chunk: u64, i: u64) -> Result<Vec<u8>, BackupError> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(path).map_err(disk(path))?;
    if f.metadata().map_err(disk(path))?.len() != size {
        return Err(BackupError::Changed(i));
    }
    let mut buf = vec![0u8; chunk_len(size, chunk, i) as usize];
    f.read_exact_at(&mut buf, i * chunk).map_err(disk(path))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoint: &str) -> BackupConfig {
        BackupConfig {
            endpoint: endpoint.into(),
            bucket: "b".into(),
            region: "garage".into(),
            access_key_id: "GK1".into(),
            secret_key_file: "/nonexistent".into(),
            prefix: "attesta".into(),
            chunk_mib: 8,
            keep: 7,
        }
    }

    #[test]
    fn endpoints_and_names_are_checked() {
        assert!(check_config(&cfg("https://s3.example.net")).is_ok());
        assert!(check_config(&cfg("http://127.0.0.1:3900")).is_ok());
        assert!(check_config(&cfg("http://[::1]:3900")).is_ok());
        assert!(check_config(&cfg("http://localhost:3900/")).is_ok());
        assert!(check_config(&cfg("http://10.0.0.5:3900")).is_err());
        assert!(check_config(&cfg("http://127.0.0.1.evil.net")).is_err());
        assert!(check_config(&cfg("ftp://x")).is_err());
        assert!(check_config(&cfg("https://")).is_err());
        for (f, ok) in [
            (&|c: &mut BackupConfig| c.bucket = "a/b".into()) as &dyn Fn(&mut BackupConfig),
            &|c| c.prefix = "a//b".into(),
            &|c| c.prefix = "../x".into(),
            &|c| c.chunk_mib = 4,
            &|c| c.keep = 0,
            &|c| c.access_key_id = String::new(),
        ]
        .into_iter()
        .map(|f| (f, false))
        {
            let mut c = cfg("https://s3.example.net");
            f(&mut c);
            assert_eq!(check_config(&c).is_ok(), ok);
        }
    }

    #[test]
    fn a_disk_scans_to_the_root_its_manifest_restores_to() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let mib = 1u64 << 20;
        let mut bytes = vec![0u8; (21 * mib) as usize];
        bytes[3] = 1;
        bytes[(17 * mib) as usize] = 7;
        std::fs::write(&p, &bytes).unwrap();
        let (size, scan, root) = scan_disk(&p, 8 * mib).unwrap();
        assert_eq!(size, 21 * mib);
        assert!(scan[0].is_some() && scan[1].is_none() && scan[2].is_some());
        let m = plan::plan("vm", 1, 0, size, 8 * mib, root, &scan, None)
            .unwrap()
            .manifest;
        assert_eq!(root_of(&m), Some(hex::encode(root)));
        assert_eq!(
            read_chunk(&p, size, 8 * mib, 2).unwrap(),
            bytes[(16 * mib) as usize..]
        );
        assert!(matches!(
            read_chunk(&p, size + 1, 8 * mib, 2),
            Err(BackupError::Changed(2))
        ));
    }
}
