//! Taking VM tasks from the chain (`[chain]`): each finalized block after the last one
//! processed, in order; each assignment to this miner created through the same path as a
//! control-socket create (launch gate, chip, capacity, broker), or refused with its code; the
//! block's refusals answered on chain through the billing outbox; then the block is done.
//!
//! **Exactly once.** An assignment's outcome is recorded before its block is done, and a
//! decided assignment is never acted on again; a crash between a create and its record is
//! recognised on replay (the VM is there, under the same order) and recorded as created. The
//! answer is built from the records, so a replay enqueues the same bytes, which the outbox
//! keeps once. A create that could succeed later (broker or database out of reach) is neither
//! recorded nor answered: the block is read again next round. Only finalized blocks are read,
//! and the block last done must still be the chain's at its number, or intake stops.

use super::Daemon;
use crate::chain::{Follower, blake2_256};
use crate::intake::{self, Malformed};
use crate::refusal::CreateError;
use crate::spec::VmSpec;
use base64::Engine as _;

/// Blocks read in one round at most (a long outage is caught up over several).
const BLOCKS_PER_ROUND: u64 = 200;
/// Largest boot file a task may name (OVMF, kernel, initrd).
const MAX_BOOT_FILE: u64 = 1 << 30;
/// Rounds a task may fail for a reason that could pass (broker or database out of reach)
/// before it is refused with that reason.
const TRIES: u32 = 10;

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntakeRound {
    /// Blocks done.
    pub blocks: u64,
    /// VMs created from assignments.
    pub created: Vec<String>,
    /// (VM id, code) of assignments refused.
    pub refused: Vec<(String, String)>,
}

impl Daemon {
    /// One round of intake: the finalized blocks after the last done (at most
    /// [`BLOCKS_PER_ROUND`]). Does nothing without `[chain]`.
    pub async fn intake_once(&self, f: &Follower) -> Result<IntakeRound, String> {
        let mut round = IntakeRound::default();
        let Some(c) = &self.cfg.chain else {
            return Ok(round);
        };
        let validators = c
            .validators
            .iter()
            .map(|v| crate::billing::account_id(v))
            .collect::<Result<Vec<_>, _>>()?;
        let me = self.miner_account()?;
        let head = f.finalized().await?;
        let start = match self.db.cursor().await? {
            Some((n, hash)) => {
                let now = f.hash_at(n).await?;
                if now != hash {
                    return Err(format!(
                        "finalized block {n} is {} on this chain, {} when it was processed: not the chain this agent followed; intake stopped",
                        hex::encode(now),
                        hex::encode(hash)
                    ));
                }
                n + 1
            }
            None => c.from_block.unwrap_or(head),
        };
        let end = head.min(start.saturating_add(BLOCKS_PER_ROUND - 1));
        for n in start..=end {
            let (hash, remarks) = f
                .remarks(n, |signer, bytes| {
                    intake::worth_reading(signer, bytes, &validators)
                })
                .await?;
            let mut per_validator = std::collections::HashMap::new();
            for r in remarks {
                let parsed = intake::parse(
                    &r.bytes,
                    r.signer.as_ref(),
                    &validators,
                    &me,
                    crate::billing::account_id,
                    blake2_256,
                );
                // Counted among this miner's tasks only: other miners' do not crowd them out.
                if parsed.is_some() {
                    let given = per_validator.entry(r.signer).or_insert(0usize);
                    *given += 1;
                    if *given > intake::MAX_PER_VALIDATOR_BLOCK {
                        tracing::warn!(
                            block = n,
                            "more assignments to this miner from one validator in one block than are acted on; the rest are not"
                        );
                        continue;
                    }
                }
                match parsed {
                    None => {}
                    Some(Err((id, why))) => self.malformed(n, &id, &why, &mut round).await?,
                    Some(Ok(a)) => self.take(n, &a, &mut round).await?,
                }
            }
            // The block's answer, from the records (the same bytes on a replay); then done.
            let refused = self.db.refusals_in(n).await?;
            if !refused.is_empty() {
                self.outbox
                    .enqueue(&intake::answers_doc(n, &refused))
                    .await
                    .map_err(|e| e.to_string())?;
                self.kick.notify_one();
            }
            self.db.set_cursor(n, &hash).await?;
            round.blocks += 1;
        }
        Ok(round)
    }

