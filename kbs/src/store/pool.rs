//! Connections: the pool, the settings every connection gets whatever the server or URL say,
//! and — for a URL that lists several PostgreSQL hosts — following the one that takes writes
//! (libpq's `target_session_attrs=read-write`, which sqlx lacks).
//!
//! **Failover.** Several hosts need `target_session_attrs=read-write` (or `primary`): the one
//! host that takes writes is used. A watcher checks it twice a second on a connection of its
//! own; once it stops answering or turns read-only, every listed host is asked again and the
//! pool replaced. Meanwhile reads and writes fail, so the broker denies with
//! `storage_unavailable` and commits nothing. Two hosts taking writes at once (a split brain)
//! are refused: the broker then serves from neither, rather than from one of two histories.
//! What makes a promoted standby hold every release a guest was answered is the database's
//! synchronous replication (`synchronous_standby_names`, with `synchronous_commit = on`, which
//! every connection sets): the broker answers only after the commit returns. A demoted primary
//! must never come back writable in the list (rewind it into a standby first); if it does while
//! the promoted one also takes writes, the broker stops writing until one of them is gone.

use super::StoreError;
use super::database::{Targets, check_postgres_url, redacted, targets};
use super::schema::Backend;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Row};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

/// How often the watcher looks at the server in use (multi-host URLs only).
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// How long one host may take to answer a probe before the next is tried.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The pool in use, and where it points.
pub(super) struct Pools {
    current: RwLock<AnyPool>,
    serving: AtomicUsize,
    targets: Targets,
    backend: Backend,
    hunting: AtomicBool,
    /// Two hosts took writes at once: the pool was closed, and stays so until one is gone.
    fenced: AtomicBool,
}

impl Pools {
    /// Connects to `database` (a `sqlite:` URL, or a PostgreSQL one, perhaps listing several
    /// hosts); a watcher follows the writable host when several are listed.
    pub(super) async fn open(database: &str, backend: Backend) -> Result<Arc<Pools>, StoreError> {
        let targets = match backend {
            Backend::Sqlite => Targets {
                urls: vec![database.to_string()],
                read_write: false,
            },
            Backend::Postgres => {
                let t = targets(database)?;
                for u in &t.urls {
                    check_postgres_url(u)?;
                }
                if t.urls.len() > 1 && !t.read_write {
                    return Err(StoreError::Db(
                        "several database hosts need target_session_attrs=read-write: the broker writes on every decision, and a standby cannot take it".into(),
                    ));
                }
                t
            }
        };
        // One host: the pool reconnects on its own; nothing to choose between.
        let serving = match targets.urls.as_slice() {
            [_] if !targets.read_write => 0,
            _ => find(&targets, true).await?,
        };
        let pool = connect(&targets.urls[serving], backend).await?;
        let pools = Arc::new(Pools {
            current: RwLock::new(pool),
            serving: AtomicUsize::new(serving),
            targets,
            backend,
            hunting: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
        });
        if pools.targets.urls.len() > 1 {
            tokio::spawn(watch(Arc::downgrade(&pools)));
        }
        Ok(pools)
    }

    /// The pool in use now (cheap: a handle).
    pub(super) fn get(&self) -> AnyPool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks every host again and switches to the writable one (one search at a time); stays
    /// when that is the host in use (its pool reconnects on its own).
    async fn hunt(&self) {
        if self.hunting.swap(true, Ordering::AcqRel) {
            return;
        }
        let found = find(&self.targets, false).await;
        let was = self.serving.load(Ordering::Acquire);
        let fenced = self.fenced.load(Ordering::Acquire);
        match found {
            Ok(n) if n == was && !fenced => {}
            Ok(n) => match connect(&self.targets.urls[n], self.backend).await {
                Ok(pool) => {
                    let old = std::mem::replace(
                        &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                        pool,
                    );
                    self.serving.store(n, Ordering::Release);
                    self.fenced.store(false, Ordering::Release);
                    tracing::warn!(
                        from = %redacted(&self.targets.urls[was]),
                        to = %redacted(&self.targets.urls[n]),
                        "database server switched"
                    );
                    // Connections still out (a commit waiting on a lost standby) are not
                    // waited for forever.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CLOSE_WITHIN, old.close()).await;
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot open the writable database server"),
            },
            // Writing to either of two histories would let a terminate on one be missed by
            // a release on the other: no writes at all until one of them is gone.
            Err(SplitBrain(e)) => {
                if !self.fenced.swap(true, Ordering::AcqRel) {
                    tracing::error!(error = %e, "no writes until one of the servers is gone");
                    let current = self.get();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CLOSE_WITHIN, current.close()).await;
                    });
                }
            }
            Err(Unusable(e)) => tracing::warn!(error = %e, "no usable database server yet"),
        }
        self.hunting.store(false, Ordering::Release);
    }
}

/// Every how many watch rounds all hosts are asked (30 s).
const ASK_ALL_EVERY: u64 = 60;

/// How long a replaced pool's connections are waited for before they are dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

