//! `kbs.toml`: the broker's configuration, and `attesta-kbs init`, which writes a working one
//! (keys with mode 0600, a TLS CA and server certificate) for a new deployment or a test.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the KEK lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum KekConfig {
    /// 32 raw bytes, mode 0600.
    File(PathBuf),
    /// A non-extractable AES key on a PKCS#11 token.
    Pkcs11 {
        module: PathBuf,
        token: String,
        pin_file: PathBuf,
        key_label: String,
    },
}

/// The broker's configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address for QUIC, e.g. "0.0.0.0:7443".
    pub listen: String,
    /// The database: an SQLite file (relative to this file), or a `postgres://` URL.
    pub database: PathBuf,
    /// PEM certificate chain and PKCS#8 key of the broker's TLS identity.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Ed25519 response-signing key (PKCS#8 DER, mode 0600); guests pin its public half.
    pub response_key: PathBuf,
    pub kek: KekConfig,
    /// Operators' order-signing public keys (hex Ed25519).
    pub operator_keys: Vec<String>,
    /// The offline allowlist-signing public key (hex Ed25519).
    pub allowlist_key: String,
    /// A signed allowlist to load at start (optional; newer ones can be installed later).
    #[serde(default)]
    pub allowlist: Option<PathBuf>,
    /// Non-AMD roots to trust (the simulator's ARK, for test deployments only).
    #[serde(default)]
    pub trust_roots: Vec<PathBuf>,
    /// "require" (default): no release without a current CRL; "if_available".
    #[serde(default)]
    pub revocation: snp::Revocation,
    /// AMD CRLs (DER or PEM, one per product, e.g. from `https://kdsintf.amd.com/vcek/v1/Milan/crl`).
    /// Each must verify against its ARK when the broker starts; they are re-read every
    /// `crl_reload_secs`, so a cron job that refreshes the files needs no restart.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    #[serde(default = "default_crl_reload")]
    pub crl_reload_secs: u64,
    #[serde(default = "default_ttl")]
    pub nonce_ttl_secs: u64,
    /// Connections served at once (default 64, at least 1); more wait un-handshaken at the door, so those
    /// admitted are answered promptly in a boot storm.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Of those, how many one source address (an IPv4 address, an IPv6 /64) may hold at once;
    /// its connections beyond are refused (QUIC CONNECTION_REFUSED), which guests retry with
    /// backoff. Default: a quarter of `max_sessions` (16), at least 1. See `kbs::limits`.
    #[serde(default)]
    pub max_sessions_per_address: Option<usize>,
    /// Seconds a running VM's lease must have run before it is renewed again; a renewal sooner
    /// is refused before any verification or audit entry (default 60; keepalives renew every
    /// 900). See `kbs::lease`.
    #[serde(default = "default_lease_min_interval")]
    pub lease_min_interval_secs: u64,
    /// Ed25519 key (PKCS#8, mode 0600) that signs audit checkpoints; `audit verify` checks them
    /// with its public half. Without it the log is chained but unsigned.
    #[serde(default)]
    pub audit_key: Option<PathBuf>,
    /// A signed checkpoint after this many audit entries…
    #[serde(default = "default_cp_every")]
    pub checkpoint_every: u64,
    /// …or after this many seconds, whichever comes first.
    #[serde(default = "default_cp_secs")]
    pub checkpoint_interval_secs: u64,
    /// CA (PEM) whose client certificates identify hosts and operators (role in a URI SAN);
    /// without it, orders can only be given on this machine (`vm register --config`).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Put the broker on the mesh (then `tls_cert`/`tls_key` are its mesh certificate, role kbs,
    /// and `client_ca` is not used): hosts and operators present mesh certificates, guests none.
    #[serde(default)]
    pub mesh: Option<MeshSection>,
    /// Local TCP address for `/metrics`, `/readyz`, `/healthz` (none: no HTTP endpoint).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// "text" (default) or "json" log lines on stderr.
    #[serde(default)]
    pub log_format: LogFormat,
    /// The policy floor every order must meet and every release is appraised with (with the
    /// order's policy). Absent: the strict built-in one ([`snp::Floor::default`]).
    #[serde(default)]
    pub floor: snp::Floor,
    /// Where the broker finds VCEKs and CRLs that evidence does not carry (offline store, AMD's
    /// key server with a cache); without it, only the certificate table.
    #[serde(default)]
    pub collateral: Option<crate::collateral::CollateralConfig>,
}

