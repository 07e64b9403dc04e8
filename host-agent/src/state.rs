//! The agent's own durable state (SQLite, WAL, synchronous=FULL): the VMs it manages with the
//! spec and signed order each was admitted on, the lifecycle events metering is computed from,
//! the last hour closed and a heartbeat; and, when it takes tasks from the chain, the last
//! finalized block it processed and what became of each assignment (so a restart replays from
//! there and acts on none twice). Lost with the host, but never needed by anyone else: the
//! broker holds the keys, the chain the bills and the tasks.

use crate::agent::Ev;
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous};
use std::path::Path;

/// A VM the agent manages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRecord {
    pub vm_id: String,
    /// The spec (TOML) as admitted.
    pub spec: String,
    /// The operator-signed register order.
    pub order: Vec<u8>,
    /// When the order was admitted (its expiry is judged at that instant on later launches).
    pub admitted_at: u64,
    /// Set once terminated: the record stays for the open hour's bill.
    pub terminated_at: Option<u64>,
    /// Why the agent last stopped it on its own (credit), if it did.
    pub stop_reason: Option<String>,
}

/// The agent's database.
#[derive(Clone)]
pub struct StateDb {
    pool: SqlitePool,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS vms (
        vm_id TEXT PRIMARY KEY, spec TEXT NOT NULL, order_doc BLOB NOT NULL,
        admitted_at INTEGER NOT NULL, stop_reason TEXT, terminated_at INTEGER);
    CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, vm_id TEXT NOT NULL, running INTEGER NOT NULL,
        at INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS chain_cursor (
        id INTEGER PRIMARY KEY CHECK (id = 1), number INTEGER NOT NULL, hash BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS assignments (
        id BLOB PRIMARY KEY, block INTEGER NOT NULL, vm_id TEXT NOT NULL, code TEXT,
        reason TEXT, at INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS lifecycle (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, vm_id TEXT NOT NULL, event TEXT NOT NULL,
        at INTEGER NOT NULL, reason TEXT);
    CREATE TABLE IF NOT EXISTS backup_resume (vm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS backup_deletions (vm_id TEXT PRIMARY KEY, since INTEGER NOT NULL);";

/// One connection to a SQLite file (created if missing) that survives power loss — WAL,
/// synchronous=FULL — with `schema` applied: the agent's database and the billing outbox.
pub(crate) async fn durable_pool(path: &Path, schema: &str) -> Result<SqlitePool, sqlx::Error> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    Ok(pool)
}

fn e(err: sqlx::Error) -> String {
    format!("agent database: {err}")
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl StateDb {
    /// Opens (creating) the database.
    pub async fn open(path: &Path) -> Result<StateDb, String> {
        Ok(StateDb {
            pool: durable_pool(path, SCHEMA).await.map_err(e)?,
        })
    }

    pub async fn add_vm(&self, r: &VmRecord) -> Result<(), String> {
        sqlx::query("INSERT INTO vms (vm_id, spec, order_doc, admitted_at) VALUES (?, ?, ?, ?)")
            .bind(&r.vm_id)
            .bind(&r.spec)
            .bind(&r.order)
            .bind(i(r.admitted_at))
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    /// Kept (its usage in the open hour is still billed), no longer managed.
    pub async fn mark_terminated(&self, vm_id: &str, at: u64) -> Result<(), String> {
        sqlx::query("UPDATE vms SET terminated_at = ? WHERE vm_id = ?")
            .bind(i(at))
            .bind(vm_id)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    /// Marks the VM terminated, journals it, and with `backups` marks its backups to be
    /// deleted, in one transaction: a crash cannot leave a terminated VM whose backups are
    /// forgotten, and their deletion is never journalled before the termination.
    pub async fn mark_terminated_deleting_backups(
        &self,
        vm_id: &str,
        at: u64,
        backups: bool,
    ) -> Result<(), String> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        sqlx::query("UPDATE vms SET terminated_at = ? WHERE vm_id = ?")
            .bind(i(at))
            .bind(vm_id)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        sqlx::query(
            "INSERT INTO lifecycle (vm_id, event, at, reason) VALUES (?, 'terminated', ?, NULL)",
        )
        .bind(vm_id)
        .bind(i(at))
        .execute(&mut *tx)
        .await
        .map_err(e)?;
        if backups {
            sqlx::query("INSERT OR IGNORE INTO backup_deletions (vm_id, since) VALUES (?, ?)")
                .bind(vm_id)
                .bind(i(at))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        tx.commit().await.map_err(e)
    }

    /// Clears the VM's pending deletion and journals that its backups are deleted, at once;
    /// only the first of two deletions that raced journals it.
    pub async fn backups_deleted(&self, vm_id: &str, at: u64, objects: u64) -> Result<(), String> {
        let mut tx = self.pool.begin().await.map_err(e)?;
        let cleared = sqlx::query("DELETE FROM backup_deletions WHERE vm_id = ?")
            .bind(vm_id)
            .execute(&mut *tx)
            .await
            .map_err(e)?
            .rows_affected();
        if cleared == 1 {
            sqlx::query(
                "INSERT INTO lifecycle (vm_id, event, at, reason) VALUES (?, 'backups_deleted', ?, ?)",
            )
            .bind(vm_id)
            .bind(i(at))
            .bind(format!("{objects} objects"))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        }
        tx.commit().await.map_err(e)
    }

    pub async fn set_stop_reason(&self, vm_id: &str, why: Option<&str>) -> Result<(), String> {
        sqlx::query("UPDATE vms SET stop_reason = ? WHERE vm_id = ?")
            .bind(why)
            .bind(vm_id)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    pub async fn vms(&self) -> Result<Vec<VmRecord>, String> {
        let rows = sqlx::query(
            "SELECT vm_id, spec, order_doc, admitted_at, stop_reason, terminated_at FROM vms ORDER BY vm_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        Ok(rows
            .iter()
            .map(|r| VmRecord {
                vm_id: r.get(0),
                spec: r.get(1),
                order: r.get(2),
                admitted_at: r.get::<i64, _>(3).max(0) as u64,
                stop_reason: r.get(4),
                terminated_at: r.get::<Option<i64>, _>(5).map(|v| v.max(0) as u64),
            })
            .collect())
    }

    /// Appends lifecycle events in one transaction.
    pub async fn record(&self, evs: &[Ev]) -> Result<(), String> {
        if evs.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(e)?;
        for ev in evs {
            sqlx::query("INSERT INTO events (vm_id, running, at) VALUES (?, ?, ?)")
                .bind(&ev.vm_id)
                .bind(ev.running)
                .bind(i(ev.at))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        tx.commit().await.map_err(e)
    }

    /// Every event, in the order recorded.
    pub async fn events(&self) -> Result<Vec<Ev>, String> {
        let rows = sqlx::query("SELECT vm_id, running, at FROM events ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .map_err(e)?;
        Ok(rows
            .iter()
            .map(|r| Ev {
                vm_id: r.get(0),
                running: r.get(1),
                at: r.get::<i64, _>(2).max(0) as u64,
            })
            .collect())
    }

    /// Journals a lifecycle transition (created, running, stopped, rebooted, terminated,
    /// credit_stopped), for the chain's record of what ran where.
    pub async fn journal(
        &self,
        vm_id: &str,
        event: &str,
        at: u64,
        reason: Option<&str>,
    ) -> Result<(), String> {
        sqlx::query("INSERT INTO lifecycle (vm_id, event, at, reason) VALUES (?, ?, ?, ?)")
            .bind(vm_id)
            .bind(event)
            .bind(i(at))
            .bind(reason)
            .execute(&self.pool)
            .await
            .map_err(e)?;
        Ok(())
    }

    /// The VM's unfinished backup (its plan and parts, JSON), if any.
    pub async fn backup_resume(&self, vm_id: &str) -> Result<Option<String>, String> {
        let row = sqlx::query("SELECT doc FROM backup_resume WHERE vm_id = ?")
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(e)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Records (or with `None` forgets) the VM's unfinished backup.
    pub async fn set_backup_resume(&self, vm_id: &str, doc: Option<&str>) -> Result<(), String> {
        let q = match doc {
            Some(d) => sqlx::query(
                "INSERT INTO backup_resume (vm_id, doc) VALUES (?, ?) \
                 ON CONFLICT (vm_id) DO UPDATE SET doc = excluded.doc",
            )
            .bind(vm_id)
            .bind(d),
            None => sqlx::query("DELETE FROM backup_resume WHERE vm_id = ?").bind(vm_id),
        };
        q.execute(&self.pool).await.map_err(e)?;
        Ok(())
    }

    /// Terminated VMs whose backups are still to be deleted (the storage was unreachable).
    pub async fn backup_deletions(&self) -> Result<Vec<String>, String> {
        let rows = sqlx::query("SELECT vm_id FROM backup_deletions ORDER BY since")
            .fetch_all(&self.pool)
            .await
            .map_err(e)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Journalled transitions after `seq`, oldest first, at most `limit`.
    pub async fn lifecycle_after(
        &self,
        seq: u64,
        limit: u64,
    ) -> Result<Vec<crate::intake::LifeRecord>, String> {
        let rows = sqlx::query(
            "SELECT seq, vm_id, event, at, reason FROM lifecycle WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(i(seq))
        .bind(i(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        Ok(rows
            .iter()
            .map(|r| crate::intake::LifeRecord {
                seq: r.get::<i64, _>(0).max(0) as u64,
                vm_id: r.get(1),
                event: r.get(2),
                at: r.get::<i64, _>(3).max(0) as u64,
                reason: r.get(4),
            })
            .collect())
    }

    /// The last finalized block whose tasks were all decided: (number, hash).
    pub async fn cursor(&self) -> Result<Option<(u64, [u8; 32])>, String> {
        let row = sqlx::query("SELECT number, hash FROM chain_cursor WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(e)?;
        Ok(row.and_then(|r| {
            let hash: Vec<u8> = r.get(1);
            Some((r.get::<i64, _>(0).max(0) as u64, hash.try_into().ok()?))
        }))
    }

    pub async fn set_cursor(&self, number: u64, hash: &[u8; 32]) -> Result<(), String> {
        sqlx::query(
            "INSERT INTO chain_cursor (id, number, hash) VALUES (1, ?, ?)
             ON CONFLICT (id) DO UPDATE SET number = excluded.number, hash = excluded.hash",
        )
        .bind(i(number))
        .bind(&hash[..])
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    /// Whether assignment `id` was decided.
    pub async fn assignment_decided(&self, id: &[u8; 32]) -> Result<bool, String> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM assignments WHERE id = ?")
            .bind(&id[..])
            .fetch_one(&self.pool)
            .await
            .map_err(e)?;
        Ok(n > 0)
    }

    /// Records what became of assignment `id` (in block `block`): created (`refusal` None), or
    /// refused with (code, reason). Once: a decided assignment keeps its first outcome.
    pub async fn decide_assignment(
        &self,
        id: &[u8; 32],
        block: u64,
        vm_id: &str,
        refusal: Option<(&str, &str)>,
        at: u64,
    ) -> Result<(), String> {
        sqlx::query(
            "INSERT INTO assignments (id, block, vm_id, code, reason, at) VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&id[..])
        .bind(i(block))
        .bind(vm_id)
        .bind(refusal.map(|r| r.0))
        .bind(refusal.map(|r| r.1))
        .bind(i(at))
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }

    /// The assignments of block `block` that were refused, in the order decided.
    pub async fn refusals_in(&self, block: u64) -> Result<Vec<crate::intake::Refused>, String> {
        let rows = sqlx::query(
            "SELECT id, vm_id, code, reason FROM assignments
             WHERE block = ? AND code IS NOT NULL ORDER BY rowid",
        )
        .bind(i(block))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id: Vec<u8> = r.get(0);
                Some(crate::intake::Refused {
                    assignment: id.try_into().ok()?,
                    vm_id: r.get(1),
                    code: r.get(2),
                    reason: r.get::<Option<String>, _>(3).unwrap_or_default(),
                })
            })
            .collect())
    }

    /// Every decided assignment: (id, block, vm_id, code), oldest first.
    pub async fn assignments(
        &self,
    ) -> Result<Vec<([u8; 32], u64, String, Option<String>)>, String> {
        let rows =
            sqlx::query("SELECT id, block, vm_id, code FROM assignments ORDER BY block, rowid")
                .fetch_all(&self.pool)
                .await
                .map_err(e)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id: Vec<u8> = r.get(0);
                Some((
                    id.try_into().ok()?,
                    r.get::<i64, _>(1).max(0) as u64,
                    r.get(2),
                    r.get(3),
                ))
            })
            .collect())
    }

    pub async fn meta(&self, key: &str) -> Result<Option<u64>, String> {
        let v: Option<i64> = sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(e)?;
        Ok(v.map(|v| v.max(0) as u64))
    }

    pub async fn set_meta(&self, key: &str, value: u64) -> Result<(), String> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES (?, ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(i(value))
        .execute(&self.pool)
        .await
        .map_err(e)?;
        Ok(())
    }
}
