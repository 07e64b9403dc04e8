//! The SQLite store's own properties: persistence across restarts with an audit chain that
//! continues and verifies, and no volume-key bytes anywhere in the database's files (db, WAL,
//! index), terminated VMs' wrapped keys included. What both backends share is in
//! `store_conformance.rs`.

mod common;

use kbs::keys::{FileKek, Kek, VolumeKey};
use kbs::release::{NonceState, VmState};
use kbs::store::{Commit, SqliteStore, Store, StoreError, VmRecord};
use serde_json::json;

fn record(vm: &str, wrapped: Vec<u8>) -> VmRecord {
    VmRecord {
        state: VmState {
            vm_id: vm.into(),
            generation: 1,
            boot_counter: 0,
            terminated: false,
        },
        tenant: "tenant-a".into(),
        order: b"signed order bytes".to_vec(),
        wrapped_key: Some(wrapped),
    }
}

#[tokio::test]
async fn lifecycle_persistence_and_no_key_bytes_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kbs.db");
    let kek = FileKek::create(&dir.path().join("kek")).unwrap();
    let key = VolumeKey::generate().unwrap();
    let wrapped = kek.wrap("vm-1", 1, &key).unwrap();
    {
        let s = SqliteStore::open(&db).await.unwrap();
        s.register(
            &record("vm-1", wrapped.clone()),
            10,
            json!({"tenant": "tenant-a"}),
        )
        .await
        .unwrap();
        assert!(matches!(
            s.register(&record("vm-1", wrapped.clone()), 11, json!({}))
                .await,
            Err(StoreError::Exists(_))
        ));
        s.register(
            &record(
                "vm-2",
                kek.wrap("vm-2", 1, &VolumeKey::generate().unwrap())
                    .unwrap(),
            ),
            12,
            json!({}),
        )
        .await
        .unwrap();

        // Nonces are issued from memory; the store learns of one when a decision spends it.
        let n = [7u8; 32];
        assert_eq!(s.nonce(&n).await.unwrap(), None);
        let release = Commit {
            nonce: n,
            spend_nonce: true,
            nonce_expires_at: 100,
            lease: None,
            lease_from: None,
            vm_update: Some(VmState {
                vm_id: "vm-1".into(),
                generation: 1,
                boot_counter: 1,
                terminated: false,
            }),
            audit: (
                20,
                "release".into(),
                "vm-1".into(),
                json!({"boot_counter": 1}),
            ),
        };
        assert!(s.commit(&release).await.unwrap().released);
        assert_eq!(s.nonce(&n).await.unwrap(), Some(NonceState::Spent));
        assert_eq!(s.vm("vm-1").await.unwrap().unwrap().state.boot_counter, 1);
        // The same nonce can never release again, even if a caller tried: the commit becomes
        // an audited denial.
        let again = s.commit(&release).await.unwrap();
        assert!(!again.released);
        assert_eq!(again.lost_race, Some("spent_nonce"));
        assert_eq!(again.entry.kind, "denial");
        assert_eq!(s.vm("vm-1").await.unwrap().unwrap().state.boot_counter, 1);

        s.terminate("vm-2", 30, json!({"order": "terminate"}))
            .await
            .unwrap();
        let dead = s.vm("vm-2").await.unwrap().unwrap();
        assert!(
            dead.state.terminated && dead.wrapped_key.is_none(),
            "tombstone without key"
        );
        assert!(matches!(
            s.terminate("vm-9", 31, json!({})).await,
            Err(StoreError::NoSuchVm(_))
        ));

        assert_eq!(s.allowlist().await.unwrap(), None);
        assert!(s.set_allowlist(5, b"epoch 5", 50).await.unwrap());
        assert!(matches!(
            s.set_allowlist(4, b"epoch 4", 50).await,
            Err(StoreError::StaleEpoch { have: 4, stored: 5 })
        ));
        // The same document again is nothing new; another one under the same epoch is refused.
        assert!(!s.set_allowlist(5, b"epoch 5", 50).await.unwrap());
        assert!(matches!(
            s.set_allowlist(5, b"another epoch 5", 50).await,
            Err(StoreError::EpochConflict(5))
        ));
    }
    // After a restart: state kept, and the audit chain continues where it stopped.
    let s = SqliteStore::open(&db).await.unwrap();
    assert_eq!(s.allowlist_epoch().await.unwrap(), 5);
    assert_eq!(s.allowlist().await.unwrap(), Some((5, b"epoch 5".to_vec())));
    let vm1 = s.vm("vm-1").await.unwrap().unwrap();
    assert_eq!(
        &kek.unwrap_key("vm-1", 1, vm1.wrapped_key.as_ref().unwrap())
            .unwrap()
            .0[..],
        &key.0[..]
    );
    let n2 = [8u8; 32];
    s.commit(&Commit {
        nonce: n2,
        spend_nonce: true,
        nonce_expires_at: 200,
        vm_update: None,
        lease: None,
        lease_from: None,
        audit: (
            40,
            "denial".into(),
            "vm-1".into(),
            json!({"reasons": ["hwid_mismatch"]}),
        ),
    })
    .await
    .unwrap();
    // Expired spent nonces are pruned (they guard nothing: a nonce is taken from memory only
    // while live); those not yet expired stay spent.
    assert_eq!(s.prune_nonces(150).await.unwrap(), 1);
    assert_eq!(s.nonce(&[7u8; 32]).await.unwrap(), None);
    assert_eq!(s.nonce(&n2).await.unwrap(), Some(NonceState::Spent));
    assert_eq!(s.prune_nonces(150).await.unwrap(), 0);
    let entries = s.audit_entries().await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5, 6]
    );
    // The refused second use was audited as a denial; an epoch is audited once.
    assert_eq!(
        entries.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        vec![
            "register",
            "register",
            "release",
            "denial",
            "terminate",
            "allowlist",
            "denial"
        ]
    );
    assert_eq!(common::verified_entries(&entries), 7);
    drop(s);

    // No 16-byte run of the volume key in any file the store wrote (db, WAL, shm).
    for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name == "kek" {
            continue;
        }
        let bytes = std::fs::read(f.path()).unwrap();
        assert!(
            !bytes.windows(16).any(|w| key.0.windows(16).any(|k| k == w)),
            "volume-key bytes found in {name}"
        );
    }
}

