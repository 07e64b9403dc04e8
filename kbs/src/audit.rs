//! The tamper-evident audit log: every decision is an entry whose hash chains to the previous
//! one, and the broker periodically signs a checkpoint (sequence number and chain hash) with its
//! Ed25519 audit key. Anyone with the public key can check the log offline: a changed, removed,
//! inserted or reordered entry breaks the chain or a checkpoint.
//!
//! The log is JSON Lines: entries `{"seq","time","kind","vm_id","detail","prev","hash"}` and
//! checkpoints `{"checkpoint":{"seq","hash","signature"}}`. Details never carry secrets.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// One decision or event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    /// `release`, `denial`, `register`, `terminate`, …
    pub kind: String,
    pub vm_id: String,
    /// Reasons, nonce, boot counter, … (never key material).
    pub detail: serde_json::Value,
    /// Hex of the previous entry's hash (zeros for the first).
    pub prev: String,
    /// Hex of SHA-256 over the domain separator and this entry without `hash`.
    pub hash: String,
}

/// A signed statement: the chain had this hash after entry `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub signature: String,
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time: u64,
    kind: &'a str,
    vm_id: &'a str,
    detail: &'a serde_json::Value,
    prev: &'a str,
}

fn entry_hash(
    seq: u64,
    time: u64,
    kind: &str,
    vm_id: &str,
    detail: &serde_json::Value,
    prev: &str,
) -> String {
    let body = serde_json::to_vec(&Hashed {
        seq,
        time,
        kind,
        vm_id,
        detail,
        prev,
    })
    .unwrap_or_default();
    let mut m = b"attesta-audit/1\0entry\0".to_vec();
    m.extend_from_slice(&body);
    hex::encode(digest(&SHA256, &m))
}

fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = b"attesta-audit/1\0checkpoint\0".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

/// The writer's state: where the chain is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub next_seq: u64,
    pub last_hash: String,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            next_seq: 0,
            last_hash: "0".repeat(64),
        }
    }
}

impl Chain {
    /// The next entry (the caller persists it before acting on the decision).
    pub fn append(
        &mut self,
        time: u64,
        kind: &str,
        vm_id: &str,
        detail: serde_json::Value,
    ) -> Entry {
        let hash = entry_hash(self.next_seq, time, kind, vm_id, &detail, &self.last_hash);
        let e = Entry {
            seq: self.next_seq,
            time,
            kind: kind.to_string(),
            vm_id: vm_id.to_string(),
            detail,
            prev: std::mem::replace(&mut self.last_hash, hash.clone()),
            hash,
        };
        self.next_seq += 1;
        e
    }

    /// A checkpoint over everything appended so far.
    pub fn checkpoint(&self, key: &Ed25519KeyPair) -> Option<Checkpoint> {
        let seq = self.next_seq.checked_sub(1)?;
        let sig = key.sign(&checkpoint_message(seq, &self.last_hash));
        Some(Checkpoint {
            seq,
            hash: self.last_hash.clone(),
            signature: hex::encode(sig.as_ref()),
        })
    }

    /// Resumes after the last entry of an existing log.
    pub fn resume(last: &Entry) -> Chain {
        Chain {
            next_seq: last.seq + 1,
            last_hash: last.hash.clone(),
        }
    }
}

/// One line of the log file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Checkpoint { checkpoint: Checkpoint },
    Entry(Entry),
}

/// Why a log does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("line {line}: not an audit entry or checkpoint: {why}")]
    Malformed { line: usize, why: String },
    #[error(
        "entry {seq}: expected sequence number {expected} (an entry was removed, inserted or reordered)"
    )]
    Sequence { seq: u64, expected: u64 },
    #[error("entry {seq}: its hash does not match its contents (the entry was changed)")]
    Hash { seq: u64 },
    #[error("entry {seq}: does not chain to the previous entry")]
    Chain { seq: u64 },
    #[error("checkpoint at entry {seq}: the signature does not verify with the audit key")]
    Signature { seq: u64 },
    #[error(
        "checkpoint at entry {seq}: the chain hash differs from the log's (the log was rewritten)"
    )]
    CheckpointMismatch { seq: u64 },
    #[error("checkpoint at entry {seq} refers to an entry not in the log (the log was truncated)")]
    Truncated { seq: u64 },
    #[error("the log has no signed checkpoint")]
    NoCheckpoint,
}

/// What a verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub checkpoints: u64,
    /// Entries after the last checkpoint: chained, but not yet covered by a signature.
    pub unsigned_tail: u64,
}

/// Verifies a whole log (JSON Lines text) against the audit public key.
pub fn verify(log: &str, audit_public_key: &[u8]) -> Result<Verified, AuditError> {
    let key = UnparsedPublicKey::new(&ED25519, audit_public_key);
    let mut chain = Chain::default();
    let mut hashes: Vec<String> = Vec::new();
    let mut checkpoints = 0u64;
    let mut last_cp: Option<u64> = None;
    let mut pending: Vec<Checkpoint> = Vec::new();
    for (i, raw) in log.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| AuditError::Malformed {
            line: i + 1,
            why: e.to_string(),
        })?;
        match line {
            Line::Entry(e) => {
                if e.seq != chain.next_seq {
                    return Err(AuditError::Sequence {
                        seq: e.seq,
                        expected: chain.next_seq,
                    });
                }
                if e.prev != chain.last_hash {
                    return Err(AuditError::Chain { seq: e.seq });
                }
                if entry_hash(e.seq, e.time, &e.kind, &e.vm_id, &e.detail, &e.prev) != e.hash {
                    return Err(AuditError::Hash { seq: e.seq });
                }
                chain = Chain::resume(&e);
                hashes.push(e.hash);
            }
            Line::Checkpoint { checkpoint: c } => pending.push(c),
        }
        // A checkpoint can only be judged once the entry it names has been read.
        let mut rest = Vec::new();
        for c in pending.drain(..) {
            if c.seq < chain.next_seq {
                let sig = hex::decode(&c.signature).unwrap_or_default();
                key.verify(&checkpoint_message(c.seq, &c.hash), &sig)
                    .map_err(|_| AuditError::Signature { seq: c.seq })?;
                if hashes.get(c.seq as usize) != Some(&c.hash) {
                    return Err(AuditError::CheckpointMismatch { seq: c.seq });
                }
                checkpoints += 1;
                last_cp = Some(last_cp.map_or(c.seq, |l| l.max(c.seq)));
            } else {
                rest.push(c);
            }
        }
        pending = rest;
    }
    if let Some(c) = pending.first() {
        return Err(AuditError::Truncated { seq: c.seq });
    }
    let Some(last) = last_cp else {
        return Err(AuditError::NoCheckpoint);
    };
    Ok(Verified {
        entries: chain.next_seq,
        checkpoints,
        unsigned_tail: chain.next_seq - 1 - last,
    })
}

/// Public key bytes of an audit key pair.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}
