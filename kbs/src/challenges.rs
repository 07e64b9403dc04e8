//! Tenants' "attest now, with my nonce" for running VMs, kept in memory (sans IO: the clock is
//! passed in). A tenant asks; the broker hands the nonce to the VM with its next lease renewal
//! (`crate::lease`); the VM answers with a report bound to the nonce and its mesh key; the
//! tenant, asking again, gets that report and checks it with `attesta-verify report`. Nothing
//! here is secret (a nonce is the tenant's, a report is AMD-signed and public), and nothing is
//! durable: a restarted broker forgets what was asked, and the tenant asks again.
//!
//! Bounded against anyone asking: [`PER_VM`] nonces per VM at once, [`MAX_VMS`] VMs, each
//! forgotten after [`TTL`] seconds.

use std::collections::HashMap;

/// Challenges waiting per VM at once.
pub const PER_VM: usize = 4;
/// VMs with challenges at once.
pub const MAX_VMS: usize = 10_000;
/// Seconds a challenge (asked or answered) is kept: two keepalive intervals and some.
pub const TTL: u64 = 2_400;

/// One tenant's challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    nonce: [u8; 32],
    asked_at: u64,
    /// The VM's report and certificate table, and the mesh key it was bound to.
    answer: Option<Answer>,
}

/// A running VM's answer to a challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub report: Vec<u8>,
    pub cert_table: Vec<u8>,
    pub mesh_key: [u8; 32],
}

/// What asking gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Asked {
    /// The VM has answered.
    Answered(Answer),
    /// Passed on at the VM's next renewal; ask again.
    Pending,
    /// Too many challenges waiting (for this VM, or in all).
    Busy,
}

/// The challenges waiting and answered.
#[derive(Debug, Default)]
pub struct ChallengeBook {
    by_vm: HashMap<String, Vec<Pending>>,
}

impl ChallengeBook {
    fn forget_old(&mut self, now: u64) {
        self.by_vm.retain(|_, v| {
            v.retain(|p| now <= p.asked_at.saturating_add(TTL));
            !v.is_empty()
        });
    }

    /// A tenant asks `vm_id` to attest with `nonce` (again: then the answer, if there is one).
    pub fn ask(&mut self, vm_id: &str, nonce: [u8; 32], now: u64) -> Asked {
        self.forget_old(now);
        if let Some(p) = self
            .by_vm
            .get(vm_id)
            .and_then(|v| v.iter().find(|p| p.nonce == nonce))
        {
            return match &p.answer {
                Some(a) => Asked::Answered(a.clone()),
                None => Asked::Pending,
            };
        }
        if !self.by_vm.contains_key(vm_id) && self.by_vm.len() >= MAX_VMS {
            return Asked::Busy;
        }
        let waiting = self.by_vm.entry(vm_id.to_string()).or_default();
        // Answered challenges are kept for their tenants but hold no slot.
        if waiting.iter().filter(|p| p.answer.is_none()).count() >= PER_VM {
            return Asked::Busy;
        }
        waiting.push(Pending {
            nonce,
            asked_at: now,
            answer: None,
        });
        Asked::Pending
    }

    /// The nonces `vm_id` has yet to answer (handed to it with its renewal).
    pub fn waiting(&mut self, vm_id: &str, now: u64) -> Vec<[u8; 32]> {
        self.forget_old(now);
        self.by_vm
            .get(vm_id)
            .map(|v| {
                v.iter()
                    .filter(|p| p.answer.is_none())
                    .map(|p| p.nonce)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The VM's answer to `nonce`; false if no such challenge waits (never asked, forgotten,
    /// or answered already: the first answer stands).
    pub fn answer(&mut self, vm_id: &str, nonce: [u8; 32], answer: Answer, now: u64) -> bool {
        self.forget_old(now);
        match self.by_vm.get_mut(vm_id).and_then(|v| {
            v.iter_mut()
                .find(|p| p.nonce == nonce && p.answer.is_none())
        }) {
            Some(p) => {
                p.answer = Some(answer);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Answer {
        Answer {
            report: vec![1],
            cert_table: vec![],
            mesh_key: [7; 32],
        }
    }

    #[test]
    fn asked_passed_on_answered_once_and_forgotten() {
        let mut b = ChallengeBook::default();
        assert_eq!(b.ask("vm", [1; 32], 10), Asked::Pending);
        assert_eq!(b.ask("vm", [1; 32], 11), Asked::Pending);
        assert_eq!(b.waiting("vm", 12), vec![[1; 32]]);
        assert!(!b.answer("vm", [2; 32], answer(), 13), "never asked");
        assert!(
            !b.answer("other", [1; 32], answer(), 13),
            "asked of another VM"
        );
        assert!(b.answer("vm", [1; 32], answer(), 13));
        assert!(
            !b.answer("vm", [1; 32], answer(), 14),
            "the first answer stands"
        );
        assert_eq!(b.waiting("vm", 14), Vec::<[u8; 32]>::new());
        assert_eq!(b.ask("vm", [1; 32], 15), Asked::Answered(answer()));
        assert_eq!(
            b.ask("vm", [1; 32], 10 + TTL + 1),
            Asked::Pending,
            "forgotten, asked anew"
        );
    }

    #[test]
    fn bounded_per_vm_and_in_all() {
        let mut b = ChallengeBook::default();
        for i in 0..PER_VM as u8 {
            assert_eq!(b.ask("vm", [i; 32], 1), Asked::Pending);
        }
        assert_eq!(b.ask("vm", [99; 32], 1), Asked::Busy);
        // An answer frees its slot.
        assert!(b.answer("vm", [0; 32], answer(), 2));
        assert_eq!(b.ask("vm", [99; 32], 2), Asked::Pending);
        for i in 1..MAX_VMS {
            assert_eq!(b.ask(&format!("vm-{i}"), [0; 32], 1), Asked::Pending);
        }
        assert_eq!(b.ask("one-too-many", [0; 32], 1), Asked::Busy);
        assert_eq!(b.ask("one-too-many", [0; 32], 1 + TTL + 1), Asked::Pending);
    }
}
