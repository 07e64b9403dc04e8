//! Connections: the pool, the settings every connection gets whatever the server or URL say,
//! and — for a URL that lists several PostgreSQL hosts — following the one that takes writes
//! (libpq's `target_session_attrs=read-write`, which sqlx lacks).
//!
//! **Failover.** The hosts are tried in the order listed; the first that answers (and, with
//! `read-write`, is not a standby) is used. A watcher checks it twice a second; once it stops
//! answering or turns read-only, the list is searched again and the pool replaced. Meanwhile
//! reads and writes fail, so the broker denies with `storage_unavailable` and commits nothing.
//! What makes a promoted standby hold every release a guest was answered is the database's
//! synchronous replication (`synchronous_standby_names`, with `synchronous_commit = on`, which
//! every connection sets): the broker answers only after the commit returns. A demoted primary
//! must never come back writable in the list (rewind it into a standby first): the watcher takes
//! the first writable host it finds.

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
                t
            }
        };
        let (serving, pool) = match targets.urls.as_slice() {
            // One host: the pool reconnects on its own; nothing to choose between.
            [one] if !targets.read_write => (0, connect(one, backend).await?),
            _ => find(&targets, backend).await?,
        };
        let pools = Arc::new(Pools {
            current: RwLock::new(pool),
            serving: AtomicUsize::new(serving),
            targets,
            backend,
            hunting: AtomicBool::new(false),
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

    /// Searches the host list again and switches to what it finds (one search at a time).
    async fn hunt(&self) {
        if self.hunting.swap(true, Ordering::AcqRel) {
            return;
        }
        match find(&self.targets, self.backend).await {
            Ok((n, pool)) => {
                let old = std::mem::replace(
                    &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                    pool,
                );
                let was = self.serving.swap(n, Ordering::AcqRel);
                tracing::warn!(
                    from = %redacted(&self.targets.urls[was]),
                    to = %redacted(&self.targets.urls[n]),
                    "database server switched"
                );
                tokio::spawn(async move { old.close().await });
            }
            Err(e) => tracing::warn!(error = %e, "no usable database server yet"),
        }
        self.hunting.store(false, Ordering::Release);
    }
}

/// Checks the server in use; searches again when it does not answer or no longer takes writes.
async fn watch(pools: Weak<Pools>) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(p) = pools.upgrade() else {
            return;
        };
        let pool = p.get();
        let fine = tokio::time::timeout(PROBE_TIMEOUT, usable_pool(&pool, p.targets.read_write))
            .await
            .is_ok_and(|r| r.is_ok_and(|ok| ok));
        if !fine {
            p.hunt().await;
        }
    }
}

/// The first host in the list that answers (and takes writes, when that is asked for), with a
/// pool on it.
async fn find(targets: &Targets, backend: Backend) -> Result<(usize, AnyPool), StoreError> {
    let mut why = Vec::new();
    for (n, url) in targets.urls.iter().enumerate() {
        let probe = async {
            let opts: AnyConnectOptions = url
                .parse()
                .map_err(|e: sqlx::Error| StoreError::Db(format!("the database URL: {e}")))?;
            let mut conn = AnyConnection::connect_with(&opts).await?;
            let ok = usable(&mut conn, targets.read_write).await;
            let _ = conn.close().await;
            ok
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(true)) => return Ok((n, connect(url, backend).await?)),
            Ok(Ok(false)) => why.push(format!("{}: read-only (a standby)", redacted(url))),
            Ok(Err(e)) => why.push(format!("{}: {e}", redacted(url))),
            Err(_) => why.push(format!(
                "{}: no answer within {PROBE_TIMEOUT:?}",
                redacted(url)
            )),
        }
    }
    Err(StoreError::Db(format!(
        "no usable database server: {}",
        why.join("; ")
    )))
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

async fn usable_pool(pool: &AnyPool, read_write: bool) -> Result<bool, StoreError> {
    usable(&mut *pool.acquire().await?, read_write).await
}

/// A pool on one server, every connection set up as the broker needs it.
async fn connect(url: &str, backend: Backend) -> Result<AnyPool, StoreError> {
    let conn: AnyConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| StoreError::Db(format!("the database URL: {e}")))?;
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
