//! Overlay IP packets, sans-IO: just enough of IPv4 and IPv6 to route a packet to its peer and
//! let the firewall judge it (addresses, protocol, destination port). Never panics; anything
//! it cannot read is dropped by the caller (deny by default).

use crate::firewall::{Proto, Service};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What the overlay needs of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    /// TCP/UDP destination port; 0 for ICMP.
    pub port: u16,
    /// TCP/UDP source port; 0 for ICMP.
    pub src_port: u16,
}

impl PacketInfo {
    /// The firewall's view of the packet.
    pub fn service(&self) -> Service {
        Service::Packet {
            proto: self.proto,
            port: self.port,
        }
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet: {0} bytes is too short")]
    Short(usize),
    #[error("packet: IP version {0}")]
    Version(u8),
    #[error("packet: protocol {0} is not carried (tcp, udp, icmp only)")]
    Protocol(u8),
    #[error("packet: a fragment (its ports cannot be judged)")]
    Fragment,
}

fn proto(n: u8) -> Result<Proto, PacketError> {
    match n {
        6 => Ok(Proto::Tcp),
        17 => Ok(Proto::Udp),
        1 | 58 => Ok(Proto::Icmp),
        other => Err(PacketError::Protocol(other)),
    }
}

/// (source, destination) ports.
fn ports(p: Proto, l4: &[u8]) -> Result<(u16, u16), PacketError> {
    match p {
        Proto::Icmp => Ok((0, 0)),
        _ => l4
            .get(0..4)
            .map(|b| {
                (
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                )
            })
            .ok_or(PacketError::Short(l4.len())),
    }
}

/// Reads a packet's addresses, protocol and destination port.
pub fn parse(p: &[u8]) -> Result<PacketInfo, PacketError> {
    let Some(first) = p.first() else {
        return Err(PacketError::Short(0));
    };
    match first >> 4 {
        4 => {
            if p.len() < 20 {
                return Err(PacketError::Short(p.len()));
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return Err(PacketError::Short(p.len()));
            }
            // More-fragments set or a non-zero offset: a later fragment has no ports.
            let frag = u16::from_be_bytes([p[6], p[7]]);
            if frag & 0x3fff != 0 {
                return Err(PacketError::Fragment);
            }
            let pr = proto(p[9])?;
            if pr == Proto::Icmp && p[9] != 1 {
                return Err(PacketError::Protocol(p[9]));
            }
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let (src_port, port) = ports(pr, &p[ihl..])?;
            Ok(PacketInfo {
                src: src.into(),
                dst: dst.into(),
                proto: pr,
                port,
                src_port,
            })
        }
        6 => {
            if p.len() < 40 {
                return Err(PacketError::Short(p.len()));
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[8..24]);
            let mut b = [0u8; 16];
            b.copy_from_slice(&p[24..40]);
            // Extension headers are not followed: only a plain next header is carried.
            let pr = proto(p[6])?;
            if pr == Proto::Icmp && p[6] != 58 {
                return Err(PacketError::Protocol(p[6]));
            }
            let (src_port, port) = ports(pr, &p[40..])?;
            Ok(PacketInfo {
                src: Ipv6Addr::from(a).into(),
                dst: Ipv6Addr::from(b).into(),
                proto: pr,
                port,
                src_port,
            })
        }
        v => Err(PacketError::Version(v)),
    }
}

type Flow = (Proto, IpAddr, u16, IpAddr, u16);

/// Connection tracking, so replies to flows this node opened pass without an inbound rule
/// (as in Nebula): outbound packets record their flow; an inbound packet that is the exact
/// reverse of a recent one is a reply. Bounded: when full, expired flows go first, then new
/// flows are not recorded (their replies then need a rule — deny by default).
#[derive(Debug)]
pub struct Flows {
    seen: std::collections::HashMap<Flow, u64>,
    ttl: u64,
    cap: usize,
}

impl Flows {
    pub fn new(ttl: u64, cap: usize) -> Flows {
        Flows {
            seen: Default::default(),
            ttl,
            cap,
        }
    }