/// Checks the server in use, on a connection of the watcher's own (a busy pool must not look
/// like a dead server); searches again when it does not answer or no longer takes writes.
async fn watch(pools: Weak<Pools>) {
    let mut probe: Option<(usize, AnyConnection)> = None;
    let mut round = 0u64;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(p) = pools.upgrade() else {
            return;
        };
        round += 1;
        // Every host asked again now and then: a second one taking writes is a split brain
        // even while the one in use answers well; and while fenced, until it is over.
        if p.fenced.load(Ordering::Acquire) || round.is_multiple_of(ASK_ALL_EVERY) {
            p.hunt().await;
            continue;
        }
        let serving = p.serving.load(Ordering::Acquire);
        let check = async {
            let mut conn = match probe.take() {
                Some((n, c)) if n == serving => c,
                _ => open_probe(&p.targets.urls[serving]).await?,
            };
            let ok = usable(&mut conn, p.targets.read_write).await?;
            probe = Some((serving, conn));
            Ok::<bool, StoreError>(ok)
        };
        let fine = tokio::time::timeout(PROBE_TIMEOUT, check)
            .await
            .is_ok_and(|r| r.is_ok_and(|ok| ok));
        if !fine {
            probe = None;
            p.hunt().await;
        }
    }
}

/// What sqlx makes of `url`.
fn options(url: &str) -> Result<AnyConnectOptions, StoreError> {
    url.parse()
        .map_err(|e: sqlx::Error| StoreError::Db(format!("the database URL: {e}")))
}

/// A connection for probing one host (no pool, no retries).
async fn open_probe(url: &str) -> Result<AnyConnection, StoreError> {
    Ok(AnyConnection::connect_with(&options(url)?).await?)
}

/// The one listed host that answers and takes writes (when asked for). Every host is asked: two
/// taking writes at once is a split brain, and neither is used.
async fn find(targets: &Targets, warn: bool) -> Result<usize, NotFound> {
    let mut why = Vec::new();
    let mut writable = Vec::new();
    for (n, url) in targets.urls.iter().enumerate() {
        let probe = async {
            let mut conn = open_probe(url).await?;
            let ok = usable(&mut conn, targets.read_write).await;
            if warn && ok.as_ref().is_ok_and(|ok| *ok) && targets.urls.len() > 1 {
                warn_if_asynchronous(&mut conn, url).await;
            }
            let _ = conn.close().await;
            ok
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(true)) => writable.push(n),
            Ok(Ok(false)) => why.push(format!("{}: read-only (a standby)", redacted(url))),
            Ok(Err(e)) => why.push(format!("{}: {e}", redacted(url))),
            Err(_) => why.push(format!(
                "{}: no answer within {PROBE_TIMEOUT:?}",
                redacted(url)
            )),
        }
        // A single host that will not do needs no further search; several are all asked.
        if targets.urls.len() == 1 || (!targets.read_write && !writable.is_empty()) {
            break;
        }
    }
    match writable.as_slice() {
        [n] => Ok(*n),
        [] => Err(Unusable(format!(
            "no usable database server: {}",
            why.join("; ")
        ))),
        several => Err(SplitBrain(format!(
            "refusing to write: {} database servers take writes at once (a split brain: {})",
            several.len(),
            several
                .iter()
                .map(|n| redacted(&targets.urls[*n]))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Why no host was chosen.
enum NotFound {
    /// None answered, or none took writes.
    Unusable(String),
    /// Several took writes at once.
    SplitBrain(String),
}
use NotFound::{SplitBrain, Unusable};

impl From<NotFound> for StoreError {
    fn from(n: NotFound) -> StoreError {
        match n {
            Unusable(e) | SplitBrain(e) => StoreError::Db(e),
        }
    }
}

/// A primary without synchronous standbys can lose answered releases on failover: say so.
async fn warn_if_asynchronous(conn: &mut AnyConnection, url: &str) {
    let names: Result<String, sqlx::Error> = sqlx::query("SHOW synchronous_standby_names")
        .fetch_one(&mut *conn)
        .await
        .map(|r| r.get(0));
    if names.is_ok_and(|n| n.trim().is_empty()) {
        tracing::warn!(
            server = %redacted(url),
            "the database has no synchronous standby: a failover can lose answered releases"
        );
    }
}

/// Whether the server behind `conn` will do: it answers and, if asked, takes writes.
async fn usable(conn: &mut AnyConnection, read_write: bool) -> Result<bool, StoreError> {
    if !read_write {
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
        return Ok(true);
    }
    let ro: String = sqlx::query("SHOW transaction_read_only")
        .fetch_one(&mut *conn)
        .await?
        .get(0);
    Ok(ro == "off")
}

/// A pool on one server, every connection set up as the broker needs it.
async fn connect(url: &str, backend: Backend) -> Result<AnyPool, StoreError> {
    let conn = options(url)?;
    Ok(AnyPoolOptions::new()
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
                    // Whatever the server, role or URL say: a commit is durable (on the
                    // synchronous standbys too, where there are any) before it is answered,
                    // and a writer that cannot get the lock (another replica stuck, or anyone
                    // else holding it) gives up instead of stalling.
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
        .await?)
}
