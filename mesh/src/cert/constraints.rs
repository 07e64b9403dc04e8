//! What a CA may issue: groups, networks, roles and names. A child must lie within its
//! issuer's constraints, and a child CA may narrow them but never widen or drop them; checked
//! by [`MeshCert::within`] when signing and again at every link when verifying.
//!
//! Names are patterns: `*` is one plain label (`[A-Za-z0-9_-]`, no dot: what VM ids are, so a
//! guest CA limited to `*` can never issue a service's dotted name such as
//! `kbs.attesta.local`); `*.SUFFIX` is one plain label, a dot, then SUFFIX; anything else is
//! that exact name. Matching is exact (case-sensitive): an allow-list never grows by folding.

use super::{CertError, MeshCert, Role, is_plain_name};
use std::net::IpAddr;
use x509_cert::ext::pkix::name::GeneralName;

/// Longest name pattern (a DNS name's longest).
const MAX_PATTERN: usize = 253;

/// One of a CA's `names`, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern<'a> {
    /// `*`: one plain label.
    Label,
    /// `*.SUFFIX`: one plain label under SUFFIX.
    Under(&'a str),
    /// That name exactly.
    Exact(&'a str),
}

fn pattern(p: &str) -> Result<Pattern<'_>, String> {
    if p == "*" {
        return Ok(Pattern::Label);
    }
    let (kind, rest) = match p.strip_prefix("*.") {
        Some(s) => (Pattern::Under(s), s),
        None => (Pattern::Exact(p), p),
    };
    let labels_ok = rest.split('.').all(|l| !l.is_empty());
    if p.len() > MAX_PATTERN || rest.is_empty() || rest.contains('*') || !labels_ok {
        return Err(format!(
            "name pattern {p:?}: expected `*`, `*.SUFFIX` or an exact name (1-{MAX_PATTERN} characters, no empty label, `*` only in front)"
        ));
    }
    Ok(kind)
}

/// Checks a name pattern (what `ca new --names` takes): `*`, `*.SUFFIX` or an exact name.
pub fn check_name_pattern(p: &str) -> Result<(), String> {
    pattern(p).map(|_| ())
}

