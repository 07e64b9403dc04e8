//! The broker on the mesh: its identity, the mesh roots and firewall rules, and following
//! them (and the revocation list) while serving.

use crate::clock::now;
use kbs::config::Config;
use kbs::config::MeshSection;
use kbs::service::{MeshGate, mesh_server_config};
use std::sync::Arc;

pub(crate) fn read_pem_identity(
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

pub(crate) fn mesh_roots(m: &MeshSection) -> Result<Vec<mesh::cert::MeshCert>, String> {
    let bytes = std::fs::read(&m.ca).map_err(|e| format!("mesh ca {}: {e}", m.ca.display()))?;
    mesh::cert::parse_bundle(&bytes).map_err(|e| format!("mesh ca {}: {e}", m.ca.display()))
}

pub(crate) fn mesh_rules(m: &MeshSection) -> Result<mesh::firewall::Firewall, String> {
    let text = std::fs::read_to_string(&m.rules)
        .map_err(|e| format!("mesh rules {}: {e}", m.rules.display()))?;
    mesh::firewall::Firewall::load(&text)
        .map_err(|e| format!("mesh rules {}: {e}", m.rules.display()))
}

/// The broker's own certificate must be a mesh certificate with role kbs under `roots`.
pub(crate) fn check_own_mesh_cert(
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
pub(crate) fn build_mesh(
    c: &Config,
    m: &MeshSection,
) -> Result<(quinn::ServerConfig, Arc<MeshGate>), String> {
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
pub(crate) async fn reload_mesh(
    c: Config,
    m: MeshSection,
    gate: Arc<MeshGate>,
    endpoint: quinn::Endpoint,
) {
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

/// The broker's own mesh node, through which it publishes its guests' revocation list: its
/// certificate, no announcements and no services of its own (it still answers the mesh's
/// control protocol on an ephemeral UDP port, as every node does), connected to `[mesh]
/// lighthouses`. None when none are configured.
pub(crate) async fn revocation_node(
    c: &Config,
    m: &MeshSection,
) -> Result<Option<mesh::node::Node>, String> {
    if m.lighthouses.is_empty() {
        return Ok(None);
    }
    let cfg = mesh::node::NodeConfig {
        cert: c.tls_cert.clone(),
        key: c.tls_key.clone(),
        ca: m.ca.clone(),
        rules: m.rules.clone(),
        listen: (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        advertise: vec![],
        lighthouse: false,
        lighthouses: m.lighthouses.keys().copied().collect(),
        static_hosts: m.lighthouses.clone(),
        revocation: None,
        revocation_max_age: None,
        announce_secs: 30,
        reload_ms: 1000,
        announce: false,
        tun: None,
        echo: false,
    };
    let node = mesh::node::Node::start(cfg, vec![])
        .await
        .map_err(|e| format!("[mesh] lighthouses: the broker's mesh node: {e}"))?;
    tracing::info!(
        lighthouses = m.lighthouses.len(),
        "on the mesh through the lighthouses, to revoke cloned guests at once"
    );
    Ok(Some(node))
}
