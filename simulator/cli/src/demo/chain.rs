//! The demo's chain, when it is at hand: Chopsticks (`tests/chain`, installed by
//! `scripts/chain-deps.sh`) serving Rococo Asset Hub's chain spec on loopback, with //Alice (a
//! validator, who assigns VM tasks) and //Bob (the first miner's billing key) funded. That
//! runtime has no marketplace pallet, so tasks, answers and lifecycle records travel as
//! `System.remark_with_event` (`host_agent::intake`).

pub use testkit::chopsticks::{Chopsticks as DemoChain, remark, remarked};

/// The validator's account (//Alice).
pub const VALIDATOR: &str = testkit::chopsticks::ALICE;
/// The first miner's account (//Bob, its billing key).
pub const MINER: &str = testkit::chopsticks::BOB;

/// What the chain saw of the fleet.
#[derive(Clone, Debug, Default)]
pub struct ChainSummary {
    /// Assignments that became VMs.
    pub assignments_taken: usize,
    /// Lifecycle transitions on chain (in batches that were finalized).
    pub lifecycle_records: usize,
    /// Assignments refused, each answered on chain with its code.
    pub refused_with_reason: usize,
    /// Every answer and lifecycle batch is found in a `System.Remarked` event.
    pub all_on_chain: bool,
}

impl ChainSummary {
    pub fn as_expected(&self) -> bool {
        self.assignments_taken >= 1
            && self.refused_with_reason >= 1
            && self.lifecycle_records >= 2
            && self.all_on_chain
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "assignments_taken": self.assignments_taken,
            "lifecycle_records": self.lifecycle_records,
            "refused_with_reason": self.refused_with_reason,
            "all_on_chain": self.all_on_chain,
        })
    }
}
