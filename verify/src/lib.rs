//! # attesta-verify — the tenant's own check of where their disk key went
//!
//! A broker's evidence bundle (`attesta-kbs evidence export`, format [`proto::bundle`]) is
//! checked offline against what only the tenant supplies: their signed order, the broker's
//! response key they pinned, and optionally the audit key and the measurements they rebuilt.
//!
//! What is checked ([`check_bundle`]):
//! - the broker's signature over the bundle's statement (VM, order hash, audit key, checkpoint);
//! - the audit segment: every entry hashes to its stated hash and chains to the one before, the
//!   closing checkpoint is signed by the audit key and covers every entry (an edited, removed,
//!   inserted or reordered entry is a finding), and no entry of this VM is hidden as elided;
//! - the segment starts at this VM's `register` entry, which names the tenant's order's hash;
//! - every release: its report is genuine (VCEK signature, chain to AMD's built-in roots — a
//!   simulator's root only when named explicitly), and passes the order's policy restricted to
//!   the order's measurements and chips, and the policy the broker states it applied; with
//!   `--measurement`, its measurement is one of the tenant's.
//!
//! - each release's report binds, in REPORT_DATA, the nonce, the guest key the VM's key was
//!   sealed to and the connection's exporter the entry names, and no report is shown twice.
//!
//! And [`check_report`]: a running VM's answer to the tenant's own challenge (`attesta-kbs
//! challenge`) is a genuine report, bound to the tenant's nonce and the VM's mesh key, that the
//! order's policy allows.
//!
//! Not checked: revocation (offline, no CRL: the output says so); that the segment is the whole
//! log before the VM was registered (nothing of this VM can precede its register entry); the
//! order's operator signature (the tenant holds the order they were given); anything after the
//! export time (printed). And the audit chain binds a broker only to what its audit key signed:
//! an operator holding that key could rebuild the log without a release. The report binding
//! above still holds then — every release shown went to a genuine, allowed VM — but a release
//! left out can only be caught with an anchor outside the broker (a checkpoint the tenant saw
//! earlier, or a witness), which this verifier does not take yet.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod report;

pub use bundle::{Expect, Outcome, check_bundle};
pub use report::{ReportExpect, ReportOutcome, check_report};

/// One thing wrong, in a closed vocabulary (`code`) with what was seen (`detail`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub code: &'static str,
    /// The audit entry it concerns, if any.
    pub seq: Option<u64>,
    pub detail: String,
}

impl Finding {
    pub fn new(code: &'static str, seq: Option<u64>, detail: impl Into<String>) -> Finding {
        Finding {
            code,
            seq,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(f, "{} (entry {s}): {}", self.code, self.detail),
            None => write!(f, "{}: {}", self.code, self.detail),
        }
    }
}
