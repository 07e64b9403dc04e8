//! A simulated AMD key hierarchy in AMD's certificate profile: ARK → ASK → VCEK per chip and
//! ARK → ASVK → VLEK, RSA-4096 with RSASSA-PSS/SHA-384 for the CAs, ECDSA P-384 for the
//! endorsement keys, AMD's names and extensions. Plus ARK-signed CRLs and report signing.

use crate::der::*;
use crate::seed::{Seed, hash};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use rsa::PrivateKey as RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use snp::certs::amd_pss_params;
use snp::report::{REPORT_LEN, ReportBody, SIGNED_LEN, Signature};
use snp::{Product, Tcb};
use std::path::{Path, PathBuf};

const OID_RSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P384: &str = "1.3.132.0.34";
const AMD: &str = "1.3.6.1.4.1.3704.1.";

/// Something the simulated key hierarchy could not do.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("key generation failed")]
    KeyGen,
    #[error("signing failed")]
    Sign,
    #[error("simulator state {path}: {why}")]
    State { path: String, why: String },
}

/// Version of the certificate profile and key derivation. Saved hierarchies are kept per version,
/// so a change to either never reuses certificates made by an older simulator.
pub const PROFILE_VERSION: u32 = 2;

/// An X.509 extension: (OID, critical, DER value).
pub type Ext = (String, bool, Vec<u8>);

/// AMD's distinguished name with the given common name.
pub fn amd_name(cn: &str) -> Vec<u8> {
    let rdn = |o: &str, v: Vec<u8>| set(&[seq(&[oid(o), v])]);
    seq(&[
        rdn("2.5.4.11", utf8("Engineering")),
        rdn("2.5.4.6", printable("US")),
        rdn("2.5.4.7", utf8("Santa Clara")),
        rdn("2.5.4.8", utf8("CA")),
        rdn("2.5.4.10", utf8("Advanced Micro Devices")),
        rdn("2.5.4.3", utf8(cn)),
    ])
}

fn pss_alg() -> Vec<u8> {
    seq(&[oid(OID_RSA_PSS), amd_pss_params().to_vec()])
}

/// What goes into one certificate.
#[derive(Clone, Debug)]
pub struct CertSpec {
    pub serial: Vec<u8>,
    pub issuer_cn: String,
    pub subject_cn: String,
    pub not_before: u64,
    pub not_after: u64,
    /// SubjectPublicKeyInfo DER.
    pub spki: Vec<u8>,
    pub extensions: Vec<Ext>,
}

/// An RSA CA key and its certificate.
pub struct Ca {
    key: RsaPrivateKey,
    /// Seeds the PSS salts, so the same content always gets the same signature.
    seed: Seed,
    pub cert: Vec<u8>,
    pub cn: String,
}

impl Ca {
    /// SubjectPublicKeyInfo of this CA's key.
    pub fn spki(&self) -> Vec<u8> {
        rsa_spki(&self.key)
    }

    /// Signs a certificate described by `spec` with this CA's key (RSASSA-PSS, AMD parameters).
    pub fn sign_cert(&self, spec: &CertSpec) -> Result<Vec<u8>, SimError> {
        sign_cert(&self.key, &self.seed, spec)
    }

    /// Signs a CRL listing `revoked` serials (big-endian bytes).
    pub fn sign_crl(
        &self,
        revoked: &[Vec<u8>],
        this_update: u64,
        next_update: Option<u64>,
    ) -> Result<Vec<u8>, SimError> {
        let mut tbs = vec![uint(1), pss_alg(), amd_name(&self.cn), time(this_update)];
        if let Some(n) = next_update {
            tbs.push(time(n));
        }
        if !revoked.is_empty() {
            let entries: Vec<Vec<u8>> = revoked
                .iter()
                .map(|s| seq(&[uint_bytes(s), time(this_update)]))
                .collect();
            tbs.push(seq(&entries));
        }
        signed(&self.key, &self.seed, seq(&tbs))
    }
}

/// The RSAPublicKey DER of a key (the subjectPublicKey bits).
fn rsa_pk(key: &RsaPrivateKey) -> Vec<u8> {
    key.to_public_key()
        .to_pkcs1_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default()
}

fn rsa_spki(key: &RsaPrivateKey) -> Vec<u8> {
    seq(&[seq(&[oid(OID_RSA), null()]), bits(&rsa_pk(key))])
}

