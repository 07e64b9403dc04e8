//! The broker's durable state behind one trait: VM records (with their wrapped keys), nonces,
//! the allowlist epoch and the audit log. Every release or denial commits its nonce, VM and audit
//! changes in one transaction before any byte of the answer is sent. Embedded SQLite (WAL,
//! synchronous=FULL) by default; PostgreSQL implements the same trait for several replicas.

use crate::audit::{Chain, Entry, Line};
use crate::release::{NonceState, VmState};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;

/// Why the store failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Db(String),
    #[error("VM {0} already exists")]
    Exists(String),
    #[error("VM {0} does not exist")]
    NoSuchVm(String),
    #[error("allowlist epoch {have} is older than the stored {stored}")]
    StaleEpoch { have: u64, stored: u64 },
    #[error("the stored audit log is corrupt: {0}")]
    Audit(String),
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
    pub spend_nonce: bool,
    pub vm_update: Option<VmState>,
    pub audit: (u64, String, String, serde_json::Value),
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
    async fn issue_nonce(
        &self,
        nonce: &[u8; 32],
        vm_id: &str,
        expires_at: u64,
    ) -> Result<(), StoreError>;
    async fn nonce(&self, nonce: &[u8; 32]) -> Result<Option<NonceState>, StoreError>;
    /// Commits a release or denial (nonce, VM state, audit entry) in one transaction.
    async fn commit(&self, c: &Commit) -> Result<Entry, StoreError>;
    /// Crypto-shreds a VM: its wrapped key is destroyed, a tombstone remains.
    async fn terminate(
        &self,
        vm_id: &str,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError>;
    async fn allowlist_epoch(&self) -> Result<u64, StoreError>;
    /// Stores a newer (or equal) allowlist epoch; an older one is refused.
    async fn set_allowlist_epoch(&self, epoch: u64) -> Result<(), StoreError>;
    /// The audit log, as JSON Lines entries (checkpoints are kept beside it).
    async fn audit_entries(&self) -> Result<Vec<Entry>, StoreError>;
}

const MIGRATIONS: [&str; 1] = [
    "CREATE TABLE IF NOT EXISTS vms (
        vm_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, generation INTEGER NOT NULL,
        boot_counter INTEGER NOT NULL, terminated INTEGER NOT NULL DEFAULT 0,
        wrapped_key BLOB, order_doc BLOB NOT NULL);
     CREATE TABLE IF NOT EXISTS nonces (
        nonce BLOB PRIMARY KEY, vm_id TEXT NOT NULL, expires_at INTEGER NOT NULL, spent INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
];

