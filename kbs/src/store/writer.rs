//! The one writer: jobs queued by [`super::SqlStore`] drained into group-committed transactions
//! (decisions with their compare-and-set, registrations, terminates, re-keys, allowlists), the
//! audit chain appended and checkpointed inside them, and expired nonces pruned.
use super::schema::Backend;
use super::{Commit, Committed, Rekeyed, StoreError, StoreOptions, StoreStats, VmRecord, i, u};
use crate::audit::{Chain, Checkpoint, Entry, Line};
use aws_lc_rs::signature::Ed25519KeyPair;
use sqlx::{AnyConnection, AnyPool, Row};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub(super) enum Op {
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

pub(super) enum Done {
    Nothing,
    Entry(Entry),
    Decision(Committed),
    Checkpoint(Option<Checkpoint>),
}

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// Where the chain stands, from the database itself (inside the caller's transaction).
pub(super) async fn tail(conn: &mut AnyConnection) -> Result<Chain, StoreError> {
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
pub(super) async fn writer(
    pools: Arc<super::pool::Pools>,
    backend: Backend,
    mut rx: mpsc::Receiver<Job>,
    opts: StoreOptions,
    stats: Arc<StoreStats>,
) {
    let mut unsigned = 0u64;
    let mut last_cp = Instant::now();
    let mut wal_pending = false;
    let mut last_prune = Instant::now();
    // The pool is fetched at each use: on a multi-host URL it follows the server that takes
    // writes (see super::pool).
    loop {
        // The spent-nonce table would otherwise grow by one row per decision, forever.
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            match prune_nonces(
                &pools.get(),
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
                    truncate_wal(&pools.get(), backend, 3).await;
                }
                // Shutting down: cover what was written since the last checkpoint.
                if unsigned > 0 {
                    let _ = apply(
                        &pools.get(),
                        backend,
                        Vec::new(),
                        opts.audit_key.as_deref(),
                        true,
                        None,
                    )
                    .await;
                }
                return;
            }
            Err(_) => {
                // Idle: a good moment to retry emptying the WAL after a terminate.
                if wal_pending {
                    wal_pending = !truncate_wal(&pools.get(), backend, 1).await;
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
        let sign = due;
        if let Ok(appended) = apply(
            &pools.get(),
            backend,
            batch,
            opts.audit_key.as_deref(),
            sign,
            Some(&stats),
        )
        .await
        {
            wal_pending |= appended.wal_pending;
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
pub(super) async fn prune_nonces(
    pool: &AnyPool,
    backend: Backend,
    before: u64,
) -> Result<u64, StoreError> {
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
    stats: Option<&StoreStats>,
) -> Result<Applied, ()> {
    let n = batch.len() as u64;
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
            // Counted before anyone is answered: whoever reads the counters after an answer
            // sees the transaction that carried it.
            if let Some(stats) = stats {
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats.writes.fetch_add(n, Ordering::Relaxed);
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

pub(super) async fn stored_kek_check(
    tx: &mut AnyConnection,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(sqlx::query("SELECT check_blob FROM kek WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.get(0)))
}

pub(super) async fn live_keys(
    conn: &mut AnyConnection,
) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
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
    if lost_race.is_none()
        && let (Some(l), Some(from)) = (&c.lease, &c.lease_from)
    {
        let n = sqlx::query("UPDATE leases SET renewed_at = $1, revoked = $2 WHERE vm_id = $3 AND mesh_key = $4 AND revoked IS NULL AND EXISTS (SELECT 1 FROM vms WHERE vms.vm_id = $3 AND terminated = 0)")
            .bind(i(l.renewed_at))
            .bind(&l.revoked)
            .bind(&l.vm_id)
            .bind(from)
            .execute(&mut *tx)
            .await?;
        if n.rows_affected() != 1 {
            lost_race = Some("lease_changed");
        } else if let Some(why) = &l.revoked {
            // Listed for the mesh until every certificate for the key has expired.
            sqlx::query("INSERT INTO revoked_mesh_keys (mesh_key, vm_id, certified_at, why) VALUES ($1, $2, $3, $4) ON CONFLICT(mesh_key) DO UPDATE SET certified_at = excluded.certified_at, why = excluded.why")
                .bind(from)
                .bind(&l.vm_id)
                .bind(i(l.renewed_at))
                .bind(why)
                .execute(&mut *tx)
                .await?;
        }
    } else if lost_race.is_none()
        && let Some(l) = &c.lease
    {
        sqlx::query("INSERT INTO leases (vm_id, chip_id, measurement, mesh_key, renewed_at, revoked) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT(vm_id) DO UPDATE SET chip_id = excluded.chip_id, measurement = excluded.measurement, mesh_key = excluded.mesh_key, renewed_at = excluded.renewed_at, revoked = excluded.revoked")
            .bind(&l.vm_id)
            .bind(&l.chip_id)
            .bind(&l.measurement)
            .bind(&l.mesh_key)
            .bind(i(l.renewed_at))
            .bind(&l.revoked)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(why) = lost_race {
        kind = if c.vm_update.is_some() {
            "denial"
        } else {
            "lease_refused"
        }
        .into();
        // What the decision said of its freshness (`bound`) stays; the rest is the denial's.
        let bound = detail.get("bound").cloned();
        detail = serde_json::json!({"nonce": hex::encode(c.nonce), "reasons": [why]});
        if let (Some(b), Some(d)) = (bound, detail.as_object_mut()) {
            d.insert("bound".into(), b);
        }
    }
    let entry = audit(tx, chain, time, &kind, &vm_id, detail).await?;
    Ok(Committed {
        entry,
        released: c.vm_update.is_some() && lost_race.is_none(),
        lost_race,
    })
}
