//! The broker's durable state behind one trait: VM records (with their wrapped keys), spent nonces,
//! the current signed allowlist (document and epoch) and the audit log. Every release or denial
//! commits its VM and audit changes (and spends an issued nonce) in one transaction before any
//! byte of the answer is sent. Embedded SQLite (WAL,
//! synchronous=FULL) by default; PostgreSQL implements the same trait for several replicas.
//!
//! **Group commit.** All writes go through one writer task that drains whatever is queued (up to
//! [`StoreOptions::max_batch`]) into a single `BEGIN IMMEDIATE` transaction: one fsync for the
//! whole batch, so durability does not cap throughput. Each write still gets its own answer, and
//! no caller is answered before the batch is durable.
//!
//! **Compare-and-set.** A release is re-checked inside the transaction: an issued nonce must
//! still be unspent, and the VM must still be live at the boot counter the decision was made on. If another
//! release or a terminate got there first, the release is committed as a denial instead (and
//! audited as one) — the key is never sent for a state that no longer holds.
//!
//! **Several processes.** The audit chain's tail is read inside each write transaction, so
//! `attesta-kbs vm register` (or a second replica) can write while `serve` runs. Writers are
//! serialized by the database: SQLite's `BEGIN IMMEDIATE`, and on PostgreSQL a transaction-scoped
//! advisory lock taken first in every write transaction, so replicas on one database append to
//! one hash chain in turn (each batch one lock, one commit) and every compare-and-set sees the
//! commits before it.
//!
//! **Two backends, one code path.** The SQL is the subset both speak (`$n` parameters,
//! `ON CONFLICT` upserts), run through sqlx's `Any` driver; only the schema's types, how a write
//! transaction begins, pruning and the WAL differ ([`Backend`]). On PostgreSQL, `terminate`
//! clears the wrapped key, but the old row version can outlive it in dead tuples, the WAL, base
//! backups and standbys until vacuumed and recycled: there the crypto-shred rests on the KEK
//! (the copy opens only with it; `kek rotate` re-wraps the live keys so that old copies die with
//! the old KEK).

use crate::audit::{Checkpoint, Entry, Line};
use crate::release::{NonceState, VmState};
use aws_lc_rs::signature::Ed25519KeyPair;
use sqlx::{AnyPool, Row};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

mod database;
mod pool;
mod schema;
mod writer;

use database::sqlite_url;
pub use database::{is_database_url, redacted};
use pool::Pools;
pub use schema::Backend;
use schema::migrate;
pub use writer::SPENT_NONCE_GRACE_SECS;
use writer::{Done, Job, Op, live_keys, prune_nonces, stored_kek_check, tail, writer};

/// Why the store failed. Never carries key material.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Db(String),
    #[error("VM {0} already exists")]
    Exists(String),
    #[error("VM {0} does not exist")]
    NoSuchVm(String),
    #[error("allowlist epoch {have} is older than the stored {stored}")]
    StaleEpoch { have: u64, stored: u64 },
    #[error("allowlist epoch {0} is already installed with other contents: sign a newer epoch")]
    EpochConflict(u64),
    #[error("the stored audit log is corrupt: {0}")]
    Audit(String),
    #[error("the store has shut down")]
    Closed,
    #[error("the KEK was rotated since this broker started: restart it with the new KEK")]
    KekRotated,
    #[error(
        "a VM was registered or terminated during the KEK rotation: nothing was changed, run it again"
    )]
    RotationRace,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// A VM's stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRecord {
    pub state: VmState,
    pub tenant: String,
    /// The signed order it was registered from.
    pub order: Vec<u8>,
    /// The envelope-encrypted volume key; `None` once crypto-shredded.
    pub wrapped_key: Option<Vec<u8>>,
}

