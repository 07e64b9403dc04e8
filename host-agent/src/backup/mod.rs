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
//! - **Terminate deletes them all**, with the key's crypto-shred (see the daemon), and leaves
//!   a marker (`<prefix>/<vm_id>/terminated`) after which the VM is never backed up again.
//!
//! A VM is backed up while it is not running (a copy of a disk in use is torn), by one host
//! at a time: a VM restored on another miner is backed up from there, once the first is gone.
//! A bucket should also have a lifecycle rule that aborts incomplete multipart uploads after a
//! day or so, for uploads whose host disappeared.

mod disk;
pub mod plan;
mod restore;
mod upload;

use crate::config::BackupConfig;
use crate::state::StateDb;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::MultipartStore as _;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore as _, ObjectStoreExt as _};
pub use plan::Manifest;
use plan::{Names, PlanError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

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
    #[error("VM {0} was terminated: its backups are gone and it is not backed up again")]
    Terminated(String),
    #[error("the store no longer knows the unfinished upload; the next backup starts over")]
    StaleUpload,
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
    let u = url::Url::parse(&b.endpoint).map_err(|e| format!("endpoint {}: {e}", b.endpoint))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "endpoint {}: no user or password in it",
            b.endpoint
        ));
    }
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(format!("endpoint {}: no host", b.endpoint)),
    };
    match u.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "endpoint {}: plain http only to a loopback address; use https",
                b.endpoint
            ));
        }
        other => return Err(format!("endpoint {}: scheme {other}", b.endpoint)),
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
    if !(5..=128).contains(&b.chunk_mib) {
        return Err(format!("chunk_mib {}: 5 to 128", b.chunk_mib));
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
    /// The pack is complete in the store (only its manifest was still to be written).
    #[serde(default)]
    pub completed: bool,
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
    /// Why its manifest does not read, if it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

    /// Backup `seq`'s manifest, checked; a `Store` error if it cannot be fetched, a `Plan`
    /// error if what was fetched is not a manifest of this VM's.
    pub async fn manifest(&self, vm_id: &str, seq: u64) -> Result<Manifest, BackupError> {
        let path = ObjPath::from(self.names.manifest(vm_id, seq));
        // Its size first: an empty or oversized object is not a manifest (and is not read).
        let size = self
            .s3
            .head(&path)
            .await
            .map_err(store(format!("head {path}")))?
            .size;
        if size == 0 || size > plan::MAX_MANIFEST {
            return Err(PlanError::Shape(format!("object of {size} bytes")).into());
        }
        let bytes = self
            .s3
            .get_range(&path, 0..size)
            .await
            .map_err(store(format!("get {path}")))?;
        Ok(Manifest::parse(&bytes, vm_id)?)
    }

    /// The VM's backups, oldest first; a manifest that does not read is listed with why.
    pub async fn list(&self, vm_id: &str) -> Result<Vec<Listed>, BackupError> {
        let (manifests, _) = self.scan_bucket(vm_id).await?;
        let mut out = Vec::new();
        for s in manifests {
            out.push(match self.manifest(vm_id, s).await {
                Ok(m) => Listed {
                    backup: m.seq,
                    created_at: m.created_at,
                    disk_bytes: m.disk_bytes,
                    bytes_uploaded: m.uploaded_bytes,
                    error: None,
                },
                Err(BackupError::Plan(e)) => Listed {
                    backup: s,
                    created_at: 0,
                    disk_bytes: 0,
                    bytes_uploaded: 0,
                    error: Some(e.to_string()),
                },
                Err(e) => return Err(e),
            });
        }
        Ok(out)
    }

    fn tombstone(&self, vm_id: &str) -> ObjPath {
        ObjPath::from(format!("{}/terminated", self.names.vm(vm_id)))
    }

    /// Whether terminate has left its marker for the VM.
    async fn terminated(&self, vm_id: &str) -> Result<bool, BackupError> {
        match self.s3.head(&self.tombstone(vm_id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store("head the terminated marker")(e)),
        }
    }

    async fn save(&self, db: &StateDb, vm_id: &str, r: &Resume) -> Result<(), BackupError> {
        let j = serde_json::to_string(r).map_err(|e| BackupError::State(e.to_string()))?;
        db.set_backup_resume(vm_id, Some(&j))
            .await
            .map_err(BackupError::State)
    }

    /// Aborts an unfinished upload (an upload the store no longer knows is no error).
    async fn abort(&self, vm_id: &str, r: &Resume) -> Result<(), BackupError> {
        let Some(id) = &r.upload_id else {
            return Ok(());
        };
        if r.completed {
            return Ok(());
        }
        let pack = ObjPath::from(self.names.pack(vm_id, r.manifest.seq));
        match self.s3.abort_multipart(&pack, id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store(format!("abort the upload of {pack}"))(e)),
        }
    }

    /// Retention: drops all but the newest `keep` backups, then the packs none of them reads.
    /// Any manifest that cannot be fetched stops it; while any manifest does not read, no
    /// pack is deleted (which packs it reads is not known).
    async fn sweep(&self, vm_id: &str) -> Result<Vec<u64>, BackupError> {
        let (manifests, packs) = self.scan_bucket(vm_id).await?;
        let mut reads = BTreeMap::new();
        let mut unreadable = false;
        for s in &manifests {
            match self.manifest(vm_id, *s).await {
                Ok(m) => {
                    reads.insert(*s, m.packs());
                }
                Err(BackupError::Plan(e)) => {
                    tracing::warn!(vm_id, backup = s, error = %e, "retention: manifest does not read; kept, no pack deleted");
                    unreadable = true;
                }
                Err(e) => return Err(e),
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
        if !unreadable {
            for s in orphans {
                let p = ObjPath::from(self.names.pack(vm_id, s));
                self.s3
                    .delete(&p)
                    .await
                    .map_err(store(format!("delete {p}")))?;
            }
        }
        Ok(drop)
    }

    /// Deletes every object of the VM's (manifests, packs) after aborting its unfinished
    /// upload, and leaves the terminated marker; the number of objects deleted. An abort that
    /// fails fails it (it is retried: the upload's parts are data of the VM's too).
    pub async fn delete_all(&self, db: &StateDb, vm_id: &str) -> Result<u64, BackupError> {
        if let Some(j) = db.backup_resume(vm_id).await.map_err(BackupError::State)? {
            match serde_json::from_str::<Resume>(&j) {
                Ok(r) => self.abort(vm_id, &r).await?,
                Err(e) => tracing::warn!(vm_id, error = %e, "unfinished backup record unreadable"),
            }
        }
        self.s3
            .put(
                &self.tombstone(vm_id),
                object_store::PutPayload::from_static(b"terminated\n"),
            )
            .await
            .map_err(store("put the terminated marker"))?;
        let tomb = self.tombstone(vm_id);
        let names: Vec<ObjPath> = self
            .s3
            .list(Some(&ObjPath::from(self.names.vm(vm_id))))
            .map_ok(|o| o.location)
            .try_filter(|p| futures::future::ready(*p != tomb))
            .try_collect()
            .await
            .map_err(store("list"))?;
        let s3 = self.s3.clone();
        futures::stream::iter(names.clone())
            .map(move |p| {
                let s3 = s3.clone();
                async move { s3.delete(&p).await.map_err(store(format!("delete {p}"))) }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        db.set_backup_resume(vm_id, None)
            .await
            .map_err(BackupError::State)?;
        Ok(names.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::disk::{read_chunk, root_of, scan_disk};
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
        assert!(check_config(&cfg("http://127.0.0.1:80@evil.net/")).is_err());
        assert!(check_config(&cfg("http://[::1]@evil.net")).is_err());
        assert!(check_config(&cfg("https://user:pw@s3.example.net")).is_err());
        assert!(check_config(&cfg("ftp://x")).is_err());
        assert!(check_config(&cfg("https://")).is_err());
        for (f, ok) in [
            (&|c: &mut BackupConfig| c.bucket = "a/b".into()) as &dyn Fn(&mut BackupConfig),
            &|c| c.prefix = "a//b".into(),
            &|c| c.prefix = "../x".into(),
            &|c| c.chunk_mib = 4,
            &|c| c.chunk_mib = 129,
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
        let (size, scan, root) = scan_disk(&p, 8 * mib, &Default::default()).unwrap();
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