/// SIGNED{tbs}: the TBS, AMD's PSS algorithm identifier and the signature.
fn signed(key: &RsaPrivateKey, seed: &Seed, tbs: Vec<u8>) -> Result<Vec<u8>, SimError> {
    let sig = rsa_sign(key, seed, &tbs)?;
    Ok(seq(&[tbs, pss_alg(), bits(&sig)]))
}

/// RSASSA-PSS, SHA-384, salt 48 (AMD's parameters), salt drawn from a seeded RNG.
fn rsa_sign(key: &RsaPrivateKey, seed: &Seed, msg: &[u8]) -> Result<Vec<u8>, SimError> {
    let signer = rsa::pss::SigningKey::<rsa::sha2::Sha384>::new_with_salt_len(key.clone(), 48);
    let mut rng = seed.rng(&hash(&[b"pss", msg]));
    let sig = signer
        .try_sign_with_rng(&mut rng, msg)
        .map_err(|_| SimError::Sign)?;
    Ok(sig.to_vec())
}

fn rsa_generate(seed: &Seed, label: &str) -> Result<RsaPrivateKey, SimError> {
    RsaPrivateKey::new(&mut seed.rng(label.as_bytes()), 4096).map_err(|_| SimError::KeyGen)
}

fn sign_cert(key: &RsaPrivateKey, seed: &Seed, spec: &CertSpec) -> Result<Vec<u8>, SimError> {
    let exts: Vec<Vec<u8>> = spec
        .extensions
        .iter()
        .map(|(o, crit, v)| {
            let mut parts = vec![oid(o)];
            if *crit {
                parts.push(boolean(true));
            }
            parts.push(octets(v));
            seq(&parts)
        })
        .collect();
    let mut tbs = vec![
        explicit(0, &uint(2)),
        uint_bytes(&spec.serial),
        pss_alg(),
        amd_name(&spec.issuer_cn),
        seq(&[time(spec.not_before), time(spec.not_after)]),
        amd_name(&spec.subject_cn),
        spec.spki.clone(),
    ];
    if !exts.is_empty() {
        tbs.push(explicit(3, &seq(&exts)));
    }
    signed(key, seed, seq(&tbs))
}

/// RFC 5280 key identifier: SHA-1 of the subjectPublicKey bits.
fn key_id(key: &RsaPrivateKey) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &rsa_pk(key))
        .as_ref()
        .to_vec()
}

/// The extensions of AMD's ARK (root) and ASK/ASVK, in AMD's order.
fn ca_exts(
    root: bool,
    product: Product,
    vlek: bool,
    subject: &RsaPrivateKey,
    issuer: &RsaPrivateKey,
) -> Vec<Ext> {
    let crl = format!(
        "https://kdsintf.amd.com/{}/v1/{}/crl",
        if vlek { "vlek" } else { "vcek" },
        product.name()
    );
    let dp = seq(&[seq(&[explicit(
        0,
        &explicit(0, &tlv(0x86, crl.as_bytes())),
    )])]);
    let ski = ("2.5.29.14".to_string(), false, octets(&key_id(subject)));
    if root {
        vec![
            ("2.5.29.15".into(), true, vec![0x03, 0x02, 0x01, 0x06]), // keyCertSign, cRLSign
            ski,
            ("2.5.29.19".into(), true, seq(&[boolean(true)])),
            ("2.5.29.31".into(), false, dp),
        ]
    } else {
        vec![
            ski,
            (
                "2.5.29.35".into(),
                false,
                seq(&[tlv(0x80, &key_id(issuer))]),
            ),
            ("2.5.29.19".into(), true, seq(&[boolean(true), uint(0)])),
            ("2.5.29.15".into(), true, vec![0x03, 0x02, 0x02, 0x04]), // keyCertSign
            ("2.5.29.31".into(), false, dp),
        ]
    }
}

/// AMD numbers its CA certificates by product: 0x01…… Milan, 0x02…… Genoa, 0x03…… Turin.
/// (Genoa's ASK in use is the re-issued 0x020002.)
fn ca_serial(product: Product, vlek: u8, sub: u8) -> Vec<u8> {
    match (product, vlek, sub) {
        (Product::Milan, v, s) => vec![1, v, s],
        (Product::Genoa, 0, 1) => vec![2, 0, 2],
        (Product::Genoa, v, s) => vec![2, v, s],
        (Product::Turin, v, s) => vec![3, v, s],
    }
}

