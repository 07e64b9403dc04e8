//! Mesh certificates: X.509 with the node's claims (overlay IPs with prefix, groups, role, and
//! for CAs the networks, roles and names they may hand out) in one private extension, Ed25519
//! by default or ECDSA P-256. A child's groups, networks, roles, names and validity must lie
//! within its issuer's ([`constraints`]); that is enforced when signing and again,
//! independently, when verifying (sans-IO: bytes and an instant in, a typed verdict out).

pub mod constraints;
pub use constraints::check_name_pattern;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ED25519, UnparsedPublicKey};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};

/// The claims extension's OID: under the 2.25 arc, a random 32-bit arc and a sub-arc (parsers
/// limit arcs to 32 bits). Not marked critical: rustls parses a node's own certificate with
/// WebPKI (to match it to its key), which refuses unknown critical extensions. Only the mesh
/// verifier trusts the mesh CA, and it refuses a certificate without the claims.
pub const CLAIMS_OID: &[u64] = &[2, 25, 2_947_116_573, 1];
/// The same OID as text.
pub const CLAIMS_OID_TEXT: &str = "2.25.2947116573.1";
/// Largest certificate or bundle accepted.
pub const MAX_CERT: usize = 64 * 1024;

/// What a node is for. Services and firewall rules key on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Kbs,
    Lighthouse,
    Host,
    Guest,
    Operator,
    /// A certificate authority (only CA certificates carry it).
    Ca,
}

/// What a certificate claims, beyond name and validity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub v: u32,
    /// Overlay addresses with prefix (nodes), e.g. "10.42.0.7/16".
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub role: Option<Role>,
    /// Networks a CA may hand out (empty: unconstrained).
    #[serde(default)]
    pub networks: Vec<String>,
    /// Roles of the node certificates a CA may issue (empty: any). Absent from certificates
    /// made before it existed, which stay unconstrained; omitted when empty so that an
    /// unconstrained CA encodes as before, while a verifier older than the field refuses a CA
    /// that states it (unknown field): fails closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// Names a CA's certificates may carry (empty: any), see [`constraints`]: `*` one plain
    /// label (a VM id, never a dotted service name), `*.SUFFIX` one label under SUFFIX,
    /// anything else that exact name. Absent and omitted like `roles`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// Signature algorithm of a new key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Curve {
    #[default]
    Ed25519,
    P256,
}

/// A parsed certificate with its claims.
#[derive(Clone, Debug)]
pub struct MeshCert {
    pub der: Vec<u8>,
    pub name: String,
    pub issuer: String,
    pub is_ca: bool,
    pub not_before: u64,
    pub not_after: u64,
    pub claims: Claims,
    pub ips: Vec<IpNet>,
    pub networks: Vec<IpNet>,
    pub serial: Vec<u8>,
    /// SHA-256 of the SubjectPublicKeyInfo (revocation by key).
    pub key_hash: [u8; 32],
    spki: Vec<u8>,
    alg: Alg,
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
    tbs: Vec<u8>,
    signature: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Ed25519,
    P256,
}

