//! Billing against a real Substrate runtime, offline: Chopsticks serves Rococo Asset Hub's
//! chain spec on loopback (see ../shared/CHAIN-TESTING.md and tests/chain/). That runtime has no
//! billing pallet, so records go as `System.remark_with_event(document)` and the chain's
//! `System.Remarked` hash (blake2_256 of the document) is checked — exactly once per
//! (period, account), across a crash before sending and a crash after sending.

use common::chain::{Chain, remarked_hashes};
use host_agent::billing::{
    BillingError, CallKind, Enqueued, MORTALITY, Outbox, State, Submitter, account_value,
    hash_value,
};
use host_agent::usage::{Event, HOUR, Meter, Terms, UsageDoc};
use std::process::Command;

mod common;

/// Two hours of two accounts' VMs: four documents.
fn documents() -> Vec<UsageDoc> {
    let mut m = Meter::new();
    let h = 495_000 * HOUR;
    for (vm, account, rate, at) in [
        (
            "vm-1",
            "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
            1_200u128,
            h + 100,
        ),
        (
            "vm-2",
            "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
            9_000u128,
            h + 1_800,
        ),
    ] {
        m.record(&Event::Started {
            vm_id: vm.into(),
            terms: Terms {
                account: account.into(),
                rate_per_hour: rate,
            },
            at,
        })
        .unwrap();
    }
    let mut docs = m.close_hour();
    docs.extend(m.close_hour());
    assert_eq!(docs.len(), 4);
    docs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_the_chain_exactly_once_across_crashes() {
    let Some(chain) = Chain::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let docs = documents();

    let outbox = Outbox::open(&db).await.unwrap();
    for d in &docs {
        assert_eq!(outbox.enqueue(d).await.unwrap(), Enqueued::New);
        assert_eq!(outbox.enqueue(d).await.unwrap(), Enqueued::AlreadyRecorded);
    }
    // Never a different hash for a period already recorded.
    let mut forged = docs[0].clone();
    forged.json.push(' ');
    forged.hash = [7; 32];
    assert!(matches!(
        outbox.enqueue(&forged).await,
        Err(BillingError::HashConflict { .. })
    ));

    // Crash 1: the first record is signed and committed, then the agent dies before sending.
    let sub = Submitter::connect(&chain.url(), "//Alice", CallKind::Remark)
        .await
        .unwrap();
    let first = sub.sign_next(&outbox).await.unwrap().unwrap();
    drop(sub);
    drop(outbox);

    // Crash 2: after a restart the second record is signed, sent and finalized, and the agent
    // dies before marking it done.
    let outbox = Outbox::open(&db).await.unwrap();
    let sub = Submitter::connect(&chain.url(), "//Alice", CallKind::Remark)
        .await
        .unwrap();
    assert!(matches!(
        outbox.records().await.unwrap()[0].state,
        State::Signed { .. }
    ));
    // (The first record's stored transaction is sent first, as a drain would.)
    assert_eq!(
        sub.send_signed(&outbox, first.0, &first.1).await.unwrap(),
        State::Done
    );
    let second = sub.sign_next(&outbox).await.unwrap().unwrap();
    let tx = outbox
        .stored_tx(second.0, &second.1)
        .await
        .unwrap()
        .unwrap();
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(chain.url())
        .await
        .unwrap();
    api.at_current_block()
        .await
        .unwrap()
        .transactions()
        .from_bytes(tx)
        .submit_and_watch()
        .await
        .unwrap()
        .wait_for_finalized_success()
        .await
        .unwrap();
    drop(sub);
    drop(outbox);

    // Restart: the drain confirms the second by its consumed nonce (not sent again) and
    // submits the other two.
    let outbox = Outbox::open(&db).await.unwrap();
    let sub = Submitter::connect(&chain.url(), "//Alice", CallKind::Remark)
        .await
        .unwrap();
    let d = sub.drain(&outbox).await.unwrap();
    assert_eq!(
        (d.confirmed, d.submitted, d.failed, d.deferred),
        (1, 2, 0, 0),
        "{d:?}"
    );
    assert!(
        outbox
            .records()
            .await
            .unwrap()
            .iter()
            .all(|r| r.state == State::Done)
    );
    assert_eq!(
        sub.drain(&outbox).await.unwrap(),
        Default::default(),
        "nothing left"
    );

    // On chain: each document's hash exactly once, nothing else.
    let mut on_chain = remarked_hashes(&chain.url()).await;
    let mut expected: Vec<[u8; 32]> = docs
        .iter()
        .map(|d| sp_crypto_hashing::blake2_256(d.json.as_bytes()))
        .collect();
    on_chain.sort();
    expected.sort();
    assert_eq!(on_chain, expected);
}

/// A stored transaction that can never be included — its nonce taken by another transaction
/// of the key, or its mortality window passed before it was sent — is signed again (never
/// left to block the outbox, never sent twice); the chain ends with each document once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_transactions_that_can_never_be_included_are_signed_again() {
    let Some(chain) = Chain::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("outbox.db")).await.unwrap();
    let docs = documents();
    for d in &docs[..2] {
        outbox.enqueue(d).await.unwrap();
    }
    let sub = Submitter::connect(&chain.url(), "//Alice", CallKind::Remark)
        .await
        .unwrap();
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(chain.url())
        .await
        .unwrap();
    let alice = subxt_signer::sr25519::dev::alice();

    // A is signed with nonce n; then another transaction of the same key takes n.
    let n = sub.chain_nonce().await.unwrap();
    let a = sub.sign_next(&outbox).await.unwrap().unwrap();
    let other = subxt::dynamic::transaction(
        "System",
        "remark_with_event",
        vec![subxt::dynamic::Value::from_bytes(b"not billing")],
    );
    api.at_current_block()
        .await
        .unwrap()
        .transactions()
        .sign_and_submit_then_watch(
            &other,
            &alice,
            subxt::config::polkadot::PolkadotExtrinsicParamsBuilder::new()
                .nonce(n)
                .build(),
        )
        .await
        .unwrap()
        .wait_for_finalized_success()
        .await
        .unwrap();

    // B is signed with n + 1, then left unsent until its window has passed.
    let b = sub.sign_next(&outbox).await.unwrap().unwrap();
    let b_tx = outbox.stored_tx(b.0, &b.1).await.unwrap().unwrap();
    chain.advance(MORTALITY + 2);
    let late = api
        .at_current_block()
        .await
        .unwrap()
        .transactions()
        .from_bytes(b_tx)
        .submit_and_watch()
        .await;
    let late = match late {
        Ok(p) => p
            .wait_for_finalized_success()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(late.is_err(), "an expired transaction was accepted");

    let d = sub.drain(&outbox).await.unwrap();
    assert_eq!(
        (d.resigned, d.submitted, d.confirmed, d.failed, d.deferred),
        (2, 2, 0, 0, 0),
        "{d:?}"
    );
    let records = outbox.records().await.unwrap();
    assert!(
        records.iter().all(|r| r.state == State::Done),
        "{records:?}"
    );
    assert_ne!(a, b);

    let mut on_chain = remarked_hashes(&chain.url()).await;
    let mut expected = vec![sp_crypto_hashing::blake2_256(b"not billing")];
    expected.extend(
        docs[..2]
            .iter()
            .map(|d| sp_crypto_hashing::blake2_256(d.json.as_bytes())),
    );
    on_chain.sort();
    expected.sort();
    assert_eq!(on_chain, expected);
}

