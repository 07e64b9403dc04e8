//! AMD's certificates (ARK, ASK, ASVK, VCEK, VLEK) and CRLs: parsing, AMD extensions, and
//! signature checks over the bytes as received.

use crate::Product;
use crate::der::{read_exact, read_tlv, uint};
use aws_lc_rs::signature::{self, ParsedPublicKey};
use der::{Decode, Encode};
use std::ops::Range;
use x509_cert::Certificate;
use x509_cert::crl::CertificateList;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};

const OID_RSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_SECP384R1: &str = "1.3.132.0.34";
const OID_BASIC_CONSTRAINTS: &str = "2.5.29.19";
const OID_KEY_USAGE: &str = "2.5.29.15";
const OID_SKI: &str = "2.5.29.14";
const OID_AKI: &str = "2.5.29.35";
const OID_CRL_DP: &str = "2.5.29.31";
const AMD_ARC: &str = "1.3.6.1.4.1.3704.1.";

/// RSASSA-PSS parameters AMD uses: SHA-384, MGF1 with SHA-384, salt 48, trailer 1 (explicit).
const PSS_SHA384_PARAMS: [u8; 59] = [
    0x30, 0x39, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
    0x02, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
    0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0xa2, 0x03, 0x02, 0x01, 0x30, 0xa3, 0x03, 0x02, 0x01, 0x01,
];

/// The same parameters in strict DER (the default trailer field omitted).
fn pss_params_ok(params: &[u8]) -> bool {
    if params == PSS_SHA384_PARAMS {
        return true;
    }
    let mut der = PSS_SHA384_PARAMS[..54].to_vec();
    der[1] = 0x34;
    params == der.as_slice()
}

/// The DER of the AMD PSS parameters, for issuers (the simulator) that must match AMD's profile.
pub fn amd_pss_params() -> &'static [u8] {
    &PSS_SHA384_PARAMS
}

/// Largest certificate or CRL accepted. AMD's are under 2 KiB; the bound keeps hostile input
/// from costing memory or time.
pub const MAX_CERT_LEN: usize = 64 * 1024;

/// Why a certificate or CRL could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not a certificate (neither DER nor PEM): {0}")]
    Encoding(String),
    #[error("certificate is not valid X.509 DER: {0}")]
    Der(String),
    #[error("CRL is not valid X.509 DER: {0}")]
    CrlDer(String),
    #[error("unsupported public key: {0}")]
    UnsupportedKey(String),
    #[error("{0} bytes is larger than any AMD certificate or CRL ({MAX_CERT_LEN} at most)")]
    TooLarge(usize),
    #[error("malformed AMD extension {oid}: {why}")]
    BadExtension { oid: String, why: &'static str },
}

/// How a certificate or CRL is signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SigAlg {
    /// RSASSA-PSS with SHA-384/MGF1-SHA-384/salt 48: what AMD's CAs use.
    RsaPssSha384,
    /// RSASSA-PSS with other parameters (rejected).
    RsaPssOther,
    /// Anything else, by OID (rejected).
    Other(String),
}

fn sig_alg(oid: &str, params: Option<&[u8]>) -> SigAlg {
    if oid == OID_RSA_PSS {
        match params {
            Some(p) if pss_params_ok(p) => SigAlg::RsaPssSha384,
            _ => SigAlg::RsaPssOther,
        }
    } else {
        SigAlg::Other(oid.to_string())
    }
}

/// A certificate's public key, in the form the verifier needs.
#[derive(Clone)]
pub enum PublicKey {
    /// RSA (ARK, ASK, ASVK): the RSAPublicKey DER.
    Rsa(Vec<u8>),
    /// ECDSA P-384 (VCEK, VLEK), pre-parsed for fast verification.
    EcP384(ParsedPublicKey),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicKey::Rsa(k) => write!(f, "Rsa({} bytes)", k.len()),
            PublicKey::EcP384(_) => f.write_str("EcP384"),
        }
    }
}

