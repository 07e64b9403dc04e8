//! `attesta-kbs init`, `serve`, `vm register` and `allowlist install`: the broker as a service.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use clap::{Args, Subcommand};
use kbs::config::MeshSection;
use kbs::config::{Config, KekConfig, LogFormat};
use kbs::keys::{FileKek, Kek, Pkcs11Kek};
use kbs::service::{
    AllowlistChange, Kbs, MeshGate, TlsIdentity, mesh_server_config, serve_with, server_config,
};
use kbs::store::{SqliteStore, Store, StoreOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Args)]
pub struct InitArgs {
    /// Directory to write the configuration and keys into (created; must not hold a kbs.toml).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// DNS name in the broker's TLS certificate (guests connect with it).
    #[arg(long, default_value = "kbs.attesta.local")]
    pub server_name: String,
    /// Local TCP address for /metrics, /readyz and /healthz ("none" for no endpoint).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    /// Trust a non-AMD root (the simulator's ark.pem) — test deployments only.
    #[arg(long, value_name = "FILE")]
    pub trust_root: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Where an order goes: straight into this machine's store (`--config`), or to a running
/// broker over QUIC with a host or operator client certificate (`--kbs`).
#[derive(Args)]
pub struct Target {
    /// The broker's configuration (writes to its database directly; works while it serves).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "kbs",
        required_unless_present = "kbs"
    )]
    pub config: Option<PathBuf>,
    /// A running broker's UDP address.
    #[arg(long, value_name = "ADDR", requires_all = ["ca", "cert", "key"])]
    pub kbs: Option<String>,
    /// The broker's TLS CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Our client certificate (PEM, role host or operator) and its key.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The name in the broker's certificate.
    #[arg(long, default_value = "kbs.attesta.local")]
    pub server_name: String,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Register a VM from an operator-signed order (generates and wraps its volume key).
    Register {
        /// The signed order document (`attesta-kbs order register` writes one).
        order: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Crypto-shred a VM's key with an operator-signed terminate order.
    Terminate {
        /// The signed terminate order (`attesta-kbs order terminate`).
        order: PathBuf,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum AllowlistCmd {
    /// Install a newer signed allowlist (an older epoch is refused).
    Install {
        allowlist: PathBuf,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Sign an allowlist with the offline allowlist key.
    Sign(crate::ops_cmd::AllowlistSign),
}

#[derive(Subcommand)]
pub enum KekCmd {
    /// Re-wrap every live volume key under a new KEK file (the volume keys stay the same),
    /// point the configuration at it, and destroy the old KEK file. Stop the broker first (a
    /// broker left running cannot release or register until restarted with the new KEK).
    Rotate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The new KEK file: created (32 random bytes, mode 0600) unless it exists.
        #[arg(long, value_name = "FILE")]
        new_kek: PathBuf,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    write_file(path, bytes, secret, false)
}

/// Writes a file, mode 0600 for secrets from creation on; `overwrite` false refuses an existing
/// file (keys are never replaced by accident).
pub fn write_file(path: &Path, bytes: &[u8], secret: bool, overwrite: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(if secret { 0o600 } else { 0o644 });
    if overwrite {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn new_ed25519(dir: &Path, name: &str) -> Result<String, String> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "key generation failed".to_string())?;
    let kp = Ed25519KeyPair::from_pkcs8(doc.as_ref())
        .map_err(|_| "key generation failed".to_string())?;
    write(&dir.join(format!("{name}.key")), doc.as_ref(), true)?;
    let public = hex::encode(kp.public_key().as_ref());
    write(
        &dir.join(format!("{name}.pub")),
        format!("{public}\n").as_bytes(),
        false,
    )?;
    Ok(public)
}

pub fn init(a: &InitArgs) -> ExitCode {
    match do_init(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attesta-kbs init: {e}");
            ExitCode::from(2)
        }
    }
}

fn do_init(a: &InitArgs) -> Result<(), String> {
    let d = &a.dir;
    std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    if d.join("kbs.toml").exists() {
        return Err(format!(
            "{} already holds a kbs.toml; refusing to overwrite keys",
            d.display()
        ));
    }
    // TLS: a CA the guests pin, and the broker's certificate.
    let tls = TlsIdentity::generate(&a.server_name)?;
    write(&d.join("tls-ca.crt"), tls.ca_pem.as_bytes(), false)?;
    write(&d.join("tls.crt"), tls.cert_pem.as_bytes(), false)?;
    write(&d.join("tls.key"), tls.key_pem.as_bytes(), true)?;
    write(&d.join("tls-ca.key"), tls.ca_key_pem.as_bytes(), true)?;
    new_ed25519(d, "response")?;
    new_ed25519(d, "audit")?;
    let operator = new_ed25519(d, "operator")?;
    let allowlist = new_ed25519(d, "allowlist")?;
    FileKek::create(&d.join("kek")).map_err(|e| e.to_string())?;
    let roots: Vec<String> = a
        .trust_root
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let toml = format!(
        "# Attesta key broker configuration (written by attesta-kbs init).\n\
         # Paths are relative to this file.\n\
         listen = {listen:?}\n\
         database = \"kbs.db\"\n\
         tls_cert = \"tls.crt\"\n\
         tls_key = \"tls.key\"\n\
         # Guests pin response.pub; keep response.key (mode 0600) on this machine only.\n\
         response_key = \"response.key\"\n\
         # The key-encryption key for volume keys. For an HSM use instead:\n\
         # kek = {{ pkcs11 = {{ module = \"/usr/lib/softhsm/libsofthsm2.so\", token = \"attesta\", pin_file = \"pin\", key_label = \"kbs-kek\" }} }}\n\
         kek = {{ file = \"kek\" }}\n\
         # Order-signing keys of the operators. operator.key and allowlist.key were generated here for\n\
         # convenience: in production, generate them offline and keep only the .pub files here.\n\
         operator_keys = [{operator:?}]\n\
         allowlist_key = {allowlist:?}\n\
         # Non-AMD roots (the simulator's) — never in production.\n\
         trust_roots = [{roots}]\n\
         # \"require\": no release without a current AMD CRL; \"if_available\" for offline tests.\n\
         revocation = {revocation:?}\n\
         # AMD CRLs (DER or PEM), verified at start and re-read every crl_reload_secs; refresh\n\
         # them daily, e.g. curl -o milan.crl https://kdsintf.amd.com/vcek/v1/Milan/crl\n\
         # crls = [\"milan.crl\", \"genoa.crl\", \"turin.crl\"]\n\
         # Or let the broker fetch CRLs, and the VCEKs hosts do not supply, from AMD's key server\n\
         # (cached; see README): a [collateral] table at the end of this file, e.g.\n\
         # [collateral]\n\
         # cache_dir = \"kds-cache\"\n\
         crl_reload_secs = 600\n\
         nonce_ttl_secs = 30\n\
         # Connections served at once; a boot storm waits at the door beyond it.\n\
         max_sessions = 64\n\
         # Of those, how many one source address (IPv6: one /64) may hold; beyond, refused at\n\
         # once (guests retry). A NAT with hundreds of VMs boots this many at a time.\n\
         max_sessions_per_address = 16\n\
         # Signs audit checkpoints; `attesta-kbs audit verify --key audit.pub` checks them.\n\
         audit_key = \"audit.key\"\n\
         checkpoint_every = 1000\n\
         checkpoint_interval_secs = 10\n\
         # Hosts and operators send orders with client certificates from this CA\n\
         # (`attesta-kbs cert issue`; tls-ca.key issues them: keep it offline in production).\n\
         client_ca = \"tls-ca.crt\"\n\
         # /metrics (Prometheus), /readyz, /healthz. Keep it local.\n\
         {metrics}\n\
         log_format = \"text\"\n",
        listen = a.listen,
        metrics = if a.metrics_listen == "none" {
            "# metrics_listen = \"127.0.0.1:9464\"".to_string()
        } else {
            format!("metrics_listen = {:?}", a.metrics_listen)
        },
        roots = roots.join(", "),
        revocation = if a.trust_root.is_empty() {
            "require"
        } else {
            "if_available"
        },
    );
    // The policy floor, last (dotted keys: whatever is appended to the file stays top-level).
    let toml = format!("{toml}{}", snp::Floor::default_toml());
    write(&d.join("kbs.toml"), toml.as_bytes(), false)?;
    println!(
        "wrote {}/kbs.toml with new keys (response.pub: guests pin it; tls-ca.crt: guests trust it)",
        d.display()
    );
    Ok(())
}

fn read_pem_identity(
    c: &Config,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&c.tls_cert)
        .map_err(|e| format!("{}: {e}", c.tls_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", c.tls_cert.display()))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&c.tls_key)
        .map_err(|e| format!("{}: {e}", c.tls_key.display()))?;
    Ok((chain, key))
}

fn mesh_roots(m: &MeshSection) -> Result<Vec<mesh::cert::MeshCert>, String> {
    let bytes = std::fs::read(&m.ca).map_err(|e| format!("mesh ca {}: {e}", m.ca.display()))?;
    mesh::cert::parse_bundle(&bytes).map_err(|e| format!("mesh ca {}: {e}", m.ca.display()))
}

fn mesh_rules(m: &MeshSection) -> Result<mesh::firewall::Firewall, String> {
    let text = std::fs::read_to_string(&m.rules)
        .map_err(|e| format!("mesh rules {}: {e}", m.rules.display()))?;
    mesh::firewall::Firewall::load(&text)
        .map_err(|e| format!("mesh rules {}: {e}", m.rules.display()))
}

/// The broker's own certificate must be a mesh certificate with role kbs under `roots`.
fn check_own_mesh_cert(
    c: &Config,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    roots: &[mesh::cert::MeshCert],
) -> Result<(), String> {
    let own = chain
        .iter()
        .map(|d| mesh::cert::MeshCert::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "tls_cert {}: not a mesh certificate: {e}",
                c.tls_cert.display()
            )
        })?;
    let leaf = mesh::cert::verify(&own, roots, now())
        .map_err(|e| format!("tls_cert {}: {e}", c.tls_cert.display()))?;
    if leaf.claims.role != Some(mesh::cert::Role::Kbs) {
        return Err(format!(
            "tls_cert {}: on the mesh the broker's certificate needs role kbs, not {:?}",
            c.tls_cert.display(),
            leaf.claims.role
        ));
    }
    Ok(())
}

/// On the mesh: the gate and the server configuration.
fn build_mesh(c: &Config, m: &MeshSection) -> Result<(quinn::ServerConfig, Arc<MeshGate>), String> {
    if c.client_ca.is_some() {
        return Err(
            "client_ca and [mesh] are alternatives: on the mesh, hosts and operators present mesh certificates"
                .into(),
        );
    }
    let roots = mesh_roots(m)?;
    let (chain, key) = read_pem_identity(c)?;
    check_own_mesh_cert(c, &chain, &roots)?;
    let trust = mesh::transport::Trust::new(roots);
    if let Some(a) = &m.revocation_max_age {
        trust.set_max_age(Some(
            mesh::parse_duration(a).map_err(|e| format!("revocation_max_age: {e}"))?,
        ));
    }
    if let Some(r) = &m.revocation
        && r.exists()
    {
        let bytes = std::fs::read(r).map_err(|e| format!("{}: {e}", r.display()))?;
        trust
            .install(&bytes, now())
            .map_err(|e| format!("{}: {e}", r.display()))?;
    }
    let gate = Arc::new(MeshGate::new(trust.clone(), mesh_rules(m)?));
    Ok((mesh_server_config(chain, key, trust)?, gate))
}

/// Re-reads the mesh files when they change: the broker's certificate and key (rotation),
/// the CA bundle, the rules and the revocation list. A file that does not load is logged and
/// the current one stays.
async fn reload_mesh(c: Config, m: MeshSection, gate: Arc<MeshGate>, endpoint: quinn::Endpoint) {
    let identity = [c.tls_cert.as_path(), c.tls_key.as_path(), m.ca.as_path()];
    let mut stamps = mesh::watch::FileStamps::new(
        identity
            .iter()
            .copied()
            .chain([m.rules.as_path()])
            .chain(m.revocation.as_deref()),
    );
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(m.reload_secs.max(1))).await;
        if stamps.changed(&identity) {
            let r = mesh_roots(&m).and_then(|roots| {
                let (chain, key) = read_pem_identity(&c)?;
                check_own_mesh_cert(&c, &chain, &roots)?;
                // The configuration shares the trust, so the roots are swapped only once
                // everything else has loaded.
                let cfg = mesh_server_config(chain, key, gate.trust.clone())?;
                gate.trust.set_roots(roots);
                Ok(cfg)
            });
            match r {
                Ok(cfg) => {
                    endpoint.set_server_config(Some(cfg));
                    tracing::info!("mesh certificate and CA bundle reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "mesh reload refused; keeping the current identity")
                }
            }
        }
        if stamps.changed(&[m.rules.as_path()]) {
            match mesh_rules(&m) {
                Ok(fw) => {
                    tracing::info!(rules = fw.rules(), "mesh rules reloaded");
                    gate.set_rules(fw);
                }
                Err(e) => {
                    tracing::error!(error = %e, "mesh rules refused; keeping the current rules")
                }
            }
        }
        if let Some(r) = &m.revocation
            && stamps.changed(&[r.as_path()])
            && let Ok(bytes) = std::fs::read(r)
        {
            match gate.trust.install(&bytes, now()) {
                Ok(true) => {
                    tracing::info!(lists = ?gate.trust.list_summary(), "mesh revocation list installed")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "mesh revocation list refused"),
            }
        }
    }
}

