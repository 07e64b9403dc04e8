//! Framing, limits, versions and the signed-then-sealed release flow.

use proptest::prelude::*;
use proto::msg::*;
use proto::{GuestKey, ProtoError, ResponseKey, SealContext, open, report_data, seal};

fn evidence() -> Request {
    Request::Evidence {
        v: VERSION,
        vm_id: "vm-1".into(),
        nonce: vec![7; 32],
        report: vec![0xaa; 1184],
        cert_table: vec![],
        guest_public_key: vec![3; 32],
        mesh_key: vec![],
    }
}

#[test]
fn frames_round_trip_and_limits_hold() {
    for r in [
        Request::Challenge {
            v: VERSION,
            vm_id: "vm-1".into(),
        },
        evidence(),
    ] {
        assert_eq!(Request::decode_frame(&frame(&r)).unwrap(), r);
    }
    let f = frame(&evidence());
    assert!(matches!(
        Request::decode_frame(&f[..f.len() - 1]),
        Err(FrameError::Truncated { .. })
    ));
    let mut long = f.clone();
    long.push(0);
    assert_eq!(Request::decode_frame(&long), Err(FrameError::Trailing(1)));
    // The length is checked before anything is read.
    let huge = ((MAX_REQUEST + 1) as u32).to_be_bytes();
    assert_eq!(
        frame_len(huge, MAX_REQUEST),
        Err(FrameError::TooLarge {
            len: MAX_REQUEST + 1,
            max: MAX_REQUEST
        })
    );
    let mut big = huge.to_vec();
    big.extend(vec![0u8; 16]);
    assert!(matches!(
        Request::decode_frame(&big),
        Err(FrameError::TooLarge { .. })
    ));
    // Another version is refused, as is a response where a request belongs.
    let v2 = Request::Challenge {
        v: 2,
        vm_id: "vm-1".into(),
    };
    assert_eq!(
        Request::decode_frame(&frame(&v2)),
        Err(FrameError::Version(2))
    );
    let resp = Response::error("bad_request", "truncated frame");
    assert!(matches!(
        Request::decode_frame(&frame(&resp)),
        Err(FrameError::Decode(_))
    ));
    assert_eq!(Response::decode_frame(&frame(&resp)).unwrap(), resp);
}

#[test]
fn a_release_is_verified_then_opened() {
    let broker = ResponseKey::generate().unwrap();
    let guest = GuestKey::generate().unwrap();
    let nonce = [5u8; 32];
    // What the guest would put in its report; the broker recomputes and compares it.
    let rd = report_data(&nonce, &guest.public(), &[9; 32]);
    assert_eq!(rd, report_data(&nonce, &guest.public(), &[9; 32]));
    let ctx = SealContext {
        vm_id: "vm-1",
        generation: 4,
        nonce,
        measurement: [6; 48],
    };
    let volume_key = [0x11u8; 64];
    let sealed = seal(&guest.public(), &ctx, &volume_key).unwrap();
    let body = ReleaseBody {
        vm_id: "vm-1".into(),
        generation: 4,
        boot_counter: 2,
        nonce: nonce.to_vec(),
        measurement: vec![6; 48],
        enc: sealed.enc.to_vec(),
        sealed: sealed.ciphertext.clone(),
        mesh_cert: vec![],
        mesh_chain: vec![],
    };
    let wire = frame(&Response::release(&broker, &body));
    let resp = Response::decode_frame(&wire).unwrap();
    let Decision::Release(got) = verify_decision(&broker.public(), &resp).unwrap() else {
        panic!("not a release")
    };
    assert_eq!(got, body);
    assert_eq!(
        &open(&guest, &ctx, &got.sealed().unwrap()).unwrap()[..],
        &volume_key
    );

    // Another broker's key, a tampered body, or a release signature presented as a denial: refused.
    let other = ResponseKey::generate().unwrap();
    assert_eq!(
        verify_decision(&other.public(), &resp),
        Err(ProtoError::BadSignature)
    );
    if let Response::Release {
        v,
        mut body,
        signature,
    } = resp.clone()
    {
        body[5] ^= 1;
        assert_eq!(
            verify_decision(
                &broker.public(),
                &Response::Release {
                    v,
                    body: body.clone(),
                    signature: signature.clone()
                }
            ),
            Err(ProtoError::BadSignature)
        );
        body[5] ^= 1;
        assert_eq!(
            verify_decision(&broker.public(), &Response::Denial { v, body, signature }),
            Err(ProtoError::BadSignature)
        );
    }
    let denial = Response::denial(
        &broker,
        &DenialBody {
            vm_id: "vm-1".into(),
            nonce: nonce.to_vec(),
            reasons: vec!["measurement_not_allowed".into()],
        },
    );
    assert!(
        matches!(verify_decision(&broker.public(), &denial), Ok(Decision::Denial(d)) if d.reasons == ["measurement_not_allowed"])
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Request::decode_frame(&bytes);
        let _ = Response::decode_frame(&bytes);
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        let _ = Request::decode_frame(&framed);
        let _ = Response::decode_frame(&framed);
    }
}