/// SQLite in WAL mode with full fsync.
pub struct SqliteStore {
    pool: SqlitePool,
    chain: tokio::sync::Mutex<Chain>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await?;
        let done: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&pool)
            .await?
            .get(0);
        for (n, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(done).unwrap_or(0))
        {
            let mut tx = pool.begin().await?;
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_migrations (version) VALUES (?)")
                .bind(n as i64 + 1)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        let last: Option<String> = sqlx::query("SELECT entry FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&pool)
            .await?
            .map(|r| r.get(0));
        let chain = match last {
            None => Chain::default(),
            Some(s) => match serde_json::from_str::<Line>(&s) {
                Ok(Line::Entry(e)) => Chain::resume(&e),
                _ => return Err(StoreError::Audit("last entry unreadable".into())),
            },
        };
        Ok(SqliteStore {
            pool,
            chain: tokio::sync::Mutex::new(chain),
        })
    }

    /// Appends the decision's audit entry inside `tx`, commits, and only then advances the
    /// in-memory chain (a failed commit leaves it where the database is).
    async fn audit_and_commit(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Sqlite>,
        chain: &mut Chain,
        time: u64,
        kind: &str,
        vm_id: &str,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError> {
        let mut next = chain.clone();
        let e = next.append(time, kind, vm_id, detail);
        let text = serde_json::to_string(&Line::Entry(e.clone()))
            .map_err(|x| StoreError::Audit(x.to_string()))?;
        sqlx::query("INSERT INTO audit (seq, entry) VALUES (?, ?)")
            .bind(i(e.seq))
            .bind(text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        *chain = next;
        Ok(e)
    }
}

impl Store for SqliteStore {
    async fn register(
        &self,
        rec: &VmRecord,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError> {
        let mut chain = self.chain.lock().await;
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "INSERT INTO vms (vm_id, tenant, generation, boot_counter, terminated, wrapped_key, order_doc) VALUES (?, ?, ?, ?, 0, ?, ?)",
        )
        .bind(&rec.state.vm_id)
        .bind(&rec.tenant)
        .bind(i(rec.state.generation))
        .bind(i(rec.state.boot_counter))
        .bind(&rec.wrapped_key)
        .bind(&rec.order)
        .execute(&mut *tx)
        .await;
        if let Err(e) = r {
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation())
            {
                return Err(StoreError::Exists(rec.state.vm_id.clone()));
            }
            return Err(e.into());
        }
        self.audit_and_commit(tx, &mut chain, now, "register", &rec.state.vm_id, detail)
            .await
    }

    async fn vm(&self, vm_id: &str) -> Result<Option<VmRecord>, StoreError> {
        let row = sqlx::query("SELECT vm_id, tenant, generation, boot_counter, terminated, wrapped_key, order_doc FROM vms WHERE vm_id = ?")
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

    async fn issue_nonce(
        &self,
        nonce: &[u8; 32],
        vm_id: &str,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO nonces (nonce, vm_id, expires_at, spent) VALUES (?, ?, ?, 0)")
            .bind(&nonce[..])
            .bind(vm_id)
            .bind(i(expires_at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn nonce(&self, nonce: &[u8; 32]) -> Result<Option<NonceState>, StoreError> {
        let row = sqlx::query("SELECT vm_id, expires_at, spent FROM nonces WHERE nonce = ?")
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

    async fn commit(&self, c: &Commit) -> Result<Entry, StoreError> {
        let mut chain = self.chain.lock().await;
        let mut tx = self.pool.begin().await?;
        if c.spend_nonce {
            // Only an unspent nonce can be spent: a concurrent second use finds nothing to update.
            let n = sqlx::query("UPDATE nonces SET spent = 1 WHERE nonce = ? AND spent = 0")
                .bind(&c.nonce[..])
                .execute(&mut *tx)
                .await?;
            if n.rows_affected() != 1 && c.vm_update.is_some() {
                return Err(StoreError::Db(
                    "nonce already spent: release refused".into(),
                ));
            }
        }
        if let Some(v) = &c.vm_update {
            sqlx::query("UPDATE vms SET boot_counter = ?, generation = ? WHERE vm_id = ? AND terminated = 0")
                .bind(i(v.boot_counter))
                .bind(i(v.generation))
                .bind(&v.vm_id)
                .execute(&mut *tx)
                .await?;
        }
        let (time, kind, vm_id, detail) = c.audit.clone();
        self.audit_and_commit(tx, &mut chain, time, &kind, &vm_id, detail)
            .await
    }

    async fn terminate(
        &self,
        vm_id: &str,
        now: u64,
        detail: serde_json::Value,
    ) -> Result<Entry, StoreError> {
        let mut chain = self.chain.lock().await;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("UPDATE vms SET terminated = 1, wrapped_key = NULL WHERE vm_id = ?")
            .bind(vm_id)
            .execute(&mut *tx)
            .await?;
        if n.rows_affected() == 0 {
            return Err(StoreError::NoSuchVm(vm_id.to_string()));
        }
        self.audit_and_commit(tx, &mut chain, now, "terminate", vm_id, detail)
            .await
    }

    async fn allowlist_epoch(&self) -> Result<u64, StoreError> {
        let v: Option<i64> = sqlx::query("SELECT value FROM meta WHERE key = 'allowlist_epoch'")
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0));
        Ok(v.map(u).unwrap_or(0))
    }

    async fn set_allowlist_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let stored: Option<i64> =
            sqlx::query("SELECT value FROM meta WHERE key = 'allowlist_epoch'")
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.get(0));
        let stored = stored.map(u).unwrap_or(0);
        if epoch < stored {
            return Err(StoreError::StaleEpoch {
                have: epoch,
                stored,
            });
        }
        sqlx::query("INSERT INTO meta (key, value) VALUES ('allowlist_epoch', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(i(epoch))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
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
}