/// What a decision commits, atomically.
#[derive(Clone, Debug)]
pub struct Commit {
    pub nonce: [u8; 32],
    /// Record the nonce as spent (it was live when the decision took it).
    pub spend_nonce: bool,
    /// Until when the spent nonce was valid (kept with it, for pruning and inspection).
    pub nonce_expires_at: u64,
    /// The VM's state after a release (its boot counter one higher than the decision saw).
    pub vm_update: Option<VmState>,
    /// The VM's lease, set by a release that certified a mesh key or by a renewal (written
    /// only if the decision holds).
    pub lease: Option<Lease>,
    /// For a renewal: the mesh key of the lease it judged. The lease is then written only if it
    /// still holds that key, unrevoked, for a VM not terminated — else the renewal lost a race
    /// (`lease_changed`: a new boot, a revocation or a terminate came first). `None` (a
    /// release): written as the release's compare-and-set allows.
    pub lease_from: Option<Vec<u8>>,
    pub audit: (u64, String, String, serde_json::Value),
}

/// A running VM's lease: what its last release certified, and its renewals since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub vm_id: String,
    pub chip_id: Vec<u8>,
    pub measurement: Vec<u8>,
    pub mesh_key: Vec<u8>,
    /// Unix seconds of the release or the last renewal.
    pub renewed_at: u64,
    /// Why the lease was revoked (never renewed again until the VM boots again); `None`: live.
    pub revoked: Option<String>,
}

/// What a decision's commit became.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    pub entry: Entry,
    /// The release holds: send the key. `false` for a denial, or for a release that lost a race
    /// (then `lost_race` says why and the audit entry is a denial).
    pub released: bool,
    pub lost_race: Option<&'static str>,
}

