//! Billing: a durable outbox of usage documents (SQLite) and their submission to a Substrate
//! chain with `subxt` (dynamic API; the call is resolved from the node's metadata at run time).
//!
//! **Exactly once per (period, account).** A document is recorded once; offering a different
//! hash for a (period, account) already recorded is refused. Submission is commit-before-emit:
//! the transaction is signed with an explicit account nonce and its bytes are committed to the
//! outbox *before* they are sent. After a crash or a network error the same bytes are sent
//! again (a transaction can be included at most once). Each transaction is mortal: valid only
//! in the [`MORTALITY`] blocks after the block it was signed at, which the outbox records. So
//! what became of a stored transaction is always decidable from the finalized chain
//! ([`judge`]): its nonce unused and its window passed — it can never be included, and is
//! signed again (same document, same nonce); its nonce used — it is looked for in its window:
//! found, it is done (or failed at dispatch, marked failed, never resent silently); not found,
//! another transaction took the nonce (the billing key should be this outbox's alone, which
//! the configuration documents), so ours can never be included and is signed again, with the
//! next free nonce. A stored transaction a runtime upgrade invalidated is re-signed the same
//! way once its window passes. Where the window's blocks cannot be read (a pruned node), the
//! record is retried and after [`SEARCH_ATTEMPTS`] marked failed for an operator — never sent
//! again on a guess.

use crate::usage::UsageDoc;
use sqlx::Row as _;
use sqlx::sqlite::SqlitePool;
use std::path::Path;
use subxt::config::polkadot::PolkadotExtrinsicParamsBuilder as Params;
use subxt::dynamic::{self, Value};
use subxt::{OnlineClient, PolkadotConfig};

/// Why a billing step failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("outbox: {0}")]
    Store(String),
    #[error(
        "period {period} for {account} is already recorded with usage hash {recorded}; refusing a different one ({offered})"
    )]
    HashConflict {
        period: u64,
        account: String,
        recorded: String,
        offered: String,
    },
    #[error("chain: {0}")]
    Chain(String),
    #[error("billing call {0}: not in the node's metadata or arguments do not fit: {1}")]
    Call(String, String),
    #[error("signer: {0}")]
    Signer(String),
}

fn store(e: sqlx::Error) -> BillingError {
    BillingError::Store(e.to_string())
}

/// Where a record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Recorded, not yet signed.
    Pending,
    /// Signed with this nonce and stored; sent or about to be.
    Signed { nonce: u64 },
    /// On chain (finalized).
    Done,
    /// Included but failed at dispatch: needs an operator.
    Failed,
}

/// One outbox record, as `attesta-host billing status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub period: u64,
    pub account: String,
    pub total: u128,
    pub hash: [u8; 32],
    pub state: State,
    pub attempts: u64,
    pub last_error: Option<String>,
    pub tx_hash: Option<String>,
    /// The finalized block the stored transaction was signed at (its mortality starts there).
    pub birth: Option<u64>,
}

/// How many blocks a billing transaction stays valid after the block it was signed at (a power
/// of two, so the era is exactly this long): ~6.4 minutes at 6 s blocks.
pub const MORTALITY: u64 = 64;

/// Drains that may fail to read a used nonce's window before its record is marked failed.
pub const SEARCH_ATTEMPTS: u64 = 5;

/// What a stored, signed transaction needs, judged from the finalized chain (sans-IO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Its nonce unused and its window open: send the stored bytes (again).
    Send,
    /// Its nonce used: look for it in blocks `from..=to` to learn whether it took the nonce.
    Search { from: u64, to: u64 },
    /// Its window passed with its nonce unused: it can never be included. Sign it again.
    Expired,
    /// Signed before the outbox kept windows: a used nonce is taken as its inclusion.
    Included,
}

