//! VM tasks from the chain: what a validator's assignment says, which ones are this miner's,
//! and the answer the miner puts on chain for those it cannot honour. Pure: bytes in, decisions
//! out; [`crate::chain`] reads the blocks and [`crate::daemon`] acts.
//!
//! **Encoding, version 1** (for runtimes without a marketplace pallet, where assignments and
//! answers travel as remarks: `System.remark` or `remark_with_event` are read, answers are sent
//! with `remark_with_event`): a remark is the ASCII prefix, one space, and a JSON object
//! (UTF-8, at most [`MAX_REMARK`] bytes).
//!
//! - Assignment, signed by a validator: `attesta/v1 assign {"miner":"<SS58 or 0x hex>",
//!   "order":"<base64 of the operator-signed register order>","spec":"<the VM spec, TOML>"}`.
//!   Its id is blake2_256 of the whole remark — the hash the chain's own `System.Remarked`
//!   event carries — so anyone can match an answer to the assignment on chain.
//! - Answer, signed by the miner's billing key, one per block that held a refusal:
//!   `attesta/v1 answers {"block":N,"refused":[{"assignment":"<hex id>","code":"<code>",
//!   "reason":"<text>","vm_id":"<id>"}]}` (keys sorted, no spaces: canonical, so a replay makes
//!   the same bytes).
//!
//! Only a remark from an account in `[chain] validators` is an assignment; other remarks, other
//! versions and other miners' assignments are not this agent's business and are skipped (a
//! malformed one from a validator is logged and answered `malformed`). The order and the spec
//! are then judged exactly as a control-socket create is: signature, measurement, chip,
//! capacity — nothing from the chain is trusted for more than the operator's signature makes it.

use serde::Deserialize;

/// The prefix of a version-1 assignment.
pub const ASSIGN: &str = "attesta/v1 assign ";
/// The prefix of a version-1 answer.
pub const ANSWERS: &str = "attesta/v1 answers ";
/// Largest remark read as an assignment (a spec and an order are a few KiB).
pub const MAX_REMARK: usize = 64 * 1024;

/// An assignment addressed to this miner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// blake2_256 of the remark.
    pub id: [u8; 32],
    /// The VM spec (TOML).
    pub spec: String,
    /// The operator-signed register order (base64, as the control socket takes it).
    pub order: String,
}

/// Why a validator's remark addressed to this miner is not an assignment it can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not of the version-1 shape: {0}")]
    Json(String),
}

/// Assignments one validator may give this miner in one block; more are not acted on (a
/// flood, logged), so that one block's answer stays one small transaction.
pub const MAX_PER_VALIDATOR_BLOCK: usize = 64;

/// Whether a remark is worth reading as an assignment: a validator's, with the prefix. (Anyone
/// can fill blocks with remarks; only these cost more than a look.)
pub fn worth_reading(signer: Option<&[u8; 32]>, remark: &[u8], validators: &[[u8; 32]]) -> bool {
    signer.is_some_and(|s| validators.contains(s)) && remark.starts_with(ASSIGN.as_bytes())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    // Read leniently first (whose it is); declared so that the strict shape has it.
    #[allow(dead_code)]
    miner: String,
    order: String,
    spec: String,
}

/// What a remark is to the miner whose account is `me`: `None` — not an assignment for it
/// (another prefix, another miner, not from a validator, or not even JSON naming a miner, or
/// larger than [`MAX_REMARK`]: nobody's to answer); `Some(Err)` — a validator's assignment
/// naming this miner that cannot be read (answered `malformed`, id given); `Some(Ok)` — its
/// task. `account` turns an account as written (SS58 or hex) into its 32 bytes.
pub fn parse(
    remark: &[u8],
    signer: Option<&[u8; 32]>,
    validators: &[[u8; 32]],
    me: &[u8; 32],
    account: impl Fn(&str) -> Result<[u8; 32], String>,
    hash: impl Fn(&[u8]) -> [u8; 32],
) -> Option<Result<Assignment, ([u8; 32], Malformed)>> {
    if !worth_reading(signer, remark, validators) || remark.len() > MAX_REMARK {
        return None;
    }
    let body = &remark[ASSIGN.len()..];
    // Whose it is, read leniently: another miner's task (or an account that is nobody's) is
    // not ours to answer, however malformed.
    let loose: serde_json::Value = serde_json::from_slice(body).ok()?;
    let miner = loose.get("miner")?.as_str()?;
    if account(miner).ok()? != *me {
        return None;
    }
    let id = hash(remark);
    match serde_json::from_slice::<Wire>(body) {
        Ok(w) => Some(Ok(Assignment {
            id,
            spec: w.spec,
            order: w.order,
        })),
        Err(e) => Some(Err((id, Malformed::Json(e.to_string())))),
    }
}

/// The remark for an assignment (what a validator, or a test, puts on chain).
pub fn assignment_remark(miner: &str, order_b64: &str, spec: &str) -> Vec<u8> {
    let doc = serde_json::json!({"miner": miner, "order": order_b64, "spec": spec});
    let mut out = ASSIGN.as_bytes().to_vec();
    out.extend_from_slice(doc.to_string().as_bytes());
    out
}

