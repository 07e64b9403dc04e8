//! Mutual TLS for the mesh: rustls verifiers that accept exactly the certificates the mesh CA
//! vouches for (chain, validity, constraints, revocation — `cert::verify`, not WebPKI), the
//! peer's identity read from the connection, and services chosen by ALPN. QUIC endpoints are
//! built on these configs by the IO shell; nothing here opens a socket.

use crate::cert::{MeshCert, parse_bundle, verify};
use crate::revocation::{RevocationError, RevocationList};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Revoked certificates, by (issuer name, serial) and by public-key hash. Shared with the
/// verifiers, so an update applies to the next handshake without a restart.
#[derive(Debug, Default)]
pub struct Revoked {
    pub serials: HashSet<(String, Vec<u8>)>,
    pub keys: HashSet<[u8; 32]>,
}

impl Revoked {
    pub fn contains(&self, c: &MeshCert) -> bool {
        self.serials.contains(&(c.issuer.clone(), c.serial.clone()))
            || self.keys.contains(&c.key_hash)
    }
}

/// Most delegated lists a node holds (each from an intermediate a root issued directly).
pub const MAX_DELEGATED_LISTS: usize = 32;

/// What a node trusts: CA roots (two during a rollover), the CA-signed revocation lists (the
/// newest per CA) and a local blocklist. Shared with the verifiers and swapped in place, so an
/// update applies to the next handshake and the next sweep of live connections, without a
/// restart.
#[derive(Debug, Default)]
pub struct Trust {
    pub roots: RwLock<Vec<MeshCert>>,
    /// Local additions (an operator's emergency blocklist); never distributed.
    pub revoked: RwLock<Revoked>,
    lists: RwLock<HashMap<String, RevocationList>>,
    /// Fail closed when the newest list is older than this (seconds); None: no limit.
    max_age: RwLock<Option<u64>>,
    /// Bumped on every change, so watchers know to re-check live connections.
    generation: AtomicU64,
}

impl Trust {
    pub fn new(roots: Vec<MeshCert>) -> Arc<Trust> {
        Arc::new(Trust {
            roots: RwLock::new(roots),
            ..Default::default()
        })
    }

