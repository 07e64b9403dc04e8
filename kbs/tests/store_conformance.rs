//! The store's conformance suite: the same behaviour on SQLite and on PostgreSQL (a throwaway
//! cluster this test binary starts on loopback, a fresh database per test). Records, a nonce
//! released once, a boot counter that never goes back, crypto-shredding, allowlist epochs that
//! only move forward, the KEK check and rotation, one audit chain that continues across a
//! reopen and verifies, group commit, and two stores on one database (replicas) that never both
//! release for the same boot and append to one chain.

mod common;

use kbs::audit::{Chain, Line, verify};
use kbs::release::{NonceState, VmState};
use kbs::store::{Backend, Commit, Lease, SqlStore, Store, StoreError, StoreOptions, VmRecord};
use serde_json::json;
use std::sync::Arc;

/// Where a test's database lives.
#[derive(Clone, Copy)]
enum On {
    Sqlite,
    Postgres,
}

/// A test's database: its URL, and what holds it (the SQLite file's folder, or a PostgreSQL
/// cluster of the test's own, stopped and removed when this is dropped).
struct Db {
    url: String,
    _dir: tempfile::TempDir,
    _cluster: Option<common::postgres::Cluster>,
}

/// A fresh database on `on`; `None`: PostgreSQL is not installed here (skipped, with a
/// message; a failure when CI=true).
fn database(on: On) -> Option<Db> {
    let dir = tempfile::tempdir().unwrap();
    match on {
        On::Sqlite => Some(Db {
            url: format!("sqlite://{}?mode=rwc", dir.path().join("kbs.db").display()),
            _dir: dir,
            _cluster: None,
        }),
        On::Postgres => common::postgres::Cluster::start().map(|c| Db {
            url: c.url("postgres"),
            _dir: dir,
            _cluster: Some(c),
        }),
    }
}

async fn open(url: &str) -> SqlStore {
    SqlStore::open_url(url, StoreOptions::default())
        .await
        .unwrap()
}

fn record(vm: &str, wrapped: &[u8]) -> VmRecord {
    VmRecord {
        state: VmState {
            vm_id: vm.into(),
            generation: 1,
            boot_counter: 0,
            terminated: false,
        },
        tenant: "tenant-a".into(),
        order: b"signed order bytes".to_vec(),
        wrapped_key: Some(wrapped.to_vec()),
    }
}

/// A release of `vm` from boot counter `from`, spending `nonce`.
fn release(vm: &str, nonce: [u8; 32], from: u64) -> Commit {
    Commit {
        nonce,
        spend_nonce: true,
        nonce_expires_at: 4_000_000_000,
        lease: None,
        lease_from: None,
        vm_update: Some(VmState {
            vm_id: vm.into(),
            generation: 1,
            boot_counter: from + 1,
            terminated: false,
        }),
        audit: (
            20,
            "release".into(),
            vm.into(),
            json!({"boot_counter": from + 1}),
        ),
    }
}

fn denial(nonce: [u8; 32]) -> Commit {
    Commit {
        nonce,
        spend_nonce: true,
        nonce_expires_at: 100,
        vm_update: None,
        lease: None,
        lease_from: None,
        audit: (
            10,
            "denial".into(),
            "vm-x".into(),
            json!({"reasons": ["unknown_vm"]}),
        ),
    }
}

/// One test per backend for each scenario.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::On::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::On::Postgres).await })*
        }
    };
}

conformance!(
    records_and_crypto_shredding,
    a_nonce_releases_once_and_the_counter_never_goes_back,
    allowlist_epochs_only_move_forward,
    the_kek_check_and_rotation,
    one_audit_chain_across_reopen_with_signed_checkpoints,
    group_commit,
    two_replicas_never_both_release_for_one_boot,
    a_lease_is_written_with_its_decision_only,
);