/// Why a certificate is refused. Each says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not a certificate: {0}")]
    Malformed(String),
    #[error("certificate {name}: unsupported signature algorithm {alg}")]
    Algorithm { name: String, alg: String },
    #[error("certificate {0}: has no mesh claims extension")]
    NoClaims(String),
    #[error("certificate {name}: claims are invalid: {why}")]
    BadClaims { name: String, why: String },
    #[error("certificate {name}: not valid before {not_before} (now {now})")]
    NotYetValid {
        name: String,
        not_before: u64,
        now: u64,
    },
    #[error("certificate {name}: expired at {not_after} (now {now})")]
    Expired {
        name: String,
        not_after: u64,
        now: u64,
    },
    #[error("certificate {name}: no trusted CA issued it (issuer {issuer})")]
    UnknownIssuer { name: String, issuer: String },
    #[error("certificate {name}: the signature does not verify with issuer {issuer}'s key")]
    Signature { name: String, issuer: String },
    #[error("certificate {name}: issued by {issuer}, which is not a CA")]
    IssuerNotCa { name: String, issuer: String },
    #[error("certificate {name}: group {group:?} is outside issuer {issuer}'s groups")]
    GroupOutside {
        name: String,
        group: String,
        issuer: String,
    },
    #[error("certificate {name}: {ip} is outside issuer {issuer}'s networks")]
    NetworkOutside {
        name: String,
        ip: String,
        issuer: String,
    },
    #[error("certificate {name}: role {role} is outside issuer {issuer}'s roles")]
    RoleOutside {
        name: String,
        role: String,
        issuer: String,
    },
    #[error("certificate {name}: name {what:?} is outside issuer {issuer}'s names")]
    NameOutside {
        name: String,
        what: String,
        issuer: String,
    },
    #[error("certificate {0}: a CA certificate is not a node's identity")]
    CaAsLeaf(String),
    #[error("certificate {name}: validity extends beyond issuer {issuer}'s")]
    ValidityOutside { name: String, issuer: String },
    #[error("certificate {0}: a node certificate needs at least one overlay IP")]
    NoIp(String),
    #[error("the chain is longer than {0} certificates")]
    TooLong(usize),
    #[error("{0}")]
    Issue(String),
}

fn common_name(n: &x509_cert::name::Name) -> String {
    n.common_name()
        .ok()
        .flatten()
        .map(|d| d.value().into_owned())
        .unwrap_or_default()
}

fn unix(t: &x509_cert::time::Time) -> u64 {
    t.to_unix_duration().as_secs()
}

