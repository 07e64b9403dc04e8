//! The brokers the demo's scenes stand on (in-process, on QUIC loopback, optionally on the
//! mesh) and the operator's orders and seeds.

use super::*;
use kbs::store::Store as _;
use zeroize::Zeroizing;

/// The approved image of the demo's VMs.
pub const IMAGE: [u8; 48] = [0x4d; 48];

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    let mut p = [0u8; 32];
    p.copy_from_slice(k.public_key().as_ref());
    p
}

/// A running broker on loopback, and what guests and the operator need to use it.
pub struct Stack {
    pub kbs: Arc<Kbs>,
    pub broker: Broker,
    pub operator: Ed25519KeyPair,
    /// The offline allowlist key (signs newer allowlists, e.g. one that withdraws an image).
    pub allowlist_key: Ed25519KeyPair,
}

/// Where the fleet's broker keeps its state, and how many replicas serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreChoice {
    /// `None`: SQLite in the demo's folder (the embedded default); else a `postgres://` URL.
    pub url: Option<String>,
    /// Broker processes' worth of replicas (in-process here), all on the one store.
    pub replicas: usize,
}

impl Default for StoreChoice {
    fn default() -> Self {
        StoreChoice {
            url: None,
            replicas: 1,
        }
    }
}

impl StoreChoice {
    /// Checks the combination: several replicas need a database built for it.
    pub fn new(store: &str, replicas: usize) -> Result<StoreChoice, String> {
        let url = match store {
            "sqlite" => None,
            u if kbs::store::is_database_url(u) => Some(u.to_string()),
            other => {
                return Err(format!(
                    "--store must be `sqlite` or a postgres:// URL, not {:?}",
                    kbs::store::redacted(other)
                ));
            }
        };
        if !(1..=proto::brokers::MAX_BROKERS).contains(&replicas) {
            return Err(format!(
                "--replicas must be between 1 and {} (the brokers a guest can list)",
                proto::brokers::MAX_BROKERS
            ));
        }
        if replicas > 1 && url.is_none() {
            return Err("several replicas need PostgreSQL: --store postgres://…".into());
        }
        Ok(StoreChoice { url, replicas })
    }

    /// `sqlite` or `postgres`, as the summary says.
    pub fn kind(&self) -> &'static str {
        if self.url.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }
}

/// The fleet's broker and its other replicas: every replica has the same keys (response key,
/// KEK, operator and allowlist keys) and the same store, as replicas of `attesta-kbs serve`
/// with one kbs.toml have (but in this process, and not polling the store for a newer allowlist:
/// the fleet's does not change).
pub struct Fleet {
    pub stack: Stack,
    /// The replicas after the first.
    pub others: Vec<Replica>,
}

/// One more replica of the fleet's broker.
pub struct Replica {
    pub kbs: Arc<Kbs>,
    /// What guests pin for it (the one response key all replicas share).
    pub broker: Broker,
    /// Closing it stops the replica: no new connection is accepted.
    pub endpoint: quinn::Endpoint,
}

/// How to start a broker for [`stack_with`].
pub struct StackOptions {
    /// The (simulated) ARKs the broker trusts.
    pub trust_roots: Vec<Vec<u8>>,
    pub revocation: Revocation,
    /// CRLs the broker holds; one that does not verify is refused, as `serve` refuses it.
    pub crls: Vec<Vec<u8>>,
    /// The image the offline allowlist approves.
    pub image: [u8; 48],
    /// The broker's clock.
    pub clock: fn() -> u64,
    /// Connections the broker serves at once (`max_sessions` in kbs.toml).
    pub max_sessions: usize,
    /// How many of those one source address may hold (`max_sessions_per_address`); the demo's
    /// fleet boots from one loopback address, so unlimited unless an attack needs it.
    pub max_sessions_per_address: usize,
    /// A `postgres://` URL for the store; `None`: SQLite in the broker's folder.
    pub store: Option<String>,
    /// Signs the audit log's checkpoints (none: the log is chained but never signed).
    pub audit_key: Option<Arc<Ed25519KeyPair>>,
    /// Seconds a lease must run before it is renewed again (`Kbs::lease_min_interval`).
    pub lease_min_interval: u64,
}

