//! Distributed revocation: a CA-signed, numbered list of revoked certificates, keyed by issuer
//! and serial and by public-key hash (so a key re-certified under a new serial stays revoked).
//! Lighthouses relay the newest list to every node; anyone may relay it, because only the CA's
//! signature makes it count, and a list never replaces one with a higher number (an attacker
//! cannot roll a node back to an older list). Sans-IO: bytes in, decisions out.
//!
//! The file is JSON: `{"body": "<the body's exact JSON>", "signature": "<hex>"}`; the signature
//! covers a domain-separation prefix and the body's bytes as written, so nothing is
//! re-serialised before checking.

use crate::cert::{CertError, MeshCert, sign_with};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Largest list accepted (about 10,000 entries).
pub const MAX_LIST: usize = 1 << 20;
/// How far in the future a list's `issued_at` may lie (clock skew).
pub const MAX_SKEW: u64 = 300;
const DOMAIN: &[u8] = b"attesta-mesh revocation list v1\0";

/// One revoked certificate, by its issuer's name and its serial (hex, as `cert print` shows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialEntry {
    pub issuer: String,
    pub serial: String,
}

/// What the CA signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub v: u32,
    /// The signing CA's name (one of the trusted roots).
    pub ca: String,
    /// Strictly increasing per CA: a node keeps the highest it has seen.
    pub number: u64,
    /// Unix seconds; nodes configured with a maximum age fail closed when the newest list is
    /// older than that, so the CA reissues the list (number + 1) on a schedule.
    pub issued_at: u64,
    #[serde(default)]
    pub serials: Vec<SerialEntry>,
    /// SHA-256 of revoked SubjectPublicKeyInfos, hex.
    #[serde(default)]
    pub keys: Vec<String>,
}

impl SerialEntry {
    /// The entry naming `c` by issuer and serial.
    pub fn of(c: &MeshCert) -> SerialEntry {
        SerialEntry {
            issuer: c.issuer.clone(),
            serial: hex::encode(&c.serial),
        }
    }
}

impl Body {
    /// Revokes `c` both ways: by issuer + serial, and by its public key (so a certificate
    /// reissued for the same key is revoked too).
    pub fn revoke(&mut self, c: &MeshCert) {
        self.serials.push(SerialEntry::of(c));
        self.keys.push(hex::encode(c.key_hash));
        self.normalize();
    }

