//! The broker's TLS: its identity (a CA that guests pin and that issues host and operator client
//! certificates, and a server certificate), the roles a client certificate names, and the QUIC
//! server configurations (TLS 1.3 with aws-lc-rs, ALPN `attesta-kbs/1`, no 0-RTT), plain or on
//! the mesh.

use proto::msg::ALPN;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Who is on the other end of a connection, from its TLS client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No client certificate: a guest. May ask for nonces and present evidence.
    Guest,
    /// A miner's host agent: may relay operator-signed orders.
    Host,
    /// An operator: may send operator-signed orders.
    Operator,
}

/// The URI SAN that names a client's role in its certificate.
pub fn role_uri(role: Role) -> &'static str {
    match role {
        Role::Guest => "urn:attesta:role:guest",
        Role::Host => "urn:attesta:role:host",
        Role::Operator => "urn:attesta:role:operator",
    }
}

/// The role a (chain-verified) client certificate claims: host or operator by URI SAN, else
/// guest (nothing more than any anonymous client).
pub fn role_of(cert_der: &[u8]) -> Role {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let Ok(cert) = x509_cert::Certificate::from_der(cert_der) else {
        return Role::Guest;
    };
    let Ok(Some(san)) = cert.tbs_certificate().get_extension::<SubjectAltName>() else {
        return Role::Guest;
    };
    let uris: Vec<String> = san
        .1
        .0
        .iter()
        .filter_map(|n| match n {
            GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    if uris.iter().any(|u| u == role_uri(Role::Operator)) {
        Role::Operator
    } else if uris.iter().any(|u| u == role_uri(Role::Host)) {
        Role::Host
    } else {
        Role::Guest
    }
}

/// A broker TLS identity: a CA (which guests pin, and which issues host and operator client
/// certificates) and a server certificate it issued.
pub struct TlsIdentity {
    pub ca_der: Vec<u8>,
    pub ca_pem: String,
    /// PKCS#8 PEM of the CA key (secret; keep it offline once client certificates are issued).
    pub ca_key_pem: Zeroizing<String>,
    pub cert_der: Vec<u8>,
    pub cert_pem: String,
    /// PKCS#8 of the server key (secret).
    pub key_der: Zeroizing<Vec<u8>>,
    pub key_pem: Zeroizing<String>,
}

fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Attesta KBS CA");
    Ok(p)
}

/// A client certificate for `name` in `role`, issued by the broker's CA (`ca_key_pem`).
/// Returns the certificate and its key, both PEM.
pub fn issue_client_cert(
    ca_key_pem: &str,
    name: &str,
    role: Role,
) -> Result<(String, Zeroizing<String>), String> {
    let err = |e: rcgen::Error| e.to_string();
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params().map_err(err)?, ca_key);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let uri = rcgen::string::Ia5String::try_from(role_uri(role)).map_err(err)?;
    p.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).map_err(err)?;
    Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
}