/// The broker's storage.
#[allow(async_fn_in_trait)]
pub trait Store {
    async fn register(
        &self,
        rec: &VmRecord,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError>;
    async fn vm(&self, vm_id: &str) -> Result<Option<VmRecord>, StoreError>;
    /// The VM's lease, if a release ever certified a mesh key for it.
    async fn lease(&self, vm_id: &str) -> Result<Option<Lease>, StoreError>;
    /// Mesh keys whose leases were revoked and whose last certificate was issued at or after
    /// `since` (so it may still be valid), newest first: what the broker's revocation list
    /// names. At most [`MAX_REVOKED_LISTED`].
    async fn revoked_mesh_keys(&self, since: u64) -> Result<Vec<RevokedKey>, StoreError>;
    /// What the durable record says of a nonce: `Spent` once a decision spent it. (Nonces are
    /// issued from memory, [`crate::nonces::NonceBook`]; only their spending is stored.)
    async fn nonce(&self, nonce: &[u8; 32]) -> Result<Option<NonceState>, StoreError>;
    /// Commits a release or denial (nonce, VM state, audit entry) in one transaction.
    async fn commit(&self, c: &Commit) -> Result<Committed, StoreError>;
    /// Crypto-shreds a VM: its wrapped key is destroyed, a tombstone remains.
    async fn terminate(
        &self,
        vm_id: &str,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError>;
    /// The epoch of the current allowlist (0: none yet). Cheap: brokers poll it.
    async fn allowlist_epoch(&self) -> Result<u64, StoreError>;
    /// The current signed allowlist document and its epoch, as installed (not re-verified).
    async fn allowlist(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Makes `doc` (already verified, of `epoch`) the current allowlist, audited; `false` when
    /// it already is. An older epoch is refused, and so is another document of the current
    /// epoch (two lists under one epoch would leave "current" ambiguous).
    async fn set_allowlist(&self, epoch: u64, doc: &[u8], now: u64) -> Result<bool, StoreError>;
    /// The audit entries in order.
    async fn audit_entries(&self) -> Result<Vec<Entry>, StoreError>;
    /// The audit log as JSON Lines: entries, each signed checkpoint after the entry it covers.
    async fn audit_log(&self) -> Result<String, StoreError>;
    /// Signs a checkpoint over the whole log now (if there is an audit key and any entry).
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;
    /// Whether the database answers.
    async fn ready(&self) -> Result<(), StoreError>;
    /// The KEK's check value (its wrap of a fixed key), or `check` stored now if there is none.
    async fn init_kek_check(&self, check: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Every live VM's wrapped key: (VM id, generation, wrapped key).
    async fn live_keys(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError>;
    /// Replaces every live wrapped key at once (`rekey`: id, generation, old, new) and the KEK
    /// check value `expect` with `check`, audited; refused unless `rekey` covers exactly the
    /// live keys as they are now, so nothing stays wrapped under the old KEK.
    async fn rekey(
        &self,
        expect: &[u8],
        check: &[u8],
        rekey: Vec<Rekeyed>,
        now: u64,
    ) -> Result<usize, StoreError>;
}

/// One VM's wrapped key under the old KEK and under the new: (VM id, generation, old, new).
pub type Rekeyed = (String, u64, Vec<u8>, Vec<u8>);

/// How the writer batches and signs.
#[derive(Clone)]
pub struct StoreOptions {
    /// Signs audit checkpoints; without it the log is chained but has no checkpoints.
    pub audit_key: Option<Arc<Ed25519KeyPair>>,
    /// A checkpoint after at most this many entries…
    pub checkpoint_every: u64,
    /// …or this long after the last one, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Writes per transaction, at most.
    pub max_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            audit_key: None,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            max_batch: 512,
        }
    }
}

/// Writer counters (for metrics): transactions and the writes they carried.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub transactions: AtomicU64,
    pub writes: AtomicU64,
    pub checkpoints: AtomicU64,
}

/// The store on SQLite (WAL mode, full fsync) or PostgreSQL, written by one group-committing
/// task.
pub struct SqlStore {
    pools: Arc<Pools>,
    backend: Backend,
    writer: mpsc::Sender<Job>,
    pub stats: Arc<StoreStats>,
    /// The KEK check value this process wraps keys under ([`SqlStore::bind_kek`]): a
    /// registration is refused once the store's differs (the KEK was rotated meanwhile).
    kek_check: std::sync::Mutex<Option<Vec<u8>>>,
}

/// A mesh key whose lease was revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedKey {
    pub vm_id: String,
    pub mesh_key: Vec<u8>,
    /// When the last certificate for the key was issued (the release or renewal before the
    /// revocation): every certificate for it has ended a lease after this.
    pub certified_at: u64,
    /// The revocation's reasons.
    pub why: String,
}

/// Most revoked keys one revocation list names (a delegated list holds about 9,000; each key
/// is one entry of ~70 bytes). More at once than this is an incident, not a clone: the oldest
/// wait for their certificates to expire, and the broker says so in its log.
pub const MAX_REVOKED_LISTED: usize = 8_000;

fn lease_of(r: &sqlx::any::AnyRow) -> Lease {
    Lease {
        vm_id: r.get(0),
        chip_id: r.get(1),
        measurement: r.get(2),
        mesh_key: r.get(3),
        renewed_at: u(r.get(4)),
        revoked: r.get(5),
    }
}

pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The name the store had while SQLite was its only backend.
pub type SqliteStore = SqlStore;

impl SqlStore {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations; no
    /// audit key.
    pub async fn open(path: &Path) -> Result<SqlStore, StoreError> {
        Self::open_with(path, StoreOptions::default()).await
    }

    /// Opens what a `database` setting names: a `postgres://` or `postgresql://` URL, otherwise
    /// an SQLite file's path.
    pub async fn open_database(
        database: &Path,
        opts: StoreOptions,
    ) -> Result<SqlStore, StoreError> {
        match database.to_str() {
            Some(url) if is_database_url(url) => Self::open_url(url, opts).await,
            _ => Self::open_with(database, opts).await,
        }
    }

    /// Which database this store is on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Opens the SQLite database at `path` with writer options. Must be called inside a Tokio
    /// runtime (the writer is a task).
    pub async fn open_with(path: &Path, opts: StoreOptions) -> Result<SqlStore, StoreError> {
        Self::open_url(&sqlite_url(path)?, opts).await
    }

