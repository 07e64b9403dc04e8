//! The tamper-evident audit log: every decision is an entry whose hash chains to the previous
//! one, and the broker periodically signs a checkpoint (sequence number and chain hash) with its
//! Ed25519 audit key. Anyone with the public key can check the log offline: a changed, removed,
//! inserted or reordered entry breaks the chain or a checkpoint.
//!
//! The log is JSON Lines: entries `{"seq","time","kind","vm_id","detail","prev","hash"}` and
//! checkpoints `{"checkpoint":{"seq","hash","signature"}}`. Details never carry secrets.
//!
//! An entry's hash covers its detail through the detail's own SHA-256, so an entry can be shown
//! *elided* — `{"elided":{"seq","time","kind","vm_id","detail_sha256","prev","hash"}}` — and still
//! be checked: a tenant's evidence bundle carries its own VM's entries whole and everyone else's
//! elided, so the chain between them verifies without showing other tenants' reports. An elided
//! entry still names its VM, so an entry of the bundle's own VM cannot be hidden that way.
//!
//! Not here: a proof that a segment is the *whole* log (a log is checked from entry 0, a segment
//! from wherever it starts), and any key management (the broker holds the signing key).

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

/// An entry with its detail replaced by the detail's SHA-256: what a bundle shows of entries
/// that are not its VM's. Its hash is the entry's, and is recomputed from these fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Elided {
    pub seq: u64,
    pub time: u64,
    pub kind: String,
    pub vm_id: String,
    pub detail_sha256: String,
    pub prev: String,
    pub hash: String,
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time: u64,
    kind: &'a str,
    vm_id: &'a str,
    detail_sha256: &'a str,
    prev: &'a str,
}

/// Hex of SHA-256 over a detail's canonical JSON ([`canonical`]).
pub fn detail_sha256(detail: &serde_json::Value) -> String {
    let mut m = b"attesta-audit/2\0detail\0".to_vec();
    canonical(detail, &mut m);
    hex::encode(digest(&SHA256, &m))
}

/// JSON with object keys sorted at every depth and no spaces, whatever order the value keeps
/// its keys in (so a build with serde_json's `preserve_order` hashes alike).
pub fn canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(&Value::String(k.clone()), out);
                out.push(b':');
                canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        leaf => out.extend_from_slice(&serde_json::to_vec(leaf).unwrap_or_default()),
    }
}

fn entry_hash(
    seq: u64,
    time: u64,
    kind: &str,
    vm_id: &str,
    detail_sha256: &str,
    prev: &str,
) -> String {
    let body = serde_json::to_vec(&Hashed {
        seq,
        time,
        kind,
        vm_id,
        detail_sha256,
        prev,
    })
    .unwrap_or_default();
    let mut m = b"attesta-audit/2\0entry\0".to_vec();
    m.extend_from_slice(&body);
    hex::encode(digest(&SHA256, &m))
}

impl Entry {
    /// This entry with its detail hidden behind its hash.
    pub fn elide(&self) -> Elided {
        Elided {
            seq: self.seq,
            time: self.time,
            kind: self.kind.clone(),
            vm_id: self.vm_id.clone(),
            detail_sha256: detail_sha256(&self.detail),
            prev: self.prev.clone(),
            hash: self.hash.clone(),
        }
    }
}

fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    let mut m = b"attesta-audit/2\0checkpoint\0".to_vec();
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
        let hash = entry_hash(
            self.next_seq,
            time,
            kind,
            vm_id,
            &detail_sha256(&detail),
            &self.last_hash,
        );
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

/// Whether a checkpoint's signature verifies with the audit public key.
pub fn checkpoint_signed(c: &Checkpoint, audit_public_key: &[u8]) -> bool {
    let Ok(sig) = hex::decode(&c.signature) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, audit_public_key)
        .verify(&checkpoint_message(c.seq, &c.hash), &sig)
        .is_ok()
}

/// One line of the log file (or of a bundle's segment, which may hold elided entries).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Checkpoint { checkpoint: Checkpoint },
    Elided { elided: Elided },
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
    #[error("entry {seq} is elided: a whole log shows every entry")]
    Elided { seq: u64 },
}

/// What a verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub checkpoints: u64,
    /// Entries after the last checkpoint: chained, but not yet covered by a signature.
    pub unsigned_tail: u64,
    /// The first entry's sequence number (0 for a whole log).
    pub first_seq: u64,
    /// The last signed checkpoint (the one covering the most entries).
    pub last_checkpoint: Option<Checkpoint>,
}

