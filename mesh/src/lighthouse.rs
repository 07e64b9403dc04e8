//! Discovery, sans-IO: signed underlay announcements, the lighthouse's directory, and the mesh
//! control protocol's messages (ALPN [`CONTROL_ALPN`]).
//!
//! A node signs "I am NAME, reachable at these underlay addresses, as of T" with its own mesh
//! key and sends it with its certificate chain to every lighthouse it knows. Because the
//! announcement is signed by its subject, any lighthouse may relay it to the others (they
//! replicate, so two nodes need not share a lighthouse) and no lighthouse can forge one. A
//! directory keeps only the newest announcement per name and forgets it after a time to live.

use crate::cert::{MeshCert, Role, sign_with};
use crate::transport::Trust;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The mesh's own control service: announcements, queries, revocation lists.
pub const CONTROL_ALPN: &[u8] = b"attesta-mesh/1";
/// Largest control message.
pub const MAX_MESSAGE: usize = 2 << 20;
/// Largest announcement.
pub const MAX_ANNOUNCEMENT: usize = 64 * 1024;
/// Underlay addresses per announcement.
pub const MAX_ADDRS: usize = 16;
/// How far in the future an announcement's time may lie.
pub const MAX_SKEW: u64 = 60;
const DOMAIN: &[u8] = b"attesta-mesh announcement v1\0";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    v: u32,
    name: String,
    addrs: Vec<SocketAddr>,
    at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    body: String,
    /// The node's chain, leaf first, DER in hex.
    chain: Vec<String>,
    signature: String,
}

/// A verified announcement.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub name: String,
    pub overlay: Vec<IpAddr>,
    pub role: Option<Role>,
    pub groups: Vec<String>,
    pub addrs: Vec<SocketAddr>,
    pub at: u64,
    /// Until when the certificate is valid (the entry goes with it).
    pub not_after: u64,
    /// As signed, to relay unchanged.
    pub doc: String,
}

/// Why an announcement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    #[error("announcement: {0}")]
    Malformed(String),
    #[error("announcement: the certificate is refused: {0}")]
    Certificate(String),
    #[error("announcement: signed for {claimed:?} by the key of {actual:?}")]
    NameMismatch { claimed: String, actual: String },
    #[error("announcement: the signature does not verify with {0}'s key")]
    Signature(String),
    #[error("announcement: dated {at}, in the future (now {now})")]
    Future { at: u64, now: u64 },
}