/// The billing call's arguments encode into the runtime's own types: the account as an
/// `AccountId32` (a string would not encode), the usage hash as an `H256`. This runtime has
/// no billing pallet; `Proxy.announce(real: AccountId32, call_hash: H256)` takes the same
/// two types and stands in for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_billing_arguments_fit_the_runtimes_types() {
    let Some(chain) = Chain::start() else { return };
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(chain.url())
        .await
        .unwrap();
    let at = api.at_current_block().await.unwrap();
    let txs = at.transactions();
    let alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
    let hash = [0x5a; 32];
    let announce = |account| {
        subxt::dynamic::transaction("Proxy", "announce", vec![account, hash_value(&hash)])
    };
    let data = txs
        .call_data(&announce(account_value(alice).unwrap()))
        .unwrap();
    let mut tail =
        hex::decode("d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d").unwrap();
    tail.extend_from_slice(&hash);
    assert_eq!(data.len(), 2 + 64, "{}", hex::encode(&data));
    assert!(data.ends_with(&tail), "{}", hex::encode(&data));
    assert!(
        txs.call_data(&announce(subxt::dynamic::Value::string(alice)))
            .is_err(),
        "a string must not pass for an AccountId32"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_runtime_lacks_is_refused_before_signing() {
    let Some(chain) = Chain::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("outbox.db")).await.unwrap();
    outbox.enqueue(&documents()[0]).await.unwrap();
    let sub = Submitter::connect(&chain.url(), "//Alice", CallKind::default())
        .await
        .unwrap();
    let e = sub.sign_next(&outbox).await.unwrap_err();
    assert!(
        matches!(&e, BillingError::Call(name, _) if name == "Marketplace.submit_compute_usage"),
        "{e}"
    );
    assert_eq!(outbox.records().await.unwrap()[0].state, State::Pending);

    // A record whose account is no chain account can never be billed: marked failed, saying
    // why, without holding up the others (here the one above, still refused for its call).
    let mut m = Meter::new();
    m.record(&Event::Started {
        vm_id: "vm-x".into(),
        terms: Terms {
            account: "alice".into(),
            rate_per_hour: 1,
        },
        at: 400_000 * HOUR,
    })
    .unwrap();
    outbox.enqueue(&m.close_hour()[0]).await.unwrap();
    assert!(matches!(
        sub.sign_next(&outbox).await,
        Err(BillingError::Call(..))
    ));
    let bad = outbox.records().await.unwrap();
    assert_eq!(
        (bad[0].state.clone(), bad[1].state.clone()),
        (State::Failed, State::Pending)
    );
    assert!(
        bad[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("SS58"),
        "{bad:?}"
    );
    drop(outbox);
    // (Start over with only the good record.)
    std::fs::remove_file(dir.path().join("outbox.db")).unwrap();
    let outbox = Outbox::open(&dir.path().join("outbox.db")).await.unwrap();
    outbox.enqueue(&documents()[0]).await.unwrap();
    drop(outbox);

    // The same record through the binary, with the call this runtime has.
    let db = dir.path().join("outbox.db");
    let signer = dir.path().join("billing.secret");
    std::fs::write(&signer, "//Alice\n").unwrap();
    let host = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_attesta-host"))
            .args(args)
            .output()
            .unwrap()
    };
    let db_s = db.to_string_lossy().to_string();
    let out = host(&[
        "billing",
        "drain",
        "--outbox",
        &db_s,
        "--chain",
        &chain.url(),
        "--signer-file",
        &signer.to_string_lossy(),
        "--call",
        "System.remark_with_event",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("submitted 1,"), "{text}");
    let out = host(&["billing", "status", "--outbox", &db_s, "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["state"], "done", "{v}");
    assert_eq!(v[0]["usage_hash"], hex::encode(documents()[0].hash), "{v}");
    let out = host(&["billing", "status", "--outbox", &db_s]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 records"));
}

/// The daemon against the chain: the credit check reads each account's free balance from
/// `System.Account` (an unfunded account's VM is not started; a funded one runs), and the hour's
/// usage, closed by the agent itself, is drained to the chain once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_checks_credit_on_chain_and_bills_the_hour() {
    use aws_lc_rs::signature::Ed25519KeyPair;
    use base64::Engine as _;
    use host_agent::control::ControlRequest as R;
    use proto::order::Billing;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let Some(chain) = Chain::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
    let unfunded = subxt_signer::sr25519::Keypair::from_uri(&"//Attesta-unfunded".parse().unwrap())
        .unwrap()
        .public_key()
        .to_account_id()
        .to_string();
    let op = Ed25519KeyPair::generate().unwrap();
    let signer = d.join("billing.secret");
    std::fs::write(&signer, "//Alice\n").unwrap();
    let config = d.join("host.toml");
    let billing = format!(
        "[platform]\nkind = \"simulator\"\nchip = 5\n\
         [billing]\nchain = \"{}\"\nsigner_file = \"billing.secret\"\ncall = \"System.remark_with_event\"\n\
         [credit]\nkind = \"chain-balance\"\n",
        chain.url()
    );
    std::fs::write(&config, common::host_toml(&op, &billing)).unwrap();
    let chip = common::chip_id("milan", 5);
    let h0 = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / HOUR
        + 1)
        * HOUR;
    let clock = Arc::new(AtomicU64::new(h0 + 1_200));
    let c = clock.clone();
    let agent = host_agent::daemon::Daemon::open(
        host_agent::config::HostConfig::load(&config).unwrap(),
        Arc::new(move || c.load(Ordering::SeqCst)),
    )
    .await
    .unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut results = Vec::new();
    for (vm, account) in [("vm-ch1", alice.to_string()), ("vm-ch2", unfunded.clone())] {
        let spec = common::spec(d, vm);
        let order = common::register_order(
            &op,
            vm,
            &spec,
            &chip,
            Some(Billing {
                account,
                rate_per_hour: 1_800,
            }),
        );
        results.push(
            agent
                .handle(R::Create {
                    spec,
                    order: b64(&order),
                    start: true,
                })
                .await,
        );
    }
    assert!(results[0].ok, "{:?}", results[0].error);
    let e = results[1].error.clone().unwrap_or_default();
    assert!(
        e.contains(&format!(
            "account {unfunded} cannot pay: free balance 0 is less than 1800"
        )),
        "{e}"
    );

    // The hour closes (2400 s at 1800/h = 1200) and the agent drains it to the chain.
    clock.store(h0 + HOUR + 2, Ordering::SeqCst);
    let t = agent.tick().await.unwrap();
    assert_eq!(t.closed, vec![h0 / HOUR]);
    assert!(t.stopped.is_empty(), "alice can pay: {t:?}");
    let drained = agent.drain_if_due().await.unwrap().unwrap();
    assert_eq!((drained.submitted, drained.failed), (1, 0));
    let recs = agent.outbox().records().await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].total, &recs[0].state), (1_200, &State::Done));
    let (json, _) = agent
        .outbox()
        .doc_and_tx(recs[0].period, &recs[0].account)
        .await
        .unwrap();
    assert_eq!(
        remarked_hashes(&chain.url()).await,
        vec![sp_crypto_hashing::blake2_256(json.as_bytes())]
    );
    // Nothing left: the next drain does nothing.
    assert!(agent.drain_if_due().await.unwrap().is_none());
    for vm in ["vm-ch1", "vm-ch2"] {
        let order = common::terminate_order(&op, vm);
        let r = agent
            .handle(R::Terminate {
                vm_id: vm.into(),
                order: b64(&order),
            })
            .await;
        assert!(r.ok, "{:?}", r.error);
    }
}