    /// Sorted and without duplicates: the same revocations always sign to the same body.
    pub fn normalize(&mut self) {
        self.serials
            .sort_by(|x, y| (&x.issuer, &x.serial).cmp(&(&y.issuer, &y.serial)));
        self.serials.dedup();
        self.keys.sort();
        self.keys.dedup();
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    body: String,
    signature: String,
}

/// A verified list.
#[derive(Clone, Debug)]
pub struct RevocationList {
    pub body: Body,
    /// The signed file as received, to relay unchanged.
    pub bytes: Vec<u8>,
    serials: HashSet<(String, Vec<u8>)>,
    keys: HashSet<[u8; 32]>,
}

/// Why a list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation list: {0}")]
    Malformed(String),
    #[error("revocation list: {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("revocation list: version {0} is not supported (this build reads 1)")]
    Version(u32),
    #[error("revocation list: signed by {0:?}, which is not a trusted CA")]
    UnknownCa(String),
    #[error("revocation list: the signature does not verify with CA {0}'s key")]
    Signature(String),
    #[error("revocation list: issued at {issued_at}, in the future (now {now})")]
    Future { issued_at: u64, now: u64 },
    #[error("revocation list: number {number} is not newer than the {have} already held")]
    NotNewer { number: u64, have: u64 },
    #[error("revocation list: {0}")]
    Sign(#[from] CertError),
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

impl RevocationList {
    /// Checks a list's signature against the trusted roots and parses it. Never panics.
    pub fn verify(
        bytes: &[u8],
        roots: &[MeshCert],
        now: u64,
    ) -> Result<RevocationList, RevocationError> {
        if bytes.len() > MAX_LIST {
            return Err(RevocationError::TooLarge(bytes.len()));
        }
        let env: Envelope =
            serde_json::from_slice(bytes).map_err(|e| RevocationError::Malformed(e.to_string()))?;
        let body: Body = serde_json::from_str(&env.body)
            .map_err(|e| RevocationError::Malformed(e.to_string()))?;
        if body.v != 1 {
            return Err(RevocationError::Version(body.v));
        }
        let ca = roots
            .iter()
            .find(|r| r.name == body.ca && r.is_ca)
            .ok_or_else(|| RevocationError::UnknownCa(body.ca.clone()))?;
        let sig = hex::decode(&env.signature)
            .map_err(|_| RevocationError::Malformed("the signature is not hex".into()))?;
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(env.body.as_bytes());
        // Two roots may share a name during a rollover: any trusted root of that name may sign.
        let signed = roots
            .iter()
            .filter(|r| r.name == body.ca && r.is_ca)
            .any(|r| r.verify_signed(&msg, &sig));
        if !signed {
            return Err(RevocationError::Signature(ca.name.clone()));
        }
        if body.issued_at > now.saturating_add(MAX_SKEW) {
            return Err(RevocationError::Future {
                issued_at: body.issued_at,
                now,
            });
        }
        let mut serials = HashSet::new();
        for e in &body.serials {
            let s = hex::decode(&e.serial).map_err(|_| {
                RevocationError::Malformed(format!("serial {:?} is not hex", e.serial))
            })?;
            serials.insert((e.issuer.clone(), s));
        }
        let mut keys = HashSet::new();
        for k in &body.keys {
            keys.insert(hex32(k).ok_or_else(|| {
                RevocationError::Malformed(format!("key hash {k:?} is not 32 bytes of hex"))
            })?);
        }
        Ok(RevocationList {
            body,
            bytes: bytes.to_vec(),
            serials,
            keys,
        })
    }

    /// Whether this list revokes the certificate (by issuer and serial, or by key).
    pub fn revokes(&self, c: &MeshCert) -> bool {
        self.serials.contains(&(c.issuer.clone(), c.serial.clone()))
            || self.keys.contains(&c.key_hash)
    }

    pub fn entries(&self) -> usize {
        self.serials.len() + self.keys.len()
    }
}

/// Signs a list with the CA's key (the `attesta-mesh revoke` command).
pub fn sign(ca: &MeshCert, ca_key_pem: &str, body: &Body) -> Result<Vec<u8>, RevocationError> {
    if body.ca != ca.name {
        return Err(RevocationError::Malformed(format!(
            "the body names CA {:?}, the key is {:?}'s",
            body.ca, ca.name
        )));
    }
    let text =
        serde_json::to_string(body).map_err(|e| RevocationError::Malformed(e.to_string()))?;
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(text.as_bytes());
    let sig = sign_with(ca, ca_key_pem, &msg)?;
    let env = Envelope {
        body: text,
        signature: hex::encode(sig),
    };
    let mut out =
        serde_json::to_vec_pretty(&env).map_err(|e| RevocationError::Malformed(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::Curve;
    use crate::test_pki::{NOW, ca, node};
    use crate::transport::Trust;

    fn body(ca: &str, number: u64) -> Body {
        Body {
            v: 1,
            ca: ca.into(),
            number,
            issued_at: NOW,
            serials: vec![],
            keys: vec![],
        }
    }

    #[test]
    fn revoking_names_both_ways_once_in_a_stable_order() {
        let root = ca("root", Curve::Ed25519);
        let (_, _, a) = node(&root, "a", "10.42.0.1/16");
        let (_, _, b) = node(&root, "b", "10.42.0.2/16");
        let (mut x, mut y) = (body("root", 1), body("root", 1));
        for c in [&a, &b, &a] {
            x.revoke(c);
        }
        for c in [&b, &a] {
            y.revoke(c);
        }
        assert_eq!(x, y, "the same revocations give the same body");
        assert_eq!((x.serials.len(), x.keys.len()), (2, 2));
        let list = RevocationList::verify(
            &sign(&root.cert, &root.key, &x).unwrap(),
            std::slice::from_ref(&root.cert),
            NOW,
        )
        .unwrap();
        let (_, _, c) = node(&root, "c", "10.42.0.3/16");
        assert!(list.revokes(&a) && list.revokes(&b) && !list.revokes(&c));
        assert!(
            x.serials
                .windows(2)
                .all(|w| (&w[0].issuer, &w[0].serial) < (&w[1].issuer, &w[1].serial))
        );
        assert!(x.keys.windows(2).all(|w| w[0] < w[1]));
        assert!(
            x.serials.contains(&SerialEntry::of(&a)) && x.keys.contains(&hex::encode(a.key_hash))
        );
    }

    #[test]
    fn signed_lists_revoke_by_serial_and_key_and_only_newer_ones_replace() {
        for curve in [Curve::Ed25519, Curve::P256] {
            let root = ca("root", curve);
            let (_, _, a) = node(&root, "a", "10.42.0.1/16");
            let (_, _, b) = node(&root, "b", "10.42.0.2/16");
            let mut b1 = body("root", 1);
            b1.serials.push(SerialEntry {
                issuer: a.issuer.clone(),
                serial: hex::encode(&a.serial),
            });
            let l1 = sign(&root.cert, &root.key, &b1).unwrap();
            let list = RevocationList::verify(&l1, std::slice::from_ref(&root.cert), NOW).unwrap();
            assert!(list.revokes(&a) && !list.revokes(&b));

            let mut b2 = body("root", 2);
            b2.keys.push(hex::encode(b.key_hash));
            let l2 = sign(&root.cert, &root.key, &b2).unwrap();
            let trust = Trust::new(vec![root.cert.clone()]);
            assert_eq!(trust.install(&l2, NOW), Ok(true));
            assert!(trust.is_revoked(&b) && !trust.is_revoked(&a));
            assert_eq!(trust.install(&l2, NOW), Ok(false), "a repeat is not news");
            assert_eq!(
                trust.install(&l1, NOW),
                Err(RevocationError::NotNewer { number: 1, have: 2 }),
                "an older list never rolls a node back"
            );
            assert!(trust.is_revoked(&b));
        }
    }

    #[test]
    fn forged_foreign_future_and_malformed_lists_are_refused() {
        let root = ca("root", Curve::Ed25519);
        let other = ca("root", Curve::Ed25519); // same name, different key
        let roots = [root.cert.clone()];
        let good = sign(&root.cert, &root.key, &body("root", 1)).unwrap();
        assert!(RevocationList::verify(&good, &roots, NOW).is_ok());

        let forged = sign(&other.cert, &other.key, &body("root", 1)).unwrap();
        assert_eq!(
            RevocationList::verify(&forged, &roots, NOW).unwrap_err(),
            RevocationError::Signature("root".into())
        );
        let stranger = ca("stranger", Curve::Ed25519);
        let l = sign(&stranger.cert, &stranger.key, &body("stranger", 1)).unwrap();
        assert_eq!(
            RevocationList::verify(&l, &roots, NOW).unwrap_err(),
            RevocationError::UnknownCa("stranger".into())
        );
        // The body edited after signing (number bumped to replace a newer list).
        let text = String::from_utf8(good.clone()).unwrap();
        let edited = text.replace("\\\"number\\\":1", "\\\"number\\\":9");
        assert_ne!(edited, text);
        assert!(matches!(
            RevocationList::verify(edited.as_bytes(), &roots, NOW),
            Err(RevocationError::Signature(_))
        ));
        let mut future = body("root", 1);
        future.issued_at = NOW + MAX_SKEW + 10;
        let l = sign(&root.cert, &root.key, &future).unwrap();
        assert!(matches!(
            RevocationList::verify(&l, &roots, NOW),
            Err(RevocationError::Future { .. })
        ));
        let mut badkey = body("root", 1);
        badkey.keys.push("abcd".into());
        let l = sign(&root.cert, &root.key, &badkey).unwrap();
        assert!(matches!(
            RevocationList::verify(&l, &roots, NOW),
            Err(RevocationError::Malformed(_))
        ));
        assert!(matches!(
            RevocationList::verify(&vec![b' '; MAX_LIST + 1], &roots, NOW),
            Err(RevocationError::TooLarge(_))
        ));
        // A key that is not the CA's cannot sign for it.
        assert!(sign(&root.cert, &other.key, &body("root", 1)).is_err());
    }

    #[test]
    fn a_max_age_fails_closed_until_a_fresh_list_arrives() {
        let root = ca("root", Curve::Ed25519);
        let trust = Trust::new(vec![root.cert.clone()]);
        assert!(trust.fresh(NOW).is_ok(), "no limit configured");
        trust.set_max_age(Some(3600));
        assert!(trust.fresh(NOW).is_err(), "no list held");
        let mut old = body("root", 1);
        old.issued_at = NOW - 7200;
        trust
            .install(&sign(&root.cert, &root.key, &old).unwrap(), NOW)
            .unwrap();
        assert!(trust.fresh(NOW).unwrap_err().contains("7200s ago"));
        trust
            .install(&sign(&root.cert, &root.key, &body("root", 2)).unwrap(), NOW)
            .unwrap();
        assert!(trust.fresh(NOW + 3600).is_ok());
        assert!(trust.fresh(NOW + 3601).is_err());
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let root = ca_cached();
            let _ = RevocationList::verify(&data, std::slice::from_ref(root), NOW);
        }
    }

    fn ca_cached() -> &'static crate::cert::MeshCert {
        static C: std::sync::OnceLock<crate::cert::MeshCert> = std::sync::OnceLock::new();
        C.get_or_init(|| ca("root", Curve::Ed25519).cert)
    }
}