/// Signs an announcement of `addrs` at `at` with the node's key.
pub fn announce(
    chain: &[CertificateDer<'_>],
    key_pem: &str,
    addrs: &[SocketAddr],
    at: u64,
) -> Result<String, AnnounceError> {
    let leaf = chain
        .first()
        .ok_or_else(|| AnnounceError::Malformed("empty chain".into()))?;
    let leaf = MeshCert::parse(leaf).map_err(|e| AnnounceError::Certificate(e.to_string()))?;
    let body = Body {
        v: 1,
        name: leaf.name.clone(),
        addrs: addrs.iter().take(MAX_ADDRS).copied().collect(),
        at,
    };
    let text = serde_json::to_string(&body).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(text.as_bytes());
    let sig =
        sign_with(&leaf, key_pem, &msg).map_err(|e| AnnounceError::Certificate(e.to_string()))?;
    let env = Envelope {
        body: text,
        chain: chain.iter().map(hex::encode).collect(),
        signature: hex::encode(sig),
    };
    serde_json::to_string(&env).map_err(|e| AnnounceError::Malformed(e.to_string()))
}

/// Verifies an announcement against what this node trusts at `now`. Never panics.
pub fn verify(doc: &str, trust: &Trust, now: u64) -> Result<Announcement, AnnounceError> {
    if doc.len() > MAX_ANNOUNCEMENT {
        return Err(AnnounceError::Malformed(format!("{} bytes", doc.len())));
    }
    let env: Envelope =
        serde_json::from_str(doc).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    let body: Body =
        serde_json::from_str(&env.body).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    if body.v != 1 {
        return Err(AnnounceError::Malformed(format!("version {}", body.v)));
    }
    if body.addrs.is_empty() || body.addrs.len() > MAX_ADDRS {
        return Err(AnnounceError::Malformed(format!(
            "{} underlay addresses (1 to {MAX_ADDRS})",
            body.addrs.len()
        )));
    }
    let ders = env
        .chain
        .iter()
        .map(|h| hex::decode(h).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| AnnounceError::Malformed("the chain is not hex".into()))?;
    let (leaf_der, rest) = ders
        .split_first()
        .ok_or_else(|| AnnounceError::Malformed("empty chain".into()))?;
    let leaf = trust
        .check(leaf_der, rest, now)
        .map_err(AnnounceError::Certificate)?;
    if leaf.name != body.name {
        return Err(AnnounceError::NameMismatch {
            claimed: body.name,
            actual: leaf.name,
        });
    }
    let sig = hex::decode(&env.signature)
        .map_err(|_| AnnounceError::Malformed("the signature is not hex".into()))?;
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(env.body.as_bytes());
    if !leaf.verify_signed(&msg, &sig) {
        return Err(AnnounceError::Signature(leaf.name));
    }
    if body.at > now.saturating_add(MAX_SKEW) {
        return Err(AnnounceError::Future { at: body.at, now });
    }
    Ok(Announcement {
        overlay: leaf.addrs(),
        role: leaf.claims.role,
        groups: leaf.claims.groups.clone(),
        not_after: leaf.not_after,
        name: body.name,
        addrs: body.addrs,
        at: body.at,
        doc: doc.to_string(),
    })
}

/// A lighthouse's view of the mesh: the newest announcement per node name.
#[derive(Debug, Default)]
pub struct Directory {
    by_name: HashMap<String, Announcement>,
    /// Seconds an announcement stays after its time.
    ttl: u64,
}

impl Directory {
    pub fn new(ttl: u64) -> Directory {
        Directory {
            by_name: HashMap::new(),
            ttl,
        }
    }

    /// Keeps `a` if it is newer than what is held for its name. True when it changed the
    /// directory (and should be relayed to the other lighthouses); relaying stops where
    /// nothing changes, so replication cannot loop.
    pub fn insert(&mut self, a: Announcement) -> bool {
        match self.by_name.get(&a.name) {
            Some(have) if have.at >= a.at => false,
            _ => {
                self.by_name.insert(a.name.clone(), a);
                true
            }
        }
    }

    fn live(&self, a: &Announcement, now: u64) -> bool {
        now <= a.at.saturating_add(self.ttl) && now <= a.not_after
    }

    /// The live node holding overlay address `ip`.
    pub fn by_ip(&self, ip: IpAddr, now: u64) -> Option<&Announcement> {
        self.by_name
            .values()
            .filter(|a| self.live(a, now) && a.overlay.contains(&ip))
            .max_by_key(|a| a.at)
    }

    pub fn by_name(&self, name: &str, now: u64) -> Option<&Announcement> {
        self.by_name.get(name).filter(|a| self.live(a, now))
    }

    /// Forgets expired entries.
    pub fn expire(&mut self, now: u64) {
        let ttl = self.ttl;
        self.by_name
            .retain(|_, a| now <= a.at.saturating_add(ttl) && now <= a.not_after);
    }

    /// Every live announcement, as signed (a replica's initial sync).
    pub fn docs(&self, now: u64) -> Vec<String> {
        self.by_name
            .values()
            .filter(|a| self.live(a, now))
            .map(|a| a.doc.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Why a lighthouse refuses a control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Only another lighthouse gets the whole directory; others look up one address at a time.
    #[error(
        "the directory dump is served to role lighthouse only (the requester's role is {})",
        role_text(*.role)
    )]
    DumpNotLighthouse { role: Option<Role> },
}

fn role_text(role: Option<Role>) -> &'static str {
    match role {
        None => "none",
        Some(Role::Kbs) => "kbs",
        Some(Role::Lighthouse) => "lighthouse",
        Some(Role::Host) => "host",
        Some(Role::Guest) => "guest",
        Some(Role::Operator) => "operator",
        Some(Role::Ca) => "ca",
    }
}

