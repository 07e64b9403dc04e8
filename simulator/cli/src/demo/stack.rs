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

/// A broker in `dir` trusting `root`'s simulated ARK, served on the mesh with its mesh identity.
pub async fn mesh_stack(
    dir: &Path,
    root: &Pki,
    image: [u8; 48],
    mesh: &mut FleetMesh,
) -> Result<Stack, String> {
    let (kbs, operator, allowlist_key) = broker(dir, StackOptions::trusting(root, image)).await?;
    let broker = mesh.serve_broker(kbs.clone()).await?;
    Ok(Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    })
}

/// The broker's state in `dir` (SQLite, KEK file), an operator key and a signed allowlist.
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
    let mut kbs = Kbs::new(
        SqliteStore::open(&dir.join("kbs.db"))
            .await
            .map_err(|x| e(&x))?,
        verifier,
        proto::ResponseKey::generate().map_err(|x| e(&x))?,
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