    /// Opens `database`: a `postgres://` or `postgresql://` URL or a `sqlite:` one. Must be
    /// called inside a Tokio runtime (the writer is a task).
    pub async fn open_url(database: &str, opts: StoreOptions) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if is_database_url(database) {
            Backend::Postgres
        } else if database.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Db(
                "the database must be a postgres://, postgresql:// or sqlite: URL".into(),
            ));
        };
        let pools = Pools::open(database, backend).await?;
        let pool = pools.get();
        migrate(&pool, backend).await?;
        // The log must be readable where it ends, or nothing can be appended to it.
        tail(&mut *pool.acquire().await?).await?;
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(StoreStats::default());
        tokio::spawn(writer(pools.clone(), backend, rx, opts, stats.clone()));
        Ok(SqlStore {
            pools,
            backend,
            writer: tx,
            stats,
            kek_check: std::sync::Mutex::new(None),
        })
    }

    /// The pool on the database server in use now.
    fn pool(&self) -> AnyPool {
        self.pools.get()
    }

    /// From now on, registrations commit only while the store's KEK check value is `check`
    /// (the KEK this process wraps with); `None`: unchecked.
    pub fn bind_kek(&self, check: Option<Vec<u8>>) {
        *self.kek_check.lock().unwrap_or_else(|e| e.into_inner()) = check;
    }

    /// Deletes nonces that expired before `before`, in batches of at most 10,000 (the writer
    /// does this every minute for those expired [`SPENT_NONCE_GRACE_SECS`] ago); how many.
    pub async fn prune_nonces(&self, before: u64) -> Result<u64, StoreError> {
        prune_nonces(&self.pool(), self.backend, before).await
    }

    /// The KEK check value bound with [`SqlStore::bind_kek`].
    pub fn bound_kek(&self) -> Option<Vec<u8>> {
        self.kek_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn submit_entry(&self, op: Op) -> Result<Entry, StoreError> {
        match self.submit(op).await? {
            Done::Entry(e) => Ok(e),
            _ => Err(StoreError::Db("unexpected writer answer".into())),
        }
    }
}

