//! `attesta-kbs init`: a new deployment's keys, certificates and kbs.toml.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use clap::Args;
use kbs::keys::FileKek;
use kbs::service::TlsIdentity;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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

pub(crate) fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
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

pub(crate) fn new_ed25519(dir: &Path, name: &str) -> Result<String, String> {
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

pub(crate) fn do_init(a: &InitArgs) -> Result<(), String> {
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
