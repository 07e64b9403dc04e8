//! `attesta-kbs serve`: the broker as a service — built from kbs.toml, serving on QUIC, and
//! following its CRLs, allowlist and floor while it runs.

use crate::clock::now;
use crate::mesh_setup::{build_mesh, read_pem_identity, reload_mesh};
use aws_lc_rs::signature::Ed25519KeyPair;
use clap::Args;
use kbs::config::{Config, KekConfig, LogFormat};
use kbs::keys::{FileKek, Kek, Pkcs11Kek};
use kbs::service::{AllowlistChange, Kbs, MeshGate, serve_with, server_config};
use kbs::store::{SqliteStore, Store, StoreOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub(crate) fn build(
    c: &Config,
) -> Result<(Kbs, quinn::ServerConfig, Option<Arc<MeshGate>>), String> {
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
    let opts = StoreOptions {
        audit_key: audit_key(c)?,
        checkpoint_every: c.checkpoint_every.max(1),
        checkpoint_interval: std::time::Duration::from_secs(c.checkpoint_interval_secs.max(1)),
        ..Default::default()
    };
    let rt = tokio::runtime::Handle::current();
    let store = rt
        .block_on(SqliteStore::open_database(&c.database, opts))
        .map_err(|e| {
            format!(
                "database {}: {e}",
                kbs::store::redacted(&c.database.to_string_lossy())
            )
        })?;
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
    kbs.lease_min_interval = c.lease_min_interval_secs;
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

/// The configured audit signing key, if any.
pub(crate) fn audit_key(c: &Config) -> Result<Option<Arc<Ed25519KeyPair>>, String> {
    let Some(p) = &c.audit_key else {
        return Ok(None);
    };
    let der = std::fs::read(p).map_err(|e| format!("audit_key {}: {e}", p.display()))?;
    Ed25519KeyPair::from_pkcs8(&der)
        .map(|k| Some(Arc::new(k)))
        .map_err(|_| format!("audit_key {}: not an Ed25519 PKCS#8 key", p.display()))
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| e.to_string())
}

pub(crate) fn fail(cmd: &str, e: String) -> ExitCode {
    eprintln!("attesta-kbs {cmd}: {e}");
    ExitCode::from(2)
}

pub(crate) fn init_logs(c: &Config) {
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
            let roots = crate::mesh_setup::mesh_roots(m)?;
            match kbs.guest_issuer.get() {
                Some(i) if i.can_revoke() && i.issued_by_one_of(&roots) => {
                    // On the mesh through a node of its own only when it has lists to publish.
                    let outlets = kbs::guest_revocation::Outlets {
                        gate: Some(g.trust.clone()),
                        node: rt.block_on(crate::mesh_setup::revocation_node(&c, m))?,
                    };
                    if outlets.node.is_none() {
                        tracing::warn!(
                            "no [mesh] lighthouses: a cloned VM's certificate is revoked at this broker only; the rest of the mesh drops it when its lease ends"
                        );
                    }
                    rt.spawn(kbs::guest_revocation::follow(
                        kbs.clone(),
                        outlets,
                        std::time::Duration::from_secs(60),
                        now,
                    ));
                }
                Some(i) => tracing::warn!(
                    ca = i.ca_name(),
                    "guest_ca is not an intermediate the mesh root issued directly: a cloned VM's certificate cannot be revoked at once (it ends with its lease)"
                ),
                None => {}
            }
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

/// Re-reads the configured CRLs every `every`: a refreshed file is verified and added; a file
/// that fails is logged and the CRLs already held stay (revocations are permanent).
pub(crate) async fn reload_crls(
    kbs: Arc<Kbs>,
    paths: Vec<std::path::PathBuf>,
    every: std::time::Duration,
) {
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
pub(crate) async fn follow_allowlist(kbs: Arc<Kbs>, key: [u8; 32], every: std::time::Duration) {
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
pub(crate) fn load_allowlist(
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