/// A release starts the lease, a renewal updates it, a revocation records why; a release that
/// loses its race writes no lease.
async fn a_lease_is_written_with_its_decision_only(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let s = open(&db.url).await;
    s.register(&record("vm-1", b"wrapped"), 10, json!({}))
        .await
        .unwrap();
    assert_eq!(s.lease("vm-1").await.unwrap(), None);
    let lease = Lease {
        vm_id: "vm-1".into(),
        chip_id: vec![0xc1; 64],
        measurement: vec![0x4d; 48],
        mesh_key: vec![7; 32],
        renewed_at: 20,
        revoked: None,
    };
    let with = |c: Commit, l: &Lease| Commit {
        lease: Some(l.clone()),
        ..c
    };
    assert!(
        s.commit(&with(release("vm-1", [1; 32], 0), &lease))
            .await
            .unwrap()
            .released
    );
    assert_eq!(s.lease("vm-1").await.unwrap(), Some(lease.clone()));
    // The same boot again loses its race: its lease is not written.
    let other = Lease {
        mesh_key: vec![8; 32],
        ..lease.clone()
    };
    let lost = s
        .commit(&with(release("vm-1", [2; 32], 0), &other))
        .await
        .unwrap();
    assert_eq!(lost.lost_race, Some("vm_changed"));
    assert_eq!(s.lease("vm-1").await.unwrap(), Some(lease.clone()));
    // A renewal (no release, no nonce spent) of the lease with key 7, then a revocation.
    let renewal = |l: Lease, from: u8| Commit {
        nonce: [3; 32],
        spend_nonce: false,
        nonce_expires_at: 30,
        vm_update: None,
        lease: Some(l),
        lease_from: Some(vec![from; 32]),
        audit: (30, "lease_renewed".into(), "vm-1".into(), json!({})),
    };
    let renewed = Lease {
        renewed_at: 30,
        ..lease.clone()
    };
    let c = s.commit(&renewal(renewed.clone(), 7)).await.unwrap();
    assert_eq!(c.lost_race, None);
    assert_eq!(s.lease("vm-1").await.unwrap(), Some(renewed.clone()));
    // A renewal judged on another key (the VM booted again meanwhile) writes nothing.
    let stale = s.commit(&renewal(renewed.clone(), 8)).await.unwrap();
    assert_eq!(stale.lost_race, Some("lease_changed"));
    assert_eq!(stale.entry.kind, "lease_refused");
    let revoked = Lease {
        revoked: Some("lease_other_chip".into()),
        ..renewed.clone()
    };
    assert!(s.revoked_mesh_keys(0).await.unwrap().is_empty());
    s.commit(&renewal(revoked.clone(), 7)).await.unwrap();
    assert_eq!(s.lease("vm-1").await.unwrap(), Some(revoked.clone()));
    // The revoked key is kept for the mesh's list, committed with the revocation.
    let listed = kbs::store::RevokedKey {
        vm_id: "vm-1".into(),
        mesh_key: vec![7; 32],
        certified_at: 30,
        why: "lease_other_chip".into(),
    };
    assert_eq!(
        s.revoked_mesh_keys(30).await.unwrap(),
        std::slice::from_ref(&listed)
    );
    assert!(s.revoked_mesh_keys(31).await.unwrap().is_empty(), "older");
    // Once revoked, a renewal that read the lease before cannot bring it back.
    let late = s.commit(&renewal(renewed, 7)).await.unwrap();
    assert_eq!(late.lost_race, Some("lease_changed"));
    assert_eq!(s.lease("vm-1").await.unwrap(), Some(revoked));
    // The VM boots again with another key: a new lease, the old key still listed.
    let next = Lease {
        mesh_key: vec![9; 32],
        renewed_at: 40,
        ..lease.clone()
    };
    assert!(
        s.commit(&with(release("vm-1", [4; 32], 1), &next))
            .await
            .unwrap()
            .released
    );
    assert_eq!(s.lease("vm-1").await.unwrap(), Some(next));
    assert_eq!(s.revoked_mesh_keys(0).await.unwrap(), [listed]);
}

