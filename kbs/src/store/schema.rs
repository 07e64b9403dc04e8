//! The schema on each database, how a write or snapshot transaction begins there, and the
//! migrations (run once, under the writer lock, by whichever replica starts first).

use super::StoreError;
use sqlx::{Any, AnyPool, Row, Transaction};

const MIGRATIONS: [&str; 6] = [
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
    // Running VMs' leases: what the last release certified (chip, image, mesh key), when the
    // lease was last renewed, and why it was revoked if it was.
    "CREATE TABLE IF NOT EXISTS leases (
        vm_id TEXT PRIMARY KEY, chip_id BLOB NOT NULL, measurement BLOB NOT NULL,
        mesh_key BLOB NOT NULL, renewed_at INTEGER NOT NULL, revoked TEXT);",
    // Mesh keys whose leases were revoked (a clone), with when their last certificate was
    // issued: the broker's revocation list names them while a certificate for them may still be
    // valid, even after the VM's next boot replaced its lease.
    "CREATE TABLE IF NOT EXISTS revoked_mesh_keys (
        mesh_key BLOB PRIMARY KEY, vm_id TEXT NOT NULL, certified_at INTEGER NOT NULL, why TEXT NOT NULL);
     CREATE INDEX IF NOT EXISTS revoked_mesh_keys_at ON revoked_mesh_keys (certified_at);",
];

/// Which database a store is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL schema: the same tables, PostgreSQL's types.
const PG_MIGRATIONS: [&str; 6] = [
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
    "CREATE TABLE IF NOT EXISTS leases (
        vm_id TEXT PRIMARY KEY, chip_id BYTEA NOT NULL, measurement BYTEA NOT NULL,
        mesh_key BYTEA NOT NULL, renewed_at BIGINT NOT NULL, revoked TEXT);",
    "CREATE TABLE IF NOT EXISTS revoked_mesh_keys (
        mesh_key BYTEA PRIMARY KEY, vm_id TEXT NOT NULL, certified_at BIGINT NOT NULL, why TEXT NOT NULL);
     CREATE INDEX IF NOT EXISTS revoked_mesh_keys_at ON revoked_mesh_keys (certified_at);",
];

/// The advisory lock every PostgreSQL write transaction takes first ("attesta" in ASCII).
const PG_WRITE_LOCK: i64 = 0x0061_7474_6573_7461;

impl Backend {
    pub(super) fn migrations(self) -> &'static [&'static str] {
        match self {
            Backend::Sqlite => &MIGRATIONS,
            Backend::Postgres => &PG_MIGRATIONS,
        }
    }

    /// A write transaction, holding the database's writer lock.
    pub(super) async fn begin_write(
        self,
        pool: &AnyPool,
    ) -> Result<Transaction<'static, Any>, StoreError> {
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
    pub(super) async fn begin_snapshot(
        self,
        pool: &AnyPool,
    ) -> Result<Transaction<'static, Any>, StoreError> {
        match self {
            Backend::Sqlite => Ok(pool.begin().await?),
            Backend::Postgres => Ok(pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?),
        }
    }
}

pub(super) async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
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