impl MeshCert {
    /// Parses one DER certificate and its claims. Never panics.
    pub fn parse(der: &[u8]) -> Result<MeshCert, CertError> {
        if der.len() > MAX_CERT {
            return Err(CertError::Malformed(format!("{} bytes", der.len())));
        }
        let c = Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
        let tbs = c.tbs_certificate();
        let name = common_name(tbs.subject());
        let alg_oid = c.signature_algorithm().oid;
        let alg = if alg_oid == const_oid::db::rfc8410::ID_ED_25519 {
            Alg::Ed25519
        } else if alg_oid == const_oid::db::rfc5912::ECDSA_WITH_SHA_256 {
            Alg::P256
        } else {
            return Err(CertError::Algorithm {
                name,
                alg: alg_oid.to_string(),
            });
        };
        let mut claims = None;
        let mut is_ca = false;
        let mut alt_names = Vec::new();
        for ext in tbs.extensions().map(|e| e.as_slice()).unwrap_or(&[]) {
            if ext.extn_id.to_string() == CLAIMS_OID_TEXT {
                let text = std::str::from_utf8(ext.extn_value.as_bytes()).map_err(|_| {
                    CertError::BadClaims {
                        name: name.clone(),
                        why: "not UTF-8".into(),
                    }
                })?;
                claims = Some(serde_json::from_str::<Claims>(text).map_err(|e| {
                    CertError::BadClaims {
                        name: name.clone(),
                        why: e.to_string(),
                    }
                })?);
            } else if ext.extn_id == const_oid::db::rfc5280::ID_CE_BASIC_CONSTRAINTS {
                let bc =
                    x509_cert::ext::pkix::BasicConstraints::from_der(ext.extn_value.as_bytes())
                        .map_err(|e| CertError::Malformed(e.to_string()))?;
                is_ca = bc.ca;
            } else if ext.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
                let san = x509_cert::ext::pkix::SubjectAltName::from_der(ext.extn_value.as_bytes())
                    .map_err(|e| CertError::Malformed(e.to_string()))?;
                alt_names.extend(san.0);
            }
        }
        let claims = claims.ok_or_else(|| CertError::NoClaims(name.clone()))?;
        let bad = |why: String| CertError::BadClaims {
            name: name.clone(),
            why,
        };
        if claims.v != 1 {
            return Err(bad(format!("version {}", claims.v)));
        }
        let parse_nets = |v: &[String]| -> Result<Vec<IpNet>, CertError> {
            v.iter()
                .map(|s| {
                    s.parse::<IpNet>()
                        .map_err(|_| bad(format!("{s:?} is not a CIDR")))
                })
                .collect()
        };
        let ips = parse_nets(&claims.ips)?;
        let networks = parse_nets(&claims.networks)?;
        if is_ca != (claims.role == Some(Role::Ca)) {
            return Err(bad(
                "only CA certificates carry role ca, and they must".into()
            ));
        }
        if !is_ca && ips.is_empty() {
            return Err(CertError::NoIp(name));
        }
        constraints::check_claims(is_ca, &claims).map_err(bad)?;
        constraints::check_alt_names(&alt_names, &name, &ips).map_err(bad)?;
        let spki = tbs
            .subject_public_key_info()
            .to_der()
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        let mut key_hash = [0u8; 32];
        key_hash
            .copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki).as_ref());
        Ok(MeshCert {
            der: der.to_vec(),
            issuer: common_name(tbs.issuer()),
            is_ca,
            not_before: unix(&tbs.validity().not_before),
            not_after: unix(&tbs.validity().not_after),
            claims,
            ips,
            networks,
            serial: tbs.serial_number().as_bytes().to_vec(),
            key_hash,
            spki,
            alg,
            subject_der: tbs
                .subject()
                .to_der()
                .map_err(|e| CertError::Malformed(e.to_string()))?,
            issuer_der: tbs
                .issuer()
                .to_der()
                .map_err(|e| CertError::Malformed(e.to_string()))?,
            tbs: tbs
                .to_der()
                .map_err(|e| CertError::Malformed(e.to_string()))?,
            signature: c.signature().raw_bytes().to_vec(),
            name,
        })
    }

    /// The raw public key (for signature checks by children).
    fn public_key(&self) -> Result<Vec<u8>, CertError> {
        let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(&self.spki)
            .map_err(|e| CertError::Malformed(e.to_string()))?;
        Ok(spki.subject_public_key.raw_bytes().to_vec())
    }

    /// Whether `ca` issued this certificate: its subject is our issuer and its key signed us.
    pub fn issued_by(&self, ca: &MeshCert) -> bool {
        ca.subject_der == self.issuer_der && self.signed_by(ca).is_ok()
    }

    /// Whether `issuer` signed this certificate (names and signature; not constraints).
    fn signed_by(&self, issuer: &MeshCert) -> Result<(), CertError> {
        let pk = issuer.public_key()?;
        let ok = match issuer.alg_of_key() {
            Alg::Ed25519 => {
                UnparsedPublicKey::new(&ED25519, &pk).verify(&self.tbs, &self.signature)
            }
            Alg::P256 => UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &pk)
                .verify(&self.tbs, &self.signature),
        };
        // The algorithm this certificate says it was signed with must be the issuer key's.
        if ok.is_err() || self.alg != issuer.alg_of_key() {
            return Err(CertError::Signature {
                name: self.name.clone(),
                issuer: issuer.name.clone(),
            });
        }
        Ok(())
    }

    /// Checks a signature made with this certificate's key (TLS handshake signatures):
    /// Ed25519, or ECDSA P-256 with SHA-256 (ASN.1 signature).
    pub fn verify_with_key(&self, ed25519: bool, message: &[u8], signature: &[u8]) -> bool {
        let Ok(pk) = self.public_key() else {
            return false;
        };
        match (self.alg_of_key(), ed25519) {
            (Alg::Ed25519, true) => UnparsedPublicKey::new(&ED25519, &pk)
                .verify(message, signature)
                .is_ok(),
            (Alg::P256, false) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &pk)
                .verify(message, signature)
                .is_ok(),
            _ => false,
        }
    }

    /// Checks a signature made with this certificate's key, in the key's own algorithm
    /// (signed mesh documents: revocation lists, announcements).
    pub fn verify_signed(&self, message: &[u8], signature: &[u8]) -> bool {
        self.verify_with_key(self.alg_of_key() == Alg::Ed25519, message, signature)
    }

    fn alg_of_key(&self) -> Alg {
        // Ed25519 SPKIs are 44 bytes; P-256 ones are 91.
        if self.spki.len() < 60 {
            Alg::Ed25519
        } else {
            Alg::P256
        }
    }

    /// The overlay addresses (without prefix).
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.ips.iter().map(|n| n.addr()).collect()
    }
}