async fn records_and_crypto_shredding(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    let s = open(&url).await;
    assert_eq!(
        s.backend(),
        match on {
            On::Sqlite => Backend::Sqlite,
            On::Postgres => Backend::Postgres,
        }
    );
    s.register(&record("vm-1", b"wrapped one"), 10, json!({}))
        .await
        .unwrap();
    assert!(matches!(
        s.register(&record("vm-1", b"other"), 11, json!({})).await,
        Err(StoreError::Exists(v)) if v == "vm-1"
    ));
    assert_eq!(
        s.vm("vm-1").await.unwrap(),
        Some(record("vm-1", b"wrapped one"))
    );
    assert_eq!(s.vm("vm-2").await.unwrap(), None);
    s.terminate("vm-1", 30, json!({})).await.unwrap();
    let dead = s.vm("vm-1").await.unwrap().unwrap();
    assert!(dead.state.terminated && dead.wrapped_key.is_none());
    assert_eq!(dead.order, b"signed order bytes");
    assert!(matches!(
        s.terminate("vm-9", 31, json!({})).await,
        Err(StoreError::NoSuchVm(_))
    ));
    // A terminated VM never releases again.
    let late = s.commit(&release("vm-1", [3; 32], 0)).await.unwrap();
    assert!(!late.released);
    assert_eq!(late.lost_race, Some("vm_changed"));
    assert_eq!(late.entry.kind, "denial");
    s.ready().await.unwrap();
}

async fn a_nonce_releases_once_and_the_counter_never_goes_back(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    let s = open(&url).await;
    s.register(&record("vm-1", b"k"), 10, json!({}))
        .await
        .unwrap();
    let n = [7u8; 32];
    assert_eq!(s.nonce(&n).await.unwrap(), None);
    let first = s.commit(&release("vm-1", n, 0)).await.unwrap();
    assert!(first.released && first.lost_race.is_none());
    assert_eq!(first.entry.kind, "release");
    assert_eq!(s.nonce(&n).await.unwrap(), Some(NonceState::Spent));
    // The same nonce again: an audited denial, the counter unchanged.
    let again = s.commit(&release("vm-1", n, 1)).await.unwrap();
    assert!(!again.released);
    assert_eq!(again.lost_race, Some("spent_nonce"));
    // A fresh nonce but a decision made on the old counter: refused too.
    let stale = s.commit(&release("vm-1", [8; 32], 0)).await.unwrap();
    assert!(!stale.released);
    assert_eq!(stale.lost_race, Some("vm_changed"));
    assert_eq!(s.vm("vm-1").await.unwrap().unwrap().state.boot_counter, 1);
    // From the counter as it is: released.
    assert!(
        s.commit(&release("vm-1", [9; 32], 1))
            .await
            .unwrap()
            .released
    );
    assert_eq!(s.vm("vm-1").await.unwrap().unwrap().state.boot_counter, 2);
    // Denials spend their nonce without touching a VM.
    let d = s.commit(&denial([10; 32])).await.unwrap();
    assert!(!d.released && d.lost_race.is_none());
    assert_eq!(s.nonce(&[10; 32]).await.unwrap(), Some(NonceState::Spent));
    // Pruning removes only nonces that expired.
    assert_eq!(s.prune_nonces(150).await.unwrap(), 1);
    assert_eq!(s.nonce(&[10; 32]).await.unwrap(), None);
    assert_eq!(s.nonce(&n).await.unwrap(), Some(NonceState::Spent));
    // Evidence bound to its connection: nothing spent or kept, the counter still guarded, and a
    // release that lost its race keeps, as a denial, what freshness it had.
    let bound = |nonce: [u8; 32], from: u64| Commit {
        spend_nonce: false,
        audit: (
            20,
            "release".into(),
            "vm-1".into(),
            json!({"bound": "connection", "boot_counter": from + 1}),
        ),
        ..release("vm-1", nonce, from)
    };
    assert!(s.commit(&bound([11; 32], 2)).await.unwrap().released);
    assert_eq!(s.nonce(&[11; 32]).await.unwrap(), None);
    let late = s.commit(&bound([12; 32], 2)).await.unwrap();
    assert_eq!(late.lost_race, Some("vm_changed"));
    assert_eq!(late.entry.detail["bound"], "connection");
    assert_eq!(late.entry.detail["reasons"], json!(["vm_changed"]));
    assert_eq!(s.vm("vm-1").await.unwrap().unwrap().state.boot_counter, 3);
}