impl TlsIdentity {
    /// A new CA (path length 0) and a certificate for `server_name` from it.
    pub fn generate(server_name: &str) -> Result<TlsIdentity, String> {
        let err = |e: rcgen::Error| e.to_string();
        let ca_key = rcgen::KeyPair::generate().map_err(err)?;
        let ca_key_pem = Zeroizing::new(ca_key.serialize_pem());
        let ca_params = ca_params().map_err(err)?;
        let ca = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = rcgen::CertificateParams::new(vec![server_name.to_string()])
            .map_err(err)?
            .signed_by(&key, &issuer)
            .map_err(err)?;
        Ok(TlsIdentity {
            ca_der: ca.der().to_vec(),
            ca_pem: ca.pem(),
            ca_key_pem,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_der: Zeroizing::new(key.serialize_der()),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The QUIC server configuration for this identity; its CA also vouches for clients.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, String> {
        server_config(
            vec![rustls::pki_types::CertificateDer::from(
                self.cert_der.clone(),
            )],
            rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.to_vec().into()),
            Some(rustls::pki_types::CertificateDer::from(self.ca_der.clone())),
        )
    }
}

/// The mesh in front of the broker: clients are verified by the mesh CA (chain, constraints,
/// revocation lists), a certified client's role comes from its mesh certificate and the mesh
/// firewall must allow it the service `attesta-kbs/1`; a client without a certificate is a
/// guest, admitted for attestation only (nonces and evidence).
pub struct MeshGate {
    pub trust: Arc<mesh::transport::Trust>,
    rules: std::sync::RwLock<Arc<mesh::firewall::Firewall>>,
}

impl MeshGate {
    pub fn new(trust: Arc<mesh::transport::Trust>, rules: mesh::firewall::Firewall) -> MeshGate {
        MeshGate {
            trust,
            rules: std::sync::RwLock::new(Arc::new(rules)),
        }
    }

    /// Swaps in reloaded rules (already parsed and self-tested).
    pub fn set_rules(&self, rules: mesh::firewall::Firewall) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    /// The role of a connection's peer, or why it is refused. `chain` is what the TLS
    /// verifier (the mesh's) already accepted.
    pub fn admit(
        &self,
        chain: Option<&[rustls::pki_types::CertificateDer<'static>]>,
        now: u64,
    ) -> Result<Role, String> {
        let Some(leaf) = chain.and_then(|c| c.first()) else {
            return Ok(Role::Guest);
        };
        let cert = mesh::cert::MeshCert::parse(leaf).map_err(|e| e.to_string())?;
        self.trust.fresh(now)?;
        let peer = mesh::firewall::Peer::from_cert(&cert);
        let service = mesh::firewall::Service::Named(String::from_utf8_lossy(ALPN).into_owned());
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone();
        if rules.decide(&peer, &service) == mesh::firewall::Verdict::Deny {
            return Err(format!(
                "the mesh firewall denies {} the broker's service",
                cert.name
            ));
        }
        Ok(match cert.claims.role {
            Some(mesh::cert::Role::Host) => Role::Host,
            Some(mesh::cert::Role::Operator) => Role::Operator,
            _ => Role::Guest,
        })
    }
}

/// The broker's QUIC server configuration on the mesh: its mesh certificate (role kbs), the
/// mesh verifier for clients (optional: guests have none yet).
pub fn mesh_server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    trust: Arc<mesh::transport::Trust>,
) -> Result<quinn::ServerConfig, String> {
    let tls = mesh::transport::server_tls(
        mesh::transport::Identity { chain, key },
        trust,
        false,
        &[ALPN],
    )?;
    finish_server(tls)
}

/// QUIC server configuration: TLS 1.3 only, ALPN `attesta-kbs/1`, no early data. With
/// `client_ca`, clients may present a certificate from it (hosts, operators); guests present none.
pub fn server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_ca: Option<rustls::pki_types::CertificateDer<'static>>,
) -> Result<quinn::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).map_err(|e| e.to_string())?;
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let tls = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    finish_server(tls)
}

fn finish_server(mut tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, String> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0; // no 0-RTT on key release
    // No resumption tickets: each boot is a fresh guest with nothing to resume, and minting two
    // tickets per connection cost the broker CPU and packets in a boot storm.
    tls.send_tls13_tickets = 0;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport()));
    Ok(server)
}

/// Requests a client may have open at once on one connection (a guest has one at a time; a
/// host relaying orders may overlap a few).
pub const MAX_STREAMS: u32 = 4;

/// The broker's QUIC transport limits, sized to its service: one request per bidirectional
/// stream, each at most [`proto::msg::MAX_REQUEST`] (+ its 4-byte length), a few at a time; no
/// unidirectional streams, no datagrams. What a connection can make the broker buffer is then
/// [`MAX_STREAMS`] requests in and as many answers out (~0.5 MiB), however it behaves.
pub fn transport() -> quinn::TransportConfig {
    use proto::msg::{MAX_REQUEST, MAX_RESPONSE};
    let stream = (MAX_REQUEST + 4) as u32;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(stream.into())
        .receive_window((stream * MAX_STREAMS).into())
        .send_window(((MAX_RESPONSE + 4) * MAX_STREAMS as usize) as u64)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0);
    t
}
