//! The broker's durable state behind one trait: VM records (with their wrapped keys), spent nonces,
//! the current signed allowlist (document and epoch) and the audit log. Every release or denial commits its nonce, VM and audit
//! changes in one transaction before any byte of the answer is sent. Embedded SQLite (WAL,
//! synchronous=FULL) by default; PostgreSQL implements the same trait for several replicas.
//!
//! **Group commit.** All writes go through one writer task that drains whatever is queued (up to
//! [`StoreOptions::max_batch`]) into a single `BEGIN IMMEDIATE` transaction: one fsync for the
//! whole batch, so durability does not cap throughput. Each write still gets its own answer, and
//! no caller is answered before the batch is durable.
//!
//! **Compare-and-set.** A release is re-checked inside the transaction: its nonce must still be
//! unspent, and the VM must still be live at the boot counter the decision was made on. If another
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

use crate::audit::{Chain, Checkpoint, Entry, Line};
use crate::release::{NonceState, VmState};
use aws_lc_rs::signature::Ed25519KeyPair;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

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
    pub audit: (u64, String, String, serde_json::Value),
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

const MIGRATIONS: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS vms (
        vm_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, generation INTEGER NOT NULL,
        boot_counter INTEGER NOT NULL, terminated INTEGER NOT NULL DEFAULT 0,
        wrapped_key BLOB, order_doc BLOB NOT NULL);
     CREATE TABLE IF NOT EXISTS nonces (
        nonce BLOB PRIMARY KEY, vm_id TEXT NOT NULL, expires_at INTEGER NOT NULL, spent INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    "CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY, checkpoint TEXT NOT NULL);
     CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at);",
    // The current signed allowlist (one row; its epoch is also meta's allowlist_epoch), so that
    // every broker process on this database follows what `allowlist install` put here.
    "CREATE TABLE IF NOT EXISTS allowlist (
        id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL, doc BLOB NOT NULL);",
    // Which KEK the wrapped keys are under: its wrap of a fixed key (opens only with that KEK).
    "CREATE TABLE IF NOT EXISTS kek (id INTEGER PRIMARY KEY CHECK (id = 1), check_blob BLOB NOT NULL);",
];

/// Which database a store is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL schema: the same tables, PostgreSQL's types.
const PG_MIGRATIONS: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS vms (
        vm_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, generation BIGINT NOT NULL,
        boot_counter BIGINT NOT NULL, terminated BIGINT NOT NULL DEFAULT 0,
        wrapped_key BYTEA, order_doc BYTEA NOT NULL);
     CREATE TABLE IF NOT EXISTS nonces (
        nonce BYTEA PRIMARY KEY, vm_id TEXT NOT NULL, expires_at BIGINT NOT NULL, spent BIGINT NOT NULL DEFAULT 0);
     CREATE TABLE IF NOT EXISTS audit (seq BIGINT PRIMARY KEY, entry TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);",
    "CREATE TABLE IF NOT EXISTS checkpoints (seq BIGINT PRIMARY KEY, checkpoint TEXT NOT NULL);
     CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at);",
    "CREATE TABLE IF NOT EXISTS allowlist (
        id BIGINT PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, doc BYTEA NOT NULL);",
    "CREATE TABLE IF NOT EXISTS kek (id BIGINT PRIMARY KEY CHECK (id = 1), check_blob BYTEA NOT NULL);",
];

/// The advisory lock every PostgreSQL write transaction takes first ("attesta" in ASCII).
const PG_WRITE_LOCK: i64 = 0x0061_7474_6573_7461;

impl Backend {
    fn migrations(self) -> &'static [&'static str] {
        match self {
            Backend::Sqlite => &MIGRATIONS,
            Backend::Postgres => &PG_MIGRATIONS,
        }
    }

    /// A write transaction, holding the database's writer lock.
    async fn begin_write(self, pool: &AnyPool) -> Result<Transaction<'static, Any>, StoreError> {
        match self {
            Backend::Sqlite => Ok(pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                // READ COMMITTED: each statement after the lock sees every commit before it
                // (a snapshot taken before waiting would not).
                let mut tx = pool
                    .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
                    .await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// A read transaction that sees one moment throughout.
    async fn begin_snapshot(self, pool: &AnyPool) -> Result<Transaction<'static, Any>, StoreError> {
        match self {
            Backend::Sqlite => Ok(pool.begin().await?),
            Backend::Postgres => Ok(pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?),
        }
    }
}