/// The broker on the mesh. Files are re-read every `reload_secs` when they change: the CA
/// bundle (rollover), the rules (a file whose tests fail is refused, the old rules stay) and the
/// revocation list (only a newer one replaces the one held).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// Mesh CA roots (PEM; two during a rollover).
    pub ca: PathBuf,
    /// Mesh firewall rules: which certified peers may use `attesta-kbs/1` (e.g. role host).
    pub rules: PathBuf,
    /// The mesh's signed revocation list (`attesta-mesh revoke`), if any.
    #[serde(default)]
    pub revocation: Option<PathBuf>,
    /// Refuse certified peers when the newest list is older than this ("2d").
    #[serde(default)]
    pub revocation_max_age: Option<String>,
    #[serde(default = "default_mesh_reload")]
    pub reload_secs: u64,
    /// A mesh CA folder (`ca.crt`, `ca.key`; an intermediate limited to the guests' network is
    /// the sensible choice) with which the broker certifies each attested guest's mesh key.
    #[serde(default)]
    pub guest_ca: Option<PathBuf>,
    /// Validity of a guest's mesh certificate, seconds: the VM's lease. Each boot gets one and
    /// `attesta-guest keepalive` renews it with a fresh report (every 15 minutes by default);
    /// a VM not renewed drops off the mesh when it ends. Default an hour: 100,000 VMs renewing
    /// every 900 s are 111 renewals/s, a tenth of what one broker decides on two cores
    /// (~1,100 releases/s, BENCHMARKS.md), and a withdrawn image leaves the mesh within the hour.
    #[serde(default = "default_guest_cert_secs")]
    pub guest_cert_secs: u64,
    /// The mesh's lighthouses: overlay address → underlay addresses, e.g.
    /// `{ "10.42.0.1" = ["203.0.113.7:4242"] }`. With an intermediate `guest_ca`, the broker
    /// joins the mesh through them (its own certificate, no announcements, no services) to
    /// publish its guests' revocation list the moment a lease is revoked: a cloned VM is cut
    /// off at once instead of when its certificate ends.
    #[serde(default)]
    pub lighthouses: std::collections::BTreeMap<std::net::IpAddr, Vec<std::net::SocketAddr>>,
}

fn default_lease_min_interval() -> u64 {
    60
}

fn default_guest_cert_secs() -> u64 {
    3_600
}

fn default_mesh_reload() -> u64 {
    2
}

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_cp_every() -> u64 {
    1000
}

fn default_cp_secs() -> u64 {
    10
}

fn default_max_sessions() -> usize {
    crate::service::DEFAULT_MAX_SESSIONS
}

fn default_ttl() -> u64 {
    30
}

fn default_crl_reload() -> u64 {
    600
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut c: Config =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        // Relative paths are relative to the configuration file.
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if !c
            .database
            .to_str()
            .is_some_and(crate::store::is_database_url)
        {
            fix(&mut c.database);
        }
        fix(&mut c.tls_cert);
        fix(&mut c.tls_key);
        fix(&mut c.response_key);
        if let KekConfig::File(p) = &mut c.kek {
            fix(p);
        }
        if let KekConfig::Pkcs11 { pin_file, .. } = &mut c.kek {
            fix(pin_file);
        }
        if let Some(a) = &mut c.allowlist {
            fix(a);
        }
        c.trust_roots.iter_mut().for_each(fix);
        c.crls.iter_mut().for_each(fix);
        if let Some(p) = &mut c.audit_key {
            fix(p);
        }
        if let Some(m) = &mut c.mesh {
            fix(&mut m.ca);
            fix(&mut m.rules);
            if let Some(g) = &mut m.guest_ca {
                fix(g);
            }
            if let Some(r) = &mut m.revocation {
                fix(r);
            }
        }
        if let Some(p) = &mut c.client_ca {
            fix(p);
        }
        if let Some(col) = &mut c.collateral {
            col.resolve(base);
        }
        Ok(c)
    }

    /// Parsed operator keys.
    pub fn operator_keys(&self) -> Result<Vec<[u8; 32]>, String> {
        self.operator_keys
            .iter()
            .map(|k| hex32(k, "operator_keys"))
            .collect()
    }

    pub fn allowlist_key(&self) -> Result<[u8; 32], String> {
        hex32(&self.allowlist_key, "allowlist_key")
    }
}

fn hex32(s: &str, what: &str) -> Result<[u8; 32], String> {
    hex::decode(s.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| format!("{what}: expected 64 hex digits (an Ed25519 public key), got {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented replica file loads, its database URL kept as written (not made a path).
    #[test]
    fn the_replica_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kbs-replica.toml");
        let c = Config::load(&path).unwrap();
        let url = c.database.to_str().unwrap();
        assert!(
            url.starts_with("postgres://kbs@db1.example,db2.example/kbs?"),
            "{url}"
        );
        assert!(url.contains("target_session_attrs=read-write"), "{url}");
        assert_eq!(
            crate::store::redacted(url),
            "postgres://kbs@db1.example/kbs?sslmode=verify-full | postgres://kbs@db2.example/kbs?sslmode=verify-full"
        );
    }
}