/// Billing records submitted per second through the outbox (sign, commit, send, wait for
/// finalization, mark done), against plain subxt `sign_and_submit_then_watch_default` of the
/// same calls, in the same run. A load run, not a timed test: it asserts nothing about speed.
///
/// `cargo test --release -p host-agent --test chain -- --ignored --nocapture billing_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load run for BENCHMARKS.md"]
async fn billing_throughput() {
    let Some(chain) = Chain::start() else { return };
    let n = 20usize;
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("outbox.db")).await.unwrap();
    let mut docs = Vec::new();
    for i in 0..n {
        let mut m = Meter::new();
        m.record(&Event::Started {
            vm_id: format!("vm-{i}"),
            terms: Terms {
                account: format!("tenant-{i}"),
                rate_per_hour: 1000,
            },
            at: 496_000 * HOUR,
        })
        .unwrap();
        docs.extend(m.close_hour());
    }
    for d in &docs {
        outbox.enqueue(d).await.unwrap();
    }
    let sub = Submitter::connect(&chain.url(), "//Alice", CallKind::Remark)
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let d = sub.drain(&outbox).await.unwrap();
    let ours = d.submitted as f64 / t.elapsed().as_secs_f64();
    assert_eq!(d.submitted, n);

    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(chain.url())
        .await
        .unwrap();
    let alice = subxt_signer::sr25519::dev::alice();
    let t = std::time::Instant::now();
    for d in &docs {
        let call = subxt::dynamic::transaction(
            "System",
            "remark_with_event",
            vec![subxt::dynamic::Value::from_bytes(d.json.as_bytes())],
        );
        api.at_current_block()
            .await
            .unwrap()
            .transactions()
            .sign_and_submit_then_watch_default(&call, &alice)
            .await
            .unwrap()
            .wait_for_finalized_success()
            .await
            .unwrap();
    }
    let raw = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "billing: {n} records; outbox {ours:.2}/s, plain subxt {raw:.2}/s, ratio {:.2}",
        ours / raw
    );
}
