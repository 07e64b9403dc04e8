//! A flood from one source address (invariant 10), over the wire: a broker of its own with a
//! small per-address cap; the flooder, on another loopback address, opens more connections
//! than the cap, holds those it gets and sends bogus evidence on them, while a genuine guest
//! boots from the usual address. The flooder's connections beyond the cap are refused at the
//! door, its evidence is refused without a trace (`unknown_nonce`, no audit entry), and the
//! guest is released: the audit log grows by that one release only. (Evidence on nonces the
//! flooder asked for is a decision like any other, audited; what bounds it is the per-address
//! cap and the evidence allowed per connection, as `kbs/tests/flood.rs` measures.)

use crate::demo::{LiveAttack, Stack, StackOptions, order, stack_with};
use guest_agent::client::{Broker, client_config, exchange, fetch};
use kbs::store::Store;
use proto::msg::{Decision, Request, Response, VERSION, verify_decision};
use simulator::{Chip, GuestLaunch, Pki};
use std::path::Path;
use std::sync::atomic::Ordering;

/// The flooder's source address (all of 127.0.0.0/8 is local on Linux).
const FLOODER: &str = "127.0.0.2";
/// The broker's cap per address here, and how many connections the flooder tries.
const CAP: usize = 4;
const TRIES: usize = 12;

/// Evidence on a nonce the broker never issued.
fn bogus_evidence(vm_id: &str) -> Request {
    Request::Evidence {
        v: VERSION,
        vm_id: vm_id.into(),
        nonce: vec![0x42; 32],
        report: vec![0x5a; 1184],
        cert_table: Vec::new(),
        guest_public_key: vec![7; 32],
        mesh_key: Vec::new(),
    }
}

/// The reasons of a signed denial, an error's code, or "released".
fn answer(broker: &Broker, r: &Response) -> String {
    match r {
        Response::Error { code, .. } => code.clone(),
        _ => match verify_decision(&broker.response_key, r) {
            Ok(Decision::Denial(d)) => d.reasons.join(","),
            Ok(Decision::Release(_)) => "released".into(),
            Ok(Decision::Renewed(_)) => "renewed".into(),
            Err(e) => e.to_string(),
        },
    }
}

async fn audit_len(kbs: &kbs::service::Kbs) -> Result<usize, String> {
    kbs.store
        .audit_entries()
        .await
        .map(|a| a.len())
        .map_err(|e| e.to_string())
}

/// Runs the flood against a broker of its own in `dir`.
pub async fn one_address(
    dir: &Path,
    root: &Pki,
    chip: &Chip,
    image: [u8; 48],
) -> Result<LiveAttack, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let Stack {
        kbs,
        broker,
        operator,
        ..
    } = stack_with(
        dir,
        StackOptions {
            max_sessions: 16,
            max_sessions_per_address: CAP,
            ..StackOptions::trusting(root, image)
        },
    )
    .await?;
    let vm = "vm-flooded";
    let now = crate::demo::now();
    kbs.register(
        &order(vm, 0, &chip.config.chip_id, &image).sign(&operator),
        now,
    )
    .await
    .map_err(|e| format!("{vm}: {e}"))?;
    let audit0 = audit_len(&kbs).await?;

    let flooder = quinn::Endpoint::client(
        format!("{FLOODER}:0")
            .parse()
            .map_err(|e| format!("{FLOODER}: {e}"))?,
    )
    .map_err(|e| format!("the flooder's endpoint on {FLOODER}: {e}"))?;
    let cfg = client_config(&broker).map_err(|e| e.to_string())?;
    let (mut held, mut refused) = (Vec::new(), 0usize);
    for _ in 0..TRIES {
        let connecting = flooder
            .connect_with(cfg.clone(), broker.addr, &broker.server_name)
            .map_err(|e| e.to_string())?;
        match connecting.await {
            Ok(conn) => held.push(conn),
            Err(_) => refused += 1,
        }
    }
    // Bogus evidence on every connection it holds.
    let mut bogus = Vec::new();
    for conn in &held {
        match exchange(conn, &bogus_evidence(vm)).await {
            Ok(r) => bogus.push(answer(&broker, &r)),
            Err(e) => bogus.push(e.to_string()),
        }
    }
    // The genuine guest, from the usual address, while the flooder holds its share.
    let guest = chip.launch(GuestLaunch {
        measurement: image,
        ..Default::default()
    });
    let genuine = fetch(&broker, vm, &guest).await;
    let added = audit_len(&kbs).await?.saturating_sub(audit0);
    let at_door = kbs.metrics.refused_per_address.load(Ordering::Relaxed);
    for conn in &held {
        conn.close(0u32.into(), b"done");
    }
    let contained = held.len() == CAP
        && refused >= TRIES - CAP
        && at_door as usize >= TRIES - CAP
        && bogus.iter().all(|b| b == "unknown_nonce")
        && genuine.is_ok()
        && added == 1;
    let reason = format!(
        "per_address_cap: {refused} of {TRIES} connections from {FLOODER} refused at the door (cap {CAP}, {} held); their bogus evidence: {}; the genuine guest: {}; audit entries added: {added}",
        held.len(),
        if bogus.is_empty() {
            "none sent".to_string()
        } else {
            bogus.join(" / ")
        },
        match &genuine {
            Ok(_) => "released".to_string(),
            Err(e) => format!("NOT released ({e})"),
        },
    );
    Ok(LiveAttack {
        name: "live-flood-from-one-address",
        denied: contained,
        reason,
        expected: "per_address_cap",
    })
}
