//! Mesh certificates, firewall rule files, revocation lists, announcements and control
//! messages: parsing never panics; a rule set that loads decides every peer without panicking,
//! and an empty one denies; nothing unsigned verifies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh::firewall::{Firewall, Peer, Proto, Service, Verdict};

fuzz_target!(|data: &[u8]| {
    let _ = mesh::cert::MeshCert::parse(data);
    let _ = mesh::cert::parse_bundle(data);
    let _ = mesh::lighthouse::Msg::decode(data);
    let trust = mesh::transport::Trust::default();
    assert!(mesh::revocation::RevocationList::verify(data, &[], 0).is_err());
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(mesh::lighthouse::verify(text, &trust, 0).is_err());
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(fw) = Firewall::load(text)
    {
        let peer = Peer {
            name: "fuzz".into(),
            groups: vec!["tenant:a".into()],
            role: None,
            ip: "10.42.0.1".parse().ok(),
        };
        let v = fw.decide(
            &peer,
            &Service::Packet {
                proto: Proto::Tcp,
                port: 22,
            },
        );
        if fw.rules() == 0 {
            assert_eq!(v, Verdict::Deny);
        }
    }
});