/// Judges a stored transaction signed with `nonce` at block `birth`, when the signer's account
/// nonce at the finalized block `head` is `chain_nonce`.
pub fn judge(nonce: u64, birth: Option<u64>, chain_nonce: u64, head: u64) -> Stored {
    match birth {
        None if nonce < chain_nonce => Stored::Included,
        None => Stored::Send,
        // It can only be in a block after the one it was signed at, and before its era ends.
        Some(b) if nonce < chain_nonce => Stored::Search {
            from: b.saturating_add(1),
            to: b.saturating_add(MORTALITY).min(head),
        },
        Some(b) if head >= b.saturating_add(MORTALITY) => Stored::Expired,
        Some(_) => Stored::Send,
    }
}

/// Whether `enqueue` added the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    New,
    AlreadyRecorded,
}

/// The durable outbox.
#[derive(Clone)]
pub struct Outbox {
    pool: SqlitePool,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage (
    period INTEGER NOT NULL, account TEXT NOT NULL, doc TEXT NOT NULL, hash BLOB NOT NULL,
    total TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', nonce INTEGER, tx BLOB,
    tx_hash TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, birth INTEGER,
    PRIMARY KEY (period, account))";

impl Outbox {
    /// Opens (creating) the outbox database: WAL, synchronous=FULL.
    pub async fn open(path: &Path) -> Result<Outbox, BillingError> {
        let pool = crate::state::durable_pool(path, SCHEMA)
            .await
            .map_err(store)?;
        // Outboxes made before transactions were mortal lack the `birth` column.
        let columns = sqlx::query("SELECT name FROM pragma_table_info('usage')")
            .fetch_all(&pool)
            .await
            .map_err(store)?;
        if !columns.iter().any(|c| c.get::<String, _>(0) == "birth") {
            sqlx::query("ALTER TABLE usage ADD COLUMN birth INTEGER")
                .execute(&pool)
                .await
                .map_err(store)?;
        }
        Ok(Outbox { pool })
    }

    /// Records a usage document, once per (period, account); a different hash is refused.
    pub async fn enqueue(&self, doc: &UsageDoc) -> Result<Enqueued, BillingError> {
        let period = i64::try_from(doc.period).map_err(|e| BillingError::Store(e.to_string()))?;
        let r = sqlx::query(
            "INSERT INTO usage (period, account, doc, hash, total) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (period, account) DO NOTHING",
        )
        .bind(period)
        .bind(&doc.account)
        .bind(&doc.json)
        .bind(&doc.hash[..])
        .bind(doc.total.to_string())
        .execute(&self.pool)
        .await
        .map_err(store)?;
        if r.rows_affected() == 1 {
            return Ok(Enqueued::New);
        }
        let row = sqlx::query("SELECT hash FROM usage WHERE period = ? AND account = ?")
            .bind(period)
            .bind(&doc.account)
            .fetch_one(&self.pool)
            .await
            .map_err(store)?;
        let recorded: Vec<u8> = row.get(0);
        if recorded != doc.hash {
            return Err(BillingError::HashConflict {
                period: doc.period,
                account: doc.account.clone(),
                recorded: hex::encode(recorded),
                offered: hex::encode(doc.hash),
            });
        }
        Ok(Enqueued::AlreadyRecorded)
    }