/// Validity of a product's CA certificates: AMD's 25 years from the product's ARK date.
fn ca_validity(product: Product) -> (u64, u64) {
    let start = match product {
        Product::Milan => 1_603_324_800, // 2020-10-22
        Product::Genoa => 1_643_155_200, // 2022-01-26
        Product::Turin => 1_684_108_800, // 2023-05-15
    };
    (start, start + 9_131 * 86_400) // 25 years (including 6 leap days)
}

/// An endorsement key (VCEK or VLEK) and its certificate.
pub struct Vcek {
    pub key: EcdsaKeyPair,
    pub cert: Vec<u8>,
}

impl Vcek {
    /// Signs a report body in place (bytes 0x000..0x2A0) and returns the full report.
    pub fn sign_report(&self, body: &mut ReportBody) -> Result<[u8; REPORT_LEN], SimError> {
        body.signature = Signature::default();
        let bytes = body.encode();
        let sig = self
            .key
            .sign(&SystemRandom::new(), &bytes[..SIGNED_LEN])
            .map_err(|_| SimError::Sign)?;
        let rs: [u8; 96] = sig.as_ref().try_into().map_err(|_| SimError::Sign)?;
        body.signature = Signature::from_fixed_be(&rs);
        Ok(body.encode())
    }
}

/// A simulated product key hierarchy.
pub struct Pki {
    pub product: Product,
    pub seed: Seed,
    pub ark: Ca,
    pub ask: Ca,
    pub asvk: Ca,
}

/// The P-384 group order, big-endian.
const P384_N: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];

