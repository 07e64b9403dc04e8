//! Backups on a real S3 server: Garage, started here on loopback (`testkit`), reached through
//! a relay that can cut the network at a chosen byte. Two host agents in process, each its own
//! simulated chip on libvirt's test driver, one operator order allowing both chips.
//!
//! Shown: a first backup uploads only the chunks that are not zeros, the next only what
//! changed; a running VM is not backed up; an upload cut in the middle resumes from its last
//! part; retention keeps the newest backups and every pack they read; a chunk damaged in the
//! bucket fails the restore and leaves nothing; the backup restores on the other host
//! byte-exact; terminate deletes every object (and, with the store unreachable, deletes them
//! on a later tick), and journals it for the chain.

mod common;

use aws_lc_rs::signature::Ed25519KeyPair;
use host_agent::config::HostConfig;
use host_agent::control::{ControlRequest as R, ControlResponse};
use host_agent::daemon::{Daemon, system_clock};
use host_agent::state::StateDb;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore as _, ObjectStoreExt as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use testkit::cut::Cut;
use testkit::garage::Garage;

const MIB: u64 = 1 << 20;

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Garage, or `None` (skipped with a message) where it is not installed, except under CI.
fn garage(dir: &Path) -> Option<Garage> {
    if testkit::garage::binary().is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no Garage binary (scripts/test.sh installs it)"
        );
        eprintln!("skipped: no Garage binary (set ATTESTA_GARAGE or run scripts/test.sh)");
        return None;
    }
    Some(Garage::start(dir, "backups").unwrap())
}

const VM: &str = "vm-b1";

async fn backup(d: &Daemon) -> Result<serde_json::Value, String> {
    ask(d, R::Backup { vm_id: VM.into() }).await
}

/// A restore of the newest backup on `d`.
async fn restore(d: &Daemon, spec: &str, order: &[u8]) -> Result<serde_json::Value, String> {
    ask(
        d,
        R::Restore {
            spec: spec.into(),
            order: b64(order),
            backup: None,
            start: false,
        },
    )
    .await
}

async fn ask(d: &Daemon, r: R) -> Result<serde_json::Value, String> {
    let ControlResponse { ok, result, error } = d.handle(r).await;
    if ok {
        Ok(result.unwrap_or_default())
    } else {
        Err(error.unwrap_or_default())
    }
}

/// A host agent in `dir` on simulated chip `chip`, backing up to `endpoint` (the relay).
async fn agent(
    op: &Ed25519KeyPair,
    dir: &Path,
    chip: u64,
    g: &Garage,
    endpoint: &str,
) -> Arc<Daemon> {
    let backup = g
        .backup_toml(&dir.join("s3.secret"), "keep = 2\n")
        .unwrap()
        .replace(&g.endpoint, endpoint);
    // Each host its own libvirt: a test driver of its own (test:///default is one per process).
    std::fs::write(dir.join("node.xml"), "<node/>").unwrap();
    let text = common::host_toml(
        op,
        &format!("[platform]\nkind = \"simulator\"\nchip = {chip}\n{backup}"),
    )
    .replace(
        "test:///default",
        &format!("test://{}", dir.join("node.xml").display()),
    );
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    Daemon::open(HostConfig::load(&path).unwrap(), system_clock())
        .await
        .unwrap()
}

/// One VM's two homes: host A (simulated chip 3), where it is created, stopped, and host B
/// (chip 4), where it is restored; its register order allows both chips.
struct Pair {
    da: PathBuf,
    db: PathBuf,
    spec_a: String,
    spec_b: String,
    disk_a: PathBuf,
    disk_b: PathBuf,
    order: Vec<u8>,
    a: Arc<Daemon>,
}

/// Host A for `vm` in `top/a{tag}` (B's folder `top/b{tag}`), the VM created there.
async fn pair(
    top: &Path,
    tag: &str,
    vm: &str,
    op: &Ed25519KeyPair,
    g: &Garage,
    endpoint: &str,
) -> Pair {
    let (da, db) = (top.join(format!("a{tag}")), top.join(format!("b{tag}")));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let spec_a = common::spec(&da, vm);
    let disk_a = da.join(format!("{vm}.img"));
    let disk_b = db.join(format!("{vm}.img"));
    let spec_b = spec_a.replace(&disk_a.display().to_string(), &disk_b.display().to_string());
    let (chip3, chip4) = (common::chip_id("milan", 3), common::chip_id("milan", 4));
    let order = common::register_order_on(op, vm, &spec_a, &[&chip3, &chip4], None);
    let a = agent(op, &da, 3, g, endpoint).await;
    ask(
        &a,
        R::Create {
            spec: spec_a.clone(),
            order: b64(&order),
            start: false,
        },
    )
    .await
    .unwrap();
    Pair {
        da,
        db,
        spec_a,
        spec_b,
        disk_a,
        disk_b,
        order,
        a,
    }
}

