//! # proto — what crosses the wire between a guest and the key broker
//!
//! This crate holds the cryptographic bindings of the release protocol, as pure functions:
//! - [`report_data`]: what a guest puts in REPORT_DATA, binding a nonce, the guest's ephemeral
//!   X25519 public key and a TLS exporter value of the connection, so a report relayed to another
//!   connection or replayed later does not match. The nonce is [`connection_nonce`] (derived from
//!   the exporter: the connection is the challenge, one round trip per boot) or, for clients that
//!   cannot bind an exporter's freshness on their own, a single-use one the broker issued.
//! - [`seal`]/[`open`]: HPKE (RFC 9180: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//!   ChaCha20-Poly1305, base mode) of a VM's secrets to the guest key, with info and AAD binding
//!   the VM id, generation, nonce and measurement.
//! - [`ResponseKey`]/[`verify_response`]: Ed25519 signatures over every release and denial, with a
//!   domain separator, so a guest accepts only what its pinned broker said.
#![forbid(unsafe_code)]

pub mod audit;
pub mod brokers;
pub mod bundle;
mod hpke;
pub mod msg;
pub mod order;

use aws_lc_rs::digest::{SHA512, digest};
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use std::fmt;
use zeroize::Zeroizing;

/// Protocol version carried in every domain separator.
pub const PROTOCOL: &str = "attesta-kbs/1";

/// Why a cryptographic binding did not hold. Deliberately terse: no secret-dependent detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("a public key is malformed")]
    BadPublicKey,
    #[error("sealing failed")]
    Seal,
    #[error("the sealed secret does not open for this guest key and context")]
    Open,
    #[error("the response signature does not verify with the pinned broker key")]
    BadSignature,
    #[error("key generation failed")]
    KeyGen,
}

/// The nonce of evidence bound to its connection alone (a [`msg::Request::Evidence`] with no
/// nonce): derived from the connection's TLS exporter value, which both ends compute and no one
/// else can (the host relaying the packets included), and which the broker's handshake makes
/// fresh. So the connection is the challenge: nothing is issued, kept or stored, and evidence made
/// for one connection matches no other (no other replica's either). The broker's audit entry
/// keeps the exporter once the decision is made, so that a tenant can recompute REPORT_DATA.
pub fn connection_nonce(tls_exporter: &[u8; 32]) -> [u8; 32] {
    let d = bind(b"\0connection-nonce\0", &[tls_exporter]);
    let mut n = [0u8; 32];
    n.copy_from_slice(&d[..32]);
    n
}

/// REPORT_DATA for a release request: SHA-512 over a domain separator, the broker's nonce, the
/// guest's ephemeral public key and the connection's TLS exporter value.
pub fn report_data(
    nonce: &[u8; 32],
    guest_public_key: &[u8; 32],
    tls_exporter: &[u8; 32],
) -> [u8; 64] {
    bind(b"\0report-data\0", &[nonce, guest_public_key, tls_exporter])
}

/// SHA-512 over the protocol name, a label and the parts, in order.
fn bind(label: &[u8], parts: &[&[u8; 32]]) -> [u8; 64] {
    let mut msg = Vec::with_capacity(PROTOCOL.len() + label.len() + 32 * parts.len());
    msg.extend_from_slice(PROTOCOL.as_bytes());
    msg.extend_from_slice(label);
    for p in parts {
        msg.extend_from_slice(*p);
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(digest(&SHA512, &msg).as_ref());
    out
}

/// REPORT_DATA when the guest also asks for a mesh identity: as [`report_data`], with the
/// guest's Ed25519 mesh public key bound too (under its own label, so the two forms never
/// collide). The broker then certifies exactly that key, for exactly this attested guest.
pub fn report_data_with_mesh_key(
    nonce: &[u8; 32],
    guest_public_key: &[u8; 32],
    tls_exporter: &[u8; 32],
    mesh_key: &[u8; 32],
) -> [u8; 64] {
    bind(
        b"\0report-data-mesh\0",
        &[nonce, guest_public_key, tls_exporter, mesh_key],
    )
}

/// The REPORT_DATA a piece of evidence must carry: without a mesh key (empty) the plain form,
/// with one (32 bytes) the mesh form; None for any other length.
pub fn expected_report_data(
    nonce: &[u8; 32],
    guest_public_key: &[u8; 32],
    tls_exporter: &[u8; 32],
    mesh_key: &[u8],
) -> Option<[u8; 64]> {
    match mesh_key.len() {
        0 => Some(report_data(nonce, guest_public_key, tls_exporter)),
        32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(mesh_key);
            Some(report_data_with_mesh_key(
                nonce,
                guest_public_key,
                tls_exporter,
                &k,
            ))
        }
        _ => None,
    }
}