    /// Every record, oldest period first.
    pub async fn records(&self) -> Result<Vec<Record>, BillingError> {
        let rows = sqlx::query(
            "SELECT period, account, total, hash, state, nonce, attempts, last_error, tx_hash,
             birth FROM usage ORDER BY period, account",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store)?;
        rows.iter()
            .map(|r| {
                let state: String = r.get(4);
                let nonce: Option<i64> = r.get(5);
                let hash: Vec<u8> = r.get(3);
                let total: String = r.get(2);
                Ok(Record {
                    period: u64::try_from(r.get::<i64, _>(0)).unwrap_or(0),
                    account: r.get(1),
                    total: total.parse().unwrap_or(0),
                    hash: hash.try_into().unwrap_or([0; 32]),
                    state: match (state.as_str(), nonce) {
                        ("signed", Some(n)) => State::Signed {
                            nonce: u64::try_from(n).unwrap_or(0),
                        },
                        ("done", _) => State::Done,
                        ("failed", _) => State::Failed,
                        _ => State::Pending,
                    },
                    attempts: u64::try_from(r.get::<i64, _>(6)).unwrap_or(0),
                    last_error: r.get(7),
                    tx_hash: r.get(8),
                    birth: r
                        .get::<Option<i64>, _>(9)
                        .and_then(|b| u64::try_from(b).ok()),
                })
            })
            .collect()
    }

    /// The signed transaction stored for a record, if it has been signed.
    pub async fn stored_tx(
        &self,
        period: u64,
        account: &str,
    ) -> Result<Option<Vec<u8>>, BillingError> {
        Ok(self.doc_and_tx(period, account).await?.1)
    }

    pub async fn doc_and_tx(
        &self,
        period: u64,
        account: &str,
    ) -> Result<(String, Option<Vec<u8>>), BillingError> {
        let r = sqlx::query("SELECT doc, tx FROM usage WHERE period = ? AND account = ?")
            .bind(period as i64)
            .bind(account)
            .fetch_one(&self.pool)
            .await
            .map_err(store)?;
        Ok((r.get(0), r.get(1)))
    }

    async fn set(
        &self,
        period: u64,
        account: &str,
        sql: &'static str,
        a: Option<String>,
    ) -> Result<(), BillingError> {
        sqlx::query(sql)
            .bind(a)
            .bind(period as i64)
            .bind(account)
            .execute(&self.pool)
            .await
            .map_err(store)?;
        Ok(())
    }

    async fn mark_signed(
        &self,
        period: u64,
        account: &str,
        nonce: u64,
        birth: u64,
        tx: &[u8],
        tx_hash: &str,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE usage SET state = 'signed', nonce = ?, birth = ?, tx = ?, tx_hash = ?
             WHERE period = ? AND account = ? AND state = 'pending'",
        )
        .bind(nonce as i64)
        .bind(i64::try_from(birth).unwrap_or(i64::MAX))
        .bind(tx)
        .bind(tx_hash)
        .bind(period as i64)
        .bind(account)
        .execute(&self.pool)
        .await
        .map_err(store)?;
        Ok(())
    }

    /// The stored transaction `tx_hash` can never be included: back to pending, to be signed
    /// again. Only that transaction: a drain running beside this one may already have
    /// replaced it, and voiding the replacement could let both be included.
    async fn mark_void(
        &self,
        period: u64,
        account: &str,
        tx_hash: &str,
        why: String,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE usage SET state = 'pending', nonce = NULL, birth = NULL, tx = NULL,
             tx_hash = NULL, last_error = ?
             WHERE period = ? AND account = ? AND state = 'signed' AND tx_hash = ?",
        )
        .bind(why)
        .bind(period as i64)
        .bind(account)
        .bind(tx_hash)
        .execute(&self.pool)
        .await
        .map_err(store)?;
        Ok(())
    }

    async fn mark_done(&self, period: u64, account: &str) -> Result<(), BillingError> {
        self.set(
            period,
            account,
            "UPDATE usage SET state = 'done', last_error = ? WHERE period = ? AND account = ?",
            None,
        )
        .await
    }

    async fn mark_failed(
        &self,
        period: u64,
        account: &str,
        why: String,
    ) -> Result<(), BillingError> {
        self.set(
            period,
            account,
            "UPDATE usage SET state = 'failed', last_error = ? WHERE period = ? AND account = ?",
            Some(why),
        )
        .await
    }

    async fn mark_error(
        &self,
        period: u64,
        account: &str,
        why: String,
    ) -> Result<(), BillingError> {
        self.set(
            period,
            account,
            "UPDATE usage SET attempts = attempts + 1, last_error = ? WHERE period = ? AND account = ?",
            Some(why),
        )
        .await
    }
}

