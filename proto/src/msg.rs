//! The messages, their framing and their limits. One request per QUIC stream: a 4-byte
//! big-endian length, then a CBOR map with a version field. Every size is bounded before any
//! decoding, and decoding never panics.
//!
//! Responses that decide something (release, denial) carry their body as the exact CBOR bytes
//! that were signed, so a guest verifies the signature before it parses anything.

use crate::{ProtoError, ResponseKey, Sealed, verify_response};
use serde::{Deserialize, Serialize};

/// ALPN protocol id of the key broker service.
pub const ALPN: &[u8] = b"attesta-kbs/1";
/// TLS exporter label whose output binds a report to its connection.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-attesta-kbs/1 report-data";

/// The message format version this build speaks.
pub const VERSION: u32 = 1;
/// Largest request frame (a report, a certificate table and a little more).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest response frame.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame is truncated: {have} of {want} bytes")]
    Truncated { have: usize, want: usize },
    #[error("frame has {0} bytes after the message")]
    Trailing(usize),
    #[error("message is not valid CBOR for this protocol: {0}")]
    Decode(String),
    #[error("message version {0} is not supported (this build speaks {VERSION})")]
    Version(u32),
}

/// Guest → broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Ask for a single-use nonce (optional: evidence bound to its connection needs none).
    Challenge { v: u32, vm_id: String },
    /// Register a VM from an operator-signed order (hosts and operators only: mTLS).
    Register {
        v: u32,
        #[serde(with = "serde_bytes")]
        order: Vec<u8>,
    },
    /// Crypto-shred a VM's key with an operator-signed terminate order (hosts relay, operators
    /// send; the order's signature is the authority).
    Terminate {
        v: u32,
        #[serde(with = "serde_bytes")]
        order: Vec<u8>,
    },
    /// Present evidence. With `nonce` empty it is bound to the connection alone
    /// ([`crate::connection_nonce`]): no challenge first (guests send it as their first
    /// request), and it is the connection's one and last evidence. With a nonce from [`Request::Challenge`] (the optional older flow), it must be
    /// that nonce, on the connection that asked for it.
    Evidence {
        v: u32,
        vm_id: String,
        #[serde(default, with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        report: Vec<u8>,
        #[serde(default, with = "serde_bytes")]
        cert_table: Vec<u8>,
        #[serde(with = "serde_bytes")]
        guest_public_key: Vec<u8>,
        /// The guest's Ed25519 mesh public key (32 bytes), bound in REPORT_DATA, for the
        /// broker to certify; empty: no mesh identity asked for.
        #[serde(default, with = "serde_bytes")]
        mesh_key: Vec<u8>,
    },
    /// Renew a running VM's lease: a fresh report, bound to this connection and the mesh key
    /// the broker certified at the VM's last release ([`crate::renew_report_data`]), for a
    /// new short-lived mesh certificate. Releases nothing; the connection's one and last.
    Renew {
        v: u32,
        vm_id: String,
        #[serde(with = "serde_bytes")]
        report: Vec<u8>,
        #[serde(default, with = "serde_bytes")]
        cert_table: Vec<u8>,
        #[serde(with = "serde_bytes")]
        mesh_key: Vec<u8>,
        /// The mesh key's Ed25519 signature over [`crate::renew_proof_message`]: only the holder
        /// of the key can renew its lease (or, from another chip, have it revoked).
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// A tenant's "attest now, with my nonce" for a running VM (anyone may ask: the answer is
    /// an AMD-signed report, public). The broker passes the nonce to the VM with its next lease
    /// renewal; asked again later, it answers [`Response::Attested`] once the VM has.
    TenantChallenge {
        v: u32,
        vm_id: String,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    /// The running VM's answer to a tenant's challenge: a report whose REPORT_DATA is
    /// [`crate::tenant_report_data`] (the tenant's nonce, the VM's mesh key and id), sent by the
    /// holder of the lease's mesh key (its signature over [`crate::attest_proof_message`]).
    Attest {
        v: u32,
        vm_id: String,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        report: Vec<u8>,
        #[serde(default, with = "serde_bytes")]
        cert_table: Vec<u8>,
        #[serde(with = "serde_bytes")]
        mesh_key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
}

/// Broker → guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Challenge {
        v: u32,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        expires_in_ms: u64,
    },
    /// A signed [`ReleaseBody`].
    Release {
        v: u32,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// A signed [`DenialBody`].
    Denial {
        v: u32,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// A signed [`RenewedBody`]: the lease renewed.
    Renewed {
        v: u32,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// A running VM's answer to a tenant's challenge, as the VM sent it: not signed by the
    /// broker (the report is AMD's, bound to the tenant's nonce; `attesta-verify report`).
    Attested {
        v: u32,
        vm_id: String,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        report: Vec<u8>,
        #[serde(default, with = "serde_bytes")]
        cert_table: Vec<u8>,
        #[serde(with = "serde_bytes")]
        mesh_key: Vec<u8>,
    },
    /// An order was carried out.
    Done { v: u32, vm_id: String },
    /// The request itself was unusable (malformed, too large, not allowed): nothing was decided
    /// about a key. `detail` says what was wrong, for operators (never secrets).
    Error {
        v: u32,
        code: String,
        #[serde(default)]
        detail: String,
    },
}

/// What a release says: the VM's secrets sealed to the guest key, and what they are bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseBody {
    pub vm_id: String,
    pub generation: u64,
    pub boot_counter: u64,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub measurement: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub enc: Vec<u8>,
    /// HPKE ciphertext of the secrets (volume key and boot configuration).
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
    /// The guest's mesh certificate (DER) for the key bound in its report, when it asked for
    /// one and its order names an overlay address; empty otherwise. Public, so not sealed.
    #[serde(default, with = "serde_bytes")]
    pub mesh_cert: Vec<u8>,
    /// The certificates above `mesh_cert` (DER, its issuer first), so that a broker certifying
    /// with an intermediate `guest_ca` hands out a chain the mesh's root alone verifies.
    #[serde(default)]
    pub mesh_chain: Vec<serde_bytes::ByteBuf>,
}

/// What a renewal says: the VM's new mesh certificate, valid until `not_after`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewedBody {
    pub vm_id: String,
    /// The connection's nonce ([`crate::connection_nonce`]): this answer is for this request.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub mesh_cert: Vec<u8>,
    #[serde(default)]
    pub mesh_chain: Vec<serde_bytes::ByteBuf>,
    /// Unix seconds: the lease (and the certificate) end then unless renewed again.
    pub not_after: u64,
    /// Tenants' nonces waiting for this VM to attest to ([`Request::Attest`]).
    #[serde(default)]
    pub challenges: Vec<serde_bytes::ByteBuf>,
}

/// What a denial says: which VM and nonce, and the reason codes (never secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialBody {
    pub vm_id: String,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    pub reasons: Vec<String>,
}