/// REPORT_DATA of a lease renewal ([`msg::Request::Renew`]): the connection's nonce, the
/// guest's mesh key and the exporter, under a label of its own (never a release's).
pub fn renew_report_data(tls_exporter: &[u8; 32], mesh_key: &[u8; 32]) -> [u8; 64] {
    bind(
        b"\0renew\0",
        &[&connection_nonce(tls_exporter), mesh_key, tls_exporter],
    )
}

/// REPORT_DATA of a running VM's answer to a tenant's challenge: the tenant's nonce, the VM's
/// mesh key (the one its lease certified) and the VM's id, under a label of their own.
pub fn tenant_report_data(nonce: &[u8; 32], mesh_key: &[u8; 32], vm_id: &str) -> [u8; 64] {
    let id = digest(&SHA512, vm_id.as_bytes());
    let mut vm = [0u8; 32];
    vm.copy_from_slice(&id.as_ref()[..32]);
    bind(b"\0tenant-challenge\0", &[nonce, mesh_key, &vm])
}

/// What a VM's mesh key signs when it answers a tenant's challenge: the connection's exporter.
pub fn attest_proof_message(tls_exporter: &[u8; 32]) -> Vec<u8> {
    let mut m = b"attesta-attest-proof/1\0".to_vec();
    m.extend_from_slice(tls_exporter);
    m
}

/// What a renewal's mesh key signs: this connection's exporter, under its own label.
pub fn renew_proof_message(tls_exporter: &[u8; 32]) -> Vec<u8> {
    let mut m = b"attesta-renew-proof/1\0".to_vec();
    m.extend_from_slice(tls_exporter);
    m
}

/// What a sealed secret is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealContext<'a> {
    pub vm_id: &'a str,
    pub generation: u64,
    pub nonce: [u8; 32],
    pub measurement: [u8; 48],
}

impl SealContext<'_> {
    /// Unambiguous encoding (length-prefixed VM id) used as both HPKE info and AAD.
    fn encode(&self, purpose: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(128 + self.vm_id.len());
        v.extend_from_slice(PROTOCOL.as_bytes());
        v.push(0);
        v.extend_from_slice(purpose);
        v.push(0);
        v.extend_from_slice(&(self.vm_id.len() as u32).to_be_bytes());
        v.extend_from_slice(self.vm_id.as_bytes());
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.extend_from_slice(&self.nonce);
        v.extend_from_slice(&self.measurement);
        v
    }
}

/// A secret sealed to a guest key: the HPKE encapsulated key and the ciphertext.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub enc: [u8; 32],
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.ciphertext.len())
    }
}

/// The guest's ephemeral key pair, born in the guest; the private half is zeroized on drop.
pub struct GuestKey {
    /// aws-lc clears the key's memory when it is freed.
    secret: aws_lc_rs::agreement::PrivateKey,
    public: [u8; 32],
}

impl GuestKey {
    pub fn generate() -> Result<GuestKey, ProtoError> {
        let (secret, public) = hpke::generate().map_err(|_| ProtoError::KeyGen)?;
        Ok(GuestKey { secret, public })
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

impl fmt::Debug for GuestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestKey(public={:02x?}…)", &self.public[..4])
    }
}

/// Seals `secret` to the guest's public key for exactly this context.
pub fn seal(
    guest_public_key: &[u8; 32],
    ctx: &SealContext<'_>,
    secret: &[u8],
) -> Result<Sealed, ProtoError> {
    let (enc, ciphertext) = hpke::seal(
        guest_public_key,
        &ctx.encode(b"info"),
        &ctx.encode(b"aad"),
        secret,
    )
    .map_err(|_| ProtoError::Seal)?;
    Ok(Sealed { enc, ciphertext })
}

/// Opens a sealed secret; fails unless key and context are exactly those it was sealed for.
pub fn open(
    key: &GuestKey,
    ctx: &SealContext<'_>,
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, ProtoError> {
    hpke::open(
        &key.secret,
        &key.public,
        &sealed.enc,
        &ctx.encode(b"info"),
        &ctx.encode(b"aad"),
        &sealed.ciphertext,
    )
    .map_err(|_| ProtoError::Open)
}

/// What a signature covers: the kind of response (release or denial) and its encoded body.
fn signed_message(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 48);
    m.extend_from_slice(PROTOCOL.as_bytes());
    m.extend_from_slice(b"\0response\0");
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// The broker's Ed25519 response-signing key.
pub struct ResponseKey(Ed25519KeyPair);

impl ResponseKey {
    pub fn generate() -> Result<ResponseKey, ProtoError> {
        Ed25519KeyPair::generate()
            .map(ResponseKey)
            .map_err(|_| ProtoError::KeyGen)
    }

    /// From a PKCS#8 document (as kept in the broker's key file).
    pub fn from_pkcs8(der: &[u8]) -> Result<ResponseKey, ProtoError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(ResponseKey)
            .map_err(|_| ProtoError::KeyGen)
    }

    pub fn public(&self) -> [u8; 32] {
        let mut p = [0u8; 32];
        p.copy_from_slice(self.0.public_key().as_ref());
        p
    }

    /// Signs a response of `kind` ("release" or "denial") with body `body`.
    pub fn sign(&self, kind: &str, body: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s.copy_from_slice(self.0.sign(&signed_message(kind, body)).as_ref());
        s
    }
}

