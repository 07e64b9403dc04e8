//! Signed orders and allowlists: only the operator's keys sign orders, only the offline key signs
//! allowlists, epochs never go back, and a host cannot add measurements, tenants or chips.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use proptest::prelude::*;
use proto::order::*;
use serde_bytes::ByteBuf;

fn key() -> Ed25519KeyPair {
    Ed25519KeyPair::generate().unwrap()
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

fn order() -> Order {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: "vm-42".into(),
        tenant: "tenant-a".into(),
        measurements: vec![ByteBuf::from(vec![0x4d; 48])],
        policy: "version = 1\n".into(),
        chip_ids: vec![ByteBuf::from(vec![0xc1; 64])],
        not_after: 2_000_000_000,
        boot_config: ByteBuf::from(b"ssh-ed25519 AAAA tenant@laptop".to_vec()),
        billing: None,
        mesh_ip: None,
        split: None,
    }
}

#[test]
fn orders_verify_only_from_operator_keys_and_in_time() {
    let (op, op2, host) = (key(), key(), key());
    let doc = order().sign(&op);
    assert_eq!(
        Order::verify(&doc, &[pk(&op)], 1_900_000_000).unwrap(),
        order()
    );
    // Key rotation: either of the configured keys.
    assert!(Order::verify(&order().sign(&op2), &[pk(&op), pk(&op2)], 1_900_000_000).is_ok());
    // A host's own key, or no key at all, is not an operator.
    assert_eq!(
        Order::verify(&order().sign(&host), &[pk(&op)], 1),
        Err(DocumentError::BadSignature)
    );
    assert_eq!(
        Order::verify(&doc, &[], 1),
        Err(DocumentError::BadSignature)
    );
    assert_eq!(
        Order::verify(&doc, &[pk(&op)], 2_000_000_001),
        Err(DocumentError::Expired {
            not_after: 2_000_000_000,
            now: 2_000_000_001
        })
    );
    // Tampering with any byte of the signed document.
    for i in (0..doc.len()).step_by(7) {
        let mut t = doc.clone();
        t[i] ^= 0x01;
        assert!(Order::verify(&t, &[pk(&op)], 1).is_err(), "byte {i}");
    }
    // Validity of what was signed.
    let bad_id = Order {
        vm_id: "../etc".into(),
        ..order()
    };
    assert!(matches!(
        Order::verify(&bad_id.sign(&op), &[pk(&op)], 1),
        Err(DocumentError::Invalid(_))
    ));
    let short = Order {
        measurements: vec![ByteBuf::from(vec![1; 47])],
        ..order()
    };
    assert!(matches!(
        Order::verify(&short.sign(&op), &[pk(&op)], 1),
        Err(DocumentError::Invalid(_))
    ));
    let empty = Order {
        measurements: vec![],
        ..order()
    };
    assert!(matches!(
        Order::verify(&empty.sign(&op), &[pk(&op)], 1),
        Err(DocumentError::Invalid(_))
    ));
    let terminate = Order {
        kind: OrderKind::Terminate,
        measurements: vec![],
        chip_ids: vec![],
        ..order()
    };
    assert!(Order::verify(&terminate.sign(&op), &[pk(&op)], 1).is_ok());
    let v2 = Order { v: 2, ..order() };
    assert_eq!(
        Order::verify(&v2.sign(&op), &[pk(&op)], 1),
        Err(DocumentError::Version(2))
    );
    assert!(matches!(
        Order::verify(&vec![0u8; MAX_DOCUMENT + 1], &[pk(&op)], 1),
        Err(DocumentError::TooLarge(_))
    ));
}

#[test]
fn allowlists_and_epochs() {
    let (offline, op) = (key(), key());
    let list = Allowlist {
        v: ORDER_VERSION,
        epoch: 5,
        measurements: vec![ByteBuf::from(vec![0x4d; 48])],
    };
    let doc = list.sign(&offline);
    assert_eq!(Allowlist::verify(&doc, &pk(&offline), 5).unwrap(), list);
    assert_eq!(
        Allowlist::verify(&doc, &pk(&offline), 6),
        Err(DocumentError::StaleEpoch { have: 5, need: 6 })
    );
    assert_eq!(
        Allowlist::verify(&list.sign(&op), &pk(&offline), 0),
        Err(DocumentError::BadSignature)
    );
    // An order is not an allowlist, even when signed by the right key.
    assert!(matches!(
        Allowlist::verify(&order().sign(&offline), &pk(&offline), 0),
        Err(DocumentError::WrongKind { .. })
    ));
    // An order may only name allowlisted measurements.
    assert!(order().outside(&list).is_empty());
    let extra = Order {
        measurements: vec![ByteBuf::from(vec![0x4d; 48]), ByteBuf::from(vec![0x66; 48])],
        ..order()
    };
    assert_eq!(extra.outside(&list), vec![vec![0x66; 48]]);
}

proptest! {
    #[test]
    fn verification_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..800)) {
        let _ = Order::verify(&bytes, &[[1u8; 32]], 0);
        let _ = Allowlist::verify(&bytes, &[1u8; 32], 0);
    }
}
