//! The broker's per-party limits, sans-IO: how many connections one source address may hold
//! ([`AddressSlots`]), and what one connection may ask for ([`SessionBudget`]). The QUIC loop
//! ([`crate::quic`]) applies them; nothing here reads a clock or a socket.
//!
//! Why a cap on *concurrent* connections per address, and refusal beyond it: without one, 64
//! connections from one address took every admission slot (`max_sessions`) and locked every
//! guest out for as long as they were held. A cap of a fraction of `max_sessions` leaves the rest
//! to everybody else whatever one address does. A miner's NAT with a few hundred VMs booting at
//! once is one address too: it gets `max_sessions_per_address` of its boots served at a time
//! (each takes a few round trips, tens of ms), and the connections beyond are refused at once
//! (QUIC CONNECTION_REFUSED, before any handshake work) — which the guest agent treats as an
//! unreachable broker and retries with backoff (200 ms doubling to 5 s, within its 60 s timeout).
//! So a NAT's storm is spread over a few seconds instead of being starved, and a flood from one
//! address costs the broker a refusal per attempt. Refusing instead of queueing keeps one
//! address's backlog from standing in front of everybody else's boots.
//!
//! An address is an IPv4 address, or an IPv6 /64 (one party's subnet; it holds 2^64 addresses).

use std::collections::HashMap;
use std::net::IpAddr;

/// Default `max_sessions_per_address`: a quarter of `max_sessions` (16 of the default 64), at
/// least 1. One address then holds at most a quarter of the broker, and a NAT still has 16
/// boots in flight at a time.
pub fn default_per_address(max_sessions: usize) -> usize {
    (max_sessions / 4).max(1)
}

/// Evidence messages one connection may send (a boot needs one; a retry or two more).
pub const MAX_EVIDENCE_PER_SESSION: u32 = 8;

/// Challenges one connection may ask for (a boot needs one; a retry or two more): a client
/// cannot flood the nonce book, nor push other guests' nonces out of it, from one session.
pub const MAX_CHALLENGES_PER_SESSION: u32 = 8;

/// The key a source address is counted under: an IPv4 address (also when IPv4-mapped), or the
/// /64 of an IPv6 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Connections held per source address, each at most `cap`. Holds an entry only for addresses
/// with a connection now, so its size is bounded by the connections admitted (`max_sessions`).
#[derive(Debug)]
pub struct AddressSlots {
    cap: usize,
    held: HashMap<IpAddr, usize>,
}

impl AddressSlots {
    /// At most `cap` (at least 1) connections per address.
    pub fn new(cap: usize) -> AddressSlots {
        AddressSlots {
            cap: cap.max(1),
            held: HashMap::new(),
        }
    }

    /// Connections `ip`'s address holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.held.get(&address_key(ip)).copied().unwrap_or(0)
    }

    /// Takes a slot for `ip`'s address; `false` (nothing taken) if it holds `cap` already.
    pub fn take(&mut self, ip: IpAddr) -> bool {
        let n = self.held.entry(address_key(ip)).or_default();
        if *n >= self.cap {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a slot [`AddressSlots::take`] gave `ip`.
    pub fn give_back(&mut self, ip: IpAddr) {
        let key = address_key(ip);
        if let Some(n) = self.held.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(&key);
            }
        }
    }

    /// Addresses holding a connection now.
    pub fn addresses(&self) -> usize {
        self.held.len()
    }
}

/// What a request would spend of its connection's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spend {
    Challenge,
    /// Evidence on a nonce this broker issued.
    Evidence,
    /// Evidence bound to its connection (no nonce): the connection is its challenge, so it is
    /// the connection's one and last evidence.
    BoundEvidence,
    /// Orders (hosts and operators only) are not counted.
    Other,
}

/// What one connection has asked for so far.
#[derive(Debug, Default)]
pub struct SessionBudget {
    challenges: u32,
    evidence: u32,
}

impl SessionBudget {
    /// Counts one request; the error code if it is over this connection's budget (then it is
    /// answered with that error and goes no further).
    pub fn spend(&mut self, what: Spend) -> Result<(), &'static str> {
        let (n, max, code) = match what {
            Spend::Challenge => (
                &mut self.challenges,
                MAX_CHALLENGES_PER_SESSION,
                "too_many_challenges",
            ),
            Spend::Evidence => (
                &mut self.evidence,
                MAX_EVIDENCE_PER_SESSION,
                "too_many_evidence",
            ),
            Spend::BoundEvidence => {
                if self.evidence >= MAX_EVIDENCE_PER_SESSION {
                    return Err("too_many_evidence");
                }
                self.evidence = MAX_EVIDENCE_PER_SESSION;
                return Ok(());
            }
            Spend::Other => return Ok(()),
        };
        if *n >= max {
            return Err(code);
        }
        *n += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_cap_and_gets_slots_back() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut s = AddressSlots::new(2);
        assert!(s.take(a) && s.take(a));
        assert!(!s.take(a), "third from one address");
        assert!(s.take(b), "another address is not affected");
        s.give_back(a);
        assert!(s.take(a));
        s.give_back(a);
        s.give_back(a);
        s.give_back(b);
        assert_eq!(s.addresses(), 0, "nothing held, nothing kept");
        s.give_back(a); // more than taken: harmless
        assert_eq!(s.held(a), 0);
    }

    #[test]
    fn an_ipv6_party_is_its_slash_64_and_mapped_ipv4_is_ipv4() {
        let mut s = AddressSlots::new(1);
        assert!(s.take("2001:db8:1:2::1".parse().unwrap()));
        assert!(!s.take("2001:db8:1:2:ffff::9".parse().unwrap()), "same /64");
        assert!(s.take("2001:db8:1:3::1".parse().unwrap()), "another /64");
        assert!(s.take("198.51.100.7".parse().unwrap()));
        assert!(
            !s.take("::ffff:198.51.100.7".parse().unwrap()),
            "mapped: same"
        );
    }

    #[test]
    fn a_session_budget_caps_challenges_and_evidence_separately() {
        let mut b = SessionBudget::default();
        for _ in 0..MAX_EVIDENCE_PER_SESSION {
            assert_eq!(b.spend(Spend::Evidence), Ok(()));
        }
        assert_eq!(b.spend(Spend::Evidence), Err("too_many_evidence"));
        for _ in 0..MAX_CHALLENGES_PER_SESSION {
            assert_eq!(b.spend(Spend::Challenge), Ok(()));
        }
        assert_eq!(b.spend(Spend::Challenge), Err("too_many_challenges"));
        assert_eq!(b.spend(Spend::Other), Ok(()));
        // Evidence bound to the connection is its one and last.
        let mut b = SessionBudget::default();
        assert_eq!(b.spend(Spend::BoundEvidence), Ok(()));
        assert_eq!(b.spend(Spend::BoundEvidence), Err("too_many_evidence"));
        assert_eq!(b.spend(Spend::Evidence), Err("too_many_evidence"));
        let mut b = SessionBudget::default();
        for _ in 0..MAX_EVIDENCE_PER_SESSION {
            assert_eq!(b.spend(Spend::Evidence), Ok(()));
        }
        assert_eq!(b.spend(Spend::BoundEvidence), Err("too_many_evidence"));
    }

    #[test]
    fn the_default_per_address_cap_is_a_quarter_and_never_zero() {
        assert_eq!(default_per_address(64), 16);
        assert_eq!(default_per_address(1), 1);
        assert_eq!(default_per_address(0), 1);
    }
}