/// An ECDSA P-384 key derived from a seed and a label (a scalar in [1, n-1]).
pub fn p384_key(seed: &Seed, label: &[u8]) -> Result<EcdsaKeyPair, SimError> {
    for counter in 0u32..64 {
        let a = hash(&[&seed.0, b"p384", label, &counter.to_be_bytes(), b"a"]);
        let b = hash(&[&seed.0, b"p384", label, &counter.to_be_bytes(), b"b"]);
        let mut d = [0u8; 48];
        d[..32].copy_from_slice(&a);
        d[32..].copy_from_slice(&b[..16]);
        if d == [0u8; 48] || d >= P384_N {
            continue;
        }
        // RFC 5915 ECPrivateKey; aws-lc computes the public point.
        let der = seq(&[uint(1), octets(&d), explicit(0, &oid(OID_P384))]);
        return EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_FIXED_SIGNING, &der)
            .map_err(|_| SimError::KeyGen);
    }
    Err(SimError::KeyGen)
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::State {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

impl Pki {
    /// A fresh hierarchy from a random seed.
    pub fn generate(product: Product) -> Result<Pki, SimError> {
        Pki::from_seed(product, Seed::random())
    }

    /// The hierarchy for a seed: the same seed gives the same keys and certificates, byte for byte.
    pub fn from_seed(product: Product, seed: Seed) -> Result<Pki, SimError> {
        let p = product.name();
        let seed = seed.derive(p.as_bytes());
        let (ca_not_before, ca_not_after) = ca_validity(product);
        let ark_key = rsa_generate(&seed, "ark")?;
        let ark_cn = format!("ARK-{p}");
        let ark_seed = seed.derive(b"ark-sign");
        let ark_cert = sign_cert(
            &ark_key,
            &ark_seed,
            &CertSpec {
                serial: ca_serial(product, 0, 0),
                issuer_cn: ark_cn.clone(),
                subject_cn: ark_cn.clone(),
                not_before: ca_not_before,
                not_after: ca_not_after,
                spki: rsa_spki(&ark_key),
                extensions: ca_exts(true, product, false, &ark_key, &ark_key),
            },
        )?;
        let ark = Ca {
            key: ark_key,
            seed: ark_seed,
            cert: ark_cert,
            cn: ark_cn.clone(),
        };
        let sub = |label: &str, cn: String, serial: Vec<u8>, vlek: bool| -> Result<Ca, SimError> {
            let key = rsa_generate(&seed, label)?;
            let cert = ark.sign_cert(&CertSpec {
                serial,
                issuer_cn: ark_cn.clone(),
                subject_cn: cn.clone(),
                not_before: ca_not_before,
                not_after: ca_not_after,
                spki: rsa_spki(&key),
                extensions: ca_exts(false, product, vlek, &key, &ark.key),
            })?;
            Ok(Ca {
                key,
                seed: seed.derive(format!("{label}-sign").as_bytes()),
                cert,
                cn,
            })
        };
        let ask = sub("ask", format!("SEV-{p}"), ca_serial(product, 0, 1), false)?;
        let asvk = sub(
            "asvk",
            format!("SEV-VLEK-{p}"),
            ca_serial(product, 1, 1),
            true,
        )?;
        Ok(Pki {
            product,
            seed,
            ark,
            ask,
            asvk,
        })
    }

    /// Writes the hierarchy to `dir` (private keys as PKCS#8 with mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), SimError> {
        std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
        let write = |name: &str, bytes: &[u8], secret: bool| -> Result<(), SimError> {
            let path = dir.join(name);
            write_file(&path, bytes, secret).map_err(|e| state_err(&path, e))
        };
        write("seed", hex::encode(self.seed.0).as_bytes(), true)?;
        for (name, ca) in [("ark", &self.ark), ("ask", &self.ask), ("asvk", &self.asvk)] {
            let key = ca.key.to_pkcs8_der().map_err(|e| state_err(dir, e))?;
            write(&format!("{name}.key"), key.as_bytes(), true)?;
            write(&format!("{name}.der"), &ca.cert, false)?;
        }
        write("product", self.product.name().as_bytes(), false)
    }

    /// Reads a hierarchy written by [`save`](Self::save).
    pub fn load(dir: &Path) -> Result<Pki, SimError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| state_err(&path, e))
        };
        let text = |name: &str| -> Result<String, SimError> {
            String::from_utf8(read(name)?).map_err(|e| state_err(&dir.join(name), e))
        };
        let product: Product = text("product")?
            .trim()
            .parse()
            .map_err(|e| state_err(dir, e))?;
        let seed_bytes = hex::decode(text("seed")?.trim()).map_err(|e| state_err(dir, e))?;
        let seed = Seed(
            seed_bytes
                .try_into()
                .map_err(|_| state_err(&dir.join("seed"), "not 32 bytes"))?,
        );
        let ca = |name: &str| -> Result<Ca, SimError> {
            let key = RsaPrivateKey::from_pkcs8_der(&read(&format!("{name}.key"))?)
                .map_err(|e| state_err(&dir.join(format!("{name}.key")), e))?;
            let cert = read(&format!("{name}.der"))?;
            let cn = snp::AmdCert::from_der(cert.clone())
                .ok()
                .and_then(|c| c.subject_cn)
                .ok_or_else(|| state_err(&dir.join(format!("{name}.der")), "not a certificate"))?;
            Ok(Ca {
                key,
                seed: seed.derive(format!("{name}-sign").as_bytes()),
                cert,
                cn,
            })
        };
        Ok(Pki {
            product,
            seed,
            ark: ca("ark")?,
            ask: ca("ask")?,
            asvk: ca("asvk")?,
        })
    }

    /// AMD's VCEK/VLEK extensions for a TCB (and hwID or CSP id).
    pub fn endorsement_exts(
        &self,
        tcb: &Tcb,
        hwid: Option<&[u8]>,
        csp_id: Option<&str>,
    ) -> Vec<Ext> {
        let spl = |n: &str, v: u8| (format!("{AMD}3.{n}"), false, uint(u64::from(v)));
        let product_name = match self.product {
            Product::Milan => "Milan-B0",
            Product::Genoa => "Genoa-B1",
            Product::Turin => "Turin",
        };
        let mut v = vec![
            (format!("{AMD}1"), false, uint(1)),
            (format!("{AMD}2"), false, ia5(product_name)),
        ];
        if let Some(f) = tcb.fmc.filter(|_| self.product.has_fmc()) {
            v.push(spl("9", f));
        }
        v.extend([spl("1", tcb.bootloader), spl("2", tcb.tee)]);
        for reserved in ["4", "5", "6", "7"] {
            v.push(spl(reserved, 0));
        }
        v.extend([spl("3", tcb.snp), spl("8", tcb.microcode)]);
        if let Some(h) = hwid {
            v.push((format!("{AMD}4"), false, octets(h)));
        }
        if let Some(c) = csp_id {
            v.push((format!("{AMD}5"), false, ia5(c)));
        }
        v
    }

    /// Issues a VCEK for `chip_id` at `tcb` (serial 0, like AMD's), valid for seven years.
    pub fn issue_vcek(
        &self,
        chip_id: &[u8; 64],
        tcb: &Tcb,
        not_before: u64,
    ) -> Result<Vcek, SimError> {
        let hwid = &chip_id[..self.product.hwid_len()];
        let exts = self.endorsement_exts(tcb, Some(hwid), None);
        let label = [
            b"vcek".as_slice(),
            chip_id,
            &tcb.encode(self.product).to_le_bytes(),
        ]
        .concat();
        let key = p384_key(&self.seed, &label)?;
        self.issue_with_key(
            key,
            &self.ask,
            "SEV-VCEK",
            exts,
            not_before,
            not_before + 7 * 365 * 86_400,
        )
    }

    /// Issues a VLEK for a cloud provider at `tcb`, valid for one year.
    pub fn issue_vlek(&self, csp_id: &str, tcb: &Tcb, not_before: u64) -> Result<Vcek, SimError> {
        let exts = self.endorsement_exts(tcb, None, Some(csp_id));
        let label = [
            b"vlek".as_slice(),
            csp_id.as_bytes(),
            &tcb.encode(self.product).to_le_bytes(),
        ]
        .concat();
        let key = p384_key(&self.seed, &label)?;
        self.issue_with_key(
            key,
            &self.asvk,
            "SEV-VLEK",
            exts,
            not_before,
            not_before + 365 * 86_400,
        )
    }

    /// Issues an endorsement key with arbitrary extensions and validity (for negative tests).
    pub fn issue_endorsement(
        &self,
        issuer: &Ca,
        cn: &str,
        extensions: Vec<Ext>,
        not_before: u64,
        not_after: u64,
    ) -> Result<Vcek, SimError> {
        let key = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
            .map_err(|_| SimError::KeyGen)?;
        self.issue_with_key(key, issuer, cn, extensions, not_before, not_after)
    }

    /// Issues a certificate for a given endorsement key.
    pub fn issue_with_key(
        &self,
        key: EcdsaKeyPair,
        issuer: &Ca,
        cn: &str,
        extensions: Vec<Ext>,
        not_before: u64,
        not_after: u64,
    ) -> Result<Vcek, SimError> {
        let spki = seq(&[
            seq(&[oid(OID_EC), oid(OID_P384)]),
            bits(key.public_key().as_ref()),
        ]);
        let cert = issuer.sign_cert(&CertSpec {
            serial: vec![0],
            issuer_cn: issuer.cn.clone(),
            subject_cn: cn.to_string(),
            not_before,
            not_after,
            spki,
            extensions,
        })?;
        Ok(Vcek { key, cert })
    }
}