/// AMD's extensions of VCEK/VLEK certificates (arc 1.3.6.1.4.1.3704.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmdExtensions {
    pub struct_version: Option<u64>,
    pub product_name: Option<String>,
    pub bl_spl: Option<u8>,
    pub tee_spl: Option<u8>,
    pub snp_spl: Option<u8>,
    pub ucode_spl: Option<u8>,
    pub fmc_spl: Option<u8>,
    /// The hwID extension value as stored (raw or DER OCTET STRING); see [`AmdCert::hwid`].
    pub hwid_raw: Option<Vec<u8>>,
    pub csp_id: Option<String>,
}

/// A parsed AMD certificate. Keeps the DER as received; signatures are checked over its TBS bytes.
#[derive(Clone, Debug)]
pub struct AmdCert {
    der: Vec<u8>,
    tbs: Range<usize>,
    pub sig_alg: SigAlg,
    /// The TBS `signature` field must equal the outer one; false if they differ.
    pub sig_alg_consistent: bool,
    signature: Vec<u8>,
    pub subject_cn: Option<String>,
    pub issuer_cn: Option<String>,
    subject_name: Vec<u8>,
    issuer_name: Vec<u8>,
    /// Serial number: the DER INTEGER's content octets (`[0]` for AMD's VCEKs).
    pub serial: Vec<u8>,
    /// Validity, seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub key: PublicKey,
    pub amd: AmdExtensions,
    pub is_ca: bool,
    pub key_cert_sign: bool,
    pub crl_sign: bool,
    /// Critical extensions this crate does not understand (a certificate with any is rejected).
    pub unknown_critical: Vec<String>,
}

fn cn(name: &x509_cert::name::Name) -> Option<String> {
    name.common_name().ok().flatten().map(String::from)
}

/// The INTEGER's content octets as encoded (DER is minimal, so equal values have equal bytes,
/// and a negative serial never equals a positive one).
fn strip_serial(bytes: &[u8]) -> Vec<u8> {
    bytes.to_vec()
}

/// Returns the TBS range (offsets into `der`) of a SIGNED{...} structure.
fn tbs_range(der: &[u8]) -> Option<Range<usize>> {
    let outer = read_exact(der)?;
    if outer.tag != 0x30 {
        return None;
    }
    let (tbs, _) = read_tlv(outer.value)?;
    let start = der.len() - outer.value.len();
    Some(start..start + tbs.whole.len())
}

fn spl(oid: &str, value: &[u8]) -> Result<u8, CertError> {
    let bad = |why| CertError::BadExtension {
        oid: oid.to_string(),
        why,
    };
    let t = read_exact(value).ok_or(bad("not a DER INTEGER"))?;
    let v = uint(&t).ok_or(bad("not a non-negative INTEGER"))?;
    u8::try_from(v).map_err(|_| bad("SPL above 255"))
}

fn ia5(oid: &str, value: &[u8]) -> Result<String, CertError> {
    let bad = |why| CertError::BadExtension {
        oid: oid.to_string(),
        why,
    };
    let t = read_exact(value).ok_or(bad("not DER"))?;
    if t.tag != 0x16 && t.tag != 0x0c && t.tag != 0x13 {
        return Err(bad("not a string"));
    }
    std::str::from_utf8(t.value)
        .map(str::to_string)
        .map_err(|_| bad("not UTF-8"))
}

impl AmdCert {
    /// Parses a certificate given as DER or PEM (auto-detected).
    pub fn from_der_or_pem(bytes: &[u8]) -> Result<AmdCert, CertError> {
        let der = to_der(bytes)?;
        AmdCert::from_der(der)
    }