impl StackOptions {
    /// Trusting `root`'s simulated ARK, CRLs if available, approving `image`, the system clock.
    pub fn trusting(root: &Pki, image: [u8; 48]) -> StackOptions {
        StackOptions {
            trust_roots: vec![root.ark.cert.clone()],
            revocation: Revocation::IfAvailable,
            crls: Vec::new(),
            image,
            clock: now,
            max_sessions: kbs::service::DEFAULT_MAX_SESSIONS,
            max_sessions_per_address: usize::MAX,
            store: None,
            audit_key: None,
            lease_min_interval: 60,
        }
    }
}

/// Starts a broker in `dir` as `o` says.
pub async fn stack_with(dir: &Path, o: StackOptions) -> Result<Stack, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let clock = o.clock;
    let Made {
        kbs,
        operator,
        allowlist_key,
        ..
    } = broker(dir, &o).await?;
    let tls = TlsIdentity::generate("kbs.attesta.local")?;
    let endpoint = kbs::service::server_endpoint(
        tls.server_config()?,
        (std::net::Ipv4Addr::LOCALHOST, 0).into(),
    )
    .map_err(|x| e(&x))?;
    let addr = endpoint.local_addr().map_err(|x| e(&x))?;
    tokio::spawn(serve(endpoint, kbs.clone(), clock));
    let broker = Broker {
        addr,
        server_name: "kbs.attesta.local".into(),
        ca_der: tls.ca_der.clone(),
        response_key: kbs.response_key.public(),
    };
    Ok(Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    })
}

/// A broker in `dir` trusting `root`'s simulated ARK, served on the mesh with its mesh identity;
/// with `store.replicas` > 1, as many replicas on the one store, each on its own port.
pub async fn mesh_stack(
    dir: &Path,
    root: &Pki,
    image: [u8; 48],
    mesh: &mut FleetMesh,
    store: &StoreChoice,
) -> Result<Fleet, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let o = StackOptions {
        store: store.url.clone(),
        ..StackOptions::trusting(root, image)
    };
    let made = broker(dir, &o).await?;
    let mut others = Vec::new();
    for _ in 1..store.replicas {
        let kbs = Arc::new(kbs_on(dir, &o, &made.response, &made.operator, false).await?);
        // The allowlist the first one installed, from the store.
        kbs.load_allowlist(None, &pk(&made.allowlist_key), (o.clock)())
            .await
            .map_err(|x| e(&x))?
            .ok_or("the replica found no allowlist in the store")?;
        let (broker, endpoint) = mesh.serve_replica(kbs.clone()).await?;
        others.push(Replica {
            kbs,
            broker,
            endpoint,
        });
    }
    let broker = mesh.serve_broker(made.kbs.clone()).await?;
    // A guest pins one response key: every replica must sign with it.
    if others
        .iter()
        .any(|r| r.broker.response_key != broker.response_key)
    {
        return Err("the replicas do not share the broker's response key".into());
    }
    Ok(Fleet {
        stack: Stack {
            kbs: made.kbs,
            broker,
            operator: made.operator,
            allowlist_key: made.allowlist_key,
        },
        others,
    })
}

/// A broker as [`broker`] makes it, with what its replicas need to be made alike.
pub(crate) struct Made {
    pub kbs: Arc<Kbs>,
    pub operator: Ed25519KeyPair,
    pub allowlist_key: Ed25519KeyPair,
    /// The response key (PKCS#8), in memory only: the replicas run in this process.
    pub response: Zeroizing<Vec<u8>>,
}