async fn allowlist_epochs_only_move_forward(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    let s = open(&url).await;
    assert_eq!(s.allowlist_epoch().await.unwrap(), 0);
    assert_eq!(s.allowlist().await.unwrap(), None);
    assert!(s.set_allowlist(5, b"epoch 5", 50).await.unwrap());
    assert!(matches!(
        s.set_allowlist(4, b"epoch 4", 50).await,
        Err(StoreError::StaleEpoch { have: 4, stored: 5 })
    ));
    assert!(!s.set_allowlist(5, b"epoch 5", 50).await.unwrap());
    assert!(matches!(
        s.set_allowlist(5, b"another epoch 5", 50).await,
        Err(StoreError::EpochConflict(5))
    ));
    assert!(s.set_allowlist(6, b"epoch 6", 60).await.unwrap());
    // Another process on the same database sees the current one.
    let other = open(&url).await;
    assert_eq!(other.allowlist_epoch().await.unwrap(), 6);
    assert_eq!(
        other.allowlist().await.unwrap(),
        Some((6, b"epoch 6".to_vec()))
    );
}

async fn the_kek_check_and_rotation(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    let s = open(&url).await;
    assert_eq!(s.init_kek_check(b"check A").await.unwrap(), b"check A");
    // The first stored value stays.
    assert_eq!(s.init_kek_check(b"check B").await.unwrap(), b"check A");
    s.register(&record("vm-1", b"old 1"), 10, json!({}))
        .await
        .unwrap();
    s.register(&record("vm-2", b"old 2"), 11, json!({}))
        .await
        .unwrap();
    assert_eq!(
        s.live_keys().await.unwrap(),
        vec![
            ("vm-1".to_string(), 1, b"old 1".to_vec()),
            ("vm-2".to_string(), 1, b"old 2".to_vec())
        ]
    );
    let all = vec![
        ("vm-1".to_string(), 1, b"old 1".to_vec(), b"new 1".to_vec()),
        ("vm-2".to_string(), 1, b"old 2".to_vec(), b"new 2".to_vec()),
    ];
    assert!(matches!(
        s.rekey(b"check B", b"check C", all.clone(), 20).await,
        Err(StoreError::KekRotated)
    ));
    assert!(matches!(
        s.rekey(b"check A", b"check C", all[..1].to_vec(), 20).await,
        Err(StoreError::RotationRace)
    ));
    assert_eq!(s.rekey(b"check A", b"check C", all, 20).await.unwrap(), 2);
    assert_eq!(s.init_kek_check(b"x").await.unwrap(), b"check C");
    assert_eq!(
        s.vm("vm-2").await.unwrap().unwrap().wrapped_key,
        Some(b"new 2".to_vec())
    );
    // A registration wrapped under the old KEK is refused once the store's has moved on.
    s.bind_kek(Some(b"check A".to_vec()));
    assert!(matches!(
        s.register(&record("vm-3", b"k"), 30, json!({})).await,
        Err(StoreError::KekRotated)
    ));
}

