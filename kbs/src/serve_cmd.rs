//! `attesta-kbs init`, `serve`, `vm register` and `allowlist install`: the broker as a service.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use clap::{Args, Subcommand};
use kbs::config::{Config, KekConfig};
use kbs::keys::{FileKek, Kek, Pkcs11Kek};
use kbs::service::{Kbs, TlsIdentity, serve, server_config};
use kbs::store::SqliteStore;
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
    /// Trust a non-AMD root (the simulator's ark.pem) — test deployments only.
    #[arg(long, value_name = "FILE")]
    pub trust_root: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Register a VM from an operator-signed order (generates and wraps its volume key).
    Register {
        /// The signed order document.
        order: PathBuf,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
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
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(if secret { 0o600 } else { 0o644 });
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
    new_ed25519(d, "response")?;
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
         nonce_ttl_secs = 30\n",
        listen = a.listen,
        roots = roots.join(", "),
        revocation = if a.trust_root.is_empty() {
            "require"
        } else {
            "if_available"
        },
    );
    write(&d.join("kbs.toml"), toml.as_bytes(), false)?;
    println!(
        "wrote {}/kbs.toml with new keys (response.pub: guests pin it; tls-ca.crt: guests trust it)",
        d.display()
    );
    Ok(())
}

fn build(c: &Config) -> Result<(Kbs, quinn::ServerConfig), String> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&c.tls_cert)
        .map_err(|e| format!("{}: {e}", c.tls_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", c.tls_cert.display()))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&c.tls_key)
        .map_err(|e| format!("{}: {e}", c.tls_key.display()))?;
    let tls = server_config(chain, key)?;
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
    let rt = tokio::runtime::Handle::current();
    let store = rt
        .block_on(SqliteStore::open(&c.database))
        .map_err(|e| e.to_string())?;
    Ok((
        Kbs {
            store,
            verifier,
            response_key,
            kek,
            operator_keys: c.operator_keys()?,
            allowlist: Default::default(),
            nonce_ttl: c.nonce_ttl_secs,
        },
        tls,
    ))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| e.to_string())
}

fn fail(cmd: &str, e: String) -> ExitCode {
    eprintln!("attesta-kbs {cmd}: {e}");
    ExitCode::from(2)
}

pub fn serve_cmd(a: &ServeArgs) -> ExitCode {
    let r = (|| -> Result<(), String> {
        let c = Config::load(&a.config)?;
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, tls) = build(&c)?;
        if let Some(p) = &c.allowlist {
            let doc = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let epoch = rt
                .block_on(kbs.set_allowlist(&doc, &c.allowlist_key()?))
                .map_err(|e| e.to_string())?;
            eprintln!("attesta-kbs: allowlist epoch {epoch} loaded");
        }
        let addr: std::net::SocketAddr = c
            .listen
            .parse()
            .map_err(|e| format!("listen {:?}: {e}", c.listen))?;
        let endpoint = quinn::Endpoint::server(tls, addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "attesta-kbs: serving on {} (QUIC, ALPN attesta-kbs/1); response key {}",
            endpoint
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            hex::encode(kbs.response_key.public())
        );
        rt.block_on(async move {
            tokio::select! {
                () = serve(endpoint, Arc::new(kbs), now) => {}
                _ = tokio::signal::ctrl_c() => eprintln!("attesta-kbs: stopping"),
            }
        });
        Ok(())
    })();
    r.map(|()| ExitCode::SUCCESS)
        .unwrap_or_else(|e| fail("serve", e))
}

pub fn vm_cmd(c: &VmCmd) -> ExitCode {
    let VmCmd::Register { order, config } = c;
    let r = (|| -> Result<String, String> {
        let c = Config::load(config)?;
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, _) = build(&c)?;
        if let Some(p) = &c.allowlist {
            let doc = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            rt.block_on(kbs.set_allowlist(&doc, &c.allowlist_key()?))
                .map_err(|e| e.to_string())?;
        } else {
            return Err("no allowlist configured: set `allowlist` in the configuration".into());
        }
        let doc = std::fs::read(order).map_err(|e| format!("{}: {e}", order.display()))?;
        rt.block_on(kbs.register(&doc, now()))
            .map_err(|e| e.to_string())
    })();
    match r {
        Ok(vm) => {
            println!("registered {vm}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs vm register: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn allowlist_cmd(c: &AllowlistCmd) -> ExitCode {
    let AllowlistCmd::Install { allowlist, config } = c;
    let r = (|| -> Result<u64, String> {
        let c = Config::load(config)?;
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, _) = build(&c)?;
        let doc = std::fs::read(allowlist).map_err(|e| format!("{}: {e}", allowlist.display()))?;
        rt.block_on(kbs.set_allowlist(&doc, &c.allowlist_key()?))
            .map_err(|e| e.to_string())
    })();
    match r {
        Ok(e) => {
            println!("allowlist epoch {e} installed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs allowlist install: {e}");
            ExitCode::from(1)
        }
    }
}