/// A broker on the store `o` names (SQLite in `dir`, or `o.store`), with `dir`'s KEK (made when
/// `new_kek`), the response key `response` and `operator`'s orders; no allowlist yet.
async fn kbs_on(
    dir: &Path,
    o: &StackOptions,
    response: &[u8],
    operator: &Ed25519KeyPair,
    new_kek: bool,
) -> Result<Kbs, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let verifier = Verifier::new(VerifierConfig {
        trust_roots: o.trust_roots.clone(),
        revocation: o.revocation,
        ..Default::default()
    });
    for crl in &o.crls {
        // A forged CRL is refused here, as `attesta-kbs serve` refuses to start with one.
        let _ = kbs::service::add_crl(&verifier, crl);
    }
    let opts = kbs::store::StoreOptions {
        audit_key: o.audit_key.clone(),
        ..Default::default()
    };
    let store = match &o.store {
        None => SqliteStore::open_with(&dir.join("kbs.db"), opts).await,
        Some(url) => kbs::store::SqlStore::open_url(url, opts).await,
    }
    .map_err(|x| e(&x))?;
    let kek_file = dir.join("kek");
    let kek = if new_kek {
        FileKek::create(&kek_file)
    } else {
        FileKek::load(&kek_file)
    }
    .map_err(|x| e(&x))?;
    let mut kbs = Kbs::new(
        store,
        verifier,
        proto::ResponseKey::from_pkcs8(response).map_err(|x| e(&x))?,
        Box::new(kek),
        vec![pk(operator)],
        30,
    );
    kbs.max_sessions = o.max_sessions.max(1);
    kbs.max_sessions_per_address = o.max_sessions_per_address.max(1);
    kbs.lease_min_interval = o.lease_min_interval;
    Ok(kbs)
}

/// The broker's state in `dir` (SQLite, or the empty database `o.store`; a KEK file), an
/// operator key and a signed allowlist.
pub(crate) async fn broker(dir: &Path, o: &StackOptions) -> Result<Made, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let operator = Ed25519KeyPair::generate().map_err(|x| e(&x))?;
    let offline = Ed25519KeyPair::generate().map_err(|x| e(&x))?;
    let response = Zeroizing::new(
        Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|x| e(&x))?
            .as_ref()
            .to_vec(),
    );
    let kbs = Arc::new(kbs_on(dir, o, &response, &operator, true).await?);
    if let Some(url) = &o.store {
        // The demo registers its own VMs and installs epoch 1: a used database would refuse both.
        let epoch = kbs.store.allowlist_epoch().await.map_err(|x| e(&x))?;
        if epoch > 0 {
            return Err(format!(
                "the database {} is not empty (allowlist epoch {epoch} installed): give the demo an empty one",
                kbs::store::redacted(url)
            ));
        }
    }
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(o.image.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), (o.clock)())
        .await
        .map_err(|x| e(&x))?;
    Ok(Made {
        kbs,
        operator,
        allowlist_key: offline,
        response,
    })
}

/// The operator's register order for VM number `i` of the demo image on `chip_id`.
pub fn order(vm_id: &str, i: usize, chip_id: &[u8; 64], image: &[u8; 48]) -> Order {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm_id.into(),
        tenant: format!("tenant-{}", i % 3),
        measurements: vec![ByteBuf::from(image.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip_id.to_vec())],
        not_after: now() + 3600,
        boot_config: ByteBuf::from(format!("ssh-ed25519 AAAA tenant-{}", i % 3).into_bytes()),
        billing: None,
        mesh_ip: None,
        split: None,
    }
}

/// The tenant of demo VM number `i` among `vms`: two tenants for small fleets, three from six
/// VMs on, so every tenant has guests that should reach each other and others that must not.
pub fn tenant_of(i: usize, vms: usize) -> String {
    format!("tenant-{}", i % if vms < 6 { 2 } else { 3 })
}

/// The seeds the demo's hierarchies come from (the attack catalogue's, so they are shared).
pub fn seeds(seed: &Seed) -> [(Product, Seed); 4] {
    [
        (Product::Milan, *seed),
        (Product::Genoa, *seed),
        (Product::Turin, *seed),
        (Product::Milan, seed.derive(b"rogue")),
    ]
}
