//! Authenticity: the AMD chain, the report signature, and the binding of the VCEK to the
//! report. Pure: the caller supplies all bytes and the instant to check validity at.

use crate::Product;
use crate::certs::{AmdCert, Crl, PublicKey, sha256};
use crate::policy::Policy;
use crate::reason::{CertRole, Reason};
use crate::report::{AttestationReport, SIG_ALGO_ECDSA_P384_SHA384, SigningKey};
use crate::roots::{self, Builtin};
use crate::tcb::{Component, Tcb};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// What to do when no current, verified CRL is at hand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// Reject (fail closed). The default.
    #[default]
    Require,
    /// Check against the CRLs at hand; if there are none, accept and say revocation was not checked.
    IfAvailable,
}

/// How the verifier is set up. Verification cannot be switched off; only trust can be widened,
/// explicitly, to a non-AMD root (the simulator's), and verdicts then say they are not AMD-rooted.
#[derive(Clone, Debug, Default)]
pub struct VerifierConfig {
    /// Extra trusted root certificates (DER), e.g. the simulator's ARK. AMD's are always trusted.
    pub trust_roots: Vec<Vec<u8>>,
    /// Force the product instead of detecting it.
    pub product: Option<Product>,
    pub revocation: Revocation,
}

/// The bytes to verify. Certificates are DER or PEM; absent ASK/ARK mean AMD's built-in ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct Evidence<'a> {
    pub report: &'a [u8],
    /// VCEK or VLEK.
    pub vcek: Option<&'a [u8]>,
    /// ASK (for a VCEK) or ASVK (for a VLEK).
    pub ask: Option<&'a [u8]>,
    pub ark: Option<&'a [u8]>,
    /// CRLs to check (each must be signed by the ARK).
    pub crls: &'a [&'a [u8]],
}

/// Who the chain is rooted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// AMD's built-in ARK for this product.
    Amd(Product),
    /// An explicitly configured root that is not AMD's (SHA-256 of its DER).
    Configured([u8; 32]),
}

/// The kind of certificate that signed the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerKind {
    Vcek,
    Vlek,
}

/// The outcome: accepted iff the report parsed and `reasons` is empty.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub report: Option<AttestationReport>,
    pub product: Option<Product>,
    pub root: Option<Root>,
    pub signer: Option<SignerKind>,
    /// Whether a verified, current CRL was checked.
    pub revocation_checked: bool,
    /// The VCEK/VLEK, when one could be parsed.
    pub vcek: Option<Arc<AmdCert>>,
    pub reasons: Vec<Reason>,
}

impl Verdict {
    pub fn accepted(&self) -> bool {
        self.report.is_some() && self.reasons.is_empty()
    }

    /// Whether the chain ends in AMD's root (false for the simulator's).
    pub fn amd_rooted(&self) -> bool {
        matches!(self.root, Some(Root::Amd(_)))
    }

    /// The reported TCB decoded for the product, when both are known.
    pub fn reported_tcb(&self) -> Option<Tcb> {
        Some(Tcb::decode(
            self.report.as_ref()?.reported_tcb,
            self.product?,
        ))
    }
}

/// Time-independent results of checking one (VCEK, ASK, ARK) triple; cached.
struct Chain {
    product: Product,
    /// SHA-256 of the ARK's DER, to find CRLs held for it.
    ark_fp: [u8; 32],
    root: Option<Root>,
    signer: Option<SignerKind>,
    reasons: Vec<Reason>,
    ark: AmdCert,
    ask: AmdCert,
    vcek: Arc<AmdCert>,
}

const CACHE_MAX: usize = 4096;

/// Verifies reports. Holds verified chains and CRLs so that a warm verification costs one
/// ECDSA verify plus comparisons. Safe to share between threads.
pub struct Verifier {
    cfg: VerifierConfig,
    trust_fps: Vec<[u8; 32]>,
    chains: RwLock<HashMap<[u8; 32], Arc<Chain>>>,
    /// Verified CRLs by the fingerprint of the ARK that signed them.
    /// Several per issuer (newest first), so a CRL issued "in the future" by a skewed clock does
    /// not push out the current one. Revocations are permanent, so all current ones apply.
    crls: RwLock<HashMap<[u8; 32], Vec<Arc<Crl>>>>,
}