    /// Parses a DER certificate.
    pub fn from_der(der: Vec<u8>) -> Result<AmdCert, CertError> {
        if der.len() > MAX_CERT_LEN {
            return Err(CertError::TooLarge(der.len()));
        }
        let cert = Certificate::from_der(&der).map_err(|e| CertError::Der(e.to_string()))?;
        let tbs_r = tbs_range(&der).ok_or_else(|| CertError::Der("no TBS".into()))?;
        let tbs = cert.tbs_certificate();
        let outer_alg = cert.signature_algorithm();
        let params = |a: &spki::AlgorithmIdentifierOwned| {
            a.parameters.as_ref().and_then(|p| p.to_der().ok())
        };
        let sig_alg_v = sig_alg(&outer_alg.oid.to_string(), params(outer_alg).as_deref());
        let sig_alg_consistent = outer_alg == tbs.signature();
        let signature = cert
            .signature()
            .as_bytes()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();

        let spki = tbs.subject_public_key_info();
        let key_bits = spki.subject_public_key.as_bytes().ok_or_else(|| {
            CertError::UnsupportedKey("public key is not a whole number of bytes".into())
        })?;
        let key = match spki.algorithm.oid.to_string().as_str() {
            OID_RSA => PublicKey::Rsa(key_bits.to_vec()),
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                    .map(|o| o.to_string());
                if curve.as_deref() != Some(OID_SECP384R1) {
                    return Err(CertError::UnsupportedKey(format!(
                        "EC curve {curve:?}, expected P-384"
                    )));
                }
                let k = ParsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, key_bits)
                    .map_err(|e| CertError::UnsupportedKey(format!("bad P-384 point: {e}")))?;
                PublicKey::EcP384(k)
            }
            other => return Err(CertError::UnsupportedKey(format!("algorithm {other}"))),
        };

        let mut amd = AmdExtensions::default();
        let mut is_ca = false;
        let mut key_cert_sign = false;
        let mut crl_sign = false;
        let mut unknown_critical = Vec::new();
        for ext in tbs.extensions().into_iter().flatten() {
            let oid = ext.extn_id.to_string();
            let v = ext.extn_value.as_bytes();
            match oid.as_str() {
                OID_BASIC_CONSTRAINTS => {
                    let bc =
                        BasicConstraints::from_der(v).map_err(|e| CertError::Der(e.to_string()))?;
                    is_ca = bc.ca;
                }
                OID_KEY_USAGE => {
                    let ku = KeyUsage::from_der(v).map_err(|e| CertError::Der(e.to_string()))?;
                    key_cert_sign = ku.0.contains(KeyUsages::KeyCertSign);
                    crl_sign = ku.0.contains(KeyUsages::CRLSign);
                }
                OID_SKI | OID_AKI | OID_CRL_DP => {}
                o if o.starts_with(AMD_ARC) => match &o[AMD_ARC.len()..] {
                    "1" => {
                        let t = read_exact(v).ok_or(CertError::BadExtension {
                            oid: oid.clone(),
                            why: "not DER",
                        })?;
                        amd.struct_version = uint(&t);
                    }
                    "2" => amd.product_name = Some(ia5(o, v)?),
                    "3.1" => amd.bl_spl = Some(spl(o, v)?),
                    "3.2" => amd.tee_spl = Some(spl(o, v)?),
                    "3.3" => amd.snp_spl = Some(spl(o, v)?),
                    "3.8" => amd.ucode_spl = Some(spl(o, v)?),
                    "3.9" => amd.fmc_spl = Some(spl(o, v)?),
                    "4" => amd.hwid_raw = Some(v.to_vec()),
                    "5" => amd.csp_id = Some(ia5(o, v)?),
                    _ if ext.critical => unknown_critical.push(oid.clone()),
                    _ => {}
                },
                _ if ext.critical => unknown_critical.push(oid.clone()),
                _ => {}
            }
        }

        Ok(AmdCert {
            tbs: tbs_r,
            sig_alg: sig_alg_v,
            sig_alg_consistent,
            signature,
            subject_cn: cn(tbs.subject()),
            issuer_cn: cn(tbs.issuer()),
            subject_name: tbs.subject().to_der().unwrap_or_default(),
            issuer_name: tbs.issuer().to_der().unwrap_or_default(),
            serial: strip_serial(tbs.serial_number().as_bytes()),
            not_before: tbs.validity().not_before.to_unix_duration().as_secs(),
            not_after: tbs.validity().not_after.to_unix_duration().as_secs(),
            key,
            amd,
            is_ca,
            key_cert_sign,
            crl_sign,
            unknown_critical,
            der,
        })
    }

    /// The DER as received.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the DER, as a pinning/caching identity.
    pub fn fingerprint(&self) -> [u8; 32] {
        sha256(&self.der)
    }

    /// Whether `issuer`'s subject is this certificate's issuer (exact name match).
    pub fn issued_by_name(&self, issuer: &AmdCert) -> bool {
        self.issuer_name == issuer.subject_name
    }

    /// Whether subject and issuer names are equal (a self-issued root).
    pub fn self_issued(&self) -> bool {
        self.issuer_name == self.subject_name
    }

    /// Whether `at` (Unix seconds) lies within the validity period, inclusive.
    pub fn valid_at(&self, at: u64) -> bool {
        self.not_before <= at && at <= self.not_after
    }

    /// Checks this certificate's signature with `issuer`'s key: RSASSA-PSS SHA-384 only.
    pub fn signature_valid(&self, issuer: &AmdCert) -> bool {
        self.sig_alg == SigAlg::RsaPssSha384
            && self.sig_alg_consistent
            && rsa_pss_verify(issuer, &self.der[self.tbs.clone()], &self.signature)
    }

    /// The hwID extension's 64- or 8-byte value, decoding both AMD's raw and DER encodings.
    pub fn hwid(&self, product: Product) -> Option<Vec<u8>> {
        let raw = self.amd.hwid_raw.as_deref()?;
        let n = product.hwid_len();
        if raw.len() == n {
            return Some(raw.to_vec());
        }
        match read_exact(raw) {
            Some(t) if t.tag == 0x04 && t.value.len() == n => Some(t.value.to_vec()),
            _ => None,
        }
    }

    /// The product named by the productName extension, if any.
    pub fn product(&self) -> Option<Product> {
        self.amd
            .product_name
            .as_deref()
            .and_then(Product::from_product_name)
    }
}

