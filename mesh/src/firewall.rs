//! The mesh firewall, as a pure function of (rules, peer identity, service): default deny, rules
//! by group, role, name, overlay CIDR and service. The IO shell evaluates it on every new
//! connection, stream and overlay packet, and swaps in a reloaded rule set atomically.
//!
//! A rules file carries its own `[[tests]]`: a rule set whose tests fail is refused at load, so
//! a reload can never silently open or close what the operator wrote down (like Tailscale's
//! policy tests).
//!
//! ```toml
//! version = 1
//! [[inbound]]
//! from = { groups = ["tenant:a"] }      # every listed group must be held
//! service = "tcp/22"
//! [[inbound]]
//! from = { role = "kbs" }
//! service = "any"
//! [[tests]]
//! from = { name = "guest-1", groups = ["tenant:a"], role = "guest", ip = "10.42.7.9" }
//! service = "tcp/22"
//! expect = "allow"
//! ```

use crate::cert::Role;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;

/// Who is asking: taken from the peer's verified certificate, never from the packet.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub role: Option<Role>,
    /// The peer's overlay address.
    pub ip: Option<IpAddr>,
}

impl Peer {
    /// The peer a verified certificate names (its first overlay address).
    pub fn from_cert(c: &crate::cert::MeshCert) -> Peer {
        Peer {
            name: c.name.clone(),
            groups: c.claims.groups.clone(),
            role: c.claims.role,
            ip: c.addrs().first().copied(),
        }
    }
}

/// What is being reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Service {
    /// A service selected by ALPN on a mesh connection (e.g. "attesta-kbs/1").
    Named(String),
    /// An overlay IP packet.
    Packet { proto: Proto, port: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// A rule's service pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Named(String),
    Ports { proto: Proto, lo: u16, hi: u16 },
    Icmp,
}

/// Who a rule admits: every field given must match (an empty rule admits nobody).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub groups: Vec<String>,
    pub role: Option<Role>,
    pub name: Option<String>,
    pub cidr: Option<String>,
    /// Explicitly anyone with a valid certificate (never implied by an empty rule).
    #[serde(default)]
    pub any: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: From,
    service: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Peer,
    service: String,
    expect: Expect,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    version: u32,
    #[serde(default)]
    inbound: Vec<RawRule>,
    #[serde(default)]
    tests: Vec<RawTest>,
}

#[derive(Clone, Debug)]
struct Rule {
    from: From,
    cidr: Option<IpNet>,
    service: Pattern,
}

/// A loaded, validated, self-tested rule set.
#[derive(Clone, Debug, Default)]
pub struct Firewall {
    rules: Vec<Rule>,
}

/// The verdict, with the rule that allowed (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow { rule: usize },
    Deny,
}

/// Why a rules file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("rules: {0}")]
    Syntax(String),
    #[error("rules: version {0} is not supported (this build reads 1)")]
    Version(u32),
    #[error("rule {rule}: {why}")]
    Rule { rule: usize, why: String },
    #[error("test {test} ({peer} → {service}): expected {expected}, the rules say {got}")]
    TestFailed {
        test: usize,
        peer: String,
        service: String,
        expected: &'static str,
        got: &'static str,
    },
}

fn parse_service(s: &str) -> Result<Pattern, String> {
    let s = s.trim();
    if s == "any" {
        return Ok(Pattern::Any);
    }
    if s == "icmp" {
        return Ok(Pattern::Icmp);
    }
    // "tcp/…" and "udp/…" are ports; any other name (an ALPN such as "attesta-kbs/1") is a
    // mesh service.
    let ports = s.split_once('/').and_then(|(proto, ports)| match proto {
        "tcp" => Some((Proto::Tcp, ports)),
        "udp" => Some((Proto::Udp, ports)),
        _ => None,
    });
    if let Some((proto, ports)) = ports {
        let (lo, hi) = match ports.split_once('-') {
            Some((a, b)) => (a, b),
            None => (ports, ports),
        };
        let p = |x: &str| {
            x.parse::<u16>()
                .map_err(|_| format!("service {s:?}: bad port {x:?}"))
        };
        let (lo, hi) = (p(lo)?, p(hi)?);
        if lo > hi {
            return Err(format!("service {s:?}: empty port range"));
        }
        return Ok(Pattern::Ports { proto, lo, hi });
    }
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("service {s:?}: not a service name"));
    }
    Ok(Pattern::Named(s.to_string()))
}