async fn one_audit_chain_across_reopen_with_signed_checkpoints(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    let key = Arc::new(aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap());
    let opts = || StoreOptions {
        audit_key: Some(key.clone()),
        ..StoreOptions::default()
    };
    {
        let s = SqlStore::open_url(&url, opts()).await.unwrap();
        s.register(&record("vm-1", b"k"), 10, json!({}))
            .await
            .unwrap();
        s.commit(&release("vm-1", [1; 32], 0)).await.unwrap();
        let cp = s.checkpoint().await.unwrap().expect("a checkpoint");
        assert_eq!(cp.seq, 1);
    }
    let s = SqlStore::open_url(&url, opts()).await.unwrap();
    s.commit(&denial([2; 32])).await.unwrap();
    s.terminate("vm-1", 40, json!({})).await.unwrap();
    s.checkpoint().await.unwrap().expect("a checkpoint");
    let entries = s.audit_entries().await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let log = s.audit_log().await.unwrap();
    let v = verify(&log, &kbs::audit::public_key(&key)).unwrap();
    assert_eq!(v.entries, 4);
    // An entry edited in the stored log breaks it.
    let edited = log.replacen("\"denial\"", "\"release\"", 1);
    assert!(verify(&edited, &kbs::audit::public_key(&key)).is_err());
    // The chain resumes from the last entry.
    let last = Chain::resume(entries.last().unwrap());
    assert_eq!(last.next_seq, 4);
    assert!(
        log.lines()
            .any(|l| matches!(serde_json::from_str::<Line>(l), Ok(Line::Checkpoint { .. })))
    );
}

async fn group_commit(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    let s = open(&url).await;
    let commits: Vec<Commit> = (0..64u8).map(|i| denial([i; 32])).collect();
    let results = join_all(commits.iter().map(|c| s.commit(c))).await;
    assert!(results.iter().all(Result::is_ok));
    let tx = s
        .stats
        .transactions
        .load(std::sync::atomic::Ordering::Relaxed);
    let writes = s.stats.writes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(writes, 64);
    assert!(tx < 64 / 4, "{writes} writes took {tx} transactions");
    let mut seqs: Vec<u64> = results.into_iter().map(|r| r.unwrap().entry.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 64);
}

/// Two stores on one database, as two broker replicas: for every VM both try to release the
/// same boot at once (each with its own nonce, and again with one nonce between them); exactly
/// one release per boot holds, and the audit log is one chain with every decision in it.
async fn two_replicas_never_both_release_for_one_boot(on: On) {
    let Some(db) = database(on) else {
        return;
    };
    let url = db.url.clone();
    // Both start at once on a new database: they migrate one after the other.
    let (a, b) = tokio::join!(open(&url), open(&url));
    let (a, b) = (Arc::new(a), Arc::new(b));
    const VMS: u8 = 24;
    for v in 0..VMS {
        a.register(&record(&format!("vm-{v}"), b"k"), 10, json!({}))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for v in 0..VMS {
        let vm = format!("vm-{v}");
        // Boot 1: own nonces. Boot 2: one nonce presented to both.
        for (store, nonce, from) in [
            (a.clone(), [v; 32], 0),
            (b.clone(), [v | 0x80; 32], 0),
            (a.clone(), [v | 0x40; 32], 1),
            (b.clone(), [v | 0x40; 32], 1),
        ] {
            let vm = vm.clone();
            tasks.push(tokio::spawn(async move {
                (
                    from,
                    store.commit(&release(&vm, nonce, from)).await.unwrap(),
                )
            }));
        }
    }
    let mut released = [[0usize; 2]; VMS as usize];
    for (i, t) in tasks.into_iter().enumerate() {
        let (from, c) = t.await.unwrap();
        released[i / 4][from as usize] += usize::from(c.released);
    }
    for (v, r) in released.iter().enumerate() {
        // Boot 2 can be released only after boot 1 was: at most one each, and boot 1 always.
        assert_eq!(r[0], 1, "vm-{v}: boot 1 released {} times", r[0]);
        assert!(r[1] <= 1, "vm-{v}: boot 2 released {} times", r[1]);
        let counter = a
            .vm(&format!("vm-{v}"))
            .await
            .unwrap()
            .unwrap()
            .state
            .boot_counter;
        assert_eq!(counter as usize, 1 + r[1]);
    }
    let entries = b.audit_entries().await.unwrap();
    let n = VMS as usize * 5;
    assert_eq!(entries.len(), n, "every decision audited once");
    assert!(entries.iter().enumerate().all(|(i, e)| e.seq == i as u64));
    assert_eq!(common::verified_entries(&entries), n as u64);
}

/// Polls every future to completion on this task.
async fn join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