/// CRLs kept per issuer.
const CRLS_PER_ISSUER: usize = 4;

/// Why a CRL could not be added to the verifier's store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    #[error("{0}")]
    Parse(#[from] crate::certs::CertError),
    #[error("CRL is not signed by the {0} ARK")]
    BadSignature(Product),
}

impl Verifier {
    pub fn new(cfg: VerifierConfig) -> Verifier {
        let trust_fps = cfg
            .trust_roots
            .iter()
            .filter_map(|r| crate::certs::to_der(r).ok())
            .map(|d| sha256(&d))
            .collect();
        Verifier {
            cfg,
            trust_fps,
            chains: RwLock::new(HashMap::new()),
            crls: RwLock::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.cfg
    }

    /// Adds a CRL after checking it is signed by `product`'s AMD ARK or a configured root.
    /// It replaces an older one from the same issuer. Freshness is judged at verification time.
    pub fn add_crl(&self, bytes: &[u8], product: Product) -> Result<(), CrlError> {
        let crl = Crl::from_der_or_pem(bytes)?;
        let mut arks: Vec<Vec<u8>> = vec![roots::der(product, Builtin::Ark).to_vec()];
        arks.extend(
            self.cfg
                .trust_roots
                .iter()
                .filter_map(|r| crate::certs::to_der(r).ok()),
        );
        for ark_der in arks {
            let Ok(ark) = AmdCert::from_der(ark_der) else {
                continue;
            };
            if crl.signed_by(&ark) {
                let fp = ark.fingerprint();
                let mut map = self.crls.write().unwrap_or_else(|e| e.into_inner());
                let list = map.entry(fp).or_default();
                if !list.iter().any(|c| c.der() == crl.der()) {
                    list.push(Arc::new(crl));
                    list.sort_by_key(|c| std::cmp::Reverse(c.this_update));
                    list.truncate(CRLS_PER_ISSUER);
                }
                return Ok(());
            }
        }
        Err(CrlError::BadSignature(product))
    }

    /// Verifies authenticity at `at` (Unix seconds).
    pub fn verify(&self, ev: &Evidence<'_>, at: u64) -> Verdict {
        let mut v = Verdict {
            report: None,
            product: None,
            root: None,
            signer: None,
            revocation_checked: false,
            vcek: None,
            reasons: Vec::new(),
        };
        let report = match AttestationReport::from_bytes(ev.report) {
            Ok(r) => r,
            Err(e) => {
                v.reasons.push(Reason::Malformed(e));
                return v;
            }
        };
        let reasons = &mut v.reasons;

        // The report on its own.
        if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384 {
            reasons.push(Reason::UnknownSignatureAlgorithm(report.signature_algo));
        }
        let sig = report.signature.to_fixed_be();
        if sig.is_none() {
            reasons.push(Reason::SignaturePaddingNonZero);
        }
        let report_key = report.key_info.signing_key();
        let wanted_kind = match report_key {
            SigningKey::Vcek => Some(SignerKind::Vcek),
            SigningKey::Vlek => Some(SignerKind::Vlek),
            other => {
                reasons.push(Reason::UnsupportedSigningKey(other));
                None
            }
        };

        // Which product: explicit, else what the report says, else what the certificates say.
        let hint = report.product_hint();
        if let (Some(p), Some(h)) = (self.cfg.product, hint)
            && p != h
        {
            reasons.push(Reason::ProductMismatch {
                report: h,
                other: p,
            });
        }
        let Some(vcek_bytes) = ev.vcek else {
            reasons.push(Reason::MissingCertificate(CertRole::Vcek));
            v.product = self.cfg.product.or(hint);
            v.report = Some(report);
            return v;
        };

        // The chain: checked once per distinct (VCEK, ASK, ARK) and cached.
        let chain = match self.chain(vcek_bytes, ev, self.cfg.product.or(hint), wanted_kind) {
            Ok(c) => c,
            Err(r) => {
                reasons.push(r);
                v.product = self.cfg.product.or(hint);
                v.report = Some(report);
                return v;
            }
        };
        let product = chain.product;
        v.product = Some(product);
        reasons.extend(chain.reasons.iter().cloned());
        v.root = chain.root;
        v.signer = chain.signer;
        v.vcek = Some(chain.vcek.clone());
        if let (Some(want), Some(got)) = (wanted_kind, chain.signer)
            && want != got
        {
            reasons.push(Reason::SigningKeyMismatch {
                report: report_key,
                cert: if got == SignerKind::Vcek {
                    "VCEK"
                } else {
                    "VLEK"
                },
            });
        }

        // Validity at the instant given.
        for (role, c) in [
            (CertRole::Ark, &chain.ark),
            (CertRole::Ask, &chain.ask),
            (CertRole::Vcek, &*chain.vcek),
        ] {
            if at < c.not_before {
                reasons.push(Reason::CertNotYetValid {
                    role,
                    not_before: c.not_before,
                    at,
                });
            } else if at > c.not_after {
                reasons.push(Reason::CertExpired {
                    role,
                    not_after: c.not_after,
                    at,
                });
            }
        }

        // Revocation.
        v.revocation_checked = self.check_revocation(&chain, ev.crls, at, reasons);

        // The report signature over the bytes as received.
        if let (Some(rs), PublicKey::EcP384(key)) = (sig, &chain.vcek.key)
            && report.signature_algo == SIG_ALGO_ECDSA_P384_SHA384
            && key.verify_sig(report.signed_bytes(), &rs).is_err()
        {
            reasons.push(Reason::ReportSignatureInvalid);
        }

        // Binding of the certificate to this report.
        bind(&report, &chain.vcek, product, chain.signer, reasons);

        v.report = Some(report);
        v
    }

    /// Verifies authenticity and appraises the report against `policy`; all reasons together.
    pub fn verify_with_policy(&self, ev: &Evidence<'_>, policy: &Policy, at: u64) -> Verdict {
        let mut v = self.verify(ev, at);
        if let (Some(r), Some(p)) = (&v.report, v.product) {
            let mut extra = policy.appraise(r, p);
            if policy.strict_reserved {
                extra.extend(
                    r.reserved_nonzero()
                        .into_iter()
                        .map(Reason::ReservedNonZero),
                );
            }
            // Which cloud provider a VLEK belongs to is in its certificate, not the report.
            if let (Some(allowed), Some(SignerKind::Vlek), Some(cert)) =
                (&policy.vlek_csp_ids, v.signer, &v.vcek)
            {
                let csp = cert.amd.csp_id.clone().unwrap_or_default();
                if !allowed.contains(&csp) {
                    extra.push(Reason::VlekCspNotAllowed(csp));
                }
            }
            v.reasons.extend(extra);
        }
        v
    }

    /// The checked chain for these certificates, from the cache when it has been seen before.
    /// The cache key covers every input the chain's checks depend on, so a hit costs one
    /// SHA-256 over the supplied certificate bytes.
    fn chain(
        &self,
        vcek_bytes: &[u8],
        ev: &Evidence<'_>,
        product_pre: Option<Product>,
        wanted: Option<SignerKind>,
    ) -> Result<Arc<Chain>, Reason> {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(&[
            product_pre.map_or(0xff, |p| p as u8),
            wanted.map_or(0xff, |k| k as u8),
        ]);
        for part in [Some(vcek_bytes), ev.ask, ev.ark] {
            match part {
                Some(b) => {
                    ctx.update(&(b.len() as u64).to_le_bytes());
                    ctx.update(b);
                }
                None => ctx.update(&u64::MAX.to_le_bytes()),
            }
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        if let Some(c) = self
            .chains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(c.clone());
        }

        let vcek = AmdCert::from_der_or_pem(vcek_bytes).map_err(|e| Reason::CertUnparsable {
            role: CertRole::Vcek,
            why: e.to_string(),
        })?;
        let product = product_pre
            .or_else(|| vcek.product())
            .or_else(|| {
                ev.ark
                    .and_then(|a| crate::certs::to_der(a).ok())
                    .and_then(|d| roots::amd_ark_product(&d))
            })
            .ok_or(Reason::ProductUnknown)?;
        let kind = wanted.unwrap_or(match vcek.subject_cn.as_deref() {
            Some("SEV-VLEK") => SignerKind::Vlek,
            _ => SignerKind::Vcek,
        });
        let builtin_ask = if kind == SignerKind::Vlek {
            Builtin::Asvk
        } else {
            Builtin::Ask
        };
        let ask_der = match ev.ask {
            Some(b) => crate::certs::to_der(b).map_err(|e| Reason::CertUnparsable {
                role: CertRole::Ask,
                why: e.to_string(),
            })?,
            None => roots::der(product, builtin_ask).to_vec(),
        };
        let ark_der = match ev.ark {
            Some(b) => crate::certs::to_der(b).map_err(|e| Reason::CertUnparsable {
                role: CertRole::Ark,
                why: e.to_string(),
            })?,
            None => roots::der(product, Builtin::Ark).to_vec(),
        };
        let ask = AmdCert::from_der(ask_der).map_err(|e| Reason::CertUnparsable {
            role: CertRole::Ask,
            why: e.to_string(),
        })?;
        let ark = AmdCert::from_der(ark_der).map_err(|e| Reason::CertUnparsable {
            role: CertRole::Ark,
            why: e.to_string(),
        })?;
        let chain = Arc::new(self.check_chain(ark, ask, vcek, product));
        // Only chains that check out end in a trusted root, so the cache holds a bounded set of
        // genuine certificates; hostile chains are re-checked each time and never stored.
        if chain.root.is_some() && chain.reasons.is_empty() {
            let mut map = self.chains.write().unwrap_or_else(|e| e.into_inner());
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(key, chain.clone());
        }
        Ok(chain)
    }

    fn check_chain(&self, ark: AmdCert, ask: AmdCert, vcek: AmdCert, product: Product) -> Chain {
        let mut reasons = Vec::new();
        // Root of trust: AMD's ARK for this product, pinned by bytes, or an explicit root.
        let root = if ark.der() == roots::der(product, Builtin::Ark) {
            Some(Root::Amd(product))
        } else if let Some(other) = roots::amd_ark_product(ark.der()) {
            reasons.push(Reason::ProductMismatch {
                report: product,
                other,
            });
            None
        } else if self.trust_fps.contains(&ark.fingerprint()) {
            Some(Root::Configured(ark.fingerprint()))
        } else {
            reasons.push(Reason::ArkNotTrusted);
            None
        };
        let p = product.name();
        expect_name(&mut reasons, CertRole::Ark, &ark, &format!("ARK-{p}"));
        if !ark.self_issued() {
            reasons.push(Reason::IssuerMismatch(CertRole::Ark));
        }
        if !ark.signature_valid(&ark) {
            reasons.push(Reason::CertSignatureInvalid(CertRole::Ark));
        }
        if !(ark.is_ca && ark.key_cert_sign) {
            reasons.push(Reason::NotACa(CertRole::Ark));
        }

        let signer = match vcek.subject_cn.as_deref() {
            Some("SEV-VCEK") => Some(SignerKind::Vcek),
            Some("SEV-VLEK") => Some(SignerKind::Vlek),
            other => {
                reasons.push(Reason::UnexpectedCertName {
                    role: CertRole::Vcek,
                    found: other.unwrap_or("").to_string(),
                    expected: "SEV-VCEK or SEV-VLEK".into(),
                });
                None
            }
        };
        let ask_name = match signer {
            Some(SignerKind::Vlek) => format!("SEV-VLEK-{p}"),
            _ => format!("SEV-{p}"),
        };
        expect_name(&mut reasons, CertRole::Ask, &ask, &ask_name);
        if !ask.issued_by_name(&ark) {
            reasons.push(Reason::IssuerMismatch(CertRole::Ask));
        }
        if !ask.signature_valid(&ark) {
            reasons.push(Reason::CertSignatureInvalid(CertRole::Ask));
        }
        if !(ask.is_ca && ask.key_cert_sign) {
            reasons.push(Reason::NotACa(CertRole::Ask));
        }
        if !vcek.issued_by_name(&ask) {
            reasons.push(Reason::IssuerMismatch(CertRole::Vcek));
        }
        if !vcek.signature_valid(&ask) {
            reasons.push(Reason::CertSignatureInvalid(CertRole::Vcek));
        }
        if !matches!(vcek.key, PublicKey::EcP384(_)) {
            reasons.push(Reason::CertUnparsable {
                role: CertRole::Vcek,
                why: "not an ECDSA P-384 key".into(),
            });
        }
        match vcek.product() {
            Some(vp) if vp != product => reasons.push(Reason::ProductMismatch {
                report: product,
                other: vp,
            }),
            Some(_) => {}
            None => reasons.push(Reason::UnexpectedCertName {
                role: CertRole::Vcek,
                found: vcek.amd.product_name.clone().unwrap_or_default(),
                expected: format!("productName {p}"),
            }),
        }
        for (role, c) in [
            (CertRole::Ark, &ark),
            (CertRole::Ask, &ask),
            (CertRole::Vcek, &vcek),
        ] {
            for oid in &c.unknown_critical {
                reasons.push(Reason::UnknownCriticalExtension {
                    role,
                    oid: oid.clone(),
                });
            }
        }
        Chain {
            product,
            ark_fp: ark.fingerprint(),
            root,
            signer,
            reasons,
            ark,
            ask,
            vcek: Arc::new(vcek),
        }
    }

    /// Returns whether revocation was checked against a verified, current CRL.
    fn check_revocation(
        &self,
        chain: &Chain,
        crls: &[&[u8]],
        at: u64,
        reasons: &mut Vec<Reason>,
    ) -> bool {
        let mut usable: Vec<Arc<Crl>> = Vec::new();
        let mut stale: Option<Reason> = None;
        for bytes in crls {
            match Crl::from_der_or_pem(bytes) {
                Err(e) => reasons.push(Reason::CrlInvalid(e.to_string())),
                Ok(c) if !c.signed_by(&chain.ark) => {
                    reasons.push(Reason::CrlInvalid("not signed by this chain's ARK".into()))
                }
                Ok(c) if !c.fresh_at(at) => {
                    stale = Some(Reason::CrlStale {
                        next_update: c.next_update,
                        at,
                    })
                }
                Ok(c) => usable.push(Arc::new(c)),
            }
        }
        if let Some(held) = self
            .crls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&chain.ark_fp)
        {
            for c in held {
                if c.fresh_at(at) {
                    usable.push(c.clone());
                } else if stale.is_none() {
                    stale = Some(Reason::CrlStale {
                        next_update: c.next_update,
                        at,
                    });
                }
            }
        }
        if usable.is_empty() {
            match (stale, self.cfg.revocation) {
                (Some(r), _) => reasons.push(r),
                (None, Revocation::Require) => reasons.push(Reason::CrlUnavailable),
                (None, Revocation::IfAvailable) => {}
            }
            return false;
        }
        for (role, cert) in [(CertRole::Ask, &chain.ask), (CertRole::Vcek, &*chain.vcek)] {
            if usable.iter().any(|c| c.revokes(cert)) {
                reasons.push(Reason::CertRevoked(role));
            }
        }
        let _ = chain.product;
        true
    }
}