/// An account as the chain's `AccountId32`: SS58 or 0x-prefixed hex of its 32 bytes.
pub fn account_value(account: &str) -> Result<Value, String> {
    Ok(Value::from_bytes(account_id(account)?))
}

/// The 32 bytes of an account given as SS58 or 0x-prefixed hex: the one reading of accounts
/// for billing and the credit check alike.
pub fn account_id(account: &str) -> Result<[u8; 32], String> {
    Ok(match account.strip_prefix("0x") {
        Some(h) => hex::decode(h)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("account {account:?}: not 32 bytes of hex"))?,
        None => {
            use std::str::FromStr as _;
            subxt::utils::AccountId32::from_str(account)
                .map_err(|e| format!("account {account:?}: not an SS58 address ({e})"))?
                .0
        }
    })
}

/// A 32-byte hash as the chain's `H256`.
pub fn hash_value(hash: &[u8; 32]) -> Value {
    Value::from_bytes(hash)
}

/// Which call carries a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `pallet.call(period, account, amount, usage_hash)`, e.g.
    /// `Marketplace.submit_compute_usage` (the default).
    Usage { pallet: String, call: String },
    /// `System.remark_with_event(document)`: the chain records blake2_256 of the canonical
    /// document in a `System.Remarked` event (for runtimes without a billing pallet).
    Remark,
}

impl CallKind {
    /// `Pallet.call`, or `System.remark_with_event` for [`CallKind::Remark`].
    pub fn parse(s: &str) -> Result<CallKind, String> {
        match s.split_once('.') {
            Some(("System", "remark_with_event")) => Ok(CallKind::Remark),
            Some((pallet, call))
                if !pallet.is_empty() && !call.is_empty() && !call.contains('.') =>
            {
                Ok(CallKind::Usage {
                    pallet: pallet.into(),
                    call: call.into(),
                })
            }
            _ => Err(format!("{s:?}: expected Pallet.call")),
        }
    }
}

impl Default for CallKind {
    fn default() -> CallKind {
        CallKind::Usage {
            pallet: "Marketplace".into(),
            call: "submit_compute_usage".into(),
        }
    }
}

/// Submits the outbox's records to a chain, signing with a key used by this outbox only.
pub struct Submitter {
    client: OnlineClient<PolkadotConfig>,
    signer: subxt_signer::sr25519::Keypair,
    call: CallKind,
}

/// What one drain did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Sent and finalized in this drain.
    pub submitted: usize,
    /// Found already included (nonce consumed) after a restart: not sent again.
    pub confirmed: usize,
    pub failed: usize,
    /// Left for the next drain after an error.
    pub deferred: usize,
    /// Stored transactions that could never be included (window passed, or their nonce taken
    /// by another transaction), signed again.
    pub resigned: usize,
}

impl Submitter {
    /// Connects to `url` (ws://…) with the signer given as a secret URI (`//Alice`, a phrase…).
    pub async fn connect(
        url: &str,
        signer_uri: &str,
        call: CallKind,
    ) -> Result<Submitter, BillingError> {
        let uri: subxt_signer::SecretUri = signer_uri
            .parse()
            .map_err(|e: subxt_signer::SecretUriError| BillingError::Signer(e.to_string()))?;
        let signer = subxt_signer::sr25519::Keypair::from_uri(&uri)
            .map_err(|e| BillingError::Signer(e.to_string()))?;
        let client = OnlineClient::<PolkadotConfig>::from_url(url)
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        Ok(Submitter {
            client,
            signer,
            call,
        })
    }

    /// The signer's account nonce at the latest finalized block.
    pub async fn chain_nonce(&self) -> Result<u64, BillingError> {
        Ok(self.chain_state().await?.0)
    }

    /// The signer's account nonce at the latest finalized block, and that block's number.
    async fn chain_state(&self) -> Result<(u64, u64), BillingError> {
        let at = self
            .client
            .at_current_block()
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        let nonce = at
            .transactions()
            .account_nonce(&self.signer.public_key().into())
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        Ok((nonce, at.block_number()))
    }

