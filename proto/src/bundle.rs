//! The evidence bundle: what `attesta-kbs evidence export` writes for one VM, and what the
//! tenant's `attesta-verify bundle` checks offline.
//!
//! A bundle holds the VM's register order as the broker stored it and a contiguous segment of the
//! broker's audit log, from the VM's `register` entry to a checkpoint signed for the export. The
//! VM's own entries are whole (each release carries its report and the VCEK that signed it);
//! every other VM's entries are [elided](crate::audit::Elided), so the chain verifies without
//! showing other tenants' evidence. The broker's response key signs a statement naming the VM,
//! the audit key, the order's hash and the closing checkpoint, so a tenant who pinned the
//! broker's key learns which audit key to trust from the broker itself.
//!
//! Not here: judging the reports (that is `attesta-verify`, with AMD's roots) and reading the
//! store (that is the broker).

use crate::audit::{Checkpoint, Line};
use aws_lc_rs::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

/// Bundle format version this build writes and reads.
pub const BUNDLE_VERSION: u32 = 1;
/// Largest bundle a reader accepts (a segment of elided entries is about 300 bytes each).
pub const MAX_BUNDLE: usize = 256 * 1024 * 1024;
/// The response-signature kind of a bundle statement (never a release's or a denial's).
pub const STATEMENT_KIND: &str = "evidence-bundle";

/// One VM's evidence, as exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub v: u32,
    pub vm_id: String,
    /// Unix seconds of the export.
    pub exported_at: u64,
    /// The VM's register order as the broker stored it (the signed document), hex.
    pub order: String,
    /// The broker's audit public key (Ed25519, hex) that signs the segment's checkpoints.
    pub audit_key: String,
    /// From the VM's register entry to the closing checkpoint.
    pub log: Vec<Line>,
    /// The broker's response-key signature over [`statement`], hex.
    pub signature: String,
}

/// Why a bundle could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is {0} bytes, more than {MAX_BUNDLE}")]
    TooLarge(usize),
    #[error("not an evidence bundle: {0}")]
    Malformed(String),
    #[error("bundle version {0} is not supported (this build reads {BUNDLE_VERSION})")]
    Version(u32),
    #[error("the audit log has no register entry for VM {0}")]
    NoRegister(String),
    #[error("the audit log has no signed checkpoint covering VM {0}'s last entry")]
    NotCovered(String),
    #[error("audit log line {line} is unreadable: {why}")]
    Log { line: usize, why: String },
}

/// The message the broker's response key signs for a bundle.
pub fn statement(
    vm_id: &str,
    exported_at: u64,
    order_sha256: &[u8; 32],
    audit_key: &[u8],
    checkpoint: &Checkpoint,
) -> Vec<u8> {
    let mut m = b"attesta-evidence/1\0".to_vec();
    m.extend_from_slice(vm_id.as_bytes());
    m.push(0);
    m.extend_from_slice(&exported_at.to_be_bytes());
    m.extend_from_slice(order_sha256);
    m.extend_from_slice(&(audit_key.len() as u64).to_be_bytes());
    m.extend_from_slice(audit_key);
    m.extend_from_slice(&checkpoint.seq.to_be_bytes());
    m.extend_from_slice(checkpoint.hash.as_bytes());
    m
}

/// SHA-256 of bytes (the order's hash in register entries and statements).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl Bundle {
    /// Reads a bundle (JSON), refusing what is too large or not this version.
    pub fn decode(bytes: &[u8]) -> Result<Bundle, BundleError> {
        if bytes.len() > MAX_BUNDLE {
            return Err(BundleError::TooLarge(bytes.len()));
        }
        let b: Bundle =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        if b.v != BUNDLE_VERSION {
            return Err(BundleError::Version(b.v));
        }
        Ok(b)
    }

    /// The closing checkpoint: the last line, which the statement names.
    pub fn closing_checkpoint(&self) -> Option<&Checkpoint> {
        match self.log.last() {
            Some(Line::Checkpoint { checkpoint }) => Some(checkpoint),
            _ => None,
        }
    }
}