    /// This miner's account: `[chain] miner`, else the billing key's.
    fn miner_account(&self) -> Result<[u8; 32], String> {
        let Some(c) = &self.cfg.chain else {
            return Err("no [chain] configured".into());
        };
        if let Some(m) = &c.miner {
            return crate::billing::account_id(m);
        }
        let b = self
            .cfg
            .billing
            .as_ref()
            .ok_or("[chain] needs [billing] (the answers' key)")?;
        let secret = zeroize::Zeroizing::new(
            std::fs::read_to_string(&b.signer_file)
                .map_err(|e| format!("billing.signer_file {}: {e}", b.signer_file.display()))?,
        );
        let uri: subxt_signer::SecretUri = secret
            .trim()
            .parse()
            .map_err(|e: subxt_signer::SecretUriError| format!("billing key: {e}"))?;
        let pair = subxt_signer::sr25519::Keypair::from_uri(&uri)
            .map_err(|e| format!("billing key: {e}"))?;
        Ok(pair.public_key().0)
    }

    async fn malformed(
        &self,
        block: u64,
        id: &[u8; 32],
        why: &Malformed,
        round: &mut IntakeRound,
    ) -> Result<(), String> {
        if self.db.assignment_decided(id).await? {
            return Ok(());
        }
        round.refused.push((String::new(), "malformed".into()));
        tracing::warn!(block, assignment = %hex::encode(id), error = %why, "a validator's assignment cannot be read");
        self.db
            .decide_assignment(
                id,
                block,
                "",
                Some(("malformed", "the assignment is not of the version-1 shape")),
                self.now(),
            )
            .await
    }

