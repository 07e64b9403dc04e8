//! HPKE base mode (RFC 9180) for the one suite Attesta uses — DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, ChaCha20-Poly1305 — single-shot seal and open, on aws-lc (the tree's one crypto
//! provider).
//!
//! Why not the `hpke` crate: its X25519 (curve25519-dalek) cost the broker ~60 µs per release,
//! a tenth of its core in a boot storm; aws-lc's costs ~20 µs. What is here is only the RFC's
//! key schedule around aws-lc's X25519, HMAC-SHA256 and ChaCha20-Poly1305. It is checked against
//! the RFC's test vector (appendix A.2.1) and, both ways, against the `hpke` crate.
//!
//! Not here: the PSK and auth modes, exporters, multi-message contexts, other suites.

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

/// `"KEM" || I2OSP(0x0020, 2)`: DHKEM(X25519, HKDF-SHA256).
const KEM_SUITE: &[u8] = b"KEM\x00\x20";
/// `"HPKE" || kem_id || kdf_id (HKDF-SHA256) || aead_id (ChaCha20Poly1305)`.
const HPKE_SUITE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";
const MODE_BASE: u8 = 0x00;

/// Why HPKE failed; deliberately without detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HpkeError;

/// `LabeledExtract(salt, label, ikm)`: HKDF-Extract = HMAC(salt, "HPKE-v1" || suite || label || ikm).
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, salt));
    for part in [b"HPKE-v1".as_slice(), suite, label, ikm] {
        ctx.update(part);
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// `LabeledExpand(prk, label, info, L)` for `L` ≤ 32: one HKDF-Expand block,
/// T(1) = HMAC(prk, I2OSP(L, 2) || "HPKE-v1" || suite || label || info || 0x01).
fn labeled_expand<const L: usize>(
    suite: &[u8],
    prk: &[u8; 32],
    label: &[u8],
    info: &[u8],
) -> Zeroizing<[u8; L]> {
    const { assert!(L <= 32) };
    let len = (L as u16).to_be_bytes();
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, prk));
    for part in [len.as_slice(), b"HPKE-v1", suite, label, info, &[1u8]] {
        ctx.update(part);
    }
    let mut out = Zeroizing::new([0u8; L]);
    out.copy_from_slice(&ctx.sign().as_ref()[..L]);
    out
}

/// DH then `ExtractAndExpand(dh, enc || pkR)`. Refuses an all-zero DH output (a low-order
/// peer key), as RFC 9180 §7.1.4 requires.
fn shared_secret(
    sk: &PrivateKey,
    peer: &[u8; 32],
    enc: &[u8; 32],
    pk_r: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, HpkeError> {
    let dh = agreement::agree(sk, UnparsedPublicKey::new(&X25519, peer), HpkeError, |s| {
        let mut d = Zeroizing::new([0u8; 32]);
        if s.len() != 32 {
            return Err(HpkeError);
        }
        d.copy_from_slice(s);
        Ok(d)
    })?;
    if dh.iter().all(|b| *b == 0) {
        return Err(HpkeError);
    }
    let eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", &dh[..]);
    let mut ctx = [0u8; 64];
    ctx[..32].copy_from_slice(enc);
    ctx[32..].copy_from_slice(pk_r);
    Ok(labeled_expand::<32>(
        KEM_SUITE,
        &eae_prk,
        b"shared_secret",
        &ctx,
    ))
}

/// The base-mode key schedule: the AEAD key and base nonce (sequence number 0).
fn key_schedule(shared: &[u8; 32], info: &[u8]) -> Result<(LessSafeKey, Nonce), HpkeError> {
    let psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info);
    let mut context = [0u8; 65];
    context[0] = MODE_BASE;
    context[1..33].copy_from_slice(&psk_id_hash[..]);
    context[33..].copy_from_slice(&info_hash[..]);
    let secret = labeled_extract(HPKE_SUITE, shared, b"secret", b"");
    let key = labeled_expand::<32>(HPKE_SUITE, &secret, b"key", &context);
    let nonce = labeled_expand::<12>(HPKE_SUITE, &secret, b"base_nonce", &context);
    let key = UnboundKey::new(&CHACHA20_POLY1305, &key[..]).map_err(|_| HpkeError)?;
    Ok((LessSafeKey::new(key), Nonce::assume_unique_for_key(*nonce)))
}

fn public_of(sk: &PrivateKey) -> Result<[u8; 32], HpkeError> {
    let p = sk.compute_public_key().map_err(|_| HpkeError)?;
    <[u8; 32]>::try_from(p.as_ref()).map_err(|_| HpkeError)
}

/// Seals `pt` to `pk_r` with a fresh ephemeral key: `(enc, ciphertext || tag)`.
pub fn seal(
    pk_r: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    pt: &[u8],
) -> Result<([u8; 32], Vec<u8>), HpkeError> {
    let sk_e = PrivateKey::generate(&X25519).map_err(|_| HpkeError)?;
    seal_with(&sk_e, pk_r, info, aad, pt)
}

