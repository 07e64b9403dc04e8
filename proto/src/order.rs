//! Orders and the measurement allowlist: the operator's signed statements of which VM may
//! exist, for which tenant, running which images on which chips — and, signed by an offline
//! allowlist key, which images may run at all. A host relays orders but cannot write them.
//!
//! Both are CBOR documents carried with an Ed25519 signature over their exact bytes, verified
//! before they are parsed.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Document version this build reads.
pub const ORDER_VERSION: u32 = 1;
/// Largest signed document accepted (policies and boot configurations are small).
pub const MAX_DOCUMENT: usize = 256 * 1024;

/// What an order asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    /// Create the VM's record and its volume key.
    Register,
    /// Crypto-shred the VM's key (operator only: a host can stop a VM but not destroy a key).
    Terminate,
}

/// A VM order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub v: u32,
    pub kind: OrderKind,
    pub vm_id: String,
    pub tenant: String,
    /// Launch measurements this VM may boot with (each 48 bytes).
    #[serde(default)]
    pub measurements: Vec<serde_bytes::ByteBuf>,
    /// The appraisal policy (TOML, `snp::Policy`) for this VM's reports.
    #[serde(default)]
    pub policy: String,
    /// Chip ids of the host(s) the VM is placed on (64 bytes each).
    #[serde(default)]
    pub chip_ids: Vec<serde_bytes::ByteBuf>,
    /// Unix seconds after which the order may no longer be used.
    pub not_after: u64,
    /// Boot configuration for the guest (e.g. SSH public keys), released sealed with the key.
    #[serde(default)]
    pub boot_config: serde_bytes::ByteBuf,
    /// Who pays for the VM's running time, and at what rate. Signed by the operator, so a host
    /// can bill only the account and price the order names. Absent: the VM is not billed.
    /// (Left out of the encoding when absent: orders signed before it existed keep their bytes.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<Billing>,
    /// The VM's mesh overlay address with prefix (e.g. "10.42.7.9/16"): the broker certifies
    /// it, with group `tenant:<tenant>`, for the key the attested guest bound in its report.
    /// Absent: no mesh identity (and left out of the encoding, as `billing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ip: Option<String>,
    /// The VM's key is split across independent brokers and this broker holds one share: who
    /// they are and how many shares open the disk. The guest's measured configuration is what
    /// enforces it; the order states it, so that each broker's log and the tenant's verifier
    /// show it. Absent: this broker holds the whole key (and left out of the encoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// A key split across brokers (see [`Order::split`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Shares needed to open the disk: 2 (no broker alone) to n.
    pub threshold: u32,
    /// The brokers holding a share, this one included (names for people: "operator",
    /// "tenant").
    pub brokers: Vec<String>,
}

impl Split {
    /// "2-of-2".
    pub fn label(&self) -> String {
        format!("{}-of-{}", self.threshold, self.brokers.len())
    }

    /// 2 to [`crate::brokers::MAX_BROKERS`] distinct, non-empty names; a threshold of 2 to n.
    pub fn check(&self) -> Result<(), &'static str> {
        let n = self.brokers.len();
        if !(2..=crate::brokers::MAX_BROKERS).contains(&n) {
            return Err("a split names 2 to 8 brokers");
        }
        if self
            .brokers
            .iter()
            .enumerate()
            .any(|(i, b)| b.is_empty() || b.len() > 64 || self.brokers[..i].contains(b))
        {
            return Err("a split's broker names are distinct, 1-64 characters");
        }
        let k = self.threshold as usize;
        if k < 2 || k > n {
            return Err("a split's threshold is 2 (no broker alone) to the number of brokers");
        }
        // As many sets of k as the guest's disk header holds wraps for (guest-agent's split).
        let sets = (0..k).fold(1u64, |c, i| c * (n - i) as u64 / (i + 1) as u64);
        if k < n && sets > 32 {
            return Err(
                "a split's sets of k brokers must number 32 at most (the disk header holds their wraps)",
            );
        }
        Ok(())
    }
}

/// The billing terms of a VM, part of its register order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billing {
    /// The paying account on the billing chain (SS58).
    pub account: String,
    /// Price per running hour, in the chain's smallest unit.
    pub rate_per_hour: u64,
}

/// The allowlist of images the KBS will release keys to at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    pub v: u32,
    /// Monotonic: the KBS never accepts an older epoch again.
    pub epoch: u64,
    pub measurements: Vec<serde_bytes::ByteBuf>,
}

/// A signed document as stored and transmitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// `order` or `allowlist`.
    pub kind: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a signed document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("document is {0} bytes, more than {MAX_DOCUMENT}")]
    TooLarge(usize),
    #[error("document is not valid: {0}")]
    Malformed(String),
    #[error("document is a {found}, expected a {expected}")]
    WrongKind {
        found: String,
        expected: &'static str,
    },
    #[error("signature does not verify with any trusted key")]
    BadSignature,
    #[error("document version {0} is not supported (this build reads {ORDER_VERSION})")]
    Version(u32),
    #[error("order expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    #[error("order is malformed: {0}")]
    Invalid(&'static str),
    #[error("allowlist epoch {have} is older than the current epoch {need}")]
    StaleEpoch { have: u64, need: u64 },
}

fn message(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut m = b"attesta-document/1\0".to_vec();
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

fn to_cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = ciborium::into_writer(v, &mut out);
    out
}