/// Verifies a response signature with the pinned broker key.
pub fn verify_response(
    pinned: &[u8; 32],
    kind: &str,
    body: &[u8],
    signature: &[u8; 64],
) -> Result<(), ProtoError> {
    UnparsedPublicKey::new(&ED25519, pinned)
        .verify(&signed_message(kind, body), signature)
        .map_err(|_| ProtoError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(vm: &str) -> SealContext<'_> {
        SealContext {
            vm_id: vm,
            generation: 2,
            nonce: [7; 32],
            measurement: [9; 48],
        }
    }

    #[test]
    fn report_data_binds_every_input() {
        let base = report_data(&[1; 32], &[2; 32], &[3; 32]);
        assert_ne!(base, report_data(&[0; 32], &[2; 32], &[3; 32]));
        assert_ne!(base, report_data(&[1; 32], &[0; 32], &[3; 32]));
        assert_ne!(base, report_data(&[1; 32], &[2; 32], &[0; 32]));
        assert_eq!(base, report_data(&[1; 32], &[2; 32], &[3; 32]));
        let mesh = report_data_with_mesh_key(&[1; 32], &[2; 32], &[3; 32], &[4; 32]);
        assert_ne!(mesh, base, "the mesh form never equals the plain one");
        assert_ne!(
            mesh,
            report_data_with_mesh_key(&[1; 32], &[2; 32], &[3; 32], &[5; 32])
        );
        assert_eq!(
            expected_report_data(&[1; 32], &[2; 32], &[3; 32], &[]),
            Some(base)
        );
        assert_eq!(
            expected_report_data(&[1; 32], &[2; 32], &[3; 32], &[4; 32]),
            Some(mesh)
        );
        assert_eq!(
            expected_report_data(&[1; 32], &[2; 32], &[3; 32], &[4; 31]),
            None
        );
    }

    #[test]
    fn a_connection_nonce_is_the_exporter_s_alone() {
        let n = connection_nonce(&[3; 32]);
        assert_eq!(n, connection_nonce(&[3; 32]));
        assert_ne!(n, connection_nonce(&[4; 32]));
        assert_ne!(&n[..], &[3u8; 32][..], "the exporter itself is never shown");
    }

    #[test]
    fn sealed_secrets_open_only_for_their_key_and_context() {
        let guest = GuestKey::generate().unwrap();
        let secret = [0x42u8; 64];
        let sealed = seal(&guest.public(), &ctx("vm-1"), &secret).unwrap();
        assert_eq!(&open(&guest, &ctx("vm-1"), &sealed).unwrap()[..], &secret);
        // Another guest key, VM, generation, nonce or measurement: nothing opens.
        assert_eq!(
            open(&GuestKey::generate().unwrap(), &ctx("vm-1"), &sealed).unwrap_err(),
            ProtoError::Open
        );
        assert!(open(&guest, &ctx("vm-2"), &sealed).is_err());
        for alter in [
            |c: &mut SealContext<'_>| c.generation += 1,
            |c: &mut SealContext<'_>| c.nonce[0] ^= 1,
            |c: &mut SealContext<'_>| c.measurement[47] ^= 1,
        ] {
            let mut c = ctx("vm-1");
            alter(&mut c);
            assert!(open(&guest, &c, &sealed).is_err());
        }
        // Tampering with the ciphertext or the encapsulated key.
        let mut t = sealed.clone();
        t.ciphertext[0] ^= 1;
        assert!(open(&guest, &ctx("vm-1"), &t).is_err());
        let mut t = sealed.clone();
        t.enc[0] ^= 1;
        assert!(open(&guest, &ctx("vm-1"), &t).is_err());
        // The VM id is length-prefixed: no ambiguity between (id, generation) encodings.
        assert_ne!(
            ctx("vm-1").encode(b"aad"),
            SealContext {
                vm_id: "vm-1\0",
                ..ctx("vm-1")
            }
            .encode(b"aad")
        );
        assert!(format!("{sealed:?} {guest:?}").len() < 80);
    }

    #[test]
    fn responses_verify_only_with_the_pinned_key_and_kind() {
        let k = ResponseKey::generate().unwrap();
        let sig = k.sign("release", b"body");
        verify_response(&k.public(), "release", b"body", &sig).unwrap();
        assert!(verify_response(&k.public(), "denial", b"body", &sig).is_err());
        assert!(verify_response(&k.public(), "release", b"bodY", &sig).is_err());
        let other = ResponseKey::generate().unwrap();
        assert_eq!(
            verify_response(&other.public(), "release", b"body", &sig),
            Err(ProtoError::BadSignature)
        );
    }
}