    /// Verifies a presented chain at `now`: the mesh chain rules, then revocation of every link.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: u64,
    ) -> Result<MeshCert, String> {
        let mut chain = vec![MeshCert::parse(end_entity).map_err(|e| e.to_string())?];
        for i in intermediates {
            chain.push(MeshCert::parse(i).map_err(|e| e.to_string())?);
        }
        let leaf = {
            let roots = read(&self.roots);
            verify(&chain, &roots, now).map_err(|e| e.to_string())?
        };
        if let Some(c) = chain.iter().find(|c| self.is_revoked(c)) {
            return Err(format!("certificate {} is revoked", c.name));
        }
        Ok(leaf)
    }

    /// Whether any held list, or the local blocklist, revokes `c`.
    pub fn is_revoked(&self, c: &MeshCert) -> bool {
        read(&self.revoked).contains(c) || read(&self.lists).values().any(|l| l.revokes(c))
    }

    /// Replaces the roots (a CA bundle reloaded from disk).
    pub fn set_roots(&self, roots: Vec<MeshCert>) {
        *self.roots.write().unwrap_or_else(|e| e.into_inner()) = roots;
        self.bump();
    }

    /// Adds to the local blocklist.
    pub fn revoke_locally(&self, f: impl FnOnce(&mut Revoked)) {
        f(&mut self.revoked.write().unwrap_or_else(|e| e.into_inner()));
        self.bump();
    }

    /// Installs a signed list if it verifies against the roots and is newer than the one held
    /// for its CA (for a delegated list: its signer, [`RevocationList::id`]). Ok(false): the
    /// same number again (relays repeat themselves; not an error). Delegated lists whose signer
    /// has expired are dropped here, and at most [`MAX_DELEGATED_LISTS`] are held.
    pub fn install(&self, bytes: &[u8], now: u64) -> Result<bool, RevocationError> {
        let list = RevocationList::verify(bytes, &read(&self.roots), now)?;
        if let Some(c) = list.chain.iter().find(|c| self.is_revoked(c)) {
            return Err(RevocationError::RevokedSigner(c.name.clone()));
        }
        let id = list.id();
        let mut lists = self.lists.write().unwrap_or_else(|e| e.into_inner());
        prune_lists(&mut lists, now);
        let delegated = lists.values().filter(|l| !l.is_root_list()).count();
        if !list.is_root_list() && !lists.contains_key(&id) && delegated >= MAX_DELEGATED_LISTS {
            return Err(RevocationError::TooMany(delegated));
        }
        if let Some(have) = lists.get(&id) {
            if have.body.number == list.body.number {
                return Ok(false);
            }
            if have.body.number > list.body.number {
                return Err(RevocationError::NotNewer {
                    number: list.body.number,
                    have: have.body.number,
                });
            }
        }
        lists.insert(id, list);
        drop(lists);
        self.bump();
        Ok(true)
    }

    /// Drops delegated lists whose signer has expired or is revoked by a root's list: they
    /// revoke nothing any more, and would hold a slot.
    pub fn prune(&self, now: u64) {
        let mut lists = self.lists.write().unwrap_or_else(|e| e.into_inner());
        let before = lists.len();
        prune_lists(&mut lists, now);
        let changed = lists.len() != before;
        drop(lists);
        if changed {
            self.bump();
        }
    }

    /// The held lists, as signed, to relay: the roots' first, then delegated ones, newest first.
    pub fn lists(&self) -> Vec<Vec<u8>> {
        let lists = read(&self.lists);
        let mut v: Vec<&RevocationList> = lists.values().collect();
        v.sort_by_key(|l| (!l.is_root_list(), std::cmp::Reverse(l.body.issued_at)));
        v.into_iter().map(|l| l.bytes.clone()).collect()
    }

    /// The list held under `id` ([`RevocationList::id`]), if any.
    pub fn list(&self, id: &str) -> Option<RevocationList> {
        read(&self.lists).get(id).cloned()
    }

    /// (CA, number, issued_at, entries) of each held list.
    pub fn list_summary(&self) -> Vec<(String, u64, u64, usize)> {
        let mut v: Vec<_> = read(&self.lists)
            .values()
            .map(|l| {
                (
                    l.body.ca.clone(),
                    l.body.number,
                    l.body.issued_at,
                    l.entries(),
                )
            })
            .collect();
        v.sort();
        v
    }

    pub fn set_max_age(&self, secs: Option<u64>) {
        *self.max_age.write().unwrap_or_else(|e| e.into_inner()) = secs;
        self.bump();
    }

    /// Err when a maximum age is configured and no list newer than it is held: the node then
    /// fails closed for everything but fetching a new list.
    pub fn fresh(&self, now: u64) -> Result<(), String> {
        let Some(max) = *read(&self.max_age) else {
            return Ok(());
        };
        // A root's list only: a delegated one (a broker's, for its guests) says nothing of the
        // root's revocations.
        let newest = read(&self.lists)
            .values()
            .filter(|l| l.is_root_list())
            .map(|l| l.body.issued_at)
            .max();
        match newest {
            Some(t) if now.saturating_sub(t) <= max => Ok(()),
            Some(t) => Err(format!(
                "the newest revocation list was issued {}s ago, more than the {max}s allowed",
                now.saturating_sub(t)
            )),
            None => Err("no revocation list is held and a maximum age is configured".into()),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// See [`Trust::prune`].
fn prune_lists(lists: &mut HashMap<String, RevocationList>, now: u64) {
    let by_roots: Vec<RevocationList> = lists
        .values()
        .filter(|l| l.is_root_list())
        .cloned()
        .collect();
    lists.retain(|_, l| {
        l.chain
            .iter()
            .all(|c| c.not_after >= now && !by_roots.iter().any(|r| r.revokes(c)))
    });
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn tls_err(why: String) -> rustls::Error {
    rustls::Error::General(why)
}

fn handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let c = MeshCert::parse(cert).map_err(|e| tls_err(e.to_string()))?;
    let ed25519 = match dss.scheme {
        SignatureScheme::ED25519 => true,
        SignatureScheme::ECDSA_NISTP256_SHA256 => false,
        _ => {
            return Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoSignatureSchemesInCommon,
            ));
        }
    };
    if c.verify_with_key(ed25519, message, dss.signature()) {
        Ok(HandshakeSignatureValid::assertion())
    } else {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadSignature,
        ))
    }
}