/// Cuts a VM's segment out of a whole log (JSON Lines, as `audit export` writes it): from the
/// VM's register entry to the last checkpoint, which must cover the VM's last entry; other VMs'
/// entries elided, checkpoints kept. The caller signs a checkpoint just before, so the segment
/// reaches the end of the log.
pub fn cut(log: &str, vm_id: &str) -> Result<Vec<Line>, BundleError> {
    let mut lines =
        crate::audit::parse_log(log).map_err(|(line, why)| BundleError::Log { line, why })?;
    let start = lines
        .iter()
        .position(|l| matches!(l, Line::Entry(e) if e.vm_id == vm_id && e.kind == "register"))
        .ok_or_else(|| BundleError::NoRegister(vm_id.into()))?;
    let last_checkpoint = lines
        .iter()
        .rposition(|l| matches!(l, Line::Checkpoint { .. }))
        .filter(|&c| c > start)
        .ok_or_else(|| BundleError::NotCovered(vm_id.into()))?;
    let last_own = lines
        .iter()
        .rposition(|l| matches!(l, Line::Entry(e) if e.vm_id == vm_id))
        .unwrap_or(start);
    if last_own > last_checkpoint {
        return Err(BundleError::NotCovered(vm_id.into()));
    }
    // Entries after the closing checkpoint are left out: no signature covers them.
    Ok(lines
        .drain(start..=last_checkpoint)
        .map(|l| match l {
            Line::Entry(e) if e.vm_id != vm_id => Line::Elided { elided: e.elide() },
            other => other,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Chain, verify_segment};
    use aws_lc_rs::signature::Ed25519KeyPair;

    fn log(key: &Ed25519KeyPair) -> String {
        let mut c = Chain::default();
        let mut out = String::new();
        let mut push = |l: Line| {
            out.push_str(&serde_json::to_string(&l).unwrap());
            out.push('\n');
        };
        push(Line::Entry(c.append(
            1,
            "register",
            "other",
            serde_json::json!({}),
        )));
        push(Line::Entry(c.append(
            2,
            "register",
            "vm-1",
            serde_json::json!({"tenant": "t"}),
        )));
        push(Line::Entry(c.append(
            3,
            "release",
            "other",
            serde_json::json!({"x": 1}),
        )));
        push(Line::Checkpoint {
            checkpoint: c.checkpoint(key).unwrap(),
        });
        push(Line::Entry(c.append(
            4,
            "release",
            "vm-1",
            serde_json::json!({"boot_counter": 1}),
        )));
        push(Line::Checkpoint {
            checkpoint: c.checkpoint(key).unwrap(),
        });
        out
    }

    #[test]
    fn a_cut_segment_starts_at_the_register_entry_and_elides_other_vms() {
        let key = Ed25519KeyPair::generate().unwrap();
        let seg = cut(&log(&key), "vm-1").unwrap();
        assert!(matches!(&seg[0], Line::Entry(e) if e.kind == "register" && e.seq == 1));
        assert!(matches!(&seg[1], Line::Elided { elided } if elided.vm_id == "other"));
        assert!(matches!(seg.last(), Some(Line::Checkpoint { checkpoint }) if checkpoint.seq == 3));
        let v = verify_segment(&seg, &crate::audit::public_key(&key)).unwrap();
        assert_eq!((v.first_seq, v.entries, v.unsigned_tail), (1, 3, 0));
    }

    #[test]
    fn a_vm_never_registered_or_not_yet_covered_is_refused() {
        let key = Ed25519KeyPair::generate().unwrap();
        assert_eq!(
            cut(&log(&key), "vm-2"),
            Err(BundleError::NoRegister("vm-2".into()))
        );
        let mut text = log(&key);
        // An entry of vm-1 after the last checkpoint: not coverable.
        let mut tail = Chain {
            next_seq: 5,
            last_hash: "0".repeat(64),
        };
        let e = tail.append(5, "release", "vm-1", serde_json::json!({}));
        text.push_str(&serde_json::to_string(&Line::Entry(e)).unwrap());
        assert_eq!(
            cut(&text, "vm-1"),
            Err(BundleError::NotCovered("vm-1".into()))
        );
    }

    #[test]
    fn decoding_refuses_other_versions_and_unknown_fields() {
        let b = Bundle {
            v: 2,
            vm_id: "vm".into(),
            exported_at: 0,
            order: String::new(),
            audit_key: String::new(),
            log: Vec::new(),
            signature: String::new(),
        };
        let bytes = serde_json::to_vec(&b).unwrap();
        assert_eq!(Bundle::decode(&bytes), Err(BundleError::Version(2)));
        assert!(matches!(
            Bundle::decode(br#"{"v":1,"extra":1}"#),
            Err(BundleError::Malformed(_))
        ));
    }
}
