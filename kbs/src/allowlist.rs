//! The signed allowlist in force: installed (never older than the stored epoch), loaded at
//! start, and followed while serving, so every replica on one store adopts a new epoch (and
//! refuses a stored document that does not verify: then nothing is released).

use crate::orders::RegisterError;
use crate::service::Kbs;
use crate::store::{Store, StoreError};
use proto::order::{Allowlist, DocumentError};
use std::sync::atomic::Ordering;

/// What [`Kbs::follow_allowlist`] found in the store.
#[derive(Debug)]
pub enum AllowlistChange {
    Unchanged,
    /// A newer epoch was verified and is now in force.
    Adopted {
        from: Option<u64>,
        to: u64,
    },
    /// The stored epoch did not verify; no allowlist is in force until one does.
    Refused {
        epoch: u64,
        error: RegisterError,
    },
}

/// A stored allowlist document, verified again (the database is not trusted to sign) and
/// checked to be of the epoch it is stored under.
fn verify_stored(doc: &[u8], epoch: u64, key: &[u8; 32]) -> Result<Allowlist, RegisterError> {
    let a = Allowlist::verify(doc, key, epoch)?;
    if a.epoch != epoch {
        return Err(RegisterError::Order(DocumentError::Invalid(
            "the stored allowlist is not of the epoch it is stored under",
        )));
    }
    Ok(a)
}

impl Kbs {
    /// Installs a newer signed allowlist: verified, stored as the current document (every
    /// broker process on this store follows it, see [`Kbs::follow_allowlist`]) and adopted here.
    /// Older epochs are refused, here and in the store.
    pub async fn set_allowlist(
        &self,
        doc: &[u8],
        allowlist_key: &[u8; 32],
        now: u64,
    ) -> Result<u64, RegisterError> {
        let epoch = self.store.allowlist_epoch().await?;
        let a = Allowlist::verify(doc, allowlist_key, epoch)?;
        self.store.set_allowlist(a.epoch, doc, now).await?;
        let e = a.epoch;
        self.adopt(a).await;
        Ok(e)
    }

    /// At start: the current allowlist is the newer of the stored document and `configured`
    /// (kbs.toml's `allowlist`), each verified with `allowlist_key`; a configured one newer than
    /// the stored one is installed. A configured file older than what was installed since is
    /// not an error (the installed one governs). `None`: there is no allowlist at all.
    pub async fn load_allowlist(
        &self,
        configured: Option<&[u8]>,
        allowlist_key: &[u8; 32],
        now: u64,
    ) -> Result<Option<u64>, RegisterError> {
        let stored = self.store.allowlist_epoch().await?;
        if let Some(doc) = configured {
            let a = Allowlist::verify(doc, allowlist_key, 0)?;
            if a.epoch >= stored {
                return self.set_allowlist(doc, allowlist_key, now).await.map(Some);
            }
            tracing::warn!(
                configured = a.epoch,
                installed = stored,
                "the configured allowlist is older than the installed one, which governs"
            );
        }
        let Some((epoch, doc)) = self.store.allowlist().await? else {
            return Ok(None);
        };
        let a = verify_stored(&doc, epoch, allowlist_key)?;
        self.adopt(a).await;
        Ok(Some(epoch))
    }

    /// Follows the store: when its allowlist epoch has grown past `seen` (another process ran
    /// `allowlist install`), the stored document is verified and adopted. A stored document
    /// that does not verify with `allowlist_key` leaves this broker with no allowlist (every
    /// release denied `no_allowlist`): the store says that epoch governs, and what it withdrew
    /// cannot be known here. Cheap when nothing changed: one read of the epoch.
    pub async fn follow_allowlist(
        &self,
        allowlist_key: &[u8; 32],
        seen: &mut u64,
    ) -> Result<AllowlistChange, StoreError> {
        let stored = self.store.allowlist_epoch().await?;
        if stored <= *seen {
            return Ok(AllowlistChange::Unchanged);
        }
        // `seen` advances only once the document has been read: a failed read is retried at
        // the next poll instead of leaving the older allowlist in force.
        let stored_doc = self.store.allowlist().await?;
        *seen = stored;
        let from = self.allowlist_epoch().await;
        // The epoch says a newer allowlist governs; a document missing or older than it (written
        // by an older `allowlist install`) cannot say what was withdrawn: deny everything.
        let checked = match stored_doc {
            Some((epoch, doc)) if epoch >= stored => verify_stored(&doc, epoch, allowlist_key),
            other => Err(RegisterError::Store(StoreError::StaleEpoch {
                have: other.map(|(e, _)| e).unwrap_or(0),
                stored,
            })),
        };
        match checked {
            Ok(a) if from.is_some_and(|f| f >= a.epoch) => Ok(AllowlistChange::Unchanged),
            Ok(a) => {
                let to = a.epoch;
                self.adopt(a).await;
                Ok(AllowlistChange::Adopted { from, to })
            }
            Err(e) => {
                *self.allowlist.write().await = None;
                self.metrics.allowlist_epoch.store(0, Ordering::Relaxed);
                Ok(AllowlistChange::Refused {
                    epoch: stored,
                    error: e,
                })
            }
        }
    }

    /// The epoch of the allowlist in force here (`None`: none, every release is denied).
    pub async fn allowlist_epoch(&self) -> Option<u64> {
        self.allowlist.read().await.as_ref().map(|a| a.epoch)
    }

    /// Makes `a` current here unless a newer one already is (installs and reloads may race).
    async fn adopt(&self, a: Allowlist) {
        let mut current = self.allowlist.write().await;
        if current.as_ref().is_none_or(|c| c.epoch <= a.epoch) {
            self.metrics
                .allowlist_epoch
                .store(a.epoch, Ordering::Relaxed);
            *current = Some(a);
        }
    }
}
