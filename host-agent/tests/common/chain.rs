//! A real Substrate runtime for tests (`testkit::chopsticks`): skipped with a message where
//! Chopsticks is not installed, required when CI=true.

use testkit::chopsticks::Chopsticks;
#[allow(unused_imports)] // not every test binary uses them
pub use testkit::chopsticks::{ALICE, BOB};

/// The running chain; stopped when dropped.
pub struct Chain(Chopsticks);

impl Chain {
    /// Starts Chopsticks, or `None` (skip) where it is not installed and CI is not set.
    pub fn start() -> Option<Chain> {
        match Chopsticks::start().unwrap() {
            Ok(c) => Some(Chain(c)),
            Err(why) => {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "Chopsticks is required when CI=true: {why}"
                );
                eprintln!("SKIP: {why}");
                None
            }
        }
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Builds `n` empty blocks.
    pub fn advance(&self, n: u64) {
        self.0.advance(n).unwrap();
    }
}

/// Every `System.Remarked` hash on the chain, in order.
pub async fn remarked_hashes(url: &str) -> Vec<[u8; 32]> {
    testkit::chopsticks::remarked(url).await.unwrap()
}

/// `signer` (a secret URI) puts `remark` on chain, finalized.
pub async fn remark(url: &str, signer: &str, remark: &[u8]) {
    testkit::chopsticks::remark(url, signer, remark)
        .await
        .unwrap();
}