/// Writes 8 MiB of random bytes (as ciphertext looks) at chunk `i`.
fn scribble(disk: &Path, i: u64) {
    let mut b = vec![0u8; (8 * MIB) as usize];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&b, i * 8 * MIB).unwrap();
}

fn sha256_file(p: &Path) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_incremental_resumable_verified_restored_elsewhere_and_deleted_on_terminate() {
    let top = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let Some(g) = garage(top.path()) else { return };
    let port: u16 = g.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let cut = Cut::start(([127, 0, 0, 1], port).into()).unwrap();
    let via = format!("http://{}", cut.addr);
    let s3 = g.client().unwrap();
    let objects = async || -> Vec<String> {
        let mut names: Vec<String> = futures::TryStreamExt::try_collect::<Vec<_>>(
            s3.list(Some(&ObjPath::from("attesta/vm-b1"))),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.location.to_string())
        .collect();
        names.sort();
        names
    };

    let op = Ed25519KeyPair::generate().unwrap();
    let Pair {
        da,
        db,
        spec_a,
        spec_b,
        disk_a,
        disk_b,
        order,
        a,
    } = pair(top.path(), "", "vm-b1", &op, &g, &via).await;
    for i in [0, 5, 100] {
        scribble(&disk_a, i);
    }
    let first = backup(&a).await.unwrap();
    assert_eq!(first["backup"], 1);
    assert_eq!(first["chunks"], 128, "1 GiB in 8 MiB chunks");
    assert_eq!(first["chunks_uploaded"], 3, "zeros are not uploaded");
    assert_eq!(first["bytes_uploaded"], 24 * MIB);

    // Running: refused, nothing uploaded.
    ask(&a, R::Start { vm_id: VM.into() }).await.unwrap();
    let e = backup(&a).await.unwrap_err();
    assert!(e.contains("is running"), "{e}");
    ask(&a, R::Stop { vm_id: VM.into() }).await.unwrap();
    assert_eq!(objects().await.len(), 2, "one pack, one manifest");

    scribble(&disk_a, 5);
    let second = backup(&a).await.unwrap();
    assert_eq!(second["backup"], 2);
    assert_eq!(second["chunks_uploaded"], 1, "only the changed chunk");
    assert_eq!(second["bytes_uploaded"], 8 * MIB);

    // Ten more chunks; the network is cut after 40 MiB of them went out.
    for i in 20..30 {
        scribble(&disk_a, i);
    }
    cut.after(40 * MIB);
    let e = backup(&a).await.unwrap_err();
    assert!(cut.is_down(), "the upload was not cut: {e}");
    // What the agent committed before the cut: the upload and the parts done.
    let state_a = StateDb::open(&da.join("state").join("host.db"))
        .await
        .unwrap();
    let pending: serde_json::Value =
        serde_json::from_str(&state_a.backup_resume("vm-b1").await.unwrap().unwrap()).unwrap();
    let done_before = pending["parts"].as_array().unwrap().len() as u64;
    assert!(pending["upload_id"].is_string());
    cut.heal();
    let third = backup(&a).await.unwrap();
    assert_eq!(third["backup"], 3, "the same backup, finished: {third}");
    assert_eq!(third["chunks_uploaded"], 10);
    assert!((1..10).contains(&done_before), "{pending}");
    assert_eq!(
        third["parts_resumed"], done_before,
        "the parts sent before the cut are not sent again: {third}"
    );
    assert_eq!(state_a.backup_resume("vm-b1").await.unwrap(), None);
    // Retention (keep = 2): backup 1 goes; pack 1 stays, backups 2 and 3 read it.
    assert_eq!(third["removed"], serde_json::json!([1]));
    let listed = ask(
        &a,
        R::Backups {
            vm_id: "vm-b1".into(),
        },
    )
    .await
    .unwrap();
    let nums: Vec<u64> = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup"].as_u64().unwrap())
        .collect();
    assert_eq!(nums, vec![2, 3]);
    assert_eq!(
        objects().await,
        vec![
            "attesta/vm-b1/manifests/0000000002.json",
            "attesta/vm-b1/manifests/0000000003.json",
            "attesta/vm-b1/packs/0000000001",
            "attesta/vm-b1/packs/0000000002",
            "attesta/vm-b1/packs/0000000003",
        ]
    );

    // Cut again, and the disk changes before the next attempt: the unfinished upload is stale
    // (aborted), and the backup starts over under the same number.
    for i in 40..46 {
        scribble(&disk_a, i);
    }
    cut.after(20 * MIB);
    backup(&a).await.unwrap_err();
    assert!(cut.is_down());
    cut.heal();
    scribble(&disk_a, 46);
    let fourth = backup(&a).await.unwrap();
    assert_eq!(
        (
            &fourth["backup"],
            &fourth["chunks_uploaded"],
            &fourth["parts_resumed"]
        ),
        (
            &serde_json::json!(4),
            &serde_json::json!(7),
            &serde_json::json!(0)
        ),
        "{fourth}"
    );
    assert_eq!(fourth["removed"], serde_json::json!([2]));

    // Host B.
    let b = agent(&op, &db, 4, &g, &via).await;
    // A chunk damaged in the bucket fails the restore and leaves nothing behind.
    let pack = ObjPath::from("attesta/vm-b1/packs/0000000004");
    let good = s3.get(&pack).await.unwrap().bytes().await.unwrap();
    let mut bad = good.to_vec();
    bad[4096] ^= 1;
    s3.put(&pack, bad.into()).await.unwrap();
    let e = restore(&b, &spec_b, &order).await.unwrap_err();
    assert!(
        e.contains("chunk 40 from pack 4 does not match its SHA-256"),
        "{e}"
    );
    assert!(!disk_b.exists());
    assert!(std::fs::read_dir(&db).unwrap().all(|f| {
        !f.unwrap()
            .file_name()
            .to_string_lossy()
            .contains("restoring")
    }));
    let listed = ask(&b, R::List).await.unwrap();
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["vm_id"] == "vm-b1"),
        "no VM was created: {listed}"
    );
    // With the bucket still damaged: a backup of another size, and an order without B's
    // chip, are refused for that, not for the damage: before anything is downloaded.
    let e = restore(&b, &spec_b.replace("size_gib = 1", "size_gib = 2"), &order)
        .await
        .unwrap_err();
    assert!(
        e.contains("is a disk of 1073741824 bytes; the spec's is 2 GiB"),
        "{e}"
    );
    let only_a =
        common::register_order_on(&op, "vm-b1", &spec_a, &[&common::chip_id("milan", 3)], None);
    let e = restore(&b, &spec_b, &only_a).await.unwrap_err();
    assert!(e.contains("not among the order"), "{e}");
    assert!(!disk_b.exists());

    s3.put(&pack, good.into()).await.unwrap();

    // Restored on host B, byte for byte, through B's launch gate and chip check.
    let v = restore(&b, &spec_b, &order).await.unwrap();
    assert_eq!(v["restored_from"], 4);
    assert_eq!(v["state"], "stopped");
    assert_eq!(sha256_file(&disk_b), sha256_file(&disk_a));

    // Terminated on B with the store unreachable: pending, then done on a tick.
    cut.after(0);
    let t = ask(
        &b,
        R::Terminate {
            vm_id: "vm-b1".into(),
            order: b64(&common::terminate_order(&op, "vm-b1")),
        },
    )
    .await
    .unwrap();
    assert!(
        t["backups"]
            .as_str()
            .unwrap()
            .starts_with("deletion pending"),
        "{t}"
    );
    assert_eq!(
        objects().await.len(),
        6,
        "nothing deleted while unreachable"
    );
    cut.heal();
    b.retry_backup_deletions().await;
    assert_eq!(
        objects().await,
        vec!["attesta/vm-b1/terminated"],
        "every backup deleted; the marker left"
    );
    // Journalled for the chain's lifecycle record.
    let journal = StateDb::open(&db.join("state").join("host.db"))
        .await
        .unwrap()
        .lifecycle_after(0, 100)
        .await
        .unwrap();
    let last = journal.last().unwrap();
    assert_eq!(
        (last.event.as_str(), last.reason.as_deref()),
        ("backups_deleted", Some("6 objects"))
    );
    assert!(journal.iter().any(|r| r.event == "terminated"));
    // Host A's record of the VM still runs; terminated there, nothing is left to delete.
    let t = ask(
        &a,
        R::Terminate {
            vm_id: "vm-b1".into(),
            order: b64(&common::terminate_order(&op, "vm-b1")),
        },
    )
    .await
    .unwrap();
    assert_eq!(t["backups"], "0 objects deleted");
    // On any other host, a terminated VM is not restored: terminate left its marker.
    let dc = top.path().join("c");
    std::fs::create_dir_all(&dc).unwrap();
    let c = agent(&op, &dc, 4, &g, &via).await;
    let e = restore(
        &c,
        &spec_b.replace(&db.display().to_string(), &dc.display().to_string()),
        &order,
    )
    .await
    .unwrap_err();
    assert!(e.contains("VM vm-b1 was terminated"), "{e}");
    // A terminated VM is not restored from the bucket again.
    let c = ask(
        &b,
        R::Backups {
            vm_id: "vm-b1".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(c["backups"], serde_json::json!([]));
}

/// A load run, not a test (`cargo test -p host-agent --features simulator --test backup --
/// --ignored --nocapture`): a first (full) backup and a restore of 512 MiB of ciphertext on a
/// 1 GiB disk against a plain S3 multipart upload and a plain download of the same bytes,
/// same Garage, same client library, part size and parts in flight, same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn backup_and_restore_throughput_against_plain_s3() {
    use futures::StreamExt as _;
    use object_store::multipart::MultipartStore as _;
    let top = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let g = garage(top.path()).expect("Garage");
    let s3 = Arc::new(g.client().unwrap());
    let op = Ed25519KeyPair::generate().unwrap();
    let mb = |bytes: u64, s: f64| bytes as f64 / s / 1e6;
    for round in 0..2 {
        let vm = format!("vm-t{round}");
        let Pair {
            db,
            spec_b,
            disk_a,
            order,
            a,
            ..
        } = pair(top.path(), &round.to_string(), &vm, &op, &g, &g.endpoint).await;
        for i in 0..64 {
            scribble(&disk_a, i * 2);
        }
        let data = 64 * 8 * MIB;

        // Plain: the same 64 chunks as one multipart object, 8 MiB parts, 4 in flight.
        let path = ObjPath::from(format!("plain/{vm}"));
        let t = std::time::Instant::now();
        let id = s3.create_multipart(&path).await.unwrap();
        let parts: Vec<_> = futures::stream::iter(0..64u64)
            .map(|k| {
                let (s3, path, id, disk) = (s3.clone(), path.clone(), id.clone(), disk_a.clone());
                async move {
                    let mut b = vec![0u8; (8 * MIB) as usize];
                    std::fs::File::open(&disk)
                        .unwrap()
                        .read_exact_at(&mut b, k * 2 * 8 * MIB)
                        .unwrap();
                    s3.put_part(&path, &id, k as usize, b.into()).await.unwrap()
                }
            })
            .buffered(4)
            .collect()
            .await;
        s3.complete_multipart(&path, &id, parts).await.unwrap();
        let plain_up = t.elapsed().as_secs_f64();

        let t = std::time::Instant::now();
        let v = ask(&a, R::Backup { vm_id: vm.clone() }).await.unwrap();
        let backup = t.elapsed().as_secs_f64();
        assert_eq!(v["bytes_uploaded"], data);

        let t = std::time::Instant::now();
        let got = s3.get(&path).await.unwrap().bytes().await.unwrap();
        let out = db.join("plain.img");
        std::fs::write(&out, &got).unwrap();
        std::fs::File::open(&out).unwrap().sync_all().unwrap();
        let plain_down = t.elapsed().as_secs_f64();
        assert_eq!(got.len() as u64, data);

        let b = agent(&op, &db, 4, &g, &g.endpoint).await;
        let t = std::time::Instant::now();
        restore(&b, &spec_b, &order).await.unwrap();
        let restore = t.elapsed().as_secs_f64();
        println!(
            "round {round}: 512 MiB of ciphertext on a 1 GiB disk — plain multipart upload {:.1} MB/s, \
             backup {:.1} MB/s (ratio {:.2}); plain download {:.1} MB/s, restore {:.1} MB/s (ratio {:.2})",
            mb(data, plain_up),
            mb(data, backup),
            plain_up / backup,
            mb(data, plain_down),
            mb(data, restore),
            plain_down / restore
        );
    }
}