/// Verifies `chain` (leaf first, then intermediates) up to one of `roots` at `now` (Unix
/// seconds): names, signatures, CA flags, validity of every link, and constraints at every link.
/// Returns the leaf.
pub fn verify(chain: &[MeshCert], roots: &[MeshCert], now: u64) -> Result<MeshCert, CertError> {
    let Some(leaf) = chain.first() else {
        return Err(CertError::Malformed("empty chain".into()));
    };
    // A CA's own name and role are not bound by its issuer's names and roles (only what it
    // may grant is), so presented as a node it would slip past them.
    if leaf.is_ca {
        return Err(CertError::CaAsLeaf(leaf.name.clone()));
    }
    walk(chain, roots, now)
}

/// Verifies a CA's chain (the CA first, then those above it) up to one of `roots` at `now`, as
/// [`verify`] does a node's: for a signer to check, before it hands the chain out, that what
/// it issues will verify. One link shorter than [`verify`] allows, for the leaf it will sign.
pub fn verify_ca(chain: &[MeshCert], roots: &[MeshCert], now: u64) -> Result<MeshCert, CertError> {
    if chain.len() >= MAX_DEPTH {
        return Err(CertError::TooLong(MAX_DEPTH - 1));
    }
    match chain.first() {
        Some(ca) if ca.is_ca => walk(chain, roots, now),
        Some(c) => Err(CertError::Malformed(format!("{} is not a CA", c.name))),
        None => Err(CertError::Malformed("empty chain".into())),
    }
}

/// Longest chain [`verify`] accepts, leaf included.
const MAX_DEPTH: usize = 8;

fn walk(chain: &[MeshCert], roots: &[MeshCert], now: u64) -> Result<MeshCert, CertError> {
    if chain.len() > MAX_DEPTH {
        return Err(CertError::TooLong(MAX_DEPTH));
    }
    let Some(leaf) = chain.first() else {
        return Err(CertError::Malformed("empty chain".into()));
    };
    let mut cur = leaf;
    let mut rest = &chain[1..];
    for _ in 0..=MAX_DEPTH {
        time_ok(cur, now)?;
        // A trusted root that issued it ends the walk.
        if let Some(root) = roots
            .iter()
            .find(|r| r.subject_der == cur.issuer_der && cur.signed_by(r).is_ok())
        {
            time_ok(root, now)?;
            cur.within(root)?;
            return Ok(leaf.clone());
        }
        let Some((next, more)) = rest.split_first() else {
            return Err(CertError::UnknownIssuer {
                name: cur.name.clone(),
                issuer: cur.issuer.clone(),
            });
        };
        if next.subject_der != cur.issuer_der {
            return Err(CertError::UnknownIssuer {
                name: cur.name.clone(),
                issuer: cur.issuer.clone(),
            });
        }
        cur.signed_by(next)?;
        cur.within(next)?;
        cur = next;
        rest = more;
    }
    Err(CertError::TooLong(MAX_DEPTH))
}

fn time_ok(c: &MeshCert, now: u64) -> Result<(), CertError> {
    if now < c.not_before {
        return Err(CertError::NotYetValid {
            name: c.name.clone(),
            not_before: c.not_before,
            now,
        });
    }
    if now > c.not_after {
        return Err(CertError::Expired {
            name: c.name.clone(),
            not_after: c.not_after,
            now,
        });
    }
    Ok(())
}