    /// Records an outbound packet's flow at `now` (seconds).
    pub fn outbound(&mut self, p: &PacketInfo, now: u64) {
        let key = (p.proto, p.src, p.src_port, p.dst, p.port);
        if self.seen.len() >= self.cap && !self.seen.contains_key(&key) {
            let ttl = self.ttl;
            self.seen.retain(|_, t| now.saturating_sub(*t) <= ttl);
            if self.seen.len() >= self.cap {
                return;
            }
        }
        self.seen.insert(key, now);
    }

    /// Whether an inbound packet answers a flow recorded within the time to live.
    pub fn is_reply(&self, p: &PacketInfo, now: u64) -> bool {
        self.seen
            .get(&(p.proto, p.dst, p.port, p.src, p.src_port))
            .is_some_and(|t| now.saturating_sub(*t) <= self.ttl)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&[10, 42, 1, 1, 10, 42, 1, 2]);
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn reads_tcp_udp_icmp_and_refuses_the_rest() {
        let tcp = parse(&v4(6, &[0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 0])).unwrap();
        assert_eq!(tcp.src, "10.42.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(tcp.dst, "10.42.1.2".parse::<IpAddr>().unwrap());
        assert_eq!((tcp.proto, tcp.port), (Proto::Tcp, 5001));
        let udp = parse(&v4(17, &[0, 1, 0, 53])).unwrap();
        assert_eq!((udp.proto, udp.port), (Proto::Udp, 53));
        let icmp = parse(&v4(1, &[8, 0, 0, 0])).unwrap();
        assert_eq!((icmp.proto, icmp.port), (Proto::Icmp, 0));
        assert_eq!(parse(&v4(47, &[0; 8])), Err(PacketError::Protocol(47)));
        assert_eq!(
            parse(&v4(58, &[0; 8])),
            Err(PacketError::Protocol(58)),
            "ICMPv6 in IPv4"
        );
        assert_eq!(parse(&v4(6, &[0, 1])), Err(PacketError::Short(2)));
        let mut frag = v4(6, &[0; 8]);
        frag[6] = 0x20; // more fragments
        assert_eq!(parse(&frag), Err(PacketError::Fragment));
        assert_eq!(parse(&[0x55; 40]), Err(PacketError::Version(5)));
        assert_eq!(parse(&[]), Err(PacketError::Short(0)));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&[0xfd; 32]);
        v6.extend_from_slice(&[0, 1, 0x01, 0xbb]);
        let u = parse(&v6).unwrap();
        assert_eq!((u.proto, u.port), (Proto::Udp, 443));
        assert!(u.dst.is_ipv6());
    }

    #[test]
    fn only_exact_replies_to_recent_outbound_flows_pass() {
        let out = parse(&v4(6, &[0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 0])).unwrap();
        let mut reply = v4(6, &[0x13, 0x89, 0x9c, 0x40, 0, 0, 0, 0]);
        reply[12..20].copy_from_slice(&[10, 42, 1, 2, 10, 42, 1, 1]);
        let reply = parse(&reply).unwrap();
        let mut flows = Flows::new(60, 2);
        assert!(!flows.is_reply(&reply, 100), "nothing sent yet");
        flows.outbound(&out, 100);
        assert!(flows.is_reply(&reply, 150));
        assert!(!flows.is_reply(&reply, 161), "expired");
        assert!(
            !flows.is_reply(&out, 150),
            "the flow itself is not its reply"
        );
        let mut other = reply;
        other.src_port = 22;
        assert!(
            !flows.is_reply(&other, 150),
            "another port of the same peer"
        );
        // Full: expired flows make room; live ones are never evicted for a new flow.
        let mut b = out;
        b.src_port = 1;
        flows.outbound(&b, 100);
        let mut c = out;
        c.src_port = 2;
        flows.outbound(&c, 120);
        assert_eq!(flows.len(), 2);
        assert!(flows.is_reply(&reply, 150), "kept");
        flows.outbound(&c, 200);
        assert_eq!(flows.len(), 1, "expired flows dropped to make room");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let _ = parse(&data);
        }
    }
}