/// Verifies a whole log (JSON Lines text, from entry 0) against the audit public key.
pub fn verify(log: &str, audit_public_key: &[u8]) -> Result<Verified, AuditError> {
    let lines = parse_log(log).map_err(|(line, why)| AuditError::Malformed { line, why })?;
    check(&lines, audit_public_key, Some(Chain::default()))
}

/// The lines of a log (JSON Lines text; blank lines skipped), or the first unreadable one's
/// number (from 1) and why.
pub fn parse_log(log: &str) -> Result<Vec<Line>, (usize, String)> {
    log.lines()
        .enumerate()
        .filter(|(_, raw)| !raw.trim().is_empty())
        .map(|(i, raw)| serde_json::from_str::<Line>(raw).map_err(|e| (i + 1, e.to_string())))
        .collect()
}

/// Verifies a contiguous segment of a log, starting wherever its first entry does: each entry
/// (whole or elided) hashes to its stated hash and chains to the one before, and the signed
/// checkpoints match. What precedes the segment is taken on trust of its first `prev`.
pub fn verify_segment(lines: &[Line], audit_public_key: &[u8]) -> Result<Verified, AuditError> {
    check(lines, audit_public_key, None)
}

/// The fields every entry, whole or elided, is hashed over.
fn view(line: &Line) -> Option<(u64, u64, &str, &str, String, &str, &str)> {
    match line {
        Line::Entry(e) => Some((
            e.seq,
            e.time,
            &e.kind,
            &e.vm_id,
            detail_sha256(&e.detail),
            &e.prev,
            &e.hash,
        )),
        Line::Elided { elided: e } => Some((
            e.seq,
            e.time,
            &e.kind,
            &e.vm_id,
            e.detail_sha256.clone(),
            &e.prev,
            &e.hash,
        )),
        Line::Checkpoint { .. } => None,
    }
}

fn check(lines: &[Line], key: &[u8], start: Option<Chain>) -> Result<Verified, AuditError> {
    // A whole log holds every entry whole; only a segment may show some elided.
    let whole = start.is_some();
    let mut chain = start.clone();
    let mut first_seq = start.as_ref().map_or(0, |c| c.next_seq);
    let mut hashes: Vec<String> = Vec::new();
    let mut checkpoints = 0u64;
    let mut last_cp: Option<Checkpoint> = None;
    for line in lines {
        if let (true, Line::Elided { elided }) = (whole, line) {
            return Err(AuditError::Elided { seq: elided.seq });
        }
        if let Some((seq, time, kind, vm_id, detail, prev, hash)) = view(line) {
            let c = chain.get_or_insert_with(|| {
                first_seq = seq;
                Chain {
                    next_seq: seq,
                    last_hash: prev.to_string(),
                }
            });
            if seq != c.next_seq {
                return Err(AuditError::Sequence {
                    seq,
                    expected: c.next_seq,
                });
            }
            if prev != c.last_hash {
                return Err(AuditError::Chain { seq });
            }
            if entry_hash(seq, time, kind, vm_id, &detail, prev) != hash {
                return Err(AuditError::Hash { seq });
            }
            c.next_seq = seq.checked_add(1).ok_or(AuditError::Sequence {
                seq,
                expected: c.next_seq,
            })?;
            c.last_hash = hash.to_string();
            hashes.push(hash.to_string());
        } else if let Line::Checkpoint { checkpoint: c } = line {
            // A checkpoint follows the entry it names (as the broker writes them): one naming
            // an entry not yet read means the log was cut after it.
            let next = chain.as_ref().map_or(first_seq, |c| c.next_seq);
            if c.seq >= next {
                return Err(AuditError::Truncated { seq: c.seq });
            }
            if !checkpoint_signed(c, key) {
                return Err(AuditError::Signature { seq: c.seq });
            }
            let at = c
                .seq
                .checked_sub(first_seq)
                .and_then(|i| usize::try_from(i).ok());
            if at.and_then(|i| hashes.get(i)) != Some(&c.hash) {
                return Err(AuditError::CheckpointMismatch { seq: c.seq });
            }
            checkpoints += 1;
            if last_cp.as_ref().is_none_or(|l| l.seq < c.seq) {
                last_cp = Some(c.clone());
            }
        }
    }
    let Some(last) = last_cp else {
        return Err(AuditError::NoCheckpoint);
    };
    let next = chain.as_ref().map_or(first_seq, |c| c.next_seq);
    Ok(Verified {
        entries: next - first_seq,
        checkpoints,
        unsigned_tail: next - 1 - last.seq,
        first_seq,
        last_checkpoint: Some(last),
    })
}

/// Public key bytes of an audit key pair.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}
