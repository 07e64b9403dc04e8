//! The brokers the demo's scenes stand on (in-process, on QUIC loopback, optionally on the
//! mesh) and the operator's orders and seeds.

use super::*;

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
/// KEK, operator and allowlist keys) and the same store, as `attesta-kbs serve` replicas do.
pub struct Fleet {
    pub stack: Stack,
    /// The replicas after the first, each with the endpoint that stops it when closed.
    pub others: Vec<(Broker, quinn::Endpoint)>,
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
        }
    }
}

/// Starts a broker in `dir` as `o` says.
pub async fn stack_with(dir: &Path, o: StackOptions) -> Result<Stack, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let clock = o.clock;
    let (kbs, operator, allowlist_key) = broker(dir, o).await?;
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
    let o = StackOptions {
        store: store.url.clone(),
        ..StackOptions::trusting(root, image)
    };
    let (kbs, operator, allowlist_key) = broker(dir, o).await?;
    let mut others = Vec::new();
    for _ in 1..store.replicas {
        let replica = replica_of(dir, &kbs, root, store, &operator, &allowlist_key).await?;
        others.push(mesh.serve_replica(replica).await?);
    }
    let broker = mesh.serve_broker(kbs.clone()).await?;
    Ok(Fleet {
        stack: Stack {
            kbs,
            broker,
            operator,
            allowlist_key,
        },
        others,
    })
}

/// Another replica of `first` (its store, keys and allowlist), as `attesta-kbs serve` started
/// with the same kbs.toml on another machine would be.
async fn replica_of(
    dir: &Path,
    first: &Kbs,
    root: &Pki,
    store: &StoreChoice,
    operator: &Ed25519KeyPair,
    allowlist_key: &Ed25519KeyPair,
) -> Result<Arc<Kbs>, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let url = store.url.as_deref().ok_or("replicas need a database URL")?;
    let response = std::fs::read(dir.join("response.pk8")).map_err(|x| e(&x))?;
    let mut kbs = Kbs::new(
        kbs::store::SqlStore::open_url(url, Default::default())
            .await
            .map_err(|x| e(&x))?,
        Verifier::new(VerifierConfig {
            trust_roots: vec![root.ark.cert.clone()],
            revocation: Revocation::IfAvailable,
            ..Default::default()
        }),
        proto::ResponseKey::from_pkcs8(&response).map_err(|x| e(&x))?,
        Box::new(FileKek::load(&dir.join("kek")).map_err(|x| e(&x))?),
        vec![pk(operator)],
        30,
    );
    kbs.max_sessions = first.max_sessions;
    kbs.max_sessions_per_address = first.max_sessions_per_address;
    let kbs = Arc::new(kbs);
    // The allowlist the first one installed, from the store.
    kbs.load_allowlist(None, &pk(allowlist_key), now())
        .await
        .map_err(|x| e(&x))?
        .ok_or("the replica found no allowlist in the store")?;
    Ok(kbs)
}

/// The broker's state in `dir` (SQLite or `o.store`, KEK file, response key), an operator key
/// and a signed allowlist.
pub(crate) async fn broker(
    dir: &Path,
    o: StackOptions,
) -> Result<(Arc<Kbs>, Ed25519KeyPair, Ed25519KeyPair), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let operator = Ed25519KeyPair::generate().map_err(|x| e(&x))?;
    let offline = Ed25519KeyPair::generate().map_err(|x| e(&x))?;
    let verifier = Verifier::new(VerifierConfig {
        trust_roots: o.trust_roots,
        revocation: o.revocation,
        ..Default::default()
    });
    for crl in &o.crls {
        // A forged CRL is refused here, as `attesta-kbs serve` refuses to start with one.
        let _ = kbs::service::add_crl(&verifier, crl);
    }
    let store = match &o.store {
        None => SqliteStore::open(&dir.join("kbs.db")).await,
        Some(url) => kbs::store::SqlStore::open_url(url, Default::default()).await,
    }
    .map_err(|x| e(&x))?;
    // Kept (mode 0600) for the replicas, as the broker's key file is.
    let response =
        Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).map_err(|x| e(&x))?;
    write_private(&dir.join("response.pk8"), response.as_ref())?;
    let mut kbs = Kbs::new(
        store,
        verifier,
        proto::ResponseKey::from_pkcs8(response.as_ref()).map_err(|x| e(&x))?,
        Box::new(FileKek::create(&dir.join("kek")).map_err(|x| e(&x))?),
        vec![pk(&operator)],
        30,
    );
    kbs.max_sessions = o.max_sessions.max(1);
    kbs.max_sessions_per_address = o.max_sessions_per_address.max(1);
    let kbs = Arc::new(kbs);
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(o.image.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), (o.clock)())
        .await
        .map_err(|x| e(&x))?;
    Ok((kbs, operator, offline))
}

/// Writes `bytes` to a new file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|x| format!("{}: {x}", path.display()))?;
    f.write_all(bytes)
        .map_err(|x| format!("{}: {x}", path.display()))
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