fn to_cbor<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Serializing our own plain structs into a Vec cannot fail.
    let _ = ciborium::into_writer(msg, &mut out);
    out
}

fn from_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    ciborium::from_reader(bytes).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Frames a message: 4-byte big-endian length, then CBOR.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = to_cbor(msg);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length a frame header announces, checked against `max` before anything is read.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

fn unframe(bytes: &[u8], max: usize) -> Result<&[u8], FrameError> {
    let Some((h, rest)) = bytes.split_first_chunk::<4>() else {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            want: 4,
        });
    };
    let len = frame_len(*h, max)?;
    if rest.len() < len {
        return Err(FrameError::Truncated {
            have: rest.len(),
            want: len,
        });
    }
    if rest.len() > len {
        return Err(FrameError::Trailing(rest.len() - len));
    }
    Ok(rest)
}

fn check_version(v: u32) -> Result<(), FrameError> {
    if v == VERSION {
        Ok(())
    } else {
        Err(FrameError::Version(v))
    }
}

impl Request {
    pub fn decode_frame(bytes: &[u8]) -> Result<Request, FrameError> {
        let r: Request = from_cbor(unframe(bytes, MAX_REQUEST)?)?;
        let v = match &r {
            Request::Challenge { v, .. }
            | Request::Register { v, .. }
            | Request::Terminate { v, .. }
            | Request::Evidence { v, .. }
            | Request::Renew { v, .. }
            | Request::TenantChallenge { v, .. }
            | Request::Attest { v, .. } => *v,
        };
        check_version(v)?;
        Ok(r)
    }
}