/// [`seal`] with a given ephemeral key (the test vectors fix it).
fn seal_with(
    sk_e: &PrivateKey,
    pk_r: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    pt: &[u8],
) -> Result<([u8; 32], Vec<u8>), HpkeError> {
    let enc = public_of(sk_e)?;
    let shared = shared_secret(sk_e, pk_r, &enc, pk_r)?;
    let (key, nonce) = key_schedule(&shared, info)?;
    // The plaintext (a volume key) is copied into a buffer with room for the tag, so sealing
    // does not reallocate and leave an unwiped copy behind; the buffer is wiped if it fails.
    let mut buf = Zeroizing::new(Vec::with_capacity(pt.len() + CHACHA20_POLY1305.tag_len()));
    buf.extend_from_slice(pt);
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut *buf)
        .map_err(|_| HpkeError)?;
    Ok((enc, std::mem::take(&mut *buf)))
}

/// Opens what [`seal`] made for the key pair `(sk_r, pk_r)`; the plaintext is zeroized on drop.
pub fn open(
    sk_r: &PrivateKey,
    pk_r: &[u8; 32],
    enc: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
    let shared = shared_secret(sk_r, enc, enc, pk_r)?;
    let (key, nonce) = key_schedule(&shared, info)?;
    let mut buf = Zeroizing::new(ct.to_vec());
    let n = key
        .open_in_place(nonce, Aad::from(aad), &mut buf[..])
        .map_err(|_| HpkeError)?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// A new X25519 key pair: the private key (aws-lc clears it when freed) and its public half.
pub fn generate() -> Result<(PrivateKey, [u8; 32]), HpkeError> {
    let sk = PrivateKey::generate(&X25519).map_err(|_| HpkeError)?;
    let pk = public_of(&sk)?;
    Ok((sk, pk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h<const N: usize>(s: &str) -> [u8; N] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    // RFC 9180, appendix A.2.1 (base mode) and A.2.1.1 (sequence number 0).
    const SK_EM: &str = "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600";
    const SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
    const PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
    const ENC: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
    const SHARED: &str = "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7";
    const INFO: &[u8] = b"Ode on a Grecian Urn";
    const AAD: &[u8] = b"Count-0";
    const PT: &[u8] = b"Beauty is truth, truth beauty";
    const CT: &str = "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28";

    #[test]
    fn rfc_9180_a_2_1_seals_and_opens_byte_exact() {
        let sk_e = PrivateKey::from_private_key(&X25519, &h::<32>(SK_EM)).unwrap();
        let sk_r = PrivateKey::from_private_key(&X25519, &h::<32>(SK_RM)).unwrap();
        let pk_r = h::<32>(PK_RM);
        assert_eq!(public_of(&sk_r).unwrap(), pk_r);
        assert_eq!(
            *shared_secret(&sk_e, &pk_r, &h::<32>(ENC), &pk_r).unwrap(),
            h::<32>(SHARED)
        );
        let (enc, ct) = seal_with(&sk_e, &pk_r, INFO, AAD, PT).unwrap();
        assert_eq!(enc, h::<32>(ENC));
        assert_eq!(ct, h::<45>(CT).to_vec());
        assert_eq!(&open(&sk_r, &pk_r, &enc, INFO, AAD, &ct).unwrap()[..], PT);
        // Any other AAD, info or a flipped bit: nothing opens.
        assert!(open(&sk_r, &pk_r, &enc, INFO, b"Count-1", &ct).is_err());
        assert!(open(&sk_r, &pk_r, &enc, b"other", AAD, &ct).is_err());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(open(&sk_r, &pk_r, &enc, INFO, AAD, &bad).is_err());
    }

    #[test]
    fn low_order_keys_are_refused() {
        // All-zero and other small-order points give an all-zero DH output.
        for p in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            assert_eq!(seal(&p, INFO, AAD, PT), Err(HpkeError));
            let (sk, pk) = generate().unwrap();
            assert!(open(&sk, &pk, &p, INFO, AAD, &h::<45>(CT)).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Interoperates both ways with the `hpke` crate (RustCrypto/dalek), byte for byte.
        #[test]
        fn interoperates_with_the_hpke_crate(
            info in proptest::collection::vec(any::<u8>(), 0..80),
            aad in proptest::collection::vec(any::<u8>(), 0..80),
            pt in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            use ::hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
            use ::hpke::aead::ChaCha20Poly1305;
            use ::hpke::kdf::HkdfSha256;
            use ::hpke::kem::X25519HkdfSha256;
            // Ours seals, the crate opens.
            let (sk_c, pk_c) = X25519HkdfSha256::gen_keypair();
            let pk_c_bytes: [u8; 32] = pk_c.to_bytes().into();
            let (enc, ct) = seal(&pk_c_bytes, &info, &aad, &pt).unwrap();
            let enc_c = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&enc).unwrap();
            let got = ::hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
                &OpModeR::Base, &sk_c, &enc_c, &info, &ct, &aad).unwrap();
            prop_assert_eq!(&got, &pt);
            // The crate seals, ours opens.
            let (sk, pk) = generate().unwrap();
            let pk_crate = <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&pk).unwrap();
            let (enc_c, ct_c) = ::hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
                &OpModeS::Base, &pk_crate, &info, &pt, &aad).unwrap();
            let enc2: [u8; 32] = enc_c.to_bytes().into();
            prop_assert_eq!(&open(&sk, &pk, &enc2, &info, &aad, &ct_c).unwrap()[..], &pt[..]);
        }
    }
}