/// A test's service: a name, "tcp/PORT", "udp/PORT" or "icmp".
fn concrete(s: &str) -> Result<Service, String> {
    match parse_service(s)? {
        Pattern::Named(n) => Ok(Service::Named(n)),
        Pattern::Icmp => Ok(Service::Packet {
            proto: Proto::Icmp,
            port: 0,
        }),
        Pattern::Ports { proto, lo, hi } if lo == hi => Ok(Service::Packet { proto, port: lo }),
        _ => Err(format!("test service {s:?} must be one concrete service")),
    }
}

impl Pattern {
    fn matches(&self, s: &Service) -> bool {
        match (self, s) {
            (Pattern::Any, _) => true,
            (Pattern::Named(a), Service::Named(b)) => a == b,
            (Pattern::Icmp, Service::Packet { proto, .. }) => *proto == Proto::Icmp,
            (Pattern::Ports { proto, lo, hi }, Service::Packet { proto: p, port }) => {
                proto == p && (lo..=hi).contains(&port)
            }
            _ => false,
        }
    }
}

impl Rule {
    fn admits(&self, peer: &Peer) -> bool {
        let f = &self.from;
        let constrained =
            !f.groups.is_empty() || f.role.is_some() || f.name.is_some() || self.cidr.is_some();
        if !f.any && !constrained {
            return false;
        }
        f.groups.iter().all(|g| peer.groups.contains(g))
            && f.role.is_none_or(|r| peer.role == Some(r))
            && f.name.as_ref().is_none_or(|n| *n == peer.name)
            && self
                .cidr
                .is_none_or(|c| peer.ip.is_some_and(|ip| c.contains(&ip)))
    }
}

impl Firewall {
    /// Parses, validates and runs the file's own tests; any failure refuses the whole file.
    pub fn load(text: &str) -> Result<Firewall, RulesError> {
        let raw: RawRules = toml::from_str(text).map_err(|e| RulesError::Syntax(e.to_string()))?;
        if raw.version != 1 {
            return Err(RulesError::Version(raw.version));
        }
        let mut rules = Vec::with_capacity(raw.inbound.len());
        for (i, r) in raw.inbound.into_iter().enumerate() {
            let bad = |why: String| RulesError::Rule { rule: i + 1, why };
            let cidr = match &r.from.cidr {
                Some(c) => Some(
                    c.parse::<IpNet>()
                        .map_err(|_| bad(format!("{c:?} is not a CIDR")))?,
                ),
                None => None,
            };
            let constrained = !r.from.groups.is_empty()
                || r.from.role.is_some()
                || r.from.name.is_some()
                || cidr.is_some();
            if constrained == r.from.any {
                return Err(bad(
                    "name who it admits (groups, role, name, cidr) or say any = true, not both"
                        .into(),
                ));
            }
            rules.push(Rule {
                service: parse_service(&r.service).map_err(bad)?,
                from: r.from,
                cidr,
            });
        }
        let fw = Firewall { rules };
        for (i, t) in raw.tests.iter().enumerate() {
            let service = concrete(&t.service).map_err(|why| RulesError::Rule { rule: 0, why })?;
            let got = fw.decide(&t.from, &service);
            let (expected, ok) = match t.expect {
                Expect::Allow => ("allow", matches!(got, Verdict::Allow { .. })),
                Expect::Deny => ("deny", got == Verdict::Deny),
            };
            if !ok {
                return Err(RulesError::TestFailed {
                    test: i + 1,
                    peer: t.from.name.clone(),
                    service: t.service.clone(),
                    expected,
                    got: if got == Verdict::Deny {
                        "deny"
                    } else {
                        "allow"
                    },
                });
            }
        }
        Ok(fw)
    }