/// Whether a requester whose certificate has role `requester` may have the whole directory
/// ([`Msg::Dump`]): every node's name, groups, role, overlay and underlay addresses, across
/// tenants. Only lighthouses, which replicate each other (a restarted one syncs from the
/// others), need it. Nothing else asks for it: nodes look up one overlay address at a time
/// ([`Msg::Query`]), and no operator tool reads it (an operator, kbs or host certificate is
/// held outside the lighthouse tier and would learn the fleet's layout for no use), so it is
/// refused to every other role and to a certificate without one.
pub fn may_dump(requester: Option<Role>) -> Result<(), Refusal> {
    match requester {
        Some(Role::Lighthouse) => Ok(()),
        role => Err(Refusal::DumpNotLighthouse { role }),
    }
}

/// Control-protocol messages: one request and one response per bidirectional stream; pushes
/// (revocation lists) on unidirectional streams. Framed as a 4-byte big-endian length and JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// A node's signed announcement (its own, or relayed between lighthouses).
    Announce {
        doc: String,
    },
    /// Who holds this overlay address?
    Query {
        ip: IpAddr,
    },
    Found {
        doc: String,
    },
    NotFound,
    /// Every live announcement (a lighthouse syncing from another); answered to role
    /// lighthouse only ([`may_dump`]), anyone else gets [`Msg::Error`] with the [`Refusal`].
    Dump,
    Entries {
        docs: Vec<String>,
    },
    /// Signed revocation lists, as files.
    Revocations {
        docs: Vec<String>,
    },
    GetRevocations,
    Ok,
    Error {
        why: String,
    },
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("control message: {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("control message: {0}")]
    Malformed(String),
}

impl Msg {
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let body = serde_json::to_vec(self).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if body.len() > MAX_MESSAGE {
            return Err(FrameError::TooLarge(body.len()));
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The length a frame header announces, checked against the limit.
    pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
        let n = u32::from_be_bytes(header) as usize;
        if n > MAX_MESSAGE {
            return Err(FrameError::TooLarge(n));
        }
        Ok(n)
    }

