//! The issued nonces, in memory: sans-IO (the caller passes the time).
//!
//! Why not in the store: a nonce is bound to the connection it is used on (REPORT_DATA covers
//! the connection's TLS exporter), so a nonce outlives neither the connection nor the broker
//! process; writing each one durably cost a write and a read of the store per boot. At most one
//! release per nonce is enforced here ([`NonceBook::take`] spends it under the book's lock); the
//! spending is also committed durably with the decision it was spent on
//! ([`crate::store::Commit`]), whose upsert turns a second release on the same nonce into a
//! denial.
//!
//! A nonce is spent by its first use, whatever the outcome ([`NonceBook::take`]). Entries stay
//! [`RETAIN_AFTER_EXPIRY`] seconds past their expiry, so a late or replayed use is denied as
//! expired or spent rather than unknown; then they go. The book holds at most `cap` entries:
//! past that the oldest is forgotten (a guest that held it is denied, `unknown_nonce`, and asks
//! again) — memory stays bounded under a flood of challenges, and nothing is ever accepted
//! that was not issued.

use crate::release::NonceState;
use std::collections::{HashMap, VecDeque};

/// Seconds an entry is kept after its nonce expired.
pub const RETAIN_AFTER_EXPIRY: u64 = 60;

/// Entries held at most by default (each ≤ ~250 bytes: VM ids are at most 128; ~64 MB); a boot
/// storm at the measured release rate needs a few tens of thousands. The broker also caps the
/// challenges per connection, so one client cannot fill it alone.
pub const DEFAULT_CAPACITY: usize = 1 << 18;

/// Issued and spent nonces, oldest first.
#[derive(Debug)]
pub struct NonceBook {
    map: HashMap<[u8; 32], NonceState>,
    /// Issue order, with each nonce's expiry: what to forget first.
    order: VecDeque<(u64, [u8; 32])>,
    cap: usize,
}

impl NonceBook {
    /// A book holding at most `cap` (at least 1) nonces.
    pub fn new(cap: usize) -> NonceBook {
        NonceBook {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Nonces held (issued or spent, not yet forgotten).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records a fresh nonce for `vm_id`, valid until `expires_at`. `false` (and nothing
    /// recorded) if the same bytes are already held: the caller must draw again.
    pub fn issue(&mut self, nonce: [u8; 32], vm_id: &str, expires_at: u64, now: u64) -> bool {
        self.forget_expired(now);
        if self.map.contains_key(&nonce) {
            return false;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some((_, old)) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(
            nonce,
            NonceState::Issued {
                vm_id: vm_id.to_string(),
                expires_at,
            },
        );
        self.order.push_back((expires_at, nonce));
        true
    }

    /// What is known of `nonce`, and it is spent from now on: the first call for an issued
    /// nonce returns it as issued (the decision then judges its expiry and VM), every later
    /// call returns `Spent`. `None`: never issued here, or forgotten.
    pub fn take(&mut self, nonce: &[u8; 32], now: u64) -> Option<NonceState> {
        self.forget_expired(now);
        let slot = self.map.get_mut(nonce)?;
        Some(std::mem::replace(slot, NonceState::Spent))
    }

    fn forget_expired(&mut self, now: u64) {
        while let Some(&(expires_at, nonce)) = self.order.front() {
            if expires_at.saturating_add(RETAIN_AFTER_EXPIRY) >= now {
                break;
            }
            self.order.pop_front();
            self.map.remove(&nonce);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn issued(vm: &str, expires_at: u64) -> Option<NonceState> {
        Some(NonceState::Issued {
            vm_id: vm.into(),
            expires_at,
        })
    }

    #[test]
    fn a_nonce_is_issued_once_and_spent_by_its_first_use() {
        let mut b = NonceBook::new(16);
        assert!(b.issue([1; 32], "vm-1", 130, 100));
        assert!(!b.issue([1; 32], "vm-2", 140, 101), "same bytes twice");
        assert_eq!(b.take(&[2; 32], 101), None, "never issued");
        assert_eq!(b.take(&[1; 32], 101), issued("vm-1", 130));
        assert_eq!(b.take(&[1; 32], 102), Some(NonceState::Spent));
        // Past its expiry it is still known (the decision denies it as expired or spent) ...
        assert!(b.issue([3; 32], "vm-1", 130, 100));
        assert_eq!(b.take(&[3; 32], 131), issued("vm-1", 130));
        // ... until it is forgotten.
        assert_eq!(b.take(&[1; 32], 130 + RETAIN_AFTER_EXPIRY + 1), None);
        assert!(b.is_empty());
    }

    #[test]
    fn a_full_book_forgets_its_oldest_nonce() {
        let mut b = NonceBook::new(2);
        assert!(b.issue([1; 32], "a", 130, 100));
        assert!(b.issue([2; 32], "b", 130, 100));
        assert!(b.issue([3; 32], "c", 130, 100));
        assert_eq!(b.len(), 2);
        assert_eq!(b.take(&[1; 32], 100), None);
        assert_eq!(b.take(&[3; 32], 100), issued("c", 130));
    }

    proptest! {
        /// Whatever the sequence of issues and uses: a nonce is handed out as issued at most
        /// once, only if it was issued (for that VM and expiry), and the book never exceeds
        /// its capacity.
        #[test]
        fn at_most_one_use_per_nonce(
            cap in 1usize..8,
            ops in proptest::collection::vec((any::<bool>(), 0u8..6, 0u64..4), 0..200),
        ) {
            let mut b = NonceBook::new(cap);
            let mut now = 1_000u64;
            let mut issued_as: HashMap<[u8; 32], u64> = HashMap::new();
            let mut used: std::collections::HashSet<[u8; 32]> = Default::default();
            for (is_issue, id, step) in ops {
                now += step * 20;
                let nonce = [id; 32];
                if is_issue {
                    if b.issue(nonce, "vm", now + 30, now) {
                        issued_as.insert(nonce, now + 30);
                        used.remove(&nonce);
                    } else {
                        prop_assert!(issued_as.contains_key(&nonce), "refused a fresh nonce");
                    }
                } else {
                    match b.take(&nonce, now) {
                        Some(NonceState::Issued { vm_id, expires_at }) => {
                            prop_assert_eq!(vm_id, "vm");
                            prop_assert_eq!(Some(&expires_at), issued_as.get(&nonce));
                            prop_assert!(used.insert(nonce), "handed out twice");
                        }
                        Some(NonceState::Spent) => prop_assert!(used.contains(&nonce)),
                        Some(NonceState::Bound) => prop_assert!(false, "the book binds nothing"),
                        None => {}
                    }
                }
                prop_assert!(b.len() <= cap);
                prop_assert_eq!(b.len(), b.order.len());
            }
        }
    }
}