/// Parses every certificate in a PEM (or single DER) file's bytes.
pub fn parse_bundle(bytes: &[u8]) -> Result<Vec<MeshCert>, CertError> {
    if bytes.len() > MAX_CERT * 8 {
        return Err(CertError::Malformed("bundle too large".into()));
    }
    if bytes.first() == Some(&0x30) {
        return Ok(vec![MeshCert::parse(bytes)?]);
    }
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ders = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    if ders.is_empty() {
        return Err(CertError::Malformed("no certificate in the file".into()));
    }
    ders.iter().map(|d| MeshCert::parse(d)).collect()
}

/// A new certificate to sign.
pub struct Request<'a> {
    pub name: &'a str,
    pub claims: Claims,
    pub is_ca: bool,
    pub not_before: u64,
    pub not_after: u64,
    pub curve: Curve,
}

/// A signed certificate and its new key (PKCS#8 PEM: secret).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

fn params(req: &Request<'_>) -> Result<rcgen::CertificateParams, CertError> {
    let e = |x: rcgen::Error| CertError::Issue(x.to_string());
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, req.name);
    let t = |s: u64| rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(s);
    p.not_before = t(req.not_before);
    p.not_after = t(req.not_after);
    p.is_ca = if req.is_ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        rcgen::IsCa::ExplicitNoCa
    };
    if req.is_ca {
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
    } else {
        // Subject alternative names as well, so standard TLS stacks (WebPKI) accept the same
        // certificate by name or overlay address; the mesh verifier itself reads the claims.
        for ip in &req.claims.ips {
            if let Ok(n) = ip.parse::<IpNet>() {
                p.subject_alt_names
                    .push(rcgen::SanType::IpAddress(n.addr()));
            }
        }
        let dns_ok = !req.name.is_empty()
            && req.name.len() <= 253
            && req.name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if dns_ok && let Ok(n) = rcgen::string::Ia5String::try_from(req.name) {
            p.subject_alt_names.push(rcgen::SanType::DnsName(n));
        }
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
    }
    let json = serde_json::to_vec(&req.claims).map_err(|x| CertError::Issue(x.to_string()))?;
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(CLAIMS_OID, json)];
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| CertError::Issue("no randomness".into()))?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(p)
}

fn new_key(curve: Curve) -> Result<rcgen::KeyPair, CertError> {
    let alg = match curve {
        Curve::Ed25519 => &rcgen::PKCS_ED25519,
        Curve::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    rcgen::KeyPair::generate_for(alg).map_err(|e| CertError::Issue(e.to_string()))
}

/// A new self-signed root CA.
pub fn new_root(req: &Request<'_>) -> Result<Issued, CertError> {
    let key = new_key(req.curve)?;
    let cert = params(req)?
        .self_signed(&key)
        .map_err(|e| CertError::Issue(e.to_string()))?;
    let issued = Issued {
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
    };
    // Refuse to write what verification would refuse.
    let c = MeshCert::parse(cert.der())?;
    c.within(&c)?;
    Ok(issued)
}

/// An Ed25519 public key held by someone else (a guest), to certify without its secret.
struct ForeignEd25519<'a>(&'a [u8; 32]);

impl rcgen::PublicKeyData for ForeignEd25519<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// A plain name: ASCII letters, digits, `-` and `_`, not empty. What a guest's VM id (its
/// certificate's name and single-label DNS name) and a tenant (its group, written into rules)
/// must be, so that neither can carry a service's DNS name or anything a rules file would parse.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A certificate for a key generated elsewhere (an attested guest's Ed25519 key): the DER.
/// Refused, like [`sign`], if its claims or validity do not lie within the CA's.
pub fn sign_for_key(
    ca: &MeshCert,
    ca_key_pem: &str,
    req: &Request<'_>,
    ed25519_public: &[u8; 32],
) -> Result<Vec<u8>, CertError> {
    let issuer = issuer_of(ca, ca_key_pem)?;
    let cert = params(req)?
        .signed_by(&ForeignEd25519(ed25519_public), &issuer)
        .map_err(|x| CertError::Issue(x.to_string()))?;
    let c = MeshCert::parse(cert.der())?;
    c.within(ca)?;
    c.signed_by(ca)?;
    Ok(cert.der().to_vec())
}