    pub fn decode(body: &[u8]) -> Result<Msg, FrameError> {
        if body.len() > MAX_MESSAGE {
            return Err(FrameError::TooLarge(body.len()));
        }
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::Curve;
    use crate::test_pki::{NOW, ca, node};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn announcements_verify_and_forgeries_do_not() {
        let root = ca("root", Curve::Ed25519);
        let trust = Trust::new(vec![root.cert.clone()]);
        let (chain, key, leaf) = node(&root, "a", "10.42.0.1/16");
        let (_, key_b, _) = node(&root, "b", "10.42.0.2/16");
        let doc = announce(&chain, &key, &[addr("192.0.2.1:4242")], NOW).unwrap();
        let a = verify(&doc, &trust, NOW).unwrap();
        assert_eq!(a.name, "a");
        assert_eq!(a.overlay, leaf.addrs());
        assert_eq!(a.addrs, vec![addr("192.0.2.1:4242")]);

        // Someone else's key cannot announce for a (sign_with refuses; a hand-made one fails).
        assert!(announce(&chain, &key_b, &[addr("192.0.2.9:1")], NOW).is_err());
        let redirected = doc.replace("192.0.2.1", "192.0.2.66");
        assert_ne!(redirected, doc);
        assert_eq!(
            verify(&redirected, &trust, NOW).unwrap_err(),
            AnnounceError::Signature("a".into()),
            "a lighthouse cannot redirect a node's traffic"
        );
        assert!(matches!(
            verify(
                &doc,
                &Trust::new(vec![ca("root", Curve::Ed25519).cert]),
                NOW
            ),
            Err(AnnounceError::Certificate(_))
        ));
        let future = announce(&chain, &key, &[addr("192.0.2.1:4242")], NOW + 600).unwrap();
        assert!(matches!(
            verify(&future, &trust, NOW),
            Err(AnnounceError::Future { .. })
        ));
        assert!(matches!(
            verify(&doc, &trust, NOW + 7200),
            Err(AnnounceError::Certificate(_)),
        ));
        let none = announce(&chain, &key, &[], NOW).unwrap();
        assert!(matches!(
            verify(&none, &trust, NOW),
            Err(AnnounceError::Malformed(_))
        ));
        // A revoked node's announcements are refused.
        trust.revoke_locally(|r| {
            r.keys.insert(leaf.key_hash);
        });
        assert!(matches!(
            verify(&doc, &trust, NOW),
            Err(AnnounceError::Certificate(_))
        ));
    }

    #[test]
    fn the_directory_keeps_the_newest_and_forgets_the_stale() {
        let root = ca("root", Curve::Ed25519);
        let trust = Trust::new(vec![root.cert.clone()]);
        let (chain, key, _) = node(&root, "a", "10.42.0.1/16");
        let ip: IpAddr = "10.42.0.1".parse().unwrap();
        let at = |t: u64, a: &str| {
            verify(&announce(&chain, &key, &[addr(a)], t).unwrap(), &trust, NOW).unwrap()
        };
        let mut dir = Directory::new(300);
        assert!(dir.insert(at(NOW - 10, "192.0.2.1:1")));
        assert!(
            !dir.insert(at(NOW - 10, "192.0.2.1:1")),
            "a repeat changes nothing"
        );
        assert!(
            !dir.insert(at(NOW - 20, "192.0.2.2:1")),
            "an older one is ignored"
        );
        assert!(dir.insert(at(NOW, "192.0.2.3:1")));
        assert_eq!(dir.by_ip(ip, NOW).unwrap().addrs, vec![addr("192.0.2.3:1")]);
        assert!(dir.by_ip("10.42.0.2".parse().unwrap(), NOW).is_none());
        assert_eq!(dir.docs(NOW).len(), 1);
        assert!(dir.by_ip(ip, NOW + 301).is_none(), "past its time to live");
        dir.expire(NOW + 301);
        assert!(dir.is_empty());
    }

    #[test]
    fn only_a_lighthouse_gets_the_whole_directory() {
        assert_eq!(may_dump(Some(Role::Lighthouse)), Ok(()));
        for role in [
            None,
            Some(Role::Guest),
            Some(Role::Host),
            Some(Role::Kbs),
            Some(Role::Operator),
            Some(Role::Ca),
        ] {
            assert_eq!(
                may_dump(role),
                Err(Refusal::DumpNotLighthouse { role }),
                "{role:?} must not get the directory"
            );
        }
        assert_eq!(
            may_dump(Some(Role::Guest)).unwrap_err().to_string(),
            "the directory dump is served to role lighthouse only (the requester's role is guest)"
        );
    }

    #[test]
    fn frames_have_limits() {
        let m = Msg::Query {
            ip: "10.42.0.1".parse().unwrap(),
        };
        let f = m.encode().unwrap();
        let n = Msg::frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(Msg::decode(&f[4..4 + n]).unwrap(), m);
        assert!(Msg::frame_len((MAX_MESSAGE as u32 + 1).to_be_bytes()).is_err());
        assert!(Msg::decode(b"{\"t\":\"query\",\"ip\":\"10.42.0.1\",\"x\":1}").is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Msg::decode(&data);
            let trust = Trust::default();
            if let Ok(s) = std::str::from_utf8(&data) {
                let _ = verify(s, &trust, NOW);
            }
        }
    }
}