    /// Looks for the transaction with hash `tx_hash` in blocks `from..=to`: `None` if it is not
    /// there, else whether it succeeded at dispatch (`Err` with the failure).
    async fn find(
        &self,
        tx_hash: &str,
        from: u64,
        to: u64,
    ) -> Result<Option<Result<(), String>>, BillingError> {
        let chain = |e: &dyn std::fmt::Display| BillingError::Chain(e.to_string());
        for n in from..=to {
            let at = self.client.at_block(n).await.map_err(|e| chain(&e))?;
            let body = at.extrinsics().fetch().await.map_err(|e| chain(&e))?;
            // Another account's extrinsic this client cannot decode is not ours: skipped.
            for x in body.iter().filter_map(Result::ok) {
                if format!("{:?}", x.hash()) != tx_hash {
                    continue;
                }
                let events = x.events().await.map_err(|e| chain(&e))?;
                let mut failed = false;
                for ev in events.iter() {
                    // An event that cannot be read could be the failure: not a success.
                    let ev = ev.map_err(|e| chain(&e))?;
                    failed |= ev.pallet_name() == "System" && ev.event_name() == "ExtrinsicFailed";
                }
                return Ok(Some(if failed {
                    Err(format!("failed at dispatch in block {n}"))
                } else {
                    Ok(())
                }));
            }
        }
        Ok(None)
    }

    /// The call carrying record `r`, whose canonical document is `json`.
    fn payload(
        &self,
        r: &Record,
        json: &str,
    ) -> Result<subxt::transactions::DynamicPayload<Vec<Value>>, String> {
        // The agent's own records (answers to the chain's tasks: account `#…`) always go as
        // remarks, whatever carries usage.
        let call = if r.account.starts_with('#') {
            &CallKind::Remark
        } else {
            &self.call
        };
        Ok(match call {
            CallKind::Remark => dynamic::transaction(
                "System",
                "remark_with_event",
                vec![Value::from_bytes(json.as_bytes())],
            ),
            CallKind::Usage { pallet, call } => dynamic::transaction(
                pallet.as_str(),
                call.as_str(),
                vec![
                    Value::u128(u128::from(r.period)),
                    account_value(&r.account)?,
                    Value::u128(r.total),
                    hash_value(&r.hash),
                ],
            ),
        })
    }