fn build(c: &Config) -> Result<(Kbs, quinn::ServerConfig, Option<Arc<MeshGate>>), String> {
    use rustls::pki_types::pem::PemObject;
    let (chain, key) = read_pem_identity(c)?;
    let client_ca = match &c.client_ca {
        Some(p) => Some(
            rustls::pki_types::CertificateDer::from_pem_file(p)
                .map_err(|e| format!("client_ca {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let (tls, gate) = match &c.mesh {
        Some(m) => {
            let (tls, gate) = build_mesh(c, m)?;
            (tls, Some(gate))
        }
        None => (server_config(chain, key, client_ca)?, None),
    };
    let rk =
        std::fs::read(&c.response_key).map_err(|e| format!("{}: {e}", c.response_key.display()))?;
    let response_key = proto::ResponseKey::from_pkcs8(&rk)
        .map_err(|e| format!("{}: {e}", c.response_key.display()))?;
    let kek: Box<dyn Kek> = match &c.kek {
        KekConfig::File(p) => Box::new(FileKek::load(p).map_err(|e| e.to_string())?),
        KekConfig::Pkcs11 {
            module,
            token,
            pin_file,
            key_label,
        } => {
            let pin = std::fs::read_to_string(pin_file)
                .map_err(|e| format!("{}: {e}", pin_file.display()))?;
            Box::new(
                Pkcs11Kek::open(module, token, pin.trim(), key_label, false)
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    let mut trust_roots = Vec::new();
    for p in &c.trust_roots {
        trust_roots.push(std::fs::read(p).map_err(|e| format!("trust root {}: {e}", p.display()))?);
    }
    let verifier = snp::Verifier::new(snp::VerifierConfig {
        trust_roots,
        revocation: c.revocation,
        ..Default::default()
    });
    // A configured CRL that cannot be read or does not verify stops the start: it is either a
    // mistake or tampering, and either way revocation would be checked against less than meant.
    for p in &c.crls {
        let bytes = std::fs::read(p).map_err(|e| format!("crl {}: {e}", p.display()))?;
        let product = kbs::service::add_crl(&verifier, &bytes)
            .map_err(|e| format!("crl {}: {e}", p.display()))?;
        tracing::info!(path = %p.display(), product = %product, "CRL loaded");
    }
    let crls_fetched = c
        .collateral
        .as_ref()
        .is_some_and(|k| k.fetch_crls && k.kds().is_some());
    if c.crls.is_empty() && c.revocation == snp::Revocation::Require && !crls_fetched {
        tracing::warn!(
            "revocation = \"require\" but no `crls` configured: every release will be denied (crl_unavailable)"
        );
    }
    let audit_key = match &c.audit_key {
        Some(p) => {
            let der = std::fs::read(p).map_err(|e| format!("audit_key {}: {e}", p.display()))?;
            Some(Arc::new(Ed25519KeyPair::from_pkcs8(&der).map_err(
                |_| format!("audit_key {}: not an Ed25519 PKCS#8 key", p.display()),
            )?))
        }
        None => None,
    };
    let opts = StoreOptions {
        audit_key,
        checkpoint_every: c.checkpoint_every.max(1),
        checkpoint_interval: std::time::Duration::from_secs(c.checkpoint_interval_secs.max(1)),
        ..Default::default()
    };
    let rt = tokio::runtime::Handle::current();
    let store = rt
        .block_on(SqliteStore::open_with(&c.database, opts))
        .map_err(|e| format!("database {}: {e}", c.database.display()))?;
    let mut kbs = Kbs::new(
        store,
        verifier,
        response_key,
        kek,
        c.operator_keys()?,
        c.nonce_ttl_secs,
    );
    if c.max_sessions == 0 {
        return Err("max_sessions must be at least 1".into());
    }
    kbs.max_sessions = c.max_sessions;
    kbs.max_sessions_per_address = match c.max_sessions_per_address {
        Some(0) => return Err("max_sessions_per_address must be at least 1".into()),
        Some(n) => n,
        None => kbs::limits::default_per_address(c.max_sessions),
    };
    kbs.set_floor(c.floor.clone());
    if let Some(col) = &c.collateral {
        let _ = kbs
            .collateral
            .set(kbs::collateral::Collateral::new(col).map_err(|e| format!("collateral: {e}"))?);
        tracing::info!(offline_dir = ?col.offline_dir, kds_url = col.kds(), "collateral sources configured");
    }
    rt.block_on(kbs.bind_kek())
        .map_err(|e| format!("kek: {e}"))?;
    Ok((kbs, tls, gate))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| e.to_string())
}

fn fail(cmd: &str, e: String) -> ExitCode {
    eprintln!("attesta-kbs {cmd}: {e}");
    ExitCode::from(2)
}

fn init_logs(c: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATTESTA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match c.log_format {
        LogFormat::Json => logs.json().try_init(),
        LogFormat::Text => logs.try_init(),
    };
}

pub fn serve_cmd(a: &ServeArgs) -> ExitCode {
    let r = (|| -> Result<(), String> {
        let c = Config::load(&a.config)?;
        init_logs(&c);
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, tls, gate) = build(&c)?;
        if let Some((mesh, dir)) = c
            .mesh
            .as_ref()
            .and_then(|m| m.guest_ca.as_ref().map(|d| (m, d)))
        {
            let certs = std::fs::read(dir.join("ca.crt"))
                .map_err(|e| format!("guest_ca {}: {e}", dir.display()))
                .and_then(|b| {
                    mesh::cert::parse_bundle(&b)
                        .map_err(|e| format!("guest_ca {}: {e}", dir.display()))
                })?;
            let mut certs = certs.into_iter();
            let ca = certs.next().ok_or("guest_ca: no certificate")?;
            let above: Vec<_> = certs.collect();
            // The chain handed to guests must verify to the mesh's roots (`[mesh] ca`, what
            // the guests' nodes trust): refuse a broken or foreign one at start.
            let roots = std::fs::read(&mesh.ca)
                .map_err(|e| format!("[mesh] ca {}: {e}", mesh.ca.display()))
                .and_then(|b| {
                    mesh::cert::parse_bundle(&b)
                        .map_err(|e| format!("[mesh] ca {}: {e}", mesh.ca.display()))
                })?;
            let mut links = vec![ca.clone()];
            links.extend(above.iter().cloned());
            mesh::cert::verify_ca(&links, &roots, now()).map_err(|e| {
                format!(
                    "guest_ca {}: ca.crt (the CA, then every certificate above it) does not verify to the mesh CA {}: {e}",
                    dir.display(),
                    mesh.ca.display()
                )
            })?;
            let key = zeroize::Zeroizing::new(
                std::fs::read_to_string(dir.join("ca.key"))
                    .map_err(|e| format!("guest_ca {}: {e}", dir.display()))?,
            );
            // Refuse a key that is not the CA's now, not at the first boot.
            mesh::cert::sign_with(&ca, &key, b"attesta guest_ca check")
                .map_err(|e| format!("guest_ca {}: {e}", dir.display()))?;
            tracing::info!(ca = %ca.name, "issuing attested guests their mesh certificates");
            let ttl = c
                .mesh
                .as_ref()
                .map_or(86_400, |m| m.guest_cert_secs.max(60));
            let _ = kbs
                .guest_issuer
                .set(kbs::service::GuestIssuer::new(ca, above, key, ttl));
        }
        match load_allowlist(&rt, &kbs, &c)? {
            Some(epoch) => tracing::info!(epoch, "allowlist loaded"),
            None => tracing::warn!(
                "no allowlist installed or configured: registrations are refused and every release is denied (no_allowlist)"
            ),
        }
        let allowlist_key = c.allowlist_key()?;
        let addr: std::net::SocketAddr = c
            .listen
            .parse()
            .map_err(|e| format!("listen {:?}: {e}", c.listen))?;
        let endpoint = kbs::service::server_endpoint(tls, addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let kbs = Arc::new(kbs);
        if let Some(m) = &c.metrics_listen {
            let l = rt
                .block_on(tokio::net::TcpListener::bind(m))
                .map_err(|e| format!("metrics_listen {m:?}: {e}"))?;
            tracing::info!(address = %m, "metrics on /metrics, readiness on /readyz");
            rt.spawn(kbs::metrics::serve_http(l, kbs.clone()));
        }
        tracing::info!(
            address = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            response_key = %hex::encode(kbs.response_key.public()),
            "serving (QUIC, ALPN attesta-kbs/1)"
        );
        rt.spawn(follow_allowlist(kbs.clone(), allowlist_key, ALLOWLIST_POLL));
        rt.spawn(kbs::floor::follow(kbs.clone(), a.config.clone()));
        if !c.crls.is_empty() {
            rt.spawn(reload_crls(
                kbs.clone(),
                c.crls.clone(),
                std::time::Duration::from_secs(c.crl_reload_secs.max(1)),
            ));
        }
        if let (Some(g), Some(m)) = (&gate, &c.mesh) {
            tracing::info!(
                "on the mesh: clients verified by the mesh CA, hosts and operators by role, guests for attestation only"
            );
            rt.spawn(reload_mesh(
                c.clone(),
                m.clone(),
                g.clone(),
                endpoint.clone(),
            ));
        }
        let k = kbs.clone();
        rt.block_on(async move {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = serve_with(endpoint, k.clone(), now, gate) => {}
                _ = tokio::signal::ctrl_c() => {}
                () = term => {}
            }
            tracing::info!("stopping: signing a final audit checkpoint");
            let _ = k.store.checkpoint().await;
        });
        Ok(())
    })();
    r.map(|()| ExitCode::SUCCESS)
        .unwrap_or_else(|e| fail("serve", e))
}

pub fn vm_cmd(c: &VmCmd) -> ExitCode {
    let (order, target, terminate, verb) = match c {
        VmCmd::Register { order, target } => (order, target, false, "register"),
        VmCmd::Terminate { order, target } => (order, target, true, "terminate"),
    };
    let r = (|| -> Result<String, String> {
        let doc = std::fs::read(order).map_err(|e| format!("{}: {e}", order.display()))?;
        let rt = runtime()?;
        let _g = rt.enter();
        if let Some(addr) = &target.kbs {
            return rt
                .block_on(kbs::client::send_order(
                    remote(target, addr)?,
                    terminate,
                    doc,
                ))
                .map_err(|e| e.to_string());
        }
        let config = target
            .config
            .as_ref()
            .ok_or("--config or --kbs is required")?;
        let c = Config::load(config)?;
        let (kbs, ..) = build(&c)?;
        if terminate {
            return rt
                .block_on(kbs.terminate(&doc, now()))
                .map_err(|e| e.to_string());
        }
        if load_allowlist(&rt, &kbs, &c)?.is_none() {
            return Err(
                "no allowlist: install one (`attesta-kbs allowlist install`) or set `allowlist`"
                    .into(),
            );
        }
        rt.block_on(kbs.register(&doc, now()))
            .map_err(|e| e.to_string())
    })();
    match r {
        Ok(vm) => {
            println!("{verb}ed {vm}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs vm {verb}: {e}");
            ExitCode::from(1)
        }
    }
}

fn remote(t: &Target, addr: &str) -> Result<kbs::client::Remote, String> {
    let need = |p: &Option<PathBuf>, what: &str| {
        p.clone()
            .ok_or_else(|| format!("--{what} is required with --kbs"))
    };
    kbs::client::Remote::from_pem_files(
        addr.parse().map_err(|e| format!("--kbs {addr:?}: {e}"))?,
        t.server_name.clone(),
        &need(&t.ca, "ca")?,
        &need(&t.cert, "cert")?,
        &need(&t.key, "key")?,
    )
}

/// Re-reads the configured CRLs every `every`: a refreshed file is verified and added; a file
/// that fails is logged and the CRLs already held stay (revocations are permanent).
async fn reload_crls(kbs: Arc<Kbs>, paths: Vec<std::path::PathBuf>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        for p in &paths {
            let r = std::fs::read(p)
                .map_err(|e| e.to_string())
                .and_then(|b| kbs::service::add_crl(&kbs.verifier, &b).map_err(|e| e.to_string()));
            if let Err(e) = r {
                tracing::error!(path = %p.display(), error = %e, "CRL reload failed; keeping the CRLs held");
            }
        }
    }
}

/// How often a serving broker looks at the stored allowlist epoch (one small read).
const ALLOWLIST_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Follows `attesta-kbs allowlist install` run by another process on this database: a newer
/// stored epoch is verified and put in force without a restart, so a withdrawn image stops
/// releasing within about `every`.
async fn follow_allowlist(kbs: Arc<Kbs>, key: [u8; 32], every: std::time::Duration) {
    let mut seen = kbs.allowlist_epoch().await.unwrap_or(0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match kbs.follow_allowlist(&key, &mut seen).await {
            Ok(AllowlistChange::Unchanged) => {}
            Ok(AllowlistChange::Adopted { from, to }) => {
                tracing::info!(
                    from = from.unwrap_or(0),
                    to,
                    "allowlist epoch changed: now in force"
                )
            }
            Ok(AllowlistChange::Refused { epoch, error }) => tracing::error!(
                epoch,
                error = %error,
                "the installed allowlist does not verify with allowlist_key: every release is denied until one does (restart if allowlist_key changed)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot read the allowlist epoch"),
        }
    }
}

/// The allowlist in force at start: the installed one or the configured file, whichever is
/// newer (see [`Kbs::load_allowlist`]); `None` when there is neither.
fn load_allowlist(
    rt: &tokio::runtime::Runtime,
    kbs: &Kbs,
    c: &Config,
) -> Result<Option<u64>, String> {
    let configured = match &c.allowlist {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let what = c
        .allowlist
        .as_ref()
        .map_or("the installed one".to_string(), |p| p.display().to_string());
    rt.block_on(kbs.load_allowlist(configured.as_deref(), &c.allowlist_key()?, now()))
        .map_err(|e| format!("allowlist {what}: {e}"))
}

pub fn audit_export(config: &Path, out: Option<PathBuf>) -> ExitCode {
    let r = (|| -> Result<String, String> {
        let c = Config::load(config)?;
        if c.audit_key.is_none() {
            return Err("no audit_key configured: the log cannot be checkpointed".into());
        }
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        rt.block_on(async {
            kbs.store.checkpoint().await.map_err(|e| e.to_string())?;
            kbs.store.audit_log().await.map_err(|e| e.to_string())
        })
    })();
    match r {
        Ok(log) => {
            let w = match &out {
                Some(p) => std::fs::write(p, &log).map_err(|e| format!("{}: {e}", p.display())),
                None => {
                    print!("{log}");
                    Ok(())
                }
            };
            match w {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("audit export", e),
            }
        }
        Err(e) => fail("audit export", e),
    }
}

pub fn allowlist_cmd(c: &AllowlistCmd) -> ExitCode {
    let AllowlistCmd::Install { allowlist, config } = c else {
        return ExitCode::from(2);
    };
    let r = (|| -> Result<u64, String> {
        let c = Config::load(config)?;
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        let doc = std::fs::read(allowlist).map_err(|e| format!("{}: {e}", allowlist.display()))?;
        rt.block_on(kbs.set_allowlist(&doc, &c.allowlist_key()?, now()))
            .map_err(|e| e.to_string())
    })();
    match r {
        Ok(e) => {
            println!(
                "allowlist epoch {e} installed (a broker serving this database puts it in force within a second)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs allowlist install: {e}");
            ExitCode::from(1)
        }
    }
}

/// `text` (a kbs.toml) with its top-level `kek = ...` line replaced by one naming `path`;
/// refused unless there is exactly one such line and the result reads back with that KEK.
fn config_with_kek(text: &str, path: &Path, config: &Path) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut replaced = 0;
    let mut top = true;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        top &= !t.starts_with('[');
        let key = t.split('=').next().unwrap_or("").trim();
        if top && key == "kek" {
            out.push_str(&format!(
                "kek = {{ file = {:?} }}\n",
                path.display().to_string()
            ));
            replaced += 1;
        } else {
            out.push_str(line);
        }
    }
    let c: Config = toml::from_str(&out).map_err(|e| e.to_string())?;
    if replaced != 1 || c.kek != KekConfig::File(path.to_path_buf()) {
        return Err(format!(
            "{}: expected one line `kek = ...` before any [section] to rewrite; edit it by hand first",
            config.display()
        ));
    }
    Ok(out)
}

/// Overwrites a retired KEK file with zeros and removes it. (On flash or a copy-on-write
/// file system the old blocks may survive: destroy its backups and media too.)
fn destroy_file(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let len = std::fs::metadata(path).map_err(err)?.len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(32)])
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::remove_file(path).map_err(err)
}