fn rsa_pss_verify(issuer: &AmdCert, msg: &[u8], sig: &[u8]) -> bool {
    match &issuer.key {
        PublicKey::Rsa(k) => {
            signature::UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA384, k)
                .verify(msg, sig)
                .is_ok()
        }
        PublicKey::EcP384(_) => false,
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// DER from DER-or-PEM input (the first PEM block when PEM).
pub fn to_der(bytes: &[u8]) -> Result<Vec<u8>, CertError> {
    if bytes.len() > 4 * MAX_CERT_LEN {
        return Err(CertError::TooLarge(bytes.len()));
    }
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    pem_blocks(bytes)?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::Encoding("no PEM block found".into()))
}

/// PEM (RFC 7468: 64 columns, LF) with `label` around DER. Empty only for a label RFC 7468
/// forbids, which no caller passes (they are constants such as "CERTIFICATE").
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// Every PEM block in `bytes`, as DER, in order.
pub fn pem_blocks(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| CertError::Encoding("neither DER nor UTF-8 PEM".into()))?;
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let end_marker = block
            .find("-----END ")
            .ok_or_else(|| CertError::Encoding("PEM block without END line".into()))?;
        let after_end = &block[end_marker + 9..];
        let close = after_end
            .find("-----")
            .ok_or_else(|| CertError::Encoding("malformed PEM END line".into()))?;
        let whole = &block[..end_marker + 9 + close + 5];
        let (_label, der) = der::pem::decode_vec(whole.as_bytes())
            .map_err(|e| CertError::Encoding(e.to_string()))?;
        out.push(der);
        rest = &block[end_marker + 9 + close + 5..];
    }
    if out.is_empty() {
        return Err(CertError::Encoding("no PEM block found".into()));
    }
    Ok(out)
}