/// Which of the database's files (main, WAL, shared-memory index) hold any 16-byte run of
/// `blob`.
fn files_holding(db: &std::path::Path, blob: &[u8]) -> Vec<String> {
    let mut found = vec![];
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if blob.windows(16).any(|w| bytes.windows(16).any(|b| b == w)) {
            found.push(path);
        }
    }
    found
}

/// Crypto-shredding holds on disk: once terminate returns, no 16-byte run of the VM's wrapped
/// key is left in the database file (free space in a page, a free page), in the WAL (the page
/// images written before the terminate) or its index — while the store is open, and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_leaves_no_copy_of_the_wrapped_key_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kbs.db");
    let kek = FileKek::create(&dir.path().join("kek")).unwrap();
    let s = SqliteStore::open(&db).await.unwrap();
    for vm in ["vm-1", "vm-2", "vm-3"] {
        let wrapped = kek.wrap(vm, 1, &VolumeKey::generate().unwrap()).unwrap();
        s.register(&record(vm, wrapped), 10, json!({}))
            .await
            .unwrap();
    }
    // A few boots, so the key's page has several images in the WAL.
    for n in 1..=3u8 {
        let c = Commit {
            nonce: [n; 32],
            spend_nonce: true,
            nonce_expires_at: 100,
            lease: None,
            lease_from: None,
            vm_update: Some(VmState {
                vm_id: "vm-1".into(),
                generation: 1,
                boot_counter: u64::from(n),
                terminated: false,
            }),
            audit: (20, "release".into(), "vm-1".into(), json!({})),
        };
        assert!(s.commit(&c).await.unwrap().released);
    }
    let blob = s.vm("vm-1").await.unwrap().unwrap().wrapped_key.unwrap();
    let kept = s.vm("vm-2").await.unwrap().unwrap().wrapped_key.unwrap();
    // The scan finds what is there: before the terminate, the key is on disk.
    assert!(!files_holding(&db, &blob).is_empty());

    s.terminate("vm-1", 30, json!({"order": "terminate"}))
        .await
        .unwrap();
    assert_eq!(files_holding(&db, &blob), Vec::<String>::new());
    assert!(
        !files_holding(&db, &kept).is_empty(),
        "a live VM's key is still stored"
    );
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(files_holding(&db, &blob), Vec::<String>::new());
    let s = SqliteStore::open(&db).await.unwrap();
    assert_eq!(s.vm("vm-2").await.unwrap().unwrap().wrapped_key, Some(kept));
}