fn sign(key: &Ed25519KeyPair, kind: &str, body: Vec<u8>) -> Vec<u8> {
    let signature = key.sign(&message(kind, &body)).as_ref().to_vec();
    to_cbor(&Signed {
        kind: kind.to_string(),
        body,
        signature,
    })
}

/// Checks size, kind and signature (against any of `trusted`), then returns the body bytes.
fn open_signed<'a>(
    doc: &[u8],
    expected: &'static str,
    trusted: &[[u8; 32]],
    out: &'a mut Signed,
) -> Result<&'a [u8], DocumentError> {
    if doc.len() > MAX_DOCUMENT {
        return Err(DocumentError::TooLarge(doc.len()));
    }
    *out = ciborium::from_reader(doc).map_err(|e| DocumentError::Malformed(e.to_string()))?;
    if out.kind != expected {
        return Err(DocumentError::WrongKind {
            found: out.kind.clone(),
            expected,
        });
    }
    let m = message(expected, &out.body);
    if !trusted.iter().any(|pk| {
        UnparsedPublicKey::new(&ED25519, pk)
            .verify(&m, &out.signature)
            .is_ok()
    }) {
        return Err(DocumentError::BadSignature);
    }
    Ok(&out.body)
}

impl Order {
    /// Signs the order with the operator's order key.
    pub fn sign(&self, key: &Ed25519KeyPair) -> Vec<u8> {
        sign(key, "order", to_cbor(self))
    }

    /// Verifies an order signed by one of the operator's order keys and still valid at `now`.
    pub fn verify(
        doc: &[u8],
        operator_keys: &[[u8; 32]],
        now: u64,
    ) -> Result<Order, DocumentError> {
        let mut s = Signed {
            kind: String::new(),
            body: Vec::new(),
            signature: Vec::new(),
        };
        let body = open_signed(doc, "order", operator_keys, &mut s)?;
        let o: Order =
            ciborium::from_reader(body).map_err(|e| DocumentError::Malformed(e.to_string()))?;
        if o.v != ORDER_VERSION {
            return Err(DocumentError::Version(o.v));
        }
        if now > o.not_after {
            return Err(DocumentError::Expired {
                not_after: o.not_after,
                now,
            });
        }
        if !is_valid_vm_id(&o.vm_id) {
            return Err(DocumentError::Invalid(
                "vm_id must be 1-128 of [A-Za-z0-9._-]",
            ));
        }
        if o.measurements.iter().any(|m| m.len() != 48) {
            return Err(DocumentError::Invalid("every measurement must be 48 bytes"));
        }
        if o.chip_ids.iter().any(|c| c.len() != 64) {
            return Err(DocumentError::Invalid("every chip id must be 64 bytes"));
        }
        if let Some(split) = &o.split {
            split.check().map_err(DocumentError::Invalid)?;
        }
        if o.kind == OrderKind::Register && (o.measurements.is_empty() || o.chip_ids.is_empty()) {
            return Err(DocumentError::Invalid(
                "a register order names at least one measurement and one chip",
            ));
        }
        Ok(o)
    }

    /// Decodes an order the broker verified when it stored it (no signature or expiry check:
    /// only for documents read back from the broker's own store).
    pub fn decode_stored(doc: &[u8]) -> Result<Order, DocumentError> {
        let s: Signed =
            ciborium::from_reader(doc).map_err(|e| DocumentError::Malformed(e.to_string()))?;
        ciborium::from_reader(s.body.as_slice())
            .map_err(|e| DocumentError::Malformed(e.to_string()))
    }

    /// Measurements of this order that the allowlist does not contain (empty: the order fits).
    pub fn outside(&self, allowlist: &Allowlist) -> Vec<Vec<u8>> {
        self.measurements
            .iter()
            .filter(|m| {
                !allowlist
                    .measurements
                    .iter()
                    .any(|a| a.as_slice() == m.as_slice())
            })
            .map(|m| m.to_vec())
            .collect()
    }
}

impl Allowlist {
    /// Signs with the offline allowlist key.
    pub fn sign(&self, key: &Ed25519KeyPair) -> Vec<u8> {
        sign(key, "allowlist", to_cbor(self))
    }

    /// Verifies an allowlist and that its epoch is not older than `current_epoch`.
    pub fn verify(
        doc: &[u8],
        allowlist_key: &[u8; 32],
        current_epoch: u64,
    ) -> Result<Allowlist, DocumentError> {
        let mut s = Signed {
            kind: String::new(),
            body: Vec::new(),
            signature: Vec::new(),
        };
        let body = open_signed(
            doc,
            "allowlist",
            std::slice::from_ref(allowlist_key),
            &mut s,
        )?;
        let a: Allowlist =
            ciborium::from_reader(body).map_err(|e| DocumentError::Malformed(e.to_string()))?;
        if a.v != ORDER_VERSION {
            return Err(DocumentError::Version(a.v));
        }
        if a.epoch < current_epoch {
            return Err(DocumentError::StaleEpoch {
                have: a.epoch,
                need: current_epoch,
            });
        }
        if a.measurements.iter().any(|m| m.len() != 48) {
            return Err(DocumentError::Invalid("every measurement must be 48 bytes"));
        }
        Ok(a)
    }
}

/// A VM id as orders (and challenges) must carry it: 1-128 of `[A-Za-z0-9._-]`.
pub fn is_valid_vm_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