    async fn take(
        &self,
        block: u64,
        a: &intake::Assignment,
        round: &mut IntakeRound,
    ) -> Result<(), String> {
        if self.db.assignment_decided(&a.id).await? {
            return Ok(());
        }
        let parsed = VmSpec::parse(&a.spec);
        let vm_id = parsed
            .as_ref()
            .map(|c| c.spec.vm_id.clone())
            .unwrap_or_default();
        let known = self.db.vms().await?.iter().any(|v| v.vm_id == vm_id);
        let attempt = match parsed {
            Ok(_) if known => Err(CreateError::Duplicate(vm_id.clone())),
            // A spec from the chain reads only the configured images and writes only its disk.
            Ok(c) => match self.confine(&c.spec) {
                Ok(()) => self.create(&a.spec, &a.order, true).await.map(|_| ()),
                Err(e) => Err(e),
            },
            Err(e) => Err(CreateError::Spec(e.to_string())),
        };
        let attempt = match attempt {
            // Created before a crash took the record: finish it, it is this assignment's.
            Err(CreateError::Duplicate(_)) if self.claimed_by(&vm_id, a).await? => {
                self.finish(&vm_id).await
            }
            other => other,
        };
        let outcome = match attempt {
            Ok(()) => None,
            Err(e) if e.transient() && self.try_again(&a.id) => {
                return Err(format!(
                    "block {block}: {vm_id}: {e} (tried again next round)"
                ));
            }
            Err(e) => {
                tracing::warn!(block, vm_id, code = e.code(), error = %e, "assignment refused");
                Some((e.code(), e.public_reason()))
            }
        };
        let at = self.now();
        match &outcome {
            None => {
                tracing::info!(block, vm_id, assignment = %hex::encode(a.id), "VM created from the chain");
                round.created.push(vm_id.clone());
            }
            Some((code, _)) => round.refused.push((vm_id.clone(), code.to_string())),
        }
        self.task_tries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&a.id);
        let refusal = outcome.as_ref().map(|(c, w)| (*c, *w));
        self.db
            .decide_assignment(&a.id, block, &vm_id, refusal, at)
            .await
    }

    /// Whether `vm_id` is on record, not terminated, under exactly this assignment's order and
    /// spec, and no other assignment was recorded as creating it: then the create was this
    /// assignment's, and a crash took its record.
    async fn claimed_by(&self, vm_id: &str, a: &intake::Assignment) -> Result<bool, CreateError> {
        let Ok(order) = base64::engine::general_purpose::STANDARD.decode(a.order.trim()) else {
            return Ok(false);
        };
        let ours = self
            .db
            .vms()
            .await
            .map_err(CreateError::Store)?
            .iter()
            .any(|v| {
                v.vm_id == vm_id
                    && v.order == order
                    && v.spec == a.spec
                    && v.terminated_at.is_none()
            });
        let taken = self
            .db
            .assignments()
            .await
            .map_err(CreateError::Store)?
            .iter()
            .any(|(id, _, vm, code)| vm == vm_id && code.is_none() && *id != a.id);
        Ok(ours && !taken)
    }

    /// Finishes a create a crash interrupted: the domain defined, and started.
    async fn finish(&self, vm_id: &str) -> Result<(), CreateError> {
        let listed = self
            .libvirt(|h| h.list())
            .await
            .map_err(CreateError::Libvirt)?;
        let running = match listed.iter().find(|v| v.vm_id == vm_id) {
            Some(v) => v.state == crate::lifecycle::State::Running,
            None => {
                let rec = self.record(vm_id).await.map_err(CreateError::Store)?;
                let c = VmSpec::parse(&rec.spec).map_err(|e| CreateError::Spec(e.to_string()))?;
                // A disk without its domain may hold a volume: never replaced on a guess.
                if std::fs::symlink_metadata(&c.spec.disk.path).is_ok() {
                    return Err(CreateError::Libvirt(format!(
                        "{vm_id}'s disk exists but its domain does not: not recreated"
                    )));
                }
                self.libvirt(move |h| h.create(&c))
                    .await
                    .map_err(CreateError::Libvirt)?;
                false
            }
        };
        if !running {
            self.start(vm_id).await.map_err(CreateError::NotStarted)?;
        }
        Ok(())
    }

    /// A spec from the chain may read boot files only from `[chain] image_dirs` (regular files,
    /// at most [`MAX_BOOT_FILE`] bytes) and put its disk only at `<disk_dir>/<vm_id>.img`,
    /// which must not exist yet: a validator names the files, not the miner.
    fn confine(&self, spec: &VmSpec) -> Result<(), CreateError> {
        let Some(c) = &self.cfg.chain else {
            return Ok(());
        };
        let bad = |why: String| CreateError::SpecPath(why);
        let dirs: Vec<_> = c
            .image_dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        let boot = [
            Some(&spec.boot.ovmf),
            spec.boot.kernel.as_ref(),
            spec.boot.initrd.as_ref(),
        ];
        for p in boot.into_iter().flatten() {
            let real =
                std::fs::canonicalize(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            if !dirs.iter().any(|d| real.starts_with(d)) {
                return Err(bad(format!("{} is not in [chain] image_dirs", p.display())));
            }
            let md = std::fs::metadata(&real).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            if !md.is_file() || md.len() > MAX_BOOT_FILE {
                return Err(bad(format!(
                    "{} is not a regular file of at most {MAX_BOOT_FILE} bytes",
                    p.display()
                )));
            }
        }
        let disk = c.disk_dir.join(format!("{}.img", spec.vm_id));
        if spec.disk.path != disk {
            return Err(bad(format!("the disk must be {}", disk.display())));
        }
        if std::fs::symlink_metadata(&disk).is_ok() {
            return Err(bad(format!("{} exists already", disk.display())));
        }
        Ok(())
    }

    /// Counts a try of task `id` that failed for a reason that could pass; false once it has
    /// had [`TRIES`] (then it is refused, and intake moves on).
    fn try_again(&self, id: &[u8; 32]) -> bool {
        let mut tries = self.task_tries.lock().unwrap_or_else(|e| e.into_inner());
        let n = tries.entry(*id).or_insert(0);
        *n += 1;
        *n < TRIES
    }

    /// Follows the chain until the process ends: a round every `poll_secs`, reconnecting with
    /// backoff when the node cannot be reached.
    pub(crate) async fn follow_chain(self: std::sync::Arc<Self>) {
        let Some(c) = self.cfg.chain.clone() else {
            return;
        };
        let Some(url) = self.cfg.billing.as_ref().map(|b| b.chain.clone()) else {
            return;
        };
        let poll = std::time::Duration::from_secs(c.poll_secs.max(1));
        let mut failures = 0u32;
        loop {
            let r: Result<(), String> = match Follower::connect(&url).await {
                Ok(f) => loop {
                    match self.intake_once(&f).await {
                        Ok(r) => {
                            failures = 0;
                            if r.blocks > 0 {
                                tracing::debug!(
                                    blocks = r.blocks,
                                    created = r.created.len(),
                                    refused = r.refused.len(),
                                    "chain intake"
                                );
                            }
                            tokio::time::sleep(poll).await;
                        }
                        Err(e) => break Err(e),
                    }
                },
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                failures = failures.saturating_add(1);
                let wait = crate::agent::backoff(failures, 300);
                tracing::warn!(error = %e, retry_in_secs = wait, "chain intake");
                tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            }
        }
    }
}
