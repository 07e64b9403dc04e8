//! Distributed revocation: a CA-signed, numbered list of revoked certificates, keyed by issuer
//! and serial and by public-key hash (so a key re-certified under a new serial stays revoked).
//! Lighthouses relay the newest list to every node; anyone may relay it, because only the CA's
//! signature makes it count, and a list never replaces one of its CA's with a higher number (an
//! attacker cannot roll a node back to an older list). Sans-IO: bytes in, decisions out.
//!
//! The file is JSON: `{"body": "<the body's exact JSON>", "signature": "<hex>"}` (and `"chain"`
//! for a delegated list, below); the signature
//! covers a domain-separation prefix and the body's bytes as written, so nothing is
//! re-serialised before checking.
//!
//! **Delegated lists.** An intermediate CA that a trusted root issued directly may sign a list
//! too, with `"chain": ["<its certificate, hex DER>"]`. Such a list revokes only certificates
//! that intermediate issued (its subject as issuer, its signature), so a broker holding the
//! guests' intermediate can cut a VM off at once and nothing else. It is held and numbered by
//! its signer's key (not its name: another CA of that name cannot displace it), never counts
//! towards `revocation_max_age` (which is about the root's list), may not use a root's name,
//! and is at most [`MAX_DELEGATED_LIST`] bytes. Only the root's operator can make such signers,
//! so how many lists a node may hold is in the root operator's hands (and capped by
//! `transport::MAX_DELEGATED_LISTS`); a sub-CA below an intermediate cannot sign one.

use crate::cert::{CertError, MeshCert, sign_with, verify_ca};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Largest list accepted (about 15,000 key entries).
pub const MAX_LIST: usize = 1 << 20;
/// Largest delegated list accepted (about 9,000 key entries): several fit in one control message
/// beside a root's list.
pub const MAX_DELEGATED_LIST: usize = 640 << 10;
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
    /// The signing CA's name: a trusted root's, or a delegated list's intermediate's.
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
    /// A delegated list's signer (hex DER; one certificate, issued by a trusted root); empty: a
    /// root signed it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chain: Vec<String>,
}

/// A verified list.
#[derive(Clone, Debug)]
pub struct RevocationList {
    pub body: Body,
    /// The signed file as received, to relay unchanged.
    pub bytes: Vec<u8>,
    serials: HashSet<(String, Vec<u8>)>,
    keys: HashSet<[u8; 32]>,
    /// A delegated list's signer (one certificate); empty for a root's list.
    pub chain: Vec<MeshCert>,
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
    #[error("revocation list: signed by intermediate {ca:?}, whose chain does not verify: {why}")]
    Chain { ca: String, why: String },
    #[error(
        "revocation list: intermediate {ca:?} may revoke only what it issued, not {issuer:?}'s"
    )]
    OutOfScope { ca: String, issuer: String },
    #[error("revocation list: signed by intermediate {0:?}, whose chain is revoked")]
    RevokedSigner(String),
    #[error("revocation list: {0} delegated lists are held already, the most a node keeps")]
    TooMany(usize),
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
        let sig = hex::decode(&env.signature)
            .map_err(|_| RevocationError::Malformed("the signature is not hex".into()))?;
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(env.body.as_bytes());
        if !env.chain.is_empty() && bytes.len() > MAX_DELEGATED_LIST {
            return Err(RevocationError::TooLarge(bytes.len()));
        }
        let chain = delegated_chain(&env.chain, &body, roots, now)?;
        let signed = match chain.first() {
            Some(signer) => signer.verify_signed(&msg, &sig),
            None => {
                if !roots.iter().any(|r| r.name == body.ca && r.is_ca) {
                    return Err(RevocationError::UnknownCa(body.ca.clone()));
                }
                // Two roots may share a name during a rollover: any trusted root of that name
                // may sign.
                roots
                    .iter()
                    .filter(|r| r.name == body.ca && r.is_ca)
                    .any(|r| r.verify_signed(&msg, &sig))
            }
        };
        if !signed {
            return Err(RevocationError::Signature(body.ca.clone()));
        }
        if body.issued_at > now.saturating_add(MAX_SKEW) {
            return Err(RevocationError::Future {
                issued_at: body.issued_at,
                now,
            });
        }
        let mut serials = HashSet::new();
        for e in &body.serials {
            if !chain.is_empty() && e.issuer != body.ca {
                return Err(RevocationError::OutOfScope {
                    ca: body.ca.clone(),
                    issuer: e.issuer.clone(),
                });
            }
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
            chain,
        })
    }

    /// What the list is held under: a root's name, or for a delegated list its CA's name and
    /// signing key, so that no other CA — whatever its name — replaces or blocks it.
    pub fn id(&self) -> String {
        match self.chain.first() {
            None => self.body.ca.clone(),
            Some(signer) => delegated_id(signer),
        }
    }

    /// Whether this list revokes the certificate (by issuer and serial, or by key); a delegated
    /// list only certificates its signer issued.
    pub fn revokes(&self, c: &MeshCert) -> bool {
        let listed = self.serials.contains(&(c.issuer.clone(), c.serial.clone()))
            || self.keys.contains(&c.key_hash);
        listed
            && match self.chain.first() {
                None => true,
                Some(signer) => c.issued_by(signer),
            }
    }

    /// Whether a root signed it (what `revocation_max_age` is about).
    pub fn is_root_list(&self) -> bool {
        self.chain.is_empty()
    }

    pub fn entries(&self) -> usize {
        self.serials.len() + self.keys.len()
    }
}