/// Whether a `database` setting is a PostgreSQL URL (rather than an SQLite file's path).
pub fn is_database_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `database` as it may be shown: a URL without its password (in the userinfo or a `password`
/// parameter); a URL that does not parse is not shown at all.
pub fn redacted(database: &str) -> String {
    if !is_database_url(database) {
        return database.to_string();
    }
    let Ok(mut u) = url::Url::parse(database) else {
        return "<a postgres:// URL that does not parse>".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("password") {
                "***".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if !pairs.is_empty() {
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Refuses a PostgreSQL URL whose traffic could be read or forged on the way: a host other than
/// loopback or a Unix socket needs `sslmode=verify-full` (TLS, the server's certificate and name
/// checked). The broker relies on the database's answers for "released at most once".
fn check_postgres_url(database: &str) -> Result<(), StoreError> {
    let u = url::Url::parse(database)
        .map_err(|e| StoreError::Db(format!("the database URL does not parse: {e}")))?;
    let param = |name: &str| {
        u.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let local = match (param("host"), u.host()) {
        (Some(h), _) => h.starts_with('/'),
        (None, None) => true,
        // A postgres:// URL's host is opaque to the URL parser: an IPv4 address arrives as text.
        (None, Some(url::Host::Domain(d))) => {
            d == "localhost" || d.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        (None, Some(url::Host::Ipv4(a))) => a.is_loopback(),
        (None, Some(url::Host::Ipv6(a))) => a.is_loopback(),
    };
    if local || param("sslmode").as_deref() == Some("verify-full") {
        return Ok(());
    }
    Err(StoreError::Db(
        "a database that is not on this machine must be reached with sslmode=verify-full (TLS, its certificate and name checked)".into(),
    ))
}

/// A `sqlite:` URL for `path`, made absolute first (a relative one would be read as a host);
/// every byte outside the unreserved set and `/` percent-encoded, as sqlx decodes them.
fn sqlite_url(path: &Path) -> Result<String, StoreError> {
    let abs = std::path::absolute(path)
        .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
    let text = abs
        .to_str()
        .ok_or_else(|| StoreError::Db(format!("{}: the path is not UTF-8", abs.display())))?;
    if abs
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(StoreError::Db(format!(
            "{text}: give the path without `..`"
        )));
    }
    let mut p = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!("sqlite://{p}?mode=rwc"))
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        for (url, want) in [
            (
                "postgres://kbs:s3cret@db.example/kbs?sslmode=verify-full",
                "postgres://kbs:***@db.example/kbs?sslmode=verify-full",
            ),
            (
                "postgres://kbs@db.example/kbs?password=s3cret",
                "postgres://kbs@db.example/kbs?password=***",
            ),
            (
                "postgres://kbs:a/b@host/db",
                "<a postgres:// URL that does not parse>",
            ),
            ("/var/lib/attesta/kbs.db", "/var/lib/attesta/kbs.db"),
        ] {
            let shown = redacted(url);
            assert_eq!(shown, want);
            assert!(!shown.contains("s3cret"));
        }
    }

    #[test]
    fn remote_databases_need_verified_tls() {
        for ok in [
            "postgres://kbs@127.0.0.1:5432/kbs",
            "postgres://kbs@localhost/kbs",
            "postgres://kbs@[::1]/kbs",
            "postgres://kbs@localhost/kbs?host=/run/postgresql",
            "postgres:///kbs?host=/run/postgresql",
            "postgres://kbs@db.example/kbs?sslmode=verify-full",
        ] {
            assert!(check_postgres_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "postgres://kbs@db.example/kbs",
            "postgres://kbs@db.example/kbs?sslmode=require",
            "postgres://kbs@10.0.0.5/kbs?sslmode=prefer",
            "postgres://kbs@127.0.0.1/kbs?host=db.example",
        ] {
            assert!(check_postgres_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sqlite_paths_become_absolute_encoded_urls() {
        let u = sqlite_url(Path::new("/srv/a b/k#1?.db")).unwrap();
        assert_eq!(u, "sqlite:///srv/a%20b/k%231%3F.db?mode=rwc");
        assert!(sqlite_url(Path::new("/srv/../etc/kbs.db")).is_err());
        let rel = sqlite_url(Path::new("kbs.db")).unwrap();
        assert!(rel.starts_with("sqlite:///") && rel.ends_with("/kbs.db?mode=rwc"));
    }
}

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

enum Op {
    /// With the KEK check value the key was wrapped under, if the broker bound one.
    Register(VmRecord, u64, serde_json::Value, Option<Vec<u8>>),
    Rekey {
        expect: Vec<u8>,
        check: Vec<u8>,
        keys: Vec<Rekeyed>,
        now: u64,
    },
    Terminate(String, u64, serde_json::Value),
    Allowlist(u64, Vec<u8>, u64),
    Decision(Commit),
    Checkpoint,
}

enum Done {
    Nothing,
    Entry(Entry),
    Decision(Committed),
    Checkpoint(Option<Checkpoint>),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// The store on SQLite (WAL mode, full fsync) or PostgreSQL, written by one group-committing
/// task.
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    writer: mpsc::Sender<Job>,
    pub stats: Arc<StoreStats>,
    /// The KEK check value this process wraps keys under ([`SqlStore::bind_kek`]): a
    /// registration is refused once the store's differs (the KEK was rotated meanwhile).
    kek_check: std::sync::Mutex<Option<Vec<u8>>>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
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
            check_postgres_url(database)?;
            Backend::Postgres
        } else if database.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Db(
                "the database must be a postgres://, postgresql:// or sqlite: URL".into(),
            ));
        };
        let conn: AnyConnectOptions = database
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Db(format!("the database URL: {e}")))?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |c, _| {
                Box::pin(async move {
                    let setup = match backend {
                        // Deleted content is overwritten with zeros, not left in free space or
                        // free pages: a terminated VM's wrapped key must not survive in the file.
                        Backend::Sqlite => {
                            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                             PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                             PRAGMA secure_delete = ON;"
                        }
                        // Whatever the server, role or URL say: a commit is durable before it
                        // is answered, and a writer that cannot get the lock (another replica
                        // stuck, or anyone else holding it) gives up instead of stalling.
                        Backend::Postgres => {
                            "SET synchronous_commit = on; SET lock_timeout = '10s'; \
                             SET idle_in_transaction_session_timeout = '60s'; \
                             SET default_transaction_isolation = 'read committed';"
                        }
                    };
                    sqlx::Executor::execute(&mut *c, setup).await?;
                    Ok(())
                })
            })
            .connect_with(conn)
            .await?;
        migrate(&pool, backend).await?;
        // The log must be readable where it ends, or nothing can be appended to it.
        tail(&mut *pool.acquire().await?).await?;
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(StoreStats::default());
        tokio::spawn(writer(pool.clone(), backend, rx, opts, stats.clone()));
        Ok(SqlStore {
            pool,
            backend,
            writer: tx,
            stats,
            kek_check: std::sync::Mutex::new(None),
        })
    }

    /// From now on, registrations commit only while the store's KEK check value is `check`
    /// (the KEK this process wraps with); `None`: unchecked.
    pub fn bind_kek(&self, check: Option<Vec<u8>>) {
        *self.kek_check.lock().unwrap_or_else(|e| e.into_inner()) = check;
    }

    /// Deletes nonces that expired before `before`, in batches of at most 10,000 (the writer
    /// does this every minute for those expired [`SPENT_NONCE_GRACE_SECS`] ago); how many.
    pub async fn prune_nonces(&self, before: u64) -> Result<u64, StoreError> {
        prune_nonces(&self.pool, self.backend, before).await
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

async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    // Under the writer lock: replicas starting at once migrate one after the other.
    let mut tx = backend.begin_write(pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")
        .execute(&mut *tx)
        .await?;
    let done: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        .fetch_one(&mut *tx)
        .await?
        .get(0);
    for (n, sql) in backend
        .migrations()
        .iter()
        .enumerate()
        .skip(usize::try_from(done).unwrap_or(0))
    {
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)")
            .bind(n as i64 + 1)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Where the chain stands, from the database itself (inside the caller's transaction).
async fn tail(conn: &mut AnyConnection) -> Result<Chain, StoreError> {
    let last: Option<String> = sqlx::query("SELECT entry FROM audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| r.get(0));
    match last {
        None => Ok(Chain::default()),
        Some(s) => match serde_json::from_str::<Line>(&s) {
            Ok(Line::Entry(e)) => Ok(Chain::resume(&e)),
            _ => Err(StoreError::Audit("the last entry is unreadable".into())),
        },
    }
}

/// The one writer: drains the queue into transactions until every sender is gone.
async fn writer(
    pool: AnyPool,
    backend: Backend,
    mut rx: mpsc::Receiver<Job>,
    opts: StoreOptions,
    stats: Arc<StoreStats>,
) {
    let mut unsigned = 0u64;
    let mut last_cp = Instant::now();
    let mut wal_pending = false;
    let mut last_prune = Instant::now();
    loop {
        // The spent-nonce table would otherwise grow by one row per decision, forever.
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            match prune_nonces(
                &pool,
                backend,
                unix_now().saturating_sub(SPENT_NONCE_GRACE_SECS),
            )
            .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(n, "expired nonces pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning expired nonces failed"),
            }
        }
        let first = match tokio::time::timeout(opts.checkpoint_interval, rx.recv()).await {
            Ok(Some(j)) => Some(j),
            Ok(None) => {
                if wal_pending {
                    truncate_wal(&pool, backend, 3).await;
                }
                // Shutting down: cover what was written since the last checkpoint.
                if unsigned > 0 {
                    let _ =
                        apply(&pool, backend, Vec::new(), opts.audit_key.as_deref(), true).await;
                }
                return;
            }
            Err(_) => {
                // Idle: a good moment to retry emptying the WAL after a terminate.
                if wal_pending {
                    wal_pending = !truncate_wal(&pool, backend, 1).await;
                }
                None
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < opts.max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let due = opts.audit_key.is_some()
            && (unsigned >= opts.checkpoint_every
                || (unsigned > 0 && last_cp.elapsed() >= opts.checkpoint_interval));
        if batch.is_empty() && !due {
            continue;
        }
        let n = batch.len() as u64;
        let sign = due;
        if let Ok(appended) = apply(&pool, backend, batch, opts.audit_key.as_deref(), sign).await {
            wal_pending |= appended.wal_pending;
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(n, Ordering::Relaxed);
            unsigned += appended.entries;
            if appended.checkpointed {
                stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                unsigned = 0;
                last_cp = Instant::now();
            }
        }
    }
}

struct Applied {
    entries: u64,
    checkpointed: bool,
    /// A VM was crypto-shredded but the WAL could not be emptied yet (retry).
    wal_pending: bool,
}

/// How long a spent nonce is kept after it expired. A nonce is only ever taken from memory
/// while it is live ([`crate::nonces::NonceBook`]), so once expired its row guards nothing;
/// the hour is slack for clocks that disagree.
pub const SPENT_NONCE_GRACE_SECS: u64 = 3600;
/// How often the writer prunes expired nonces.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Rows one prune deletes at most, so that it never holds the writer up for long (a store
/// upgraded from before pruning holds every nonce ever spent); the rest go a minute later.
const PRUNE_BATCH: u32 = 10_000;

/// Deletes up to [`PRUNE_BATCH`] nonces that expired before `before` (Unix seconds); how many.
async fn prune_nonces(pool: &AnyPool, backend: Backend, before: u64) -> Result<u64, StoreError> {
    let sql = match backend {
        Backend::Sqlite => {
            "DELETE FROM nonces WHERE rowid IN (SELECT rowid FROM nonces WHERE expires_at < $1 LIMIT $2)"
        }
        Backend::Postgres => {
            "DELETE FROM nonces WHERE nonce IN (SELECT nonce FROM nonces WHERE expires_at < $1 LIMIT $2)"
        }
    };
    let n = sqlx::query(sql)
        .bind(i(before))
        .bind(i64::from(PRUNE_BATCH))
        .execute(pool)
        .await?;
    Ok(n.rows_affected())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Folds the WAL into the database and empties it (`wal_checkpoint(TRUNCATE)`): after a
/// terminate, the page images written before it — holding the wrapped key — must not stay in
/// the WAL. Readers still on an older snapshot are waited for (the busy timeout), `attempts`
/// times; `false` if the WAL could not be emptied.
async fn truncate_wal(pool: &AnyPool, backend: Backend, attempts: u32) -> bool {
    // PostgreSQL's WAL is not ours to empty (see the module's notes on crypto-shredding there).
    if backend == Backend::Postgres {
        return true;
    }
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(pool)
            .await
        {
            // (busy, log frames, checkpointed frames): not busy = the WAL is empty now.
            Ok(row) if row.get::<i64, _>(0) == 0 => return true,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
    false
}

/// One transaction for a batch. Answers every job; `Err(())` when the batch did not commit
/// (every job was then answered with the error).
async fn apply(
    pool: &AnyPool,
    backend: Backend,
    batch: Vec<Job>,
    key: Option<&Ed25519KeyPair>,
    checkpoint: bool,
) -> Result<Applied, ()> {
    let mut ops = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for j in batch {
        ops.push(j.op);
        replies.push(j.reply);
    }
    match apply_ops(pool, backend, &ops, key, checkpoint).await {
        Ok((results, mut applied)) => {
            // Crypto-shredding holds before anyone is told it is done.
            let shredded = ops
                .iter()
                .zip(&results)
                .any(|(op, r)| matches!(op, Op::Terminate(..) | Op::Rekey { .. }) && r.is_ok());
            if shredded && !truncate_wal(pool, backend, 3).await {
                tracing::warn!("a terminated VM's old pages are still in the WAL; retrying");
                applied.wal_pending = true;
            }
            for (r, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(r);
            }
            Ok(applied)
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            Err(())
        }
    }
}

type Results = Vec<Result<Done, StoreError>>;

async fn apply_ops(
    pool: &AnyPool,
    backend: Backend,
    ops: &[Op],
    key: Option<&Ed25519KeyPair>,
    mut checkpoint: bool,
) -> Result<(Results, Applied), StoreError> {
    let mut tx = backend.begin_write(pool).await?;
    let mut chain = tail(&mut tx).await?;
    let start = chain.next_seq;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let r = match op {
            Op::Register(rec, now, detail, check) => {
                if let Some(check) = check
                    && stored_kek_check(&mut tx)
                        .await?
                        .is_some_and(|s| s != *check)
                {
                    out.push(Err(StoreError::KekRotated));
                    continue;
                }
                let n = sqlx::query(
                    "INSERT INTO vms (vm_id, tenant, generation, boot_counter, terminated, wrapped_key, order_doc) VALUES ($1, $2, $3, $4, 0, $5, $6) ON CONFLICT(vm_id) DO NOTHING",
                )
                .bind(&rec.state.vm_id)
                .bind(&rec.tenant)
                .bind(i(rec.state.generation))
                .bind(i(rec.state.boot_counter))
                .bind(&rec.wrapped_key)
                .bind(&rec.order)
                .execute(&mut *tx)
                .await?;
                if n.rows_affected() == 1 {
                    let e = audit(
                        &mut tx,
                        &mut chain,
                        *now,
                        "register",
                        &rec.state.vm_id,
                        detail.clone(),
                    )
                    .await?;
                    Ok(Done::Entry(e))
                } else {
                    Err(StoreError::Exists(rec.state.vm_id.clone()))
                }
            }
            Op::Terminate(vm_id, now, detail) => {
                let n = sqlx::query(
                    "UPDATE vms SET terminated = 1, wrapped_key = NULL WHERE vm_id = $1",
                )
                .bind(vm_id)
                .execute(&mut *tx)
                .await?;
                if n.rows_affected() == 0 {
                    Err(StoreError::NoSuchVm(vm_id.clone()))
                } else {
                    let e = audit(
                        &mut tx,
                        &mut chain,
                        *now,
                        "terminate",
                        vm_id,
                        detail.clone(),
                    )
                    .await?;
                    Ok(Done::Entry(e))
                }
            }
            Op::Allowlist(epoch, doc, now) => {
                let stored: Option<i64> =
                    sqlx::query("SELECT value FROM meta WHERE key = 'allowlist_epoch'")
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|r| r.get(0));
                let stored = stored.map(u).unwrap_or(0);
                let current: Option<(i64, Vec<u8>)> =
                    sqlx::query("SELECT epoch, doc FROM allowlist WHERE id = 1")
                        .fetch_optional(&mut *tx)
                        .await?
                        .map(|r| (r.get(0), r.get(1)));
                match current {
                    _ if *epoch < stored => Err(StoreError::StaleEpoch {
                        have: *epoch,
                        stored,
                    }),
                    Some((e, d)) if u(e) == *epoch && d == *doc => Ok(Done::Nothing),
                    Some((e, _)) if u(e) == *epoch => Err(StoreError::EpochConflict(*epoch)),
                    // Newer, or the epoch an older broker recorded without its document.
                    _ => {
                        sqlx::query("INSERT INTO meta (key, value) VALUES ('allowlist_epoch', $1) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
                            .bind(i(*epoch))
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("INSERT INTO allowlist (id, epoch, doc) VALUES (1, $1, $2) ON CONFLICT(id) DO UPDATE SET epoch = excluded.epoch, doc = excluded.doc")
                            .bind(i(*epoch))
                            .bind(doc)
                            .execute(&mut *tx)
                            .await?;
                        let sha256 =
                            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, doc));
                        let e = audit(
                            &mut tx,
                            &mut chain,
                            *now,
                            "allowlist",
                            "",
                            serde_json::json!({"epoch": epoch, "sha256": sha256}),
                        )
                        .await?;
                        Ok(Done::Entry(e))
                    }
                }
            }
            Op::Decision(c) => decision(&mut tx, &mut chain, c).await.map(Done::Decision),
            Op::Rekey {
                expect,
                check,
                keys,
                now,
            } => rekey(&mut tx, &mut chain, expect, check, keys, *now).await,
            Op::Checkpoint => {
                checkpoint = true;
                Ok(Done::Nothing)
            }
        };
        out.push(r);
    }
    let mut cp = None;
    if checkpoint && let Some(k) = key {
        cp = chain.checkpoint(k);
        if let Some(c) = &cp {
            let text = serde_json::to_string(c).map_err(|e| StoreError::Audit(e.to_string()))?;
            sqlx::query("INSERT INTO checkpoints (seq, checkpoint) VALUES ($1, $2) ON CONFLICT(seq) DO UPDATE SET checkpoint = excluded.checkpoint")
                .bind(i(c.seq))
                .bind(text)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    for (op, r) in ops.iter().zip(out.iter_mut()) {
        if matches!(op, Op::Checkpoint) {
            *r = Ok(Done::Checkpoint(cp.clone()));
        }
    }
    Ok((
        out,
        Applied {
            entries: chain.next_seq - start,
            checkpointed: cp.is_some(),
            wal_pending: false,
        },
    ))
}

async fn audit(
    tx: &mut AnyConnection,
    chain: &mut Chain,
    time: u64,
    kind: &str,
    vm_id: &str,
    detail: serde_json::Value,
) -> Result<Entry, StoreError> {
    let e = chain.append(time, kind, vm_id, detail);
    let text = serde_json::to_string(&Line::Entry(e.clone()))
        .map_err(|x| StoreError::Audit(x.to_string()))?;
    sqlx::query("INSERT INTO audit (seq, entry) VALUES ($1, $2)")
        .bind(i(e.seq))
        .bind(text)
        .execute(&mut *tx)
        .await?;
    Ok(e)
}

async fn stored_kek_check(tx: &mut AnyConnection) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(sqlx::query("SELECT check_blob FROM kek WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get(0)))
}

async fn live_keys(conn: &mut AnyConnection) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
    Ok(sqlx::query(
        "SELECT vm_id, generation, wrapped_key FROM vms WHERE wrapped_key IS NOT NULL ORDER BY vm_id",
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.get(0), u(r.get(1)), r.get(2)))
    .collect())
}

/// Every live key re-wrapped at once, or none: `keys` must be exactly the live keys now.
async fn rekey(
    tx: &mut AnyConnection,
    chain: &mut Chain,
    expect: &[u8],
    check: &[u8],
    keys: &[Rekeyed],
    now: u64,
) -> Result<Done, StoreError> {
    if stored_kek_check(tx).await?.is_some_and(|s| s != expect) {
        return Err(StoreError::KekRotated);
    }
    let live = live_keys(tx).await?;
    let mut planned: Vec<(String, u64, Vec<u8>)> = keys
        .iter()
        .map(|(v, g, old, _)| (v.clone(), *g, old.clone()))
        .collect();
    planned.sort();
    if planned != live {
        return Err(StoreError::RotationRace);
    }
    for (vm_id, generation, _, new) in keys {
        sqlx::query("UPDATE vms SET wrapped_key = $1 WHERE vm_id = $2 AND generation = $3")
            .bind(new)
            .bind(vm_id)
            .bind(i(*generation))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("INSERT INTO kek (id, check_blob) VALUES (1, $1) ON CONFLICT(id) DO UPDATE SET check_blob = excluded.check_blob")
        .bind(check)
        .execute(&mut *tx)
        .await?;
    let e = audit(
        tx,
        chain,
        now,
        "kek_rotate",
        "",
        serde_json::json!({"keys": keys.len()}),
    )
    .await?;
    Ok(Done::Entry(e))
}

/// A decision, re-checked against the state inside the transaction.
async fn decision(
    tx: &mut AnyConnection,
    chain: &mut Chain,
    c: &Commit,
) -> Result<Committed, StoreError> {
    let (time, mut kind, vm_id, mut detail) = c.audit.clone();
    let mut lost_race = None;
    if c.spend_nonce {
        // Recorded spent now; a row that is already spent means another decision took it.
        let n = sqlx::query("INSERT INTO nonces (nonce, vm_id, expires_at, spent) VALUES ($1, $2, $3, 1) ON CONFLICT(nonce) DO UPDATE SET spent = 1 WHERE nonces.spent = 0")
            .bind(&c.nonce[..])
            .bind(&vm_id)
            .bind(i(c.nonce_expires_at))
            .execute(&mut *tx)
            .await?;
        if n.rows_affected() != 1 && c.vm_update.is_some() {
            lost_race = Some("spent_nonce");
        }
    }
    if lost_race.is_none()
        && let Some(v) = &c.vm_update
    {
        // Only from the boot counter the decision saw, and only while the VM is live.
        let n = sqlx::query("UPDATE vms SET boot_counter = $1, generation = $2 WHERE vm_id = $3 AND terminated = 0 AND boot_counter = $4 AND wrapped_key IS NOT NULL")
            .bind(i(v.boot_counter))
            .bind(i(v.generation))
            .bind(&v.vm_id)
            .bind(i(v.boot_counter.saturating_sub(1)))
            .execute(&mut *tx)
            .await?;
        if n.rows_affected() != 1 {
            lost_race = Some("vm_changed");
        }
    }
    if let Some(why) = lost_race {
        kind = "denial".into();
        detail = serde_json::json!({"nonce": hex::encode(c.nonce), "reasons": [why]});
    }
    let entry = audit(tx, chain, time, &kind, &vm_id, detail).await?;
    Ok(Committed {
        entry,
        released: c.vm_update.is_some() && lost_race.is_none(),
        lost_race,
    })
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
            .fetch_optional(&self.pool)
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

    async fn nonce(&self, nonce: &[u8; 32]) -> Result<Option<NonceState>, StoreError> {
        let row = sqlx::query("SELECT vm_id, expires_at, spent FROM nonces WHERE nonce = $1")
            .bind(&nonce[..])
            .fetch_optional(&self.pool)
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
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0));
        Ok(v.map(u).unwrap_or(0))
    }

    async fn allowlist(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let row = sqlx::query("SELECT epoch, doc FROM allowlist WHERE id = 1")
            .fetch_optional(&self.pool)
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
            .fetch_all(&self.pool)
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
        let mut tx = self.backend.begin_snapshot(&self.pool).await?;
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
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn init_kek_check(&self, check: &[u8]) -> Result<Vec<u8>, StoreError> {
        sqlx::query("INSERT INTO kek (id, check_blob) VALUES (1, $1) ON CONFLICT(id) DO NOTHING")
            .bind(check)
            .execute(&self.pool)
            .await?;
        let mut conn = self.pool.acquire().await?;
        stored_kek_check(&mut conn)
            .await?
            .ok_or_else(|| StoreError::Db("the KEK check value is missing".into()))
    }

    async fn live_keys(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
        live_keys(&mut *self.pool.acquire().await?).await
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
