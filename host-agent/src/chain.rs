//! Following the chain for VM tasks (`[chain]`): finalized blocks only, read with `subxt`, and
//! in each the remarks that succeeded, with their signers. What they mean is
//! [`crate::intake`]'s to say; acting on them is the daemon's.
//!
//! Only finalized blocks are read (the client's current block is the finalized head), so an
//! assignment in a block that is not finalized — or never will be — is never acted on. The node
//! must keep the state of the blocks the agent has yet to read (an archive node, or one that
//! prunes no nearer than the agent can fall behind): reading a block needs its runtime version
//! and events.

use subxt::{OnlineClient, PolkadotConfig};

/// One successful `System.remark` or `System.remark_with_event` in a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remark {
    /// The signer's account (`MultiAddress::Id`), if signed so.
    pub signer: Option<[u8; 32]>,
    pub bytes: Vec<u8>,
}

/// A connection to the chain's node.
pub struct Follower {
    client: OnlineClient<PolkadotConfig>,
}

fn chain(e: impl std::fmt::Display) -> String {
    format!("chain: {e}")
}

impl Follower {
    /// Connects to `url` (ws://…).
    pub async fn connect(url: &str) -> Result<Follower, String> {
        Ok(Follower {
            client: OnlineClient::<PolkadotConfig>::from_url(url)
                .await
                .map_err(chain)?,
        })
    }

    /// The finalized head: its number.
    pub async fn finalized(&self) -> Result<u64, String> {
        Ok(self
            .client
            .at_current_block()
            .await
            .map_err(chain)?
            .block_number())
    }

    /// Block `n`'s hash and the successful remarks in it that `keep` (signer, bytes) wants, in
    /// order. The block's events are read once, and only when a remark is kept: anyone can
    /// fill blocks with remarks, and only a validator's assignment costs more than a look.
    pub async fn remarks(
        &self,
        n: u64,
        keep: impl Fn(Option<&[u8; 32]>, &[u8]) -> bool,
    ) -> Result<([u8; 32], Vec<Remark>), String> {
        let at = self.client.at_block(n).await.map_err(chain)?;
        let hash = at.block_hash().0;
        let body = at.extrinsics().fetch().await.map_err(chain)?;
        let mut kept = Vec::new();
        for x in body.iter() {
            let x = match x {
                Ok(x) => x,
                // Not a remark this client could read: one the runtime's types have changed.
                Err(e) => {
                    tracing::warn!(block = n, error = %e, "an extrinsic cannot be decoded; skipped");
                    continue;
                }
            };
            if x.pallet_name() != "System"
                || !matches!(x.call_name(), "remark" | "remark_with_event")
            {
                continue;
            }
            let Some(bytes) = crate::intake::scale_bytes(x.call_data_field_bytes()) else {
                continue;
            };
            let signer = crate::intake::signer_of(x.address_bytes());
            if keep(signer.as_ref(), bytes) {
                kept.push((x.index() as u32, signer, bytes.to_vec()));
            }
        }
        if kept.is_empty() {
            return Ok((hash, Vec::new()));
        }
        // A remark whose extrinsic failed did not happen.
        let events = at.events().fetch().await.map_err(chain)?;
        let mut failed = std::collections::HashSet::new();
        for ev in events.iter() {
            let ev = ev.map_err(chain)?;
            if let subxt::events::Phase::ApplyExtrinsic(i) = ev.phase()
                && ev.pallet_name() == "System"
                && ev.event_name() == "ExtrinsicFailed"
            {
                failed.insert(i);
            }
        }
        Ok((
            hash,
            kept.into_iter()
                .filter(|(i, ..)| !failed.contains(i))
                .map(|(_, signer, bytes)| Remark { signer, bytes })
                .collect(),
        ))
    }

    /// Block `n`'s hash (to check the chain is still the one followed).
    pub async fn hash_at(&self, n: u64) -> Result<[u8; 32], String> {
        Ok(self.client.at_block(n).await.map_err(chain)?.block_hash().0)
    }
}

/// blake2_256, the chain's hash (what `System.Remarked` carries for a remark).
pub fn blake2_256(bytes: &[u8]) -> [u8; 32] {
    use subxt::config::Hasher as _;
    subxt::config::substrate::BlakeTwo256.hash(bytes).0
}
