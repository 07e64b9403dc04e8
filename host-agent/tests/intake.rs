//! VM tasks from a real chain (Chopsticks, see tests/common/chain.rs): a validator's
//! assignments in `System.remark_with_event` create VMs through the launch gate and capacity
//! checks; a refusal is answered on chain with its code, through the billing outbox; remarks
//! from others, or for other miners, are not acted on; the VM's lifecycle goes on chain in a
//! batch; `attesta-host chain status` says what was decided and what is left to send; a replay
//! after a restart (or after a crash between a create and its record) creates nothing twice.

use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use common::chain::{ALICE, BOB, Chain, remark, remarked_hashes};
use host_agent::chain::Follower;
use host_agent::control::ControlRequest as R;
use host_agent::intake::assignment_remark;
use std::sync::Arc;

mod common;

fn vms(list: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["vm_id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_from_the_chain_create_once_and_refusals_are_answered() {
    let Some(chain) = Chain::start() else { return };
    let url = chain.url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let op = Ed25519KeyPair::generate().unwrap();
    std::fs::write(d.join("billing.secret"), "//Bob\n").unwrap();
    let config = d.join("host.toml");
    let extra = format!(
        "[platform]\nkind = \"simulator\"\nchip = 5\n\
         [billing]\nchain = \"{url}\"\nsigner_file = \"billing.secret\"\ncall = \"System.remark_with_event\"\n\
         [chain]\nvalidators = [\"{ALICE}\"]\nfrom_block = 1\nimage_dirs = [{d:?}]\ndisk_dir = {d:?}\n\
         [capacity]\nvcpus = 64\nmemory_mib = 262144\ndisk_gib = 4096\ntenants = {{ \"tenant-a\" = 1 }}\n"
    );
    std::fs::write(&config, common::host_toml(&op, &extra)).unwrap();
    let chip = common::chip_id("milan", 5);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let task = |vm: &str, miner: &str| {
        let spec = common::spec(d, vm);
        let order = common::register_order(&op, vm, &spec, &chip, None);
        assignment_remark(miner, &b64(&order), &spec)
    };
    // vm-t1 for this miner (Bob, the billing key); vm-t2 too, beyond tenant-a's one VM; vm-t3
    // for another miner; vm-t4 assigned by someone who is not a validator; an assignment to this
    // miner that cannot be read; vm-t5 whose kernel is a file of the host's outside the image
    // folder; and vm-t1 again, with another spec (a validator racing the first).
    let t1 = task("vm-t1", BOB);
    remark(&url, "//Alice", &t1).await;
    remark(&url, "//Alice", &task("vm-t2", BOB)).await;
    remark(&url, "//Alice", &task("vm-t3", ALICE)).await;
    remark(&url, "//Bob", &task("vm-t4", BOB)).await;
    let garbled = format!("attesta/v1 assign {{\"miner\": \"{BOB}\", \"spec\": 7}}");
    remark(&url, "//Alice", garbled.as_bytes()).await;
    let outside = String::from_utf8(task("vm-t5", BOB))
        .unwrap()
        .replace(&d.join("vmlinuz").display().to_string(), "/etc/hostname");
    assert!(outside.contains("/etc/hostname"));
    remark(&url, "//Alice", outside.as_bytes()).await;
    let again = String::from_utf8(task("vm-t1", BOB))
        .unwrap()
        .replace("memory_mib = 8192", "memory_mib = 256");
    assert_ne!(again.as_bytes(), t1.as_slice());
    remark(&url, "//Alice", again.as_bytes()).await;

    let clock: host_agent::daemon::Clock = Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    let open = || async {
        host_agent::daemon::Daemon::open(
            host_agent::config::HostConfig::load(&config).unwrap(),
            clock.clone(),
        )
        .await
        .unwrap()
    };
    let agent = open().await;
    let f = Follower::connect(&url).await.unwrap();
    let round = agent.intake_once(&f).await.unwrap();
    assert_eq!(round.created, ["vm-t1"], "{round:?}");
    assert_eq!(
        round.refused,
        [
            ("vm-t2".to_string(), "tenant_quota".to_string()),
            (String::new(), "malformed".to_string()),
            ("vm-t5".to_string(), "spec_path".to_string()),
            ("vm-t1".to_string(), "duplicate".to_string()),
        ],
        "{round:?}"
    );
    let list = agent.handle(R::List).await.result.unwrap();
    assert_eq!(vms(&list), ["vm-t1"], "{list}");
    assert_eq!(
        agent.intake_once(&f).await.unwrap().blocks,
        0,
        "nothing new"
    );

    // The answers go on chain, signed by the billing key: one per block with a refusal.
    let drained = agent.drain_if_due().await.unwrap().unwrap();
    assert_eq!((drained.submitted, drained.failed), (4, 0), "{drained:?}");
    let answers: Vec<String> = {
        let mut v = Vec::new();
        for r in agent.outbox().records().await.unwrap() {
            if r.account != host_agent::intake::ANSWERS_ACCOUNT {
                continue;
            }
            v.push(
                agent
                    .outbox()
                    .doc_and_tx(r.period, &r.account)
                    .await
                    .unwrap()
                    .0,
            );
        }
        v
    };
    assert!(
        answers[0].starts_with("attesta/v1 answers {\"block\":"),
        "{answers:?}"
    );
    assert!(
        answers[0].contains("\"code\":\"tenant_quota\"")
            && answers[0].contains("\"vm_id\":\"vm-t2\""),
        "{answers:?}"
    );
    assert!(answers[1].contains("\"code\":\"malformed\""), "{answers:?}");
    assert!(answers[2].contains("\"code\":\"spec_path\""), "{answers:?}");
    // The reason on chain is the code's fixed text: nothing of the host's files is told.
    assert!(!answers[2].contains("/etc/hostname"), "{answers:?}");
    let on_chain = remarked_hashes(&url).await;
    for a in &answers {
        assert!(on_chain.contains(&host_agent::chain::blake2_256(a.as_bytes())));
    }
    // The assignment's id is the hash the chain recorded for it.
    assert!(on_chain.contains(&host_agent::chain::blake2_256(&t1)));

    // Lifecycle on chain: vm-t1 created and running, one batch, signed by the billing key.
    let through = agent.flush_lifecycle().await.unwrap().expect("a batch");
    assert_eq!(agent.flush_lifecycle().await.unwrap(), None, "nothing new");
    let (batch, _) = agent
        .outbox()
        .doc_and_tx(through, "#lifecycle")
        .await
        .unwrap();
    assert!(
        batch.starts_with("attesta/v1 lifecycle {\"records\":["),
        "{batch}"
    );
    for event in ["\"event\":\"created\"", "\"event\":\"running\""] {
        assert!(batch.contains(event) && batch.contains("vm-t1"), "{batch}");
    }
    assert!(
        !batch.contains("vm-t2"),
        "a refused task never ran: {batch}"
    );
    let drained = agent.drain_if_due().await.unwrap().unwrap();
    assert_eq!((drained.submitted, drained.failed), (1, 0), "{drained:?}");
    assert!(
        remarked_hashes(&url)
            .await
            .contains(&host_agent::chain::blake2_256(batch.as_bytes()))
    );
    // What `attesta-host chain status` says: all decided, nothing left to send.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attesta-host"))
        .args(["chain", "status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        st["cursor"]["block"].as_u64().is_some_and(|b| b >= 5),
        "{st}"
    );
    let outcomes: Vec<&str> = st["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "created",
            "tenant_quota",
            "malformed",
            "spec_path",
            "duplicate"
        ],
        "{st}"
    );
    assert_eq!(st["lifecycle"]["unbatched"], 0, "{st}");
    assert_eq!(st["outbox"].as_array().unwrap().len(), 5, "{st}");
    assert!(
        st["outbox"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "done"),
        "{st}"
    );

    // A restart that replays every block, after a crash took vm-t1's record between the VM's
    // record and its domain: the create is finished (defined, started) and recorded as the
    // task's; nothing is created twice, nothing answered twice.
    drop(agent);
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", d.join("state/host.db").display()))
        .await
        .unwrap();
    // (A crash after the VM was on record and before its domain and disk were made.)
    std::fs::remove_file(d.join("vm-t1.img")).unwrap();
    sqlx::query("DELETE FROM assignments WHERE vm_id = 'vm-t1' AND code IS NULL")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE chain_cursor SET number = 0, hash = (SELECT hash FROM chain_cursor)")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let agent = open().await;
    // (The cursor's hash is no longer block 0's: intake refuses a chain it did not follow.)
    let e = agent.intake_once(&f).await.unwrap_err();
    assert!(e.contains("not the chain this agent followed"), "{e}");
    let genesis = {
        let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(&url)
            .await
            .unwrap();
        api.at_block(0u64).await.unwrap().block_hash().0
    };
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", d.join("state/host.db").display()))
        .await
        .unwrap();
    sqlx::query("UPDATE chain_cursor SET hash = ?")
        .bind(&genesis[..])
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let round = agent.intake_once(&f).await.unwrap();
    assert!(round.blocks >= 5, "{round:?}");
    assert_eq!(
        round.created,
        ["vm-t1"],
        "recognised as this task's VM: {round:?}"
    );
    assert!(round.refused.is_empty(), "{round:?}");
    let list = agent.handle(R::List).await.result.unwrap();
    assert_eq!(vms(&list), ["vm-t1"], "{list}");
    assert_eq!(agent.outbox().records().await.unwrap().len(), 5);
    // No VM was created again (whatever the restart observed is journalled as observed).
    if let Some(n) = agent.flush_lifecycle().await.unwrap() {
        let (batch, _) = agent.outbox().doc_and_tx(n, "#lifecycle").await.unwrap();
        assert!(!batch.contains("\"created\""), "{batch}");
    }
    let d = agent.drain_if_due().await.unwrap();
    assert!(
        d.as_ref().is_none_or(|d| d.submitted <= 1),
        "no answer again: {d:?}"
    );
}

/// Assignments processed per second from the chain, against a plain `subxt` read of the same
/// blocks (each block's extrinsics and their events), in the same run:
/// `cargo test --release -p host-agent --features simulator --test intake -- --ignored --nocapture intake_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load run for BENCHMARKS.md"]
async fn intake_throughput() {
    let Some(chain) = Chain::start() else { return };
    let url = chain.url();
    let n = 30usize;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let op = Ed25519KeyPair::generate().unwrap();
    std::fs::write(d.join("billing.secret"), "//Bob\n").unwrap();
    let config = d.join("host.toml");
    let extra = format!(
        "[platform]\nkind = \"simulator\"\nchip = 5\n\
         [billing]\nchain = \"{url}\"\nsigner_file = \"billing.secret\"\ncall = \"System.remark_with_event\"\n\
         [chain]\nvalidators = [\"{ALICE}\"]\nfrom_block = 1\nimage_dirs = [{d:?}]\ndisk_dir = {d:?}\n\
         [capacity]\nvcpus = 1024\nmemory_mib = 4194304\ndisk_gib = 65536\n"
    );
    std::fs::write(&config, common::host_toml(&op, &extra)).unwrap();
    let chip = common::chip_id("milan", 5);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for i in 0..n {
        let vm = format!("vm-b{i}");
        let spec = common::spec(d, &vm);
        let order = common::register_order(&op, &vm, &spec, &chip, None);
        remark(
            &url,
            "//Alice",
            &assignment_remark(BOB, &b64(&order), &spec),
        )
        .await;
    }
    let agent = host_agent::daemon::Daemon::open(
        host_agent::config::HostConfig::load(&config).unwrap(),
        host_agent::daemon::system_clock(),
    )
    .await
    .unwrap();
    let f = Follower::connect(&url).await.unwrap();
    let t = std::time::Instant::now();
    let round = agent.intake_once(&f).await.unwrap();
    let ours = round.created.len() as f64 / t.elapsed().as_secs_f64();
    assert_eq!(round.created.len(), n, "{round:?}");

    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(&url)
        .await
        .unwrap();
    let head = api.at_current_block().await.unwrap().block_number();
    let t = std::time::Instant::now();
    let mut seen = 0;
    for b in 1..=head {
        let at = api.at_block(b).await.unwrap();
        for x in at.extrinsics().fetch().await.unwrap().iter().flatten() {
            if x.call_name() == "remark_with_event" {
                x.events().await.unwrap();
                seen += 1;
            }
        }
    }
    let raw = seen as f64 / t.elapsed().as_secs_f64();
    assert_eq!(seen, n);
    println!(
        "intake: {n} assignments; agent {ours:.1}/s (gate, capacity, libvirt define and start, records), plain subxt read {raw:.1}/s, ratio {:.2}",
        ours / raw
    );
}