/// Where simulated hierarchies are kept: `$ATTESTA_SIM_STATE`, else `$XDG_CACHE_HOME/attesta-sim`,
/// else `~/.cache/attesta-sim`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ATTESTA_SIM_STATE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("attesta-sim");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache/attesta-sim")
}

impl Pki {
    /// The hierarchy for (product, seed): loaded from `state`, else generated (deterministically,
    /// so every process derives the same one) and saved there. `note` hears about slow work.
    pub fn cached(
        product: Product,
        seed: &Seed,
        state: &Path,
        note: impl Fn(&str),
    ) -> Result<Pki, String> {
        let dir = state
            .join(format!("v{PROFILE_VERSION}"))
            .join(seed.id())
            .join(product.name().to_lowercase());
        if let Ok(p) = Pki::load(&dir)
            && p.product == product
        {
            return Ok(p);
        }
        note(&format!(
            "generating the simulated {product} key hierarchy (RSA-4096, a few seconds; kept in {})",
            dir.display()
        ));
        let p = Pki::from_seed(product, *seed).map_err(|e| e.to_string())?;
        if let Err(e) = p.save(&dir) {
            note(&format!(
                "note: could not keep the hierarchy ({e}); it will be generated again next time"
            ));
        }
        Ok(p)
    }
}

/// Writes a file; secrets get mode 0600 from creation on.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