pub fn kek_cmd(c: &KekCmd) -> ExitCode {
    let KekCmd::Rotate { config, new_kek } = c;
    let r = (|| -> Result<String, String> {
        let text = std::fs::read_to_string(config)
            .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
        let c = Config::load(config)?;
        // The new KEK as kbs.toml will name it: relative to its folder if inside it.
        let dir = match config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let absolute = std::path::absolute(new_kek).map_err(|e| e.to_string())?;
        let named =
            match absolute.strip_prefix(std::path::absolute(dir).map_err(|e| e.to_string())?) {
                Ok(rel) => rel.to_path_buf(),
                Err(_) => absolute.clone(),
            };
        let edited = config_with_kek(&text, &named, config)?;
        if let KekConfig::File(old) = &c.kek
            && std::path::absolute(old).ok() == Some(absolute.clone())
        {
            return Err("--new-kek is the current KEK file".into());
        }
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        let new = if absolute.exists() {
            FileKek::load(&absolute)
        } else {
            FileKek::create(&absolute)
        }
        .map_err(|e| e.to_string())?;
        let n = rt
            .block_on(kbs.rotate_kek(&new, now()))
            .map_err(|e| e.to_string())?;
        // Read back: every live key opens under the new KEK before the old one is destroyed.
        for (vm_id, generation, wrapped) in rt
            .block_on(kbs.store.live_keys())
            .map_err(|e| e.to_string())?
        {
            new.unwrap_key(&vm_id, generation, &wrapped)
                .map_err(|e| format!("{vm_id}: {e}; the old KEK is kept"))?;
        }
        drop(kbs);
        let tmp = config.with_extension("toml.rotating");
        write_file(&tmp, edited.as_bytes(), false, true)
            .and_then(|()| std::fs::rename(&tmp, config).map_err(|e| e.to_string()))
            .map_err(|e| {
                format!(
                    "{n} keys are now wrapped under {} but {} could not be rewritten ({e}): set kek = {{ file = {:?} }} by hand; the old KEK is kept",
                    absolute.display(),
                    config.display(),
                    named.display().to_string()
                )
            })?;
        // The new KEK file's and the configuration's directory entries durable before the old
        // KEK goes: a power loss now must not leave keys wrapped under a KEK nobody can find.
        for dir in [absolute.parent(), config.parent()].into_iter().flatten() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    format!(
                        "{}: {e}; keys are wrapped under {}, the old KEK is kept",
                        dir.display(),
                        absolute.display()
                    )
                })?;
        }
        let retired = match &c.kek {
            KekConfig::File(old) => {
                destroy_file(old)?;
                format!("the old KEK file {} destroyed", old.display())
            }
            KekConfig::Pkcs11 { key_label, .. } => {
                format!("destroy the old KEK {key_label:?} on its token to retire it")
            }
        };
        Ok(format!(
            "{n} keys re-wrapped under {}; {} now names it; {retired}",
            absolute.display(),
            config.display()
        ))
    })();
    match r {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs kek rotate: {e}");
            ExitCode::from(1)
        }
    }
}