impl Response {
    /// An error answer.
    pub fn error(code: &str, detail: impl Into<String>) -> Response {
        Response::Error {
            v: VERSION,
            code: code.into(),
            detail: detail.into(),
        }
    }

    pub fn decode_frame(bytes: &[u8]) -> Result<Response, FrameError> {
        let r: Response = from_cbor(unframe(bytes, MAX_RESPONSE)?)?;
        let v = match &r {
            Response::Challenge { v, .. }
            | Response::Release { v, .. }
            | Response::Denial { v, .. }
            | Response::Renewed { v, .. }
            | Response::Attested { v, .. }
            | Response::Done { v, .. }
            | Response::Error { v, .. } => *v,
        };
        check_version(v)?;
        Ok(r)
    }

    /// A signed release.
    pub fn release(key: &ResponseKey, body: &ReleaseBody) -> Response {
        let bytes = to_cbor(body);
        Response::Release {
            v: VERSION,
            signature: key.sign("release", &bytes).to_vec(),
            body: bytes,
        }
    }

    /// A signed renewal.
    pub fn renewed(key: &ResponseKey, body: &RenewedBody) -> Response {
        let bytes = to_cbor(body);
        Response::Renewed {
            v: VERSION,
            signature: key.sign("renewed", &bytes).to_vec(),
            body: bytes,
        }
    }

    /// A signed denial.
    pub fn denial(key: &ResponseKey, body: &DenialBody) -> Response {
        let bytes = to_cbor(body);
        Response::Denial {
            v: VERSION,
            signature: key.sign("denial", &bytes).to_vec(),
            body: bytes,
        }
    }
}

/// A decided response, after its signature checked out against the pinned broker key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Release(ReleaseBody),
    Renewed(RenewedBody),
    Denial(DenialBody),
}

/// Verifies the signature (before parsing the body) and decodes a release or denial.
pub fn verify_decision(pinned: &[u8; 32], resp: &Response) -> Result<Decision, ProtoError> {
    let sig = |s: &[u8]| -> Result<[u8; 64], ProtoError> {
        s.try_into().map_err(|_| ProtoError::BadSignature)
    };
    match resp {
        Response::Release {
            body, signature, ..
        } => {
            verify_response(pinned, "release", body, &sig(signature)?)?;
            from_cbor(body)
                .map(Decision::Release)
                .map_err(|_| ProtoError::BadSignature)
        }
        Response::Renewed {
            body, signature, ..
        } => {
            verify_response(pinned, "renewed", body, &sig(signature)?)?;
            from_cbor(body)
                .map(Decision::Renewed)
                .map_err(|_| ProtoError::BadSignature)
        }
        Response::Denial {
            body, signature, ..
        } => {
            verify_response(pinned, "denial", body, &sig(signature)?)?;
            from_cbor(body)
                .map(Decision::Denial)
                .map_err(|_| ProtoError::BadSignature)
        }
        _ => Err(ProtoError::BadSignature),
    }
}

impl ReleaseBody {
    /// The sealed secrets as a [`Sealed`], if the encapsulated key has the right length.
    pub fn sealed(&self) -> Option<Sealed> {
        Some(Sealed {
            enc: self.enc.as_slice().try_into().ok()?,
            ciphertext: self.sealed.clone(),
        })
    }
}
