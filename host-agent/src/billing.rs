//! Billing: a durable outbox of usage documents (SQLite) and their submission to a Substrate
//! chain with `subxt` (dynamic API; the call is resolved from the node's metadata at run time).
//!
//! **Exactly once per (period, account).** A document is recorded once; offering a different
//! hash for a (period, account) already recorded is refused. Submission is commit-before-emit:
//! the transaction is signed with an explicit account nonce and its bytes are committed to the
//! outbox *before* they are sent. After a crash or a network error the same bytes are sent
//! again (a transaction can be included at most once), and a stored transaction whose nonce the
//! chain has already consumed is known to be included — this needs the billing key to be used
//! by this outbox only, which the configuration documents. A transaction included but failed
//! at dispatch is marked failed, never resent silently.

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
    tx_hash TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    PRIMARY KEY (period, account))";

impl Outbox {
    /// Opens (creating) the outbox database: WAL, synchronous=FULL.
    pub async fn open(path: &Path) -> Result<Outbox, BillingError> {
        let pool = crate::state::durable_pool(path, SCHEMA)
            .await
            .map_err(store)?;
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
            "SELECT period, account, total, hash, state, nonce, attempts, last_error, tx_hash
             FROM usage ORDER BY period, account",
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
        tx: &[u8],
        tx_hash: &str,
    ) -> Result<(), BillingError> {
        sqlx::query(
            "UPDATE usage SET state = 'signed', nonce = ?, tx = ?, tx_hash = ?
             WHERE period = ? AND account = ? AND state = 'pending'",
        )
        .bind(nonce as i64)
        .bind(tx)
        .bind(tx_hash)
        .bind(period as i64)
        .bind(account)
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
        let at = self
            .client
            .at_current_block()
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        at.transactions()
            .account_nonce(&self.signer.public_key().into())
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))
    }

    /// The call carrying record `r`, whose canonical document is `json`.
    fn payload(&self, r: &Record, json: &str) -> subxt::transactions::DynamicPayload<Vec<Value>> {
        match &self.call {
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
                    Value::string(r.account.clone()),
                    Value::u128(r.total),
                    Value::from_bytes(r.hash),
                ],
            ),
        }
    }

    /// Signs the oldest pending record with the next nonce and commits the signed bytes
    /// (before anything is sent). Returns the record's key, or `None` if nothing is pending.
    pub async fn sign_next(&self, outbox: &Outbox) -> Result<Option<(u64, String)>, BillingError> {
        let records = outbox.records().await?;
        let Some(r) = records.iter().find(|r| r.state == State::Pending) else {
            return Ok(None);
        };
        let highest_signed = records
            .iter()
            .filter_map(|r| match r.state {
                State::Signed { nonce } => Some(nonce + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let nonce = self.chain_nonce().await?.max(highest_signed);
        let (json, _) = outbox.doc_and_tx(r.period, &r.account).await?;
        let at = self
            .client
            .at_current_block()
            .await
            .map_err(|e| BillingError::Chain(e.to_string()))?;
        let mut txs = at.transactions();
        let payload = self.payload(r, &json);
        let name = match &self.call {
            CallKind::Remark => "System.remark_with_event".to_string(),
            CallKind::Usage { pallet, call } => format!("{pallet}.{call}"),
        };
        txs.validate(&payload)
            .map_err(|e| BillingError::Call(name.clone(), e.to_string()))?;
        let signed = txs
            .create_signed(&payload, &self.signer, Params::new().nonce(nonce).build())
            .await
            .map_err(|e| BillingError::Call(name, e.to_string()))?;
        let tx_hash = format!("{:?}", signed.hash());
        outbox
            .mark_signed(r.period, &r.account, nonce, signed.encoded(), &tx_hash)
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

    /// Drives every unfinished record to the chain, in order: stored transactions first (one
    /// whose nonce the chain consumed is included: confirmed without sending), then pending
    /// records one at a time. Stops at the first chain error (the rest wait for the next
    /// drain, with backoff by the caller).
    pub async fn drain(&self, outbox: &Outbox) -> Result<Drained, BillingError> {
        let mut d = Drained::default();
        let chain_nonce = self.chain_nonce().await?;
        for r in outbox.records().await? {
            if let State::Signed { nonce } = r.state {
                if nonce < chain_nonce {
                    outbox.mark_done(r.period, &r.account).await?;
                    d.confirmed += 1;
                    continue;
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