impl Store for SqlStore {
    async fn register(
        &self,
        rec: &VmRecord,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError> {
        self.submit_entry(Op::Register(rec.clone(), now, detail, self.bound_kek()))
            .await
    }

    async fn vm(&self, vm_id: &str) -> Result<Option<VmRecord>, StoreError> {
        let row = sqlx::query("SELECT vm_id, tenant, generation, boot_counter, terminated, wrapped_key, order_doc FROM vms WHERE vm_id = $1")
            .bind(vm_id)
            .fetch_optional(&self.pool())
            .await?;
        Ok(row.map(|r| VmRecord {
            state: VmState {
                vm_id: r.get(0),
                generation: u(r.get(2)),
                boot_counter: u(r.get(3)),
                terminated: r.get::<i64, _>(4) != 0,
            },
            tenant: r.get(1),
            wrapped_key: r.get(5),
            order: r.get(6),
        }))
    }

    async fn lease(&self, vm_id: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query(
            "SELECT vm_id, chip_id, measurement, mesh_key, renewed_at, revoked FROM leases WHERE vm_id = $1",
        )
        .bind(vm_id)
        .fetch_optional(&self.pool())
        .await?;
        Ok(row.map(|r| lease_of(&r)))
    }

    async fn revoked_mesh_keys(&self, since: u64) -> Result<Vec<RevokedKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT vm_id, mesh_key, certified_at, why FROM revoked_mesh_keys \
             WHERE certified_at >= $1 ORDER BY certified_at DESC, mesh_key LIMIT $2",
        )
        .bind(i(since))
        .bind(MAX_REVOKED_LISTED as i64)
        .fetch_all(&self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| RevokedKey {
                vm_id: r.get(0),
                mesh_key: r.get(1),
                certified_at: u(r.get(2)),
                why: r.get(3),
            })
            .collect())
    }

    async fn nonce(&self, nonce: &[u8; 32]) -> Result<Option<NonceState>, StoreError> {
        let row = sqlx::query("SELECT vm_id, expires_at, spent FROM nonces WHERE nonce = $1")
            .bind(&nonce[..])
            .fetch_optional(&self.pool())
            .await?;
        Ok(row.map(|r| {
            if r.get::<i64, _>(2) != 0 {
                NonceState::Spent
            } else {
                NonceState::Issued {
                    vm_id: r.get(0),
                    expires_at: u(r.get(1)),
                }
            }
        }))
    }

    async fn commit(&self, c: &Commit) -> Result<Committed, StoreError> {
        match self.submit(Op::Decision(c.clone())).await? {
            Done::Decision(d) => Ok(d),
            _ => Err(StoreError::Db("unexpected writer answer".into())),
        }
    }

    async fn terminate(
        &self,
        vm_id: &str,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError> {
        self.submit_entry(Op::Terminate(vm_id.to_string(), now, detail))
            .await
    }

    async fn allowlist_epoch(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = sqlx::query("SELECT value FROM meta WHERE key = 'allowlist_epoch'")
            .fetch_optional(&self.pool())
            .await?
            .map(|r| r.get(0));
        Ok(v.map(u).unwrap_or(0))
    }

    async fn allowlist(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let row = sqlx::query("SELECT epoch, doc FROM allowlist WHERE id = 1")
            .fetch_optional(&self.pool())
            .await?;
        Ok(row.map(|r| (u(r.get(0)), r.get(1))))
    }

    async fn set_allowlist(&self, epoch: u64, doc: &[u8], now: u64) -> Result<bool, StoreError> {
        match self.submit(Op::Allowlist(epoch, doc.to_vec(), now)).await? {
            Done::Entry(_) => Ok(true),
            _ => Ok(false),
        }
    }

    async fn audit_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query("SELECT entry FROM audit ORDER BY seq")
            .fetch_all(&self.pool())
            .await?;
        rows.into_iter()
            .map(
                |r| match serde_json::from_str::<Line>(&r.get::<String, _>(0)) {
                    Ok(Line::Entry(e)) => Ok(e),
                    _ => Err(StoreError::Audit("an entry is unreadable".into())),
                },
            )
            .collect()
    }

    async fn audit_log(&self) -> Result<String, StoreError> {
        // One read transaction, so entries and checkpoints are from the same moment.
        let mut tx = self.backend.begin_snapshot(&self.pool()).await?;
        let entries: Vec<String> = sqlx::query("SELECT entry FROM audit ORDER BY seq")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let cps: Vec<(i64, String)> =
            sqlx::query("SELECT seq, checkpoint FROM checkpoints ORDER BY seq")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        tx.commit().await?;
        let mut out = String::new();
        let mut cps = cps.into_iter().peekable();
        for (seq, e) in entries.iter().enumerate() {
            out.push_str(e);
            out.push('\n');
            while let Some((s, c)) = cps.next_if(|(s, _)| u(*s) <= seq as u64) {
                let _ = s;
                out.push_str(&format!("{{\"checkpoint\":{c}}}\n"));
            }
        }
        Ok(out)
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        match self.submit(Op::Checkpoint).await? {
            Done::Checkpoint(c) => Ok(c),
            _ => Ok(None),
        }
    }

    async fn ready(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool()).await?;
        Ok(())
    }

    async fn init_kek_check(&self, check: &[u8]) -> Result<Vec<u8>, StoreError> {
        sqlx::query("INSERT INTO kek (id, check_blob) VALUES (1, $1) ON CONFLICT(id) DO NOTHING")
            .bind(check)
            .execute(&self.pool())
            .await?;
        let mut conn = self.pool().acquire().await?;
        stored_kek_check(&mut conn)
            .await?
            .ok_or_else(|| StoreError::Db("the KEK check value is missing".into()))
    }

    async fn live_keys(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
        live_keys(&mut *self.pool().acquire().await?).await
    }

    async fn rekey(
        &self,
        expect: &[u8],
        check: &[u8],
        keys: Vec<Rekeyed>,
        now: u64,
    ) -> Result<usize, StoreError> {
        let n = keys.len();
        self.submit_entry(Op::Rekey {
            expect: expect.to_vec(),
            check: check.to_vec(),
            keys,
            now,
        })
        .await
        .map(|_| n)
    }
}