fn expect_name(reasons: &mut Vec<Reason>, role: CertRole, c: &AmdCert, want: &str) {
    if c.subject_cn.as_deref() != Some(want) {
        reasons.push(Reason::UnexpectedCertName {
            role,
            found: c.subject_cn.clone().unwrap_or_default(),
            expected: want.to_string(),
        });
    }
}

/// The VCEK/VLEK must be the one for this chip (hwID = CHIP_ID) and this TCB (SPLs = REPORTED_TCB).
fn bind(
    report: &AttestationReport,
    cert: &AmdCert,
    product: Product,
    signer: Option<SignerKind>,
    reasons: &mut Vec<Reason>,
) {
    if signer != Some(SignerKind::Vlek) {
        match cert.hwid(product) {
            None => reasons.push(Reason::HwidMissing),
            Some(h) => {
                let n = h.len();
                if report.chip_id[..n] != h[..] || report.chip_id[n..].iter().any(|&b| b != 0) {
                    reasons.push(Reason::HwidMismatch);
                }
            }
        }
    }
    let tcb = Tcb::decode(report.reported_tcb, product);
    for (component, have) in tcb.components() {
        let spl = match component {
            Component::Fmc => cert.amd.fmc_spl,
            Component::Bootloader => cert.amd.bl_spl,
            Component::Tee => cert.amd.tee_spl,
            Component::Snp => cert.amd.snp_spl,
            Component::Microcode => cert.amd.ucode_spl,
        };
        match spl {
            None => reasons.push(Reason::TcbExtensionMissing(component)),
            Some(c) if c != have => reasons.push(Reason::TcbMismatch {
                component,
                report: have,
                cert: c,
            }),
            Some(_) => {}
        }
    }
}