/// The [`MeshCert::key_hash`] of any certificate for this Ed25519 public key: SHA-256 of its
/// SubjectPublicKeyInfo. Revokes a key without holding its certificates.
pub fn ed25519_key_hash(public: &[u8; 32]) -> [u8; 32] {
    // SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) key }
    const PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let mut spki = PREFIX.to_vec();
    spki.extend_from_slice(public);
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki).as_ref());
    out
}

/// The CA as an rcgen issuer, after checking the key is the certificate's.
fn issuer_of(
    ca: &MeshCert,
    ca_key_pem: &str,
) -> Result<rcgen::Issuer<'static, rcgen::KeyPair>, CertError> {
    let e = |x: rcgen::Error| CertError::Issue(x.to_string());
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(e)?;
    if rcgen::PublicKeyData::subject_public_key_info(&ca_key) != ca.spki {
        return Err(CertError::Issue(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }
    // Rebuild the issuer from the CA's own name (rcgen encodes it as it did when creating it).
    let mut ip = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ip.distinguished_name = rcgen::DistinguishedName::new();
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, ca.name.as_str());
    Ok(rcgen::Issuer::new(ip, ca_key))
}

/// A certificate signed by the CA `ca` (with key `ca_key_pem`). Refused if its claims or
/// validity do not lie within the CA's.
pub fn sign(ca: &MeshCert, ca_key_pem: &str, req: &Request<'_>) -> Result<Issued, CertError> {
    let e = |x: rcgen::Error| CertError::Issue(x.to_string());
    let issuer = issuer_of(ca, ca_key_pem)?;
    let key = new_key(req.curve)?;
    let cert = params(req)?.signed_by(&key, &issuer).map_err(e)?;
    let c = MeshCert::parse(cert.der())?;
    c.within(ca)?;
    c.signed_by(ca)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
    })
}

/// Signs `message` with a PEM key that must belong to `cert` (Ed25519, or ECDSA P-256 SHA-256
/// ASN.1): what [`MeshCert::verify_signed`] checks.
pub fn sign_with(cert: &MeshCert, key_pem: &str, message: &[u8]) -> Result<Vec<u8>, CertError> {
    use rcgen::SigningKey;
    let e = |x: rcgen::Error| CertError::Issue(x.to_string());
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(e)?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != cert.spki {
        return Err(CertError::Issue(format!(
            "the key does not belong to certificate {}",
            cert.name
        )));
    }
    key.sign(message).map_err(e)
}

/// A CA held in memory, with what tests, benchmarks and demos need to stand up a mesh: a root
/// (Ed25519) and node certificates from it. Production CAs live in files (`attesta-mesh ca new`).
pub struct LocalCa {
    pub cert: MeshCert,
    pub pem: String,
    pub key: zeroize::Zeroizing<String>,
}

/// A node certificate issued by a [`LocalCa`], parsed.
pub struct LocalNode {
    pub issued: Issued,
    pub cert: MeshCert,
}

impl LocalCa {
    /// A new root valid over `[not_before, not_after]`; `networks` constrain what it hands out.
    pub fn root(
        name: &str,
        networks: &[&str],
        not_before: u64,
        not_after: u64,
    ) -> Result<LocalCa, CertError> {
        let i = new_root(&Request {
            name,
            claims: Claims {
                v: 1,
                role: Some(Role::Ca),
                networks: networks.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            },
            is_ca: true,
            not_before,
            not_after,
            curve: Curve::Ed25519,
        })?;
        let cert = parse_bundle(i.cert_pem.as_bytes())?.remove(0);
        Ok(LocalCa {
            cert,
            pem: i.cert_pem,
            key: i.key_pem,
        })
    }