/// One refusal in an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub assignment: [u8; 32],
    pub vm_id: String,
    /// A closed vocabulary: [`crate::refusal::CreateError::code`], or `malformed`.
    pub code: String,
    pub reason: String,
}

/// The canonical answer for block `block`'s refusals, in assignment order.
pub fn answers_remark(block: u64, refused: &[Refused]) -> String {
    // serde_json's maps are ordered by key, and `to_string` writes no spaces: canonical.
    let refused: Vec<serde_json::Value> = refused
        .iter()
        .map(|r| {
            serde_json::json!({
                "assignment": hex::encode(r.assignment),
                "code": r.code,
                "reason": r.reason,
                "vm_id": r.vm_id,
            })
        })
        .collect();
    let doc = serde_json::json!({"block": block, "refused": refused});
    format!("{ANSWERS}{doc}")
}

/// The outbox's account for answers (not a chain account: `#` is in no SS58 or hex account).
pub const ANSWERS_ACCOUNT: &str = "#answers";

/// Block `block`'s answer as an outbox record (period = the block), sent like a usage
/// document: once, with the billing key, as `System.remark_with_event`.
pub fn answers_doc(block: u64, refused: &[Refused]) -> crate::usage::UsageDoc {
    use sha2::Digest as _;
    let json = answers_remark(block, refused);
    crate::usage::UsageDoc {
        period: block,
        account: ANSWERS_ACCOUNT.into(),
        total: 0,
        lines: Vec::new(),
        hash: sha2::Sha256::digest(json.as_bytes()).into(),
        json,
    }
}

/// The outbox's account for lifecycle records.
pub const LIFECYCLE_ACCOUNT: &str = "#lifecycle";
/// The prefix of a version-1 lifecycle batch.
pub const LIFECYCLE: &str = "attesta/v1 lifecycle ";

/// One journalled transition of a VM on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifeRecord {
    /// The journal's sequence number (batches are contiguous runs of it).
    pub seq: u64,
    pub vm_id: String,
    /// created, running, stopped, rebooted, terminated, credit_stopped, backups_deleted.
    pub event: String,
    pub at: u64,
    pub reason: Option<String>,
}

/// A batch of transitions as an outbox record (period = the batch's last sequence number, so
/// a batch is recorded once and the next starts after it): `attesta/v1 lifecycle {"records":
/// [{"at":…,"event":…,"reason":…|null,"seq":…,"vm_id":…}]}`, canonical. None for no records.
pub fn lifecycle_doc(records: &[LifeRecord]) -> Option<crate::usage::UsageDoc> {
    use sha2::Digest as _;
    let last = records.last()?.seq;
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "at": r.at, "event": r.event, "reason": r.reason, "seq": r.seq, "vm_id": r.vm_id,
            })
        })
        .collect();
    let json = format!("{LIFECYCLE}{}", serde_json::json!({ "records": records }));
    Some(crate::usage::UsageDoc {
        period: last,
        account: LIFECYCLE_ACCOUNT.into(),
        total: 0,
        lines: Vec::new(),
        hash: sha2::Sha256::digest(json.as_bytes()).into(),
        json,
    })
}

/// The 32-byte account of an extrinsic's signer from its address bytes: `MultiAddress::Id`
/// (a 0x00 byte, then the account) only.
pub fn signer_of(address: Option<&[u8]>) -> Option<[u8; 32]> {
    match address? {
        [0, rest @ ..] => rest.try_into().ok(),
        _ => None,
    }
}

