//! A simulated AMD key hierarchy in AMD's certificate profile: ARK → ASK → VCEK per chip and
//! ARK → ASVK → VLEK, RSA-4096 with RSASSA-PSS/SHA-384 for the CAs, ECDSA P-384 for the
//! endorsement keys, AMD's names and extensions. Plus ARK-signed CRLs and report signing.

use crate::der::*;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PSS_SHA384,
};
use snp::certs::amd_pss_params;
use snp::report::{REPORT_LEN, ReportBody, SIGNED_LEN, Signature};
use snp::{Product, Tcb};

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
}

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
    key: RsaKeyPair,
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
        sign_cert(&self.key, spec)
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
        let tbs = seq(&tbs);
        let sig = rsa_sign(&self.key, &tbs)?;
        Ok(seq(&[tbs, pss_alg(), bits(&sig)]))
    }
}

fn rsa_spki(key: &RsaKeyPair) -> Vec<u8> {
    seq(&[
        seq(&[oid(OID_RSA), null()]),
        bits(key.public_key().as_ref()),
    ])
}

fn rsa_sign(key: &RsaKeyPair, msg: &[u8]) -> Result<Vec<u8>, SimError> {
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(&RSA_PSS_SHA384, &SystemRandom::new(), msg, &mut sig)
        .map_err(|_| SimError::Sign)?;
    Ok(sig)
}

fn sign_cert(key: &RsaKeyPair, spec: &CertSpec) -> Result<Vec<u8>, SimError> {
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
    let tbs = seq(&tbs);
    let sig = rsa_sign(key, &tbs)?;
    Ok(seq(&[tbs, pss_alg(), bits(&sig)]))
}

fn ca_exts(root: bool, product: Product, vlek: bool) -> Vec<Ext> {
    let ku = if root {
        vec![0x03, 0x02, 0x01, 0x06]
    } else {
        vec![0x03, 0x02, 0x02, 0x04]
    };
    let bc = if root {
        seq(&[boolean(true)])
    } else {
        seq(&[boolean(true), uint(0)])
    };
    let crl = format!(
        "https://kdsintf.amd.com/{}/v1/{}/crl",
        if vlek { "vlek" } else { "vcek" },
        product.name()
    );
    let dp = seq(&[seq(&[explicit(
        0,
        &explicit(0, &tlv(0x86, crl.as_bytes())),
    )])]);
    vec![
        ("2.5.29.15".into(), true, ku),
        ("2.5.29.19".into(), true, bc),
        ("2.5.29.31".into(), false, dp),
    ]
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
    pub ark: Ca,
    pub ask: Ca,
    pub asvk: Ca,
}

/// 2020-01-01T00:00:00Z and 2045-01-01T00:00:00Z: CA validity like AMD's 25 years.
const CA_NOT_BEFORE: u64 = 1_577_836_800;
const CA_NOT_AFTER: u64 = 2_366_841_600;

impl Pki {
    /// Generates a fresh hierarchy (RSA-4096 ARK, ASK and ASVK).
    pub fn generate(product: Product) -> Result<Pki, SimError> {
        let p = product.name();
        let gen_key = || RsaKeyPair::generate(KeySize::Rsa4096).map_err(|_| SimError::KeyGen);
        let ark_key = gen_key()?;
        let ark_cn = format!("ARK-{p}");
        let ark_cert = sign_cert(
            &ark_key,
            &CertSpec {
                serial: vec![0x01, 0x00, 0x00],
                issuer_cn: ark_cn.clone(),
                subject_cn: ark_cn.clone(),
                not_before: CA_NOT_BEFORE,
                not_after: CA_NOT_AFTER,
                spki: rsa_spki(&ark_key),
                extensions: ca_exts(true, product, false),
            },
        )?;
        let ark = Ca {
            key: ark_key,
            cert: ark_cert,
            cn: ark_cn.clone(),
        };
        let sub = |cn: String, serial: Vec<u8>, vlek: bool| -> Result<Ca, SimError> {
            let key = gen_key()?;
            let cert = ark.sign_cert(&CertSpec {
                serial,
                issuer_cn: ark_cn.clone(),
                subject_cn: cn.clone(),
                not_before: CA_NOT_BEFORE,
                not_after: CA_NOT_AFTER,
                spki: rsa_spki(&key),
                extensions: ca_exts(false, product, vlek),
            })?;
            Ok(Ca { key, cert, cn })
        };
        let ask = sub(format!("SEV-{p}"), vec![0x01, 0x00, 0x01], false)?;
        let asvk = sub(format!("SEV-VLEK-{p}"), vec![0x01, 0x01, 0x01], true)?;
        Ok(Pki {
            product,
            ark,
            ask,
            asvk,
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
        self.issue_endorsement(
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
        self.issue_endorsement(
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