    /// An intermediate CA under this one for `roles` within `networks` and `names` (e.g. the
    /// guests' CA a broker holds), valid over `[not_before, not_after]`. Its certificate is
    /// `cert`; a node it signs presents it after the leaf.
    pub fn intermediate(
        &self,
        name: &str,
        networks: &[&str],
        roles: &[Role],
        names: &[&str],
        not_before: u64,
        not_after: u64,
    ) -> Result<LocalCa, CertError> {
        let (i, cert) = self.sign_parsed(&Request {
            name,
            claims: Claims {
                v: 1,
                role: Some(Role::Ca),
                networks: networks.iter().map(|n| n.to_string()).collect(),
                roles: roles.to_vec(),
                names: names.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            },
            is_ca: true,
            not_before,
            not_after,
            curve: Curve::Ed25519,
        })?;
        Ok(LocalCa {
            cert,
            pem: i.cert_pem,
            key: i.key_pem,
        })
    }

    /// A node certificate (Ed25519) for `name` at overlay address `ip` (with prefix).
    pub fn issue(
        &self,
        name: &str,
        ip: &str,
        groups: &[&str],
        role: Role,
        not_before: u64,
        not_after: u64,
    ) -> Result<LocalNode, CertError> {
        let (issued, cert) = self.sign_parsed(&Request {
            name,
            claims: Claims {
                v: 1,
                ips: vec![ip.into()],
                groups: groups.iter().map(|g| g.to_string()).collect(),
                role: Some(role),
                ..Default::default()
            },
            is_ca: false,
            not_before,
            not_after,
            curve: Curve::Ed25519,
        })?;
        Ok(LocalNode { issued, cert })
    }