/// The bytes of a SCALE `Vec<u8>` (a compact length, then the bytes): the remark of a
/// `System.remark` or `remark_with_event` call's fields. None if they do not read as one.
pub fn scale_bytes(fields: &[u8]) -> Option<&[u8]> {
    let (&first, _) = fields.split_first()?;
    let (len, head) = match first & 0b11 {
        0 => (u64::from(first >> 2), 1),
        1 => (
            u64::from(u16::from_le_bytes(fields.get(..2)?.try_into().ok()?) >> 2),
            2,
        ),
        2 => (
            u64::from(u32::from_le_bytes(fields.get(..4)?.try_into().ok()?) >> 2),
            4,
        ),
        _ => return None,
    };
    let len = usize::try_from(len).ok()?;
    let body = fields.get(head..)?;
    (body.len() == len).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: [u8; 32] = [1; 32];
    const V: [u8; 32] = [9; 32];

    fn account(s: &str) -> Result<[u8; 32], String> {
        match s {
            "me" => Ok(ME),
            "other" => Ok([2; 32]),
            _ => Err("not an account".into()),
        }
    }

    fn hash(b: &[u8]) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[0] = b.len() as u8;
        h
    }

    fn p(
        remark: &[u8],
        signer: Option<[u8; 32]>,
    ) -> Option<Result<Assignment, ([u8; 32], Malformed)>> {
        parse(remark, signer.as_ref(), &[V], &ME, account, hash)
    }

    #[test]
    fn only_a_validators_assignment_to_this_miner_is_taken() {
        let r = assignment_remark("me", "b3JkZXI=", "vm_id = \"vm-1\"");
        assert_eq!(
            p(&r, Some(V)),
            Some(Ok(Assignment {
                id: hash(&r),
                spec: "vm_id = \"vm-1\"".into(),
                order: "b3JkZXI=".into(),
            }))
        );
        assert_eq!(p(&r, Some([3; 32])), None, "not a validator");
        assert_eq!(p(&r, None), None, "unsigned");
        let theirs = assignment_remark("other", "x", "y");
        assert_eq!(p(&theirs, Some(V)), None, "another miner's");
        assert_eq!(p(&assignment_remark("nobody", "x", "y"), Some(V)), None);
        assert_eq!(p(b"attesta/v2 assign {}", Some(V)), None, "another version");
        assert_eq!(p(b"hello", Some(V)), None);
        // A validator's assignment that cannot be read: answered, with its id.
        let bad = format!("{ASSIGN}{{\"miner\":\"me\"}}");
        assert!(matches!(
            p(bad.as_bytes(), Some(V)),
            Some(Err((_, Malformed::Json(_))))
        ));
        // One that names nobody (or another miner), or is not JSON: nobody's to answer.
        for junk in [
            format!("{ASSIGN}{{\"miner\":\"other\"}}"),
            format!("{ASSIGN}{{\"miner\":7}}"),
            format!("{ASSIGN}not json"),
        ] {
            assert_eq!(p(junk.as_bytes(), Some(V)), None, "{junk}");
        }
        let mut big = assignment_remark("me", "x", "y");
        big.resize(MAX_REMARK + 1, b' ');
        assert_eq!(p(&big, Some(V)), None, "too large to be anyone's");
    }

    #[test]
    fn answers_are_canonical() {
        let r = Refused {
            assignment: [0xab; 32],
            vm_id: "vm-2".into(),
            code: "tenant_quota".into(),
            reason: "tenant_quota: tenant t has 1 VM(s) here, its limit is 1".into(),
        };
        let a = answers_remark(7, std::slice::from_ref(&r));
        assert_eq!(
            a,
            format!(
                "attesta/v1 answers {{\"block\":7,\"refused\":[{{\"assignment\":\"{}\",\"code\":\"tenant_quota\",\"reason\":\"tenant_quota: tenant t has 1 VM(s) here, its limit is 1\",\"vm_id\":\"vm-2\"}}]}}",
                "ab".repeat(32)
            )
        );
        assert_eq!(a, answers_remark(7, &[r]), "the same bytes again");
    }

    #[test]
    fn signers_and_remark_bytes_are_read_exactly() {
        let mut a = vec![0u8];
        a.extend_from_slice(&[7; 32]);
        assert_eq!(signer_of(Some(&a)), Some([7; 32]));
        assert_eq!(signer_of(Some(&a[..32])), None);
        a[0] = 1;
        assert_eq!(signer_of(Some(&a)), None, "not MultiAddress::Id");
        assert_eq!(signer_of(None), None);
        assert_eq!(scale_bytes(&[3 << 2, 1, 2, 3]), Some(&[1u8, 2, 3][..]));
        let mut two = vec![0u8; 2];
        two[..2].copy_from_slice(&((100u16 << 2) | 1).to_le_bytes());
        two.extend_from_slice(&[5; 100]);
        assert_eq!(scale_bytes(&two).map(<[u8]>::len), Some(100));
        assert_eq!(scale_bytes(&[3 << 2, 1, 2]), None, "short");
        assert_eq!(scale_bytes(&[]), None);
        assert_eq!(scale_bytes(&[0b11]), None, "big-integer mode");
    }

    #[test]
    fn lifecycle_batches_are_canonical_and_named_by_their_last_record() {
        let r = |seq: u64, event: &str, reason: Option<&str>| LifeRecord {
            seq,
            vm_id: "vm-1".into(),
            event: event.into(),
            at: 100 + seq,
            reason: reason.map(str::to_string),
        };
        assert!(lifecycle_doc(&[]).is_none());
        let d = lifecycle_doc(&[
            r(4, "created", None),
            r(5, "credit_stopped", Some("cannot pay")),
        ])
        .unwrap();
        assert_eq!((d.period, d.account.as_str()), (5, LIFECYCLE_ACCOUNT));
        assert_eq!(
            d.json,
            "attesta/v1 lifecycle {\"records\":[{\"at\":104,\"event\":\"created\",\"reason\":null,\"seq\":4,\"vm_id\":\"vm-1\"},{\"at\":105,\"event\":\"credit_stopped\",\"reason\":\"cannot pay\",\"seq\":5,\"vm_id\":\"vm-1\"}]}"
        );
    }

    proptest! {
        #[test]
        fn reading_never_panics(
            remark in proptest::collection::vec(any::<u8>(), 0..300),
            fields in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut r = ASSIGN.as_bytes().to_vec();
            r.extend_from_slice(&remark);
            let _ = p(&r, Some(V));
            let _ = p(&remark, Some(V));
            let _ = scale_bytes(&fields);
            let _ = signer_of(Some(&fields));
        }
    }
}