/// The id a delegated list signed by `ca` is held under: its name and the hash of its key.
pub fn delegated_id(ca: &MeshCert) -> String {
    format!("{}#{}", ca.name, hex::encode(ca.key_hash))
}

/// What a list says it is, unverified: (the id it would be held under, its number, whether a
/// root signed it). For deciding what to store or send; [`RevocationList::verify`] decides
/// what counts. None: not a list.
pub fn peek(bytes: &[u8]) -> Option<(String, u64, bool)> {
    if bytes.len() > MAX_LIST {
        return None;
    }
    let env: Envelope = serde_json::from_slice(bytes).ok()?;
    let body: Body = serde_json::from_str(&env.body).ok()?;
    match env.chain.first() {
        None => Some((body.ca, body.number, true)),
        Some(h) => {
            let signer = MeshCert::parse(&hex::decode(h).ok()?).ok()?;
            Some((delegated_id(&signer), body.number, false))
        }
    }
}

/// A delegated list's chain, parsed and verified to `roots` at `now` (empty for a root's).
fn delegated_chain(
    hex_der: &[String],
    body: &Body,
    roots: &[MeshCert],
    now: u64,
) -> Result<Vec<MeshCert>, RevocationError> {
    if hex_der.is_empty() {
        return Ok(Vec::new());
    }
    let chain_err = |why: String| RevocationError::Chain {
        ca: body.ca.clone(),
        why,
    };
    let chain = hex_der
        .iter()
        .map(|h| {
            let der = hex::decode(h).map_err(|_| chain_err("a link is not hex".into()))?;
            MeshCert::parse(&der).map_err(|e| chain_err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Signed by a CA a root issued itself: the root's operator decides who may publish lists.
    if chain.len() != 1 {
        return Err(chain_err(format!(
            "{} links: only an intermediate a root issued directly signs a list",
            chain.len()
        )));
    }
    verify_ca(&chain, roots, now).map_err(|e| chain_err(e.to_string()))?;
    let signer = &chain[0];
    if signer.name != body.ca {
        return Err(chain_err(format!(
            "the chain starts with {:?}, not the list's CA",
            signer.name
        )));
    }
    // A root's list is keyed by the root's name: an intermediate may not take its place.
    if roots.iter().any(|r| r.name == body.ca) {
        return Err(chain_err(
            "a root's name: only that root signs its list".into(),
        ));
    }
    Ok(chain)
}

/// Signs a list with the CA's key (the `attesta-mesh revoke` command).
pub fn sign(ca: &MeshCert, ca_key_pem: &str, body: &Body) -> Result<Vec<u8>, RevocationError> {
    sign_delegated(ca, &[], ca_key_pem, body)
}

/// Signs a list with an intermediate CA's key, `above` being the CAs over it up to the root
/// (not included; nodes accept a delegated list only from an intermediate a root issued
/// directly, so `above` is empty for one they take): a list that revokes only what `ca`
/// issued. With `above` empty and `ca` a root, the same as [`sign`].
pub fn sign_delegated(
    ca: &MeshCert,
    above: &[MeshCert],
    ca_key_pem: &str,
    body: &Body,
) -> Result<Vec<u8>, RevocationError> {
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
    let chain = if above.is_empty() && ca.issued_by(ca) {
        Vec::new()
    } else {
        // A root in `above` (a CA file that ends with it) is the node's to know, not sent.
        std::iter::once(ca)
            .chain(above.iter().filter(|c| !c.issued_by(c)))
            .map(|c| hex::encode(&c.der))
            .collect()
    };
    let env = Envelope {
        body: text,
        signature: hex::encode(sig),
        chain,
    };
    let mut out =
        serde_json::to_vec_pretty(&env).map_err(|e| RevocationError::Malformed(e.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{Curve, LocalCa, Role};
    use crate::test_pki::{Ca, NOW, ca, node};
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

    /// The root, the guests' intermediate under it (as `test_pki::Ca`), and a second
    /// intermediate of the same name under the same root (another key).
    fn delegation() -> (Ca, Ca, Ca) {
        let root = LocalCa::root("root", &[], NOW - 86_400, NOW + 86_400).unwrap();
        let guests = |r: &LocalCa| {
            let i = r
                .intermediate("guests", &[], &[Role::Guest], &[], NOW - 3600, NOW + 3600)
                .unwrap();
            Ca {
                cert: i.cert,
                key: i.key.to_string(),
            }
        };
        let (a, b) = (guests(&root), guests(&root));
        let root = Ca {
            cert: root.cert,
            key: root.key.to_string(),
        };
        (root, a, b)
    }

    #[test]
    fn an_intermediates_list_revokes_what_it_issued_and_nothing_else() {
        let (root, guests, twin) = delegation();
        let roots = [root.cert.clone()];
        let (_, _, vm) = node(&guests, "vm-1", "10.42.1.1/16");
        let (_, _, twins_vm) = node(&twin, "vm-2", "10.42.1.2/16");
        let (_, _, host) = node(&root, "host", "10.42.0.9/16");
        // It lists all three, by key and by serial under its own name.
        let mut b = body("guests", 7);
        for c in [&vm, &twins_vm, &host] {
            b.keys.push(hex::encode(c.key_hash));
        }
        b.serials.push(SerialEntry::of(&vm));
        b.normalize();
        let bytes = sign_delegated(&guests.cert, &[], &guests.key, &b).unwrap();
        let list = RevocationList::verify(&bytes, &roots, NOW).unwrap();
        assert!(!list.is_root_list());
        // Signed from a CA file that ends with the root: the root is not sent, the same list.
        let with_root = sign_delegated(
            &guests.cert,
            std::slice::from_ref(&root.cert),
            &guests.key,
            &b,
        )
        .unwrap();
        assert_eq!(with_root, bytes);
        assert!(list.revokes(&vm), "its own VM is revoked");
        assert!(
            !list.revokes(&host) && !list.revokes(&twins_vm),
            "the root's host and another CA of the same name are beyond it"
        );
        let trust = Trust::new(roots.to_vec());
        assert_eq!(trust.install(&bytes, NOW), Ok(true));
        assert!(trust.is_revoked(&vm) && !trust.is_revoked(&host));
        // It does not satisfy a maximum age: that is about the root's list.
        trust.set_max_age(Some(3600));
        assert!(trust.fresh(NOW).is_err());
        trust
            .install(&sign(&root.cert, &root.key, &body("root", 1)).unwrap(), NOW)
            .unwrap();
        assert!(trust.fresh(NOW).is_ok());
        // Both lists held, each under its CA, each relayed.
        assert_eq!(trust.lists().len(), 2);
    }

    #[test]
    fn delegated_lists_out_of_scope_unchained_or_from_a_revoked_signer_are_refused() {
        let (root, guests, twin) = delegation();
        let roots = [root.cert.clone()];
        // A serial entry under another issuer's name.
        let mut b = body("guests", 1);
        b.serials.push(SerialEntry {
            issuer: "root".into(),
            serial: "01".into(),
        });
        let l = sign_delegated(&guests.cert, &[], &guests.key, &b).unwrap();
        assert_eq!(
            RevocationList::verify(&l, &roots, NOW).unwrap_err(),
            RevocationError::OutOfScope {
                ca: "guests".into(),
                issuer: "root".into()
            }
        );
        // Without its chain, an intermediate is an unknown CA.
        let text = String::from_utf8(sign(&guests.cert, &guests.key, &body("guests", 1)).unwrap())
            .unwrap();
        let mut unchained: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(unchained.as_object_mut().unwrap().remove("chain").is_some());
        assert_eq!(
            RevocationList::verify(unchained.to_string().as_bytes(), &roots, NOW).unwrap_err(),
            RevocationError::UnknownCa("guests".into())
        );
        // Signed by the twin's key while presenting the guests' chain.
        let mut env: serde_json::Value = serde_json::from_str(&text).unwrap();
        let twins = sign_delegated(&twin.cert, &[], &twin.key, &body("guests", 1)).unwrap();
        let twins: serde_json::Value = serde_json::from_slice(&twins).unwrap();
        env["signature"] = twins["signature"].clone();
        assert_eq!(
            RevocationList::verify(env.to_string().as_bytes(), &roots, NOW).unwrap_err(),
            RevocationError::Signature("guests".into())
        );
        // A chain to a root this node does not trust, expired, or under a root's name.
        let chain_why = |r: Result<RevocationList, RevocationError>| match r {
            Err(RevocationError::Chain { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        let stranger = ca("stranger", Curve::Ed25519);
        let good = sign_delegated(&guests.cert, &[], &guests.key, &body("guests", 1)).unwrap();
        let why = chain_why(RevocationList::verify(
            &good,
            std::slice::from_ref(&stranger.cert),
            NOW,
        ));
        assert!(why.contains("issuer"), "{why}");
        let why = chain_why(RevocationList::verify(&good, &roots, NOW + 7200));
        assert!(why.contains("valid") || why.contains("expired"), "{why}");
        let root2 = LocalCa::root("root", &[], NOW - 86_400, NOW + 86_400).unwrap();
        let named_root = root2
            .intermediate("root", &[], &[], &[], NOW - 60, NOW + 60)
            .unwrap();
        let l = sign_delegated(&named_root.cert, &[], &named_root.key, &body("root", 9)).unwrap();
        let why = chain_why(RevocationList::verify(
            &l,
            std::slice::from_ref(&root2.cert),
            NOW,
        ));
        assert!(why.contains("a root's name"), "{why}");
        // A sub-CA of the intermediate (which the intermediate's holder can make at will) does
        // not sign lists: only what the root issued itself.
        let sub = crate::test_pki::local(&guests)
            .intermediate("sub", &[], &[Role::Guest], &[], NOW - 60, NOW + 60)
            .unwrap();
        let l = sign_delegated(
            &sub.cert,
            std::slice::from_ref(&guests.cert),
            &sub.key,
            &body("sub", 1),
        )
        .unwrap();
        let why = chain_why(RevocationList::verify(&l, &roots, NOW));
        assert!(why.contains("2 links"), "{why}");
        // Larger than a delegated list may be (a root's may be larger).
        let mut big = body("guests", 2);
        big.keys = (0..10_000u32)
            .map(|i| hex::encode([(i % 251) as u8; 32]))
            .collect();
        let l = sign_delegated(&guests.cert, &[], &guests.key, &big).unwrap();
        assert!(l.len() > MAX_DELEGATED_LIST && l.len() <= MAX_LIST);
        assert_eq!(
            RevocationList::verify(&l, &roots, NOW).unwrap_err(),
            RevocationError::TooLarge(l.len())
        );
        // The root revoked the intermediate: its lists are refused from then on.
        let trust = Trust::new(roots.to_vec());
        let mut r = body("root", 1);
        r.revoke(&guests.cert);
        trust
            .install(&sign(&root.cert, &root.key, &r).unwrap(), NOW)
            .unwrap();
        assert_eq!(
            trust.install(&good, NOW),
            Err(RevocationError::RevokedSigner("guests".into()))
        );
        // Held before the root revoked its signer: pruned, its slot freed.
        let trust = Trust::new(roots.to_vec());
        assert_eq!(trust.install(&good, NOW), Ok(true));
        trust
            .install(&sign(&root.cert, &root.key, &r).unwrap(), NOW)
            .unwrap();
        assert_eq!(trust.lists().len(), 2);
        trust.prune(NOW);
        assert_eq!(trust.list_summary().len(), 1);
        assert_eq!(trust.list_summary()[0].0, "root");
    }

    #[test]
    fn another_ca_of_the_same_name_neither_displaces_nor_blocks_a_delegated_list() {
        let (root, guests, twin) = delegation();
        let roots = [root.cert.clone()];
        let trust = Trust::new(roots.to_vec());
        let (_, _, vm) = node(&guests, "vm-1", "10.42.1.1/16");
        let mut b = body("guests", 5);
        b.keys.push(hex::encode(vm.key_hash));
        let mine = sign_delegated(&guests.cert, &[], &guests.key, &b).unwrap();
        assert_eq!(trust.install(&mine, NOW), Ok(true));
        // The twin (same name, another key) signs an empty list with the highest number.
        let theirs = sign_delegated(&twin.cert, &[], &twin.key, &body("guests", u64::MAX)).unwrap();
        assert_eq!(
            trust.install(&theirs, NOW),
            Ok(true),
            "held beside, by its key"
        );
        assert!(trust.is_revoked(&vm), "still revoked");
        // And the real CA's next list still goes in.
        let next = sign_delegated(&guests.cert, &[], &guests.key, &{
            let mut n = b.clone();
            n.number = 6;
            n
        })
        .unwrap();
        assert_eq!(trust.install(&next, NOW), Ok(true));
        assert_eq!(trust.lists().len(), 2);
        // What a list says it is, before checking: its id, number and kind.
        let l = RevocationList::verify(&next, &roots, NOW).unwrap();
        assert_eq!(peek(&next), Some((l.id(), 6, false)));
        assert_ne!(
            l.id(),
            RevocationList::verify(&theirs, &roots, NOW).unwrap().id()
        );
        let rl = sign(&root.cert, &root.key, &body("root", 3)).unwrap();
        assert_eq!(peek(&rl), Some(("root".into(), 3, true)));
        assert_eq!(peek(b"not a list"), None);
    }

    #[test]
    fn a_node_holds_a_bounded_number_of_delegated_lists_and_drops_expired_ones() {
        let root = LocalCa::root("root", &[], NOW - 86_400, NOW + 86_400).unwrap();
        let roots = [root.cert.clone()];
        let trust = Trust::new(roots.to_vec());
        let mut signers = Vec::new();
        for i in 0..=crate::transport::MAX_DELEGATED_LISTS {
            let until = if i == 0 { NOW + 10 } else { NOW + 3600 };
            let c = root
                .intermediate(
                    &format!("ca-{i}"),
                    &[],
                    &[Role::Guest],
                    &[],
                    NOW - 60,
                    until,
                )
                .unwrap();
            let l = sign_delegated(&c.cert, &[], &c.key, &body(&format!("ca-{i}"), 1)).unwrap();
            signers.push(l);
        }
        let (last, first) = (signers.pop().unwrap(), &signers);
        for l in first {
            assert_eq!(trust.install(l, NOW), Ok(true));
        }
        assert_eq!(
            trust.install(&last, NOW),
            Err(RevocationError::TooMany(
                crate::transport::MAX_DELEGATED_LISTS
            ))
        );
        // A root's list is never crowded out.
        assert_eq!(
            trust.install(&sign(&root.cert, &root.key, &body("root", 1)).unwrap(), NOW),
            Ok(true)
        );
        // ca-0's certificate has ended: its list goes, and makes room.
        assert_eq!(trust.install(&last, NOW + 20), Ok(true));
        assert_eq!(
            trust.lists().len(),
            crate::transport::MAX_DELEGATED_LISTS + 1
        );
        assert!(trust.list_summary().iter().all(|(ca, ..)| ca != "ca-0"));
        assert!(
            crate::revocation::peek(&trust.lists()[0]).is_some_and(|(_, _, root)| root),
            "the root's first"
        );
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