/// A parsed CRL. Keeps its DER; its signature is checked over the TBS bytes as received.
#[derive(Clone, Debug)]
pub struct Crl {
    der: Vec<u8>,
    tbs: Range<usize>,
    sig_alg: SigAlg,
    sig_alg_consistent: bool,
    signature: Vec<u8>,
    issuer_name: Vec<u8>,
    pub issuer_cn: Option<String>,
    pub this_update: u64,
    pub next_update: Option<u64>,
    /// Revoked serial numbers (big-endian magnitude, no leading zeros).
    pub revoked: Vec<Vec<u8>>,
    pub unknown_critical: Vec<String>,
}

impl Crl {
    /// Parses a CRL given as DER or PEM.
    pub fn from_der_or_pem(bytes: &[u8]) -> Result<Crl, CertError> {
        let der = to_der(bytes)?;
        if der.len() > MAX_CERT_LEN {
            return Err(CertError::TooLarge(der.len()));
        }
        let crl = CertificateList::<x509_cert::certificate::Rfc5280>::from_der(&der)
            .map_err(|e| CertError::CrlDer(e.to_string()))?;
        let tbs = tbs_range(&der).ok_or_else(|| CertError::CrlDer("no TBS".into()))?;
        let t = &crl.tbs_cert_list;
        let params = crl
            .signature_algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.to_der().ok());
        let mut unknown_critical = Vec::new();
        for ext in t.crl_extensions.iter().flatten() {
            let oid = ext.extn_id.to_string();
            // CRL number (2.5.29.20) and authority key id are informational.
            if ext.critical && oid != "2.5.29.20" && oid != OID_AKI {
                unknown_critical.push(oid);
            }
        }
        for rc in t.revoked_certificates.iter().flatten() {
            for ext in rc.crl_entry_extensions.iter().flatten() {
                if ext.critical {
                    unknown_critical.push(ext.extn_id.to_string());
                }
            }
        }
        Ok(Crl {
            sig_alg: sig_alg(&crl.signature_algorithm.oid.to_string(), params.as_deref()),
            sig_alg_consistent: crl.signature_algorithm == t.signature,
            signature: crl
                .signature
                .as_bytes()
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
            issuer_name: t.issuer.to_der().unwrap_or_default(),
            issuer_cn: cn(&t.issuer),
            this_update: t.this_update.to_unix_duration().as_secs(),
            next_update: t.next_update.map(|n| n.to_unix_duration().as_secs()),
            revoked: t
                .revoked_certificates
                .iter()
                .flatten()
                .map(|r| strip_serial(r.serial_number.as_bytes()))
                .collect(),
            unknown_critical,
            tbs,
            der,
        })
    }

    /// The DER as received.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Whether the CRL is issued and correctly signed by `ark`.
    pub fn signed_by(&self, ark: &AmdCert) -> bool {
        self.issuer_name == ark.subject_name
            && ark.crl_sign
            && self.sig_alg == SigAlg::RsaPssSha384
            && self.sig_alg_consistent
            && self.unknown_critical.is_empty()
            && rsa_pss_verify(ark, &self.der[self.tbs.clone()], &self.signature)
    }

    /// Whether the CRL is current at `at`: issued no later than `at` and not past nextUpdate.
    /// A CRL without nextUpdate is never considered fresh.
    pub fn fresh_at(&self, at: u64) -> bool {
        self.this_update <= at && self.next_update.is_some_and(|n| at <= n)
    }

    /// Whether `cert`'s serial number is listed.
    pub fn revokes(&self, cert: &AmdCert) -> bool {
        self.revoked.contains(&cert.serial)
    }
}