fn matches(p: Pattern<'_>, name: &str) -> bool {
    match p {
        Pattern::Label => is_plain_name(name),
        Pattern::Under(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(is_plain_name),
        Pattern::Exact(n) => name == n,
    }
}

/// Whether every name `child` allows, `parent` allows too. A wildcard is covered only by the
/// same wildcard: `*` names have no dot, and `*.S` names split at their first dot into one
/// label and S, so no other pattern holds all of them.
fn covers(parent: Pattern<'_>, child: Pattern<'_>) -> bool {
    match child {
        Pattern::Exact(n) => matches(parent, n),
        wild => parent == wild,
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Kbs => "kbs",
        Role::Lighthouse => "lighthouse",
        Role::Host => "host",
        Role::Guest => "guest",
        Role::Operator => "operator",
        Role::Ca => "ca",
    }
}

/// What a certificate's claims must be on their own (at parsing): roles and names are a CA's
/// (on a node they would read as a grant), a CA grants node roles only, and every name pattern
/// is well formed.
pub(super) fn check_claims(is_ca: bool, claims: &super::Claims) -> Result<(), String> {
    if !is_ca && (!claims.roles.is_empty() || !claims.names.is_empty()) {
        return Err("only CA certificates carry roles and names".into());
    }
    if claims.roles.contains(&Role::Ca) {
        return Err("roles are node roles: ca cannot be granted (a sub-CA is bound by its parent's roles instead)".into());
    }
    claims.names.iter().try_for_each(|p| check_name_pattern(p))
}

/// The subject alternative names must repeat what the claims say (the DNS name is the
/// certificate's name, IP addresses its overlay addresses), as [`super::sign`] writes them:
/// standard TLS stacks read these, so they must not escape the constraints the claims obey.
pub(super) fn check_alt_names(
    alt: &[GeneralName],
    name: &str,
    ips: &[ipnet::IpNet],
) -> Result<(), String> {
    for g in alt {
        let (ok, shown) = match g {
            GeneralName::DnsName(d) => (d.as_str() == name, format!("DNS {:?}", d.as_str())),
            GeneralName::IpAddress(o) => {
                let ip = match o.as_bytes().len() {
                    4 => <[u8; 4]>::try_from(o.as_bytes()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(o.as_bytes()).ok().map(IpAddr::from),
                    _ => None,
                };
                let ok = ip.is_some_and(|ip| ips.iter().any(|n| n.addr() == ip));
                (
                    ok,
                    ip.map_or("a malformed IP".into(), |ip| format!("IP {ip}")),
                )
            }
            _ => (false, "of another kind".into()),
        };
        if !ok {
            return Err(format!(
                "subject alternative name {shown} is neither its name nor one of its overlay addresses"
            ));
        }
    }
    Ok(())
}

impl MeshCert {
    /// Checks that this certificate's claims and validity lie within `issuer`'s.
    pub fn within(&self, issuer: &MeshCert) -> Result<(), CertError> {
        if !issuer.is_ca {
            return Err(CertError::IssuerNotCa {
                name: self.name.clone(),
                issuer: issuer.name.clone(),
            });
        }
        // A sub-CA of a constrained CA must be constrained too (empty would mean "anything").
        if self.is_ca && !issuer.claims.groups.is_empty() && self.claims.groups.is_empty() {
            return Err(CertError::GroupOutside {
                name: self.name.clone(),
                group: "(any)".into(),
                issuer: issuer.name.clone(),
            });
        }
        if self.is_ca && !issuer.networks.is_empty() && self.networks.is_empty() {
            return Err(CertError::NetworkOutside {
                name: self.name.clone(),
                ip: "(any)".into(),
                issuer: issuer.name.clone(),
            });
        }
        if !issuer.claims.groups.is_empty() {
            for g in &self.claims.groups {
                if !issuer.claims.groups.contains(g) {
                    return Err(CertError::GroupOutside {
                        name: self.name.clone(),
                        group: g.clone(),
                        issuer: issuer.name.clone(),
                    });
                }
            }
        }
        if !issuer.networks.is_empty() {
            for n in self.ips.iter().chain(self.networks.iter()) {
                if !issuer.networks.iter().any(|p| p.contains(n)) {
                    return Err(CertError::NetworkOutside {
                        name: self.name.clone(),
                        ip: n.to_string(),
                        issuer: issuer.name.clone(),
                    });
                }
            }
        }
        self.roles_within(issuer)?;
        self.names_within(issuer)?;
        if self.not_before < issuer.not_before || self.not_after > issuer.not_after {
            return Err(CertError::ValidityOutside {
                name: self.name.clone(),
                issuer: issuer.name.clone(),
            });
        }
        Ok(())
    }

    /// A node's role must be one of the issuer's roles; a sub-CA's roles a subset of them.
    fn roles_within(&self, issuer: &MeshCert) -> Result<(), CertError> {
        let allowed = &issuer.claims.roles;
        if allowed.is_empty() {
            return Ok(());
        }
        let outside = |role: &str| CertError::RoleOutside {
            name: self.name.clone(),
            role: role.into(),
            issuer: issuer.name.clone(),
        };
        if self.is_ca {
            if self.claims.roles.is_empty() {
                return Err(outside("(any)"));
            }
            match self.claims.roles.iter().find(|r| !allowed.contains(r)) {
                Some(r) => Err(outside(role_name(*r))),
                None => Ok(()),
            }
        } else {
            match self.claims.role {
                Some(r) if allowed.contains(&r) => Ok(()),
                Some(r) => Err(outside(role_name(r))),
                None => Err(outside("(none)")),
            }
        }
    }

    /// A node's name must match one of the issuer's patterns; each of a sub-CA's patterns must
    /// be covered by one of them. A pattern that does not parse matches nothing (fail closed).
    fn names_within(&self, issuer: &MeshCert) -> Result<(), CertError> {
        if issuer.claims.names.is_empty() {
            return Ok(());
        }
        let allowed: Vec<Pattern<'_>> = issuer
            .claims
            .names
            .iter()
            .filter_map(|p| pattern(p).ok())
            .collect();
        let outside = |what: &str| CertError::NameOutside {
            name: self.name.clone(),
            what: what.into(),
            issuer: issuer.name.clone(),
        };
        if !self.is_ca {
            return match allowed.iter().any(|p| matches(*p, &self.name)) {
                true => Ok(()),
                false => Err(outside(&self.name)),
            };
        }
        if self.claims.names.is_empty() {
            return Err(outside("(any)"));
        }
        for p in &self.claims.names {
            let ok = pattern(p).is_ok_and(|c| allowed.iter().any(|q| covers(*q, c)));
            if !ok {
                return Err(outside(p));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
