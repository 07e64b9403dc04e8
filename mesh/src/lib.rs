//! # mesh — Attesta's overlay network
//!
//! A Nebula-like overlay on QUIC that will carry all of the system's traffic. This crate so far
//! holds its sans-IO cores: the identity layer ([`cert`]: the mesh CA, intermediate CAs and node
//! certificates, with Nebula-style constraints — a child's groups, networks and validity lie
//! within its issuer's — enforced when signing and again when verifying) and the default-deny
//! [`firewall`] with self-testing rule files. Transport, lighthouses, rotation, revocation and
//! the tun overlay come next (issue 5).
#![forbid(unsafe_code)]

pub mod cert;
pub mod firewall;
pub mod lighthouse;
pub mod node;
pub mod packet;
pub mod revocation;
pub mod transport;
pub mod watch;

/// "8760h", "30d", "90m", "3600s" or plain seconds, as the CLI and node.toml take them.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'd')) => (&s[..i], 86_400),
        Some((i, 'h')) => (&s[..i], 3_600),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 's')) => (&s[..i], 1),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("duration {s:?}: expected e.g. 8760h, 30d, 90m or 3600s"))
}

/// Unix seconds now (0 if the clock is before 1970: every validity check then fails closed).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Locks that stay usable after a panicking holder: the state they guard is replaced whole,
/// never left half-updated, so a poisoned lock's value is still sound.
pub(crate) trait Locked<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> Locked<T> for std::sync::Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A CA and nodes for the unit tests.
#[cfg(test)]
pub(crate) mod test_pki {
    use crate::cert::{Curve, LocalCa, MeshCert, Role};
    use rustls::pki_types::CertificateDer;

    pub const NOW: u64 = 1_800_000_000;

    pub struct Ca {
        pub cert: MeshCert,
        pub key: String,
    }

    pub fn ca(name: &str, curve: Curve) -> Ca {
        if curve == Curve::Ed25519 {
            let c = LocalCa::root(name, &[], NOW - 86_400, NOW + 86_400).unwrap();
            return Ca {
                cert: c.cert,
                key: c.key.to_string(),
            };
        }
        let i = crate::cert::new_root(&crate::cert::Request {
            name,
            claims: crate::cert::Claims {
                v: 1,
                role: Some(Role::Ca),
                ..Default::default()
            },
            is_ca: true,
            not_before: NOW - 86_400,
            not_after: NOW + 86_400,
            curve,
        })
        .unwrap();
        Ca {
            cert: crate::cert::parse_bundle(i.cert_pem.as_bytes())
                .unwrap()
                .remove(0),
            key: i.key_pem.to_string(),
        }
    }

    /// The CA as a [`LocalCa`] (to issue with).
    pub fn local(ca: &Ca) -> LocalCa {
        LocalCa {
            cert: ca.cert.clone(),
            pem: String::new(),
            key: zeroize::Zeroizing::new(ca.key.clone()),
        }
    }

    /// A node: (chain DER, key PEM, leaf).
    pub fn node(ca: &Ca, name: &str, ip: &str) -> (Vec<CertificateDer<'static>>, String, MeshCert) {
        let n = local(ca)
            .issue(name, ip, &["tenant:a"], Role::Guest, NOW - 3600, NOW + 3600)
            .unwrap();
        (
            vec![CertificateDer::from(n.cert.der.clone())],
            n.issued.key_pem.to_string(),
            n.cert,
        )
    }
}