    /// `req` signed by this CA, and the certificate parsed.
    fn sign_parsed(&self, req: &Request<'_>) -> Result<(Issued, MeshCert), CertError> {
        let issued = sign(&self.cert, &self.key, req)?;
        let cert = parse_bundle(issued.cert_pem.as_bytes())?.remove(0);
        Ok((issued, cert))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    /// A certificate signed with the CA's key but without [`sign`]'s constraint check: what a
    /// careless or compromised signer could produce. Verification must still refuse it.
    fn forged(ca: &LocalCa, name: &str, ip: &str, groups: &[&str], until: u64) -> MeshCert {
        let req = Request {
            name,
            claims: Claims {
                v: 1,
                ips: vec![ip.into()],
                groups: groups.iter().map(|g| g.to_string()).collect(),
                role: Some(Role::Guest),
                ..Default::default()
            },
            is_ca: false,
            not_before: NOW - 60,
            not_after: until,
            curve: Curve::Ed25519,
        };
        let issuer = issuer_of(&ca.cert, &ca.key).unwrap();
        let key = new_key(Curve::Ed25519).unwrap();
        let cert = params(&req).unwrap().signed_by(&key, &issuer).unwrap();
        MeshCert::parse(cert.der()).unwrap()
    }

    #[test]
    fn a_keys_hash_is_the_hash_its_certificates_carry() {
        let ca = LocalCa::root("root", &[], NOW - 60, NOW + 60).unwrap();
        let public = [7u8; 32];
        let req = Request {
            name: "vm-1",
            claims: Claims {
                v: 1,
                ips: vec!["10.42.1.1/16".into()],
                role: Some(Role::Guest),
                ..Default::default()
            },
            is_ca: false,
            not_before: NOW - 60,
            not_after: NOW + 60,
            curve: Curve::Ed25519,
        };
        let der = sign_for_key(&ca.cert, &ca.key, &req, &public).unwrap();
        let c = MeshCert::parse(&der).unwrap();
        assert_eq!(c.key_hash, ed25519_key_hash(&public));
        assert_ne!(c.key_hash, ed25519_key_hash(&[8u8; 32]));
    }

    fn root() -> LocalCa {
        let i = new_root(&Request {
            name: "root",
            claims: Claims {
                v: 1,
                role: Some(Role::Ca),
                groups: vec!["tenant:a".into()],
                networks: vec!["10.42.0.0/16".into()],
                ..Default::default()
            },
            is_ca: true,
            not_before: NOW - 86_400,
            not_after: NOW + 86_400,
            curve: Curve::Ed25519,
        })
        .unwrap();
        LocalCa {
            cert: parse_bundle(i.cert_pem.as_bytes()).unwrap().remove(0),
            pem: i.cert_pem,
            key: i.key_pem,
        }
    }

    /// A sub-CA of `parent`, limited to role guest.
    fn sub_ca(parent: &MeshCert, key: &str, name: &str) -> (MeshCert, String) {
        let i = sign(
            parent,
            key,
            &Request {
                name,
                claims: Claims {
                    v: 1,
                    role: Some(Role::Ca),
                    groups: vec!["tenant:a".into()],
                    networks: vec!["10.42.0.0/16".into()],
                    roles: vec![Role::Guest],
                    ..Default::default()
                },
                is_ca: true,
                not_before: parent.not_before,
                not_after: parent.not_after,
                curve: Curve::Ed25519,
            },
        )
        .unwrap();
        (
            parse_bundle(i.cert_pem.as_bytes()).unwrap().remove(0),
            i.key_pem.to_string(),
        )
    }

    #[test]
    fn a_ca_chain_verifies_only_to_the_given_roots_and_leaves_room_for_a_leaf() {
        let ca = root();
        let (sub, sub_key) = sub_ca(&ca.cert, &ca.key, "guests");
        let roots = [ca.cert.clone()];
        assert_eq!(
            verify_ca(std::slice::from_ref(&sub), &roots, NOW)
                .unwrap()
                .name,
            "guests"
        );
        assert_eq!(
            verify_ca(&[sub.clone(), ca.cert.clone()], &roots, NOW)
                .unwrap()
                .name,
            "guests"
        );
        // Another root, even one named the same, or a chain that claims its own root: refused.
        let other = root();
        assert!(
            verify_ca(
                std::slice::from_ref(&sub),
                std::slice::from_ref(&other.cert),
                NOW
            )
            .is_err()
        );
        assert!(
            verify_ca(
                &[sub.clone(), ca.cert.clone()],
                std::slice::from_ref(&other.cert),
                NOW
            )
            .is_err()
        );
        // A node is not a CA chain; an empty chain is nothing.
        let node = forged(&ca, "n", "10.42.1.1/16", &["tenant:a"], NOW + 3600);
        assert!(verify_ca(&[node], &roots, NOW).is_err());
        assert!(verify_ca(&[], &roots, NOW).is_err());
        // Seven CAs under the root verify; eight would leave no room for the leaf.
        let mut chain = vec![sub.clone()];
        let mut key = sub_key;
        for n in 0..7 {
            let (next, k) = sub_ca(&chain[0], &key, &format!("sub-{n}"));
            chain.insert(0, next);
            key = k;
            let r = verify_ca(&chain, &roots, NOW);
            assert_eq!(
                r.is_ok(),
                chain.len() < MAX_DEPTH,
                "{} links: {r:?}",
                chain.len()
            );
        }
    }

    #[test]
    fn verification_enforces_the_issuers_constraints_not_only_signing() {
        let ca = root();
        let roots = [ca.cert.clone()];
        let ok = forged(&ca, "in", "10.42.1.1/16", &["tenant:a"], NOW + 3600);
        assert_eq!(verify(&[ok], &roots, NOW).unwrap().name, "in");
        let group = forged(&ca, "g", "10.42.1.2/16", &["tenant:b"], NOW + 3600);
        assert!(matches!(
            verify(&[group], &roots, NOW),
            Err(CertError::GroupOutside { .. })
        ));
        let net = forged(&ca, "n", "192.168.1.2/24", &["tenant:a"], NOW + 3600);
        assert!(matches!(
            verify(&[net], &roots, NOW),
            Err(CertError::NetworkOutside { .. })
        ));
        let long = forged(&ca, "l", "10.42.1.3/16", &["tenant:a"], NOW + 2 * 86_400);
        assert!(matches!(
            verify(&[long], &roots, NOW),
            Err(CertError::ValidityOutside { .. })
        ));
    }
}