    /// Default deny: the first rule that admits the peer for the service allows.
    pub fn decide(&self, peer: &Peer, service: &Service) -> Verdict {
        self.rules
            .iter()
            .position(|r| r.service.matches(service) && r.admits(peer))
            .map_or(Verdict::Deny, |rule| Verdict::Allow { rule })
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
version = 1
[[inbound]]
from = { groups = ["tenant:a"] }
service = "tcp/22"
[[inbound]]
from = { role = "kbs" }
service = "any"
[[inbound]]
from = { cidr = "10.42.9.0/24", groups = ["ops"] }
service = "tcp/9000-9100"
[[inbound]]
from = { any = true }
service = "icmp"
[[tests]]
from = { name = "g1", groups = ["tenant:a"], role = "guest", ip = "10.42.7.9" }
service = "tcp/22"
expect = "allow"
[[tests]]
from = { name = "g2", groups = ["tenant:b"], role = "guest", ip = "10.42.8.9" }
service = "tcp/22"
expect = "deny"
"#;

    fn peer(groups: &[&str], role: Option<Role>, ip: &str) -> Peer {
        Peer {
            name: "p".into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            role,
            ip: ip.parse().ok(),
        }
    }

    #[test]
    fn default_deny_and_each_rule_kind() {
        let fw = Firewall::load(RULES).unwrap();
        let ssh = Service::Packet {
            proto: Proto::Tcp,
            port: 22,
        };
        assert_eq!(
            fw.decide(&peer(&["tenant:a"], None, "10.42.7.1"), &ssh),
            Verdict::Allow { rule: 0 }
        );
        assert_eq!(
            fw.decide(&peer(&["tenant:b"], None, "10.42.7.1"), &ssh),
            Verdict::Deny
        );
        assert_eq!(
            fw.decide(
                &peer(&[], Some(Role::Kbs), "10.42.0.1"),
                &Service::Named("x".into())
            ),
            Verdict::Allow { rule: 1 }
        );
        let p9050 = Service::Packet {
            proto: Proto::Tcp,
            port: 9050,
        };
        assert!(matches!(
            fw.decide(&peer(&["ops"], None, "10.42.9.3"), &p9050),
            Verdict::Allow { .. }
        ));
        assert_eq!(
            fw.decide(&peer(&["ops"], None, "10.42.8.3"), &p9050),
            Verdict::Deny,
            "outside the CIDR"
        );
        assert_eq!(
            fw.decide(&peer(&[], None, "10.42.9.3"), &p9050),
            Verdict::Deny,
            "without the group"
        );
        let udp = Service::Packet {
            proto: Proto::Udp,
            port: 9050,
        };
        assert_eq!(
            fw.decide(&peer(&["ops"], None, "10.42.9.3"), &udp),
            Verdict::Deny,
            "wrong protocol"
        );
        let ping = Service::Packet {
            proto: Proto::Icmp,
            port: 0,
        };
        assert!(matches!(
            fw.decide(&peer(&[], None, "10.1.1.1"), &ping),
            Verdict::Allow { .. }
        ));
        assert_eq!(
            Firewall::default().decide(&peer(&["tenant:a"], Some(Role::Kbs), "10.42.7.1"), &ssh),
            Verdict::Deny
        );
    }

    #[test]
    fn bad_files_and_failing_tests_are_refused() {
        let failing = RULES.replace("expect = \"deny\"", "expect = \"allow\"");
        assert!(matches!(
            Firewall::load(&failing),
            Err(RulesError::TestFailed { test: 2, .. })
        ));
        for bad in [
            "version = 2",
            "version = 1\n[[inbound]]\nfrom = {}\nservice = \"any\"",
            "version = 1\n[[inbound]]\nfrom = { any = true, role = \"kbs\" }\nservice = \"any\"",
            "version = 1\n[[inbound]]\nfrom = { cidr = \"10.0.0.0/33\" }\nservice = \"any\"",
            "version = 1\n[[inbound]]\nfrom = { any = true }\nservice = \"tcp/9-1\"",
            "version = 1\n[[inbound]]\nfrom = { any = true }\nservice = \"udp/http\"",
            "version = 1\n[[inbound]]\nfrom = { any = true }\nservice = \"bad name\"",
            "version = 1\n[[inbound]]\nfrom = { any = true }\nservice = \"any\"\nextra = 1",
        ] {
            assert!(Firewall::load(bad).is_err(), "{bad}");
        }
        // Any other "x/y" is a mesh service named by its ALPN, never a port range.
        let fw = Firewall::load(
            "version = 1\n[[inbound]]\nfrom = { role = \"guest\" }\nservice = \"attesta-kbs/1\"",
        )
        .unwrap();
        let guest = Peer {
            name: "g".into(),
            groups: vec![],
            role: Some(Role::Guest),
            ip: None,
        };
        assert!(matches!(
            fw.decide(&guest, &Service::Named("attesta-kbs/1".into())),
            Verdict::Allow { .. }
        ));
        assert_eq!(
            fw.decide(
                &guest,
                &Service::Packet {
                    proto: Proto::Tcp,
                    port: 1
                }
            ),
            Verdict::Deny
        );
    }
}
