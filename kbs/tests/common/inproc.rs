//! A broker in this process on a simulated Milan platform, served on QUIC loopback: what the
//! end-to-end tests of the protocol (releases, leases) stand on.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use guest_agent::client::Broker;
use kbs::keys::FileKek;
use kbs::service::{Kbs, TlsIdentity, serve};
use kbs::store::SqliteStore;
use proto::ResponseKey;
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, Pki, Seed};
use snp::{Product, Revocation, Verifier, VerifierConfig};
use std::sync::Arc;

pub const GOOD: [u8; 48] = [0x4d; 48];

pub fn now() -> u64 {
    1_780_272_000 // 2026-06-01: inside the simulated VCEKs' validity
}

pub fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

/// A broker with an allowlist of GOOD, on a simulated Milan platform: one chip where VMs are
/// placed and another where they are not.
pub struct Setup {
    pub dir: tempfile::TempDir,
    /// The simulated platform's key hierarchy (its ARK and ASK: what a tenant names with
    /// `attesta-verify --trust-chain`).
    pub pki: Arc<Pki>,
    pub chip: Chip,
    pub elsewhere: Chip,
    pub operator: Ed25519KeyPair,
    /// The offline allowlist key (signs newer allowlists).
    pub offline: Ed25519KeyPair,
    pub response_pub: [u8; 32],
    pub kbs: Arc<Kbs>,
}

/// Serves `kbs` on a loopback QUIC endpoint with TLS from a fresh CA; what a guest pins to
/// reach it.
pub fn serve_on_loopback(kbs: &Arc<Kbs>, response_pub: [u8; 32]) -> Broker {
    let tls = TlsIdentity::generate("kbs.attesta.test").unwrap();
    let endpoint =
        quinn::Endpoint::server(tls.server_config().unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(serve(endpoint, kbs.clone(), now));
    Broker {
        addr,
        server_name: "kbs.attesta.test".into(),
        ca_der: tls.ca_der,
        response_key: response_pub,
    }
}

/// A register order for `vm` on `chip`, of the GOOD image, an hour to run.
pub fn order_on(vm: &str, chip: &Chip) -> Order {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm.into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip.config.chip_id.to_vec())],
        not_after: now() + 3600,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
}

/// A guest's connection to `broker` from `client`, for requests written by hand.
pub async fn connect(client: &quinn::Endpoint, broker: &Broker) -> quinn::Connection {
    client
        .connect_with(
            guest_agent::client::client_config(broker).unwrap(),
            broker.addr,
            &broker.server_name,
        )
        .unwrap()
        .await
        .unwrap()
}

pub async fn setup() -> Setup {
    setup_with(|_| {}).await
}

/// [`setup`], with the broker adjusted by `f` before it is shared.
pub async fn setup_with(f: impl FnOnce(&mut Kbs)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::from_seed(Product::Milan, Seed::from_text("e2e")).unwrap());
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let elsewhere = Chip::new(pki.clone(), ChipConfig::typical(&pki, 1)).unwrap();

    // Operator and allowlist keys; the broker's keys and store.
    let (operator, offline) = (
        Ed25519KeyPair::generate().unwrap(),
        Ed25519KeyPair::generate().unwrap(),
    );
    let response_key = ResponseKey::generate().unwrap();
    let response_pub = response_key.public();
    let mut kbs = Kbs::new(
        SqliteStore::open(&dir.path().join("kbs.db")).await.unwrap(),
        Verifier::new(VerifierConfig {
            trust_roots: vec![pki.ark.cert.clone()],
            revocation: Revocation::IfAvailable,
            ..Default::default()
        }),
        response_key,
        Box::new(FileKek::create(&dir.path().join("kek")).unwrap()),
        vec![pk(&operator)],
        30,
    );
    f(&mut kbs);
    let kbs = Arc::new(kbs);
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(GOOD.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), now())
        .await
        .unwrap();
    Setup {
        dir,
        pki,
        chip,
        elsewhere,
        operator,
        offline,
        response_pub,
        kbs,
    }
}