const SCHEMES: [SignatureScheme; 2] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
];

/// Verifies a server's mesh certificate; its name must be the one we dialled.
#[derive(Debug)]
pub struct MeshServerVerifier(pub Arc<Trust>);

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let leaf = self
            .0
            .check(end_entity, intermediates, now.as_secs())
            .map_err(tls_err)?;
        // Dialled by name: the certificate's name; by overlay address: one of its addresses.
        match server_name {
            ServerName::IpAddress(ip) => {
                let ip = std::net::IpAddr::from(*ip);
                if !leaf.addrs().contains(&ip) {
                    return Err(tls_err(format!(
                        "the peer {:?} does not hold overlay address {ip}",
                        leaf.name
                    )));
                }
            }
            _ => {
                let want = server_name.to_str();
                if leaf.name != want {
                    return Err(tls_err(format!(
                        "the peer is {:?}, not {want:?}",
                        leaf.name
                    )));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// Verifies a client's mesh certificate. `mandatory = false` lets certificate-less clients
/// through (the KBS admits guests for attestation only; their role is then "none").
#[derive(Debug)]
pub struct MeshClientVerifier {
    pub trust: Arc<Trust>,
    pub mandatory: bool,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .check(end_entity, intermediates, now.as_secs())
            .map_err(tls_err)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// A node's own identity: its certificate chain (leaf first) and key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// From `node.crt` and `node.key` as `attesta-mesh cert sign` writes them.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, String> {
        use rustls::pki_types::pem::PemObject;
        parse_bundle(cert_pem).map_err(|e| e.to_string())?;
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| e.to_string())?;
        Ok(Identity { chain, key })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Server side: TLS 1.3, mesh client verification, the given ALPN services, no early data.
pub fn server_tls(
    id: Identity,
    trust: Arc<Trust>,
    client_cert_required: bool,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, String> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier {
            trust,
            mandatory: client_cert_required,
        }))
        .with_single_cert(id.chain, id.key)
        .map_err(|e| e.to_string())?;
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    c.max_early_data_size = 0;
    Ok(c)
}

/// TLS 1.3 with the mesh verifier in place of WebPKI (a replacement, not a switch-off).
fn client_builder(
    trust: Arc<Trust>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier(trust))))
}

fn finish_client(mut c: rustls::ClientConfig, alpn: &[u8]) -> rustls::ClientConfig {
    c.alpn_protocols = vec![alpn.to_vec()];
    c.enable_early_data = false;
    c
}

/// Client side: TLS 1.3, mesh server verification, our certificate, one ALPN service.
pub fn client_tls(
    id: Identity,
    trust: Arc<Trust>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, String> {
    let c = client_builder(trust)?
        .with_client_auth_cert(id.chain, id.key)
        .map_err(|e| e.to_string())?;
    Ok(finish_client(c, alpn))
}

/// Client side without a certificate (a guest before it has one), still verifying the server.
pub fn client_tls_anonymous(
    trust: Arc<Trust>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, String> {
    Ok(finish_client(
        client_builder(trust)?.with_no_client_auth(),
        alpn,
    ))
}

/// The verified peer certificate of a finished handshake (None: the peer presented none).
pub fn peer(certs: Option<&[CertificateDer<'static>]>) -> Option<MeshCert> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| MeshCert::parse(c).ok())
}