    /// Signs the oldest pending record with the next nonce and commits the signed bytes
    /// (before anything is sent). Returns the record's key, or `None` if nothing is pending.
    /// A record whose account is not a chain account can never be billed: it is marked
    /// failed (saying why) and the next one is signed, so it does not hold up the outbox.
    pub async fn sign_next(&self, outbox: &Outbox) -> Result<Option<(u64, String)>, BillingError> {
        let records = outbox.records().await?;
        let mut pending = records.iter().filter(|r| r.state == State::Pending);
        let r = loop {
            let Some(r) = pending.next() else {
                return Ok(None);
            };
            match account_value(&r.account) {
                Err(why)
                    if matches!(self.call, CallKind::Usage { .. })
                        && !r.account.starts_with('#') =>
                {
                    outbox.mark_failed(r.period, &r.account, why).await?;
                }
                _ => break r,
            }
        };
        let highest_signed = records
            .iter()
            .filter_map(|r| match r.state {
                State::Signed { nonce } => Some(nonce + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let (json, _) = outbox.doc_and_tx(r.period, &r.account).await?;
        let at = self
            .client
            .at_current_block()
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        // The nonce and the mortality's start from the same finalized block.
        let birth = at.block_number();
        let nonce = at
            .transactions()
            .account_nonce(&self.signer.public_key().into())
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?
            .max(highest_signed);
        let mut txs = at.transactions();
        let name = match &self.call {
            _ if r.account.starts_with('#') => "System.remark_with_event".to_string(),
            CallKind::Remark => "System.remark_with_event".to_string(),
            CallKind::Usage { pallet, call } => format!("{pallet}.{call}"),
        };
        let payload = self
            .payload(r, &json)
            .map_err(|e| BillingError::Call(name.clone(), e))?;
        txs.validate(&payload)
            .map_err(|e| BillingError::Call(name.clone(), e.to_string()))?;
        // Mortal from this block: what became of it is decidable once the window has passed.
        let params = Params::new().nonce(nonce).mortal(MORTALITY).build();
        let signed = txs
            .create_signed(&payload, &self.signer, params)
            .await
            .map_err(|e| BillingError::Call(name, e.to_string()))?;
        let tx_hash = format!("{:?}", signed.hash());
        outbox
            .mark_signed(
                r.period,
                &r.account,
                nonce,
                birth,
                signed.encoded(),
                &tx_hash,
            )
            .await?;
        Ok(Some((r.period, r.account.clone())))
    }

    /// Sends a signed record's stored bytes and waits for finalization.
    pub async fn send_signed(
        &self,
        outbox: &Outbox,
        period: u64,
        account: &str,
    ) -> Result<State, BillingError> {
        let (_, tx) = outbox.doc_and_tx(period, account).await?;
        let Some(tx) = tx else {
            return Ok(State::Pending);
        };
        let at = self
            .client
            .at_current_block()
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        let progress = at.transactions().from_bytes(tx).submit_and_watch().await;
        let outcome = match progress {
            Ok(p) => p.wait_for_finalized_success().await.map(|_| ()),
            Err(e) => {
                outbox.mark_error(period, account, e.to_string()).await?;
                return Err(BillingError::Chain(e.to_string()));
            }
        };
        match outcome {
            Ok(()) => {
                outbox.mark_done(period, account).await?;
                Ok(State::Done)
            }
            Err(subxt::error::TransactionFinalizedSuccessError::SuccessError(e)) => {
                outbox.mark_failed(period, account, e.to_string()).await?;
                Ok(State::Failed)
            }
            Err(e) => {
                outbox.mark_error(period, account, e.to_string()).await?;
                Err(BillingError::Chain(e.to_string()))
            }
        }
    }

    /// Drives every unfinished record to the chain, in order: stored transactions first, as
    /// [`judge`] says (confirmed without sending if found on chain, signed again if they can
    /// never be included, else sent again), then pending records one at a time. Stops at the
    /// first chain error (the rest wait for the next drain, with backoff by the caller).
    pub async fn drain(&self, outbox: &Outbox) -> Result<Drained, BillingError> {
        let mut d = Drained::default();
        let (chain_nonce, head) = self.chain_state().await?;
        for r in outbox.records().await? {
            if let State::Signed { nonce } = r.state {
                let (period, account) = (r.period, r.account.as_str());
                match judge(nonce, r.birth, chain_nonce, head) {
                    Stored::Included => {
                        outbox.mark_done(period, account).await?;
                        d.confirmed += 1;
                        continue;
                    }
                    Stored::Search { from, to } => {
                        let hash = r.tx_hash.as_deref().unwrap_or_default();
                        let found = match self.find(hash, from, to).await {
                            Ok(f) => f,
                            // Blocks unreadable (pruned, or the node failing): this record
                            // waits, the others go on; an operator decides in the end.
                            Err(e) if r.attempts + 1 >= SEARCH_ATTEMPTS => {
                                let why = format!(
                                    "nonce {nonce} is used but blocks {from}..={to} cannot be \
                                     read to tell whether by this transaction ({e}); needs an \
                                     operator"
                                );
                                outbox.mark_failed(period, account, why).await?;
                                d.failed += 1;
                                continue;
                            }
                            Err(e) => {
                                outbox.mark_error(period, account, e.to_string()).await?;
                                d.deferred += 1;
                                continue;
                            }
                        };
                        match found {
                            Some(Ok(())) => {
                                outbox.mark_done(period, account).await?;
                                d.confirmed += 1;
                            }
                            Some(Err(why)) => {
                                outbox.mark_failed(period, account, why).await?;
                                d.failed += 1;
                            }
                            None => {
                                let why = format!(
                                    "nonce {nonce} was used by another transaction of the \
                                     billing key; signed again"
                                );
                                tracing::warn!(period, account, "{why}");
                                outbox.mark_void(period, account, hash, why).await?;
                                d.resigned += 1;
                            }
                        }
                        continue;
                    }
                    Stored::Expired => {
                        let why = format!(
                            "not included within {MORTALITY} blocks of block {}; signed again",
                            r.birth.unwrap_or_default()
                        );
                        let hash = r.tx_hash.as_deref().unwrap_or_default();
                        outbox.mark_void(period, account, hash, why).await?;
                        d.resigned += 1;
                        continue;
                    }
                    Stored::Send => {}
                }
                match self.send_signed(outbox, r.period, &r.account).await {
                    Ok(State::Done) => d.submitted += 1,
                    Ok(_) => d.failed += 1,
                    Err(_) => {
                        d.deferred += 1;
                        return Ok(d);
                    }
                }
            }
        }
        while let Some((period, account)) = self.sign_next(outbox).await? {
            match self.send_signed(outbox, period, &account).await {
                Ok(State::Done) => d.submitted += 1,
                Ok(_) => d.failed += 1,
                Err(_) => {
                    d.deferred += 1;
                    break;
                }
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_stored_transaction_is_judged_from_the_finalized_chain() {
        // Nonce unused, window open: send the same bytes again.
        assert_eq!(judge(5, Some(100), 5, 163), Stored::Send);
        // Window passed with the nonce unused: it can never be included.
        assert_eq!(judge(5, Some(100), 5, 164), Stored::Expired);
        assert_eq!(judge(5, Some(100), 3, 900), Stored::Expired);
        // Nonce used: searched for in its window only, bounded by the head.
        assert_eq!(
            judge(5, Some(100), 6, 120),
            Stored::Search { from: 101, to: 120 }
        );
        assert_eq!(
            judge(5, Some(100), 9, 5_000),
            Stored::Search { from: 101, to: 164 }
        );
        // Rows signed before windows were kept: the older rule.
        assert_eq!(judge(5, None, 6, 10), Stored::Included);
        assert_eq!(judge(5, None, 5, 10_000), Stored::Send);
    }

    proptest! {
        /// Never sent once its nonce is used; never re-signed while it could still be included
        /// (nonce unused and inside its era); searched for only where it could be.
        #[test]
        fn judging_never_risks_a_second_inclusion(
            nonce in 0u64..1_000, chain_nonce in 0u64..1_000,
            birth in 0u64..1_000_000, ahead in 0u64..500,
        ) {
            let head = birth + ahead;
            match judge(nonce, Some(birth), chain_nonce, head) {
                Stored::Send => {
                    prop_assert!(nonce >= chain_nonce);
                    prop_assert!(head < birth + MORTALITY);
                }
                Stored::Expired => {
                    prop_assert!(nonce >= chain_nonce);
                    prop_assert!(head >= birth + MORTALITY);
                }
                Stored::Search { from, to } => {
                    prop_assert!(nonce < chain_nonce);
                    prop_assert!(from > birth && to <= birth + MORTALITY && to <= head);
                }
                Stored::Included => prop_assert!(false, "only for rows without a birth block"),
            }
        }
    }

    #[test]
    fn accounts_become_account_ids_or_are_refused() {
        let alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
        let hex_alice = "0xd43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d";
        assert_eq!(
            account_value(alice).unwrap(),
            account_value(hex_alice).unwrap()
        );
        for bad in [
            "",
            "alice",
            "0x1234",
            "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQZ",
        ] {
            assert!(account_value(bad).is_err(), "{bad:?}");
        }
    }
}
