//! The daemon's decisions, as pure functions of what it has recorded and observed and of the
//! time the caller passes in: which lifecycle events to record after looking at libvirt, which
//! hours to close, each closed hour's usage documents, whose VMs to stop for credit, and how
//! long to wait before retrying the chain. [`crate::daemon`] does the IO around them.

use crate::usage::{Event, HOUR, Meter, Terms, UsageDoc};
use std::collections::{BTreeMap, BTreeSet};

/// A recorded lifecycle event: the VM was seen to start (`running`) or stop at `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ev {
    pub vm_id: String,
    pub running: bool,
    pub at: u64,
}

/// Each VM's last recorded state.
pub fn last_states(events: &[Ev]) -> BTreeMap<String, bool> {
    let mut m = BTreeMap::new();
    for e in events {
        m.insert(e.vm_id.clone(), e.running);
    }
    m
}

/// The events to record after observing libvirt at `now`: every VM whose observed state differs
/// from its last recorded one. A VM recorded running but found stopped after the agent was
/// down is taken to have stopped at the agent's last `heartbeat` (never billed for time nobody
/// saw); otherwise a change is dated `now`. A VM libvirt no longer has is stopped.
pub fn reconcile(
    recorded: &BTreeMap<String, bool>,
    observed: &BTreeMap<String, bool>,
    heartbeat: Option<u64>,
    after_restart: bool,
    now: u64,
) -> Vec<Ev> {
    let mut out = Vec::new();
    let ids: BTreeSet<&String> = recorded.keys().chain(observed.keys()).collect();
    for id in ids {
        let was = recorded.get(id).copied().unwrap_or(false);
        let is = observed.get(id).copied().unwrap_or(false);
        if was == is {
            continue;
        }
        let at = match (is, after_restart, heartbeat) {
            (false, true, Some(hb)) => hb.min(now),
            _ => now,
        };
        out.push(Ev {
            vm_id: id.clone(),
            running: is,
            at,
        });
    }
    out
}

/// The periods to close at `now`, given that every period up to `closed_through` is closed:
/// each hour that has ended, in order. (The open hour is never closed.)
pub fn hours_to_close(closed_through: u64, now: u64) -> std::ops::Range<u64> {
    let open = now / HOUR;
    (closed_through + 1)..open.max(closed_through + 1)
}

/// The usage documents of `period`, from every recorded event (in order) and each VM's terms.
/// A VM without terms is not billed. The same events always give the same documents, so a
/// period closed twice (after a crash) enqueues identical bytes.
pub fn usage_for(period: u64, events: &[Ev], terms: &BTreeMap<String, Terms>) -> Vec<UsageDoc> {
    let start = period * HOUR;
    let end = start + HOUR;
    let mut at_start: BTreeMap<&str, bool> = BTreeMap::new();
    for e in events.iter().filter(|e| e.at < start) {
        at_start.insert(&e.vm_id, e.running);
    }
    let mut m = Meter::new();
    // Opens the meter at this period even when nothing happens in it.
    let _ = m.record(&Event::Stopped {
        vm_id: String::new(),
        at: start,
    });
    for (vm, running) in at_start {
        if let (true, Some(t)) = (running, terms.get(vm)) {
            let _ = m.record(&Event::Started {
                vm_id: vm.to_string(),
                terms: t.clone(),
                at: start,
            });
        }
    }
    for e in events.iter().filter(|e| e.at >= start && e.at < end) {
        let Some(t) = terms.get(&e.vm_id) else {
            continue;
        };
        let ev = if e.running {
            Event::Started {
                vm_id: e.vm_id.clone(),
                terms: t.clone(),
                at: e.at,
            }
        } else {
            Event::Stopped {
                vm_id: e.vm_id.clone(),
                at: e.at,
            }
        };
        let _ = m.record(&ev);
    }
    m.close_hour()
}

/// What each account's running VMs will cost in the next hour.
pub fn next_hour_cost(
    running: &BTreeMap<String, bool>,
    terms: &BTreeMap<String, Terms>,
) -> BTreeMap<String, u128> {
    let mut out: BTreeMap<String, u128> = BTreeMap::new();
    for (vm, t) in terms {
        if running.get(vm).copied().unwrap_or(false) {
            *out.entry(t.account.clone()).or_default() += t.rate_per_hour;
        }
    }
    out
}

/// The answer of a credit check for one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credit {
    CanPay,
    CannotPay(String),
    /// The check itself failed.
    Unknown(String),
}

/// The running VMs to stop, each with the reason to record and show: those of accounts that
/// cannot pay, and (when `stop_on_error`) those whose check failed.
pub fn to_stop(
    running: &BTreeMap<String, bool>,
    terms: &BTreeMap<String, Terms>,
    verdicts: &BTreeMap<String, Credit>,
    stop_on_error: bool,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (vm, t) in terms {
        if !running.get(vm).copied().unwrap_or(false) {
            continue;
        }
        let why = match verdicts.get(&t.account) {
            Some(Credit::CannotPay(r)) => format!("account {} cannot pay: {r}", t.account),
            Some(Credit::Unknown(r)) if stop_on_error => {
                format!("credit check for account {} failed: {r}", t.account)
            }
            _ => continue,
        };
        out.push((vm.clone(), why));
    }
    out
}

/// Seconds to wait before retry number `failures` (1, 2, …): 5 s doubling, at most `max`.
pub fn backoff(failures: u32, max: u64) -> u64 {
    let exp = failures.saturating_sub(1).min(20);
    (5u64 << exp).min(max.max(1))
}

/// Builds the usage line terms of a VM from its order's billing terms.
pub fn terms_of(b: &proto::order::Billing) -> Terms {
    Terms {
        account: b.account.clone(),
        rate_per_hour: u128::from(b.rate_per_hour),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(vm: &str, running: bool, at: u64) -> Ev {
        Ev {
            vm_id: vm.into(),
            running,
            at,
        }
    }

    fn terms(pairs: &[(&str, &str, u128)]) -> BTreeMap<String, Terms> {
        pairs
            .iter()
            .map(|(vm, acct, rate)| {
                (
                    vm.to_string(),
                    Terms {
                        account: acct.to_string(),
                        rate_per_hour: *rate,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_vm_running_across_hours_is_billed_each_full_hour() {
        let t = terms(&[("a", "alice", 3600)]);
        let events = [ev("a", true, 10 * HOUR + 1800)];
        let d = usage_for(10, &events, &t);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].lines[0].seconds, d[0].total), (1800, 1800));
        let d = usage_for(11, &events, &t);
        assert_eq!((d[0].lines[0].seconds, d[0].total), (3600, 3600));
        // Stopped in hour 12 after 60 s; nothing in hour 13.
        let events = [
            ev("a", true, 10 * HOUR + 1800),
            ev("a", false, 12 * HOUR + 60),
        ];
        assert_eq!(usage_for(12, &events, &t)[0].lines[0].seconds, 60);
        assert!(usage_for(13, &events, &t).is_empty());
        // Before it ever started: nothing.
        assert!(usage_for(9, &events, &t).is_empty());
    }

    #[test]
    fn unbilled_vms_and_the_boundary_second() {
        let t = terms(&[("a", "alice", 100)]);
        // "b" has no terms: never billed; an event at the hour's end belongs to the next hour.
        let events = [ev("b", true, 5 * HOUR), ev("a", true, 6 * HOUR)];
        assert!(usage_for(5, &events, &t).is_empty());
        assert_eq!(usage_for(6, &events, &t)[0].lines.len(), 1);
    }

    #[test]
    fn reconcile_dates_unseen_stops_at_the_heartbeat() {
        let rec: BTreeMap<String, bool> = [("a".into(), true), ("b".into(), false)].into();
        let obs: BTreeMap<String, bool> = [("a".into(), false), ("b".into(), true)].into();
        let e = reconcile(&rec, &obs, Some(500), true, 900);
        assert_eq!(e, vec![ev("a", false, 500), ev("b", true, 900)]);
        // While running (not after a restart) a change is dated now.
        let e = reconcile(&rec, &obs, Some(500), false, 900);
        assert_eq!(e, vec![ev("a", false, 900), ev("b", true, 900)]);
        // A VM that vanished from libvirt is stopped; agreement records nothing.
        let e = reconcile(&rec, &BTreeMap::new(), None, true, 900);
        assert_eq!(e, vec![ev("a", false, 900)]);
        assert!(reconcile(&rec, &rec, None, false, 900).is_empty());
    }

    #[test]
    fn hours_close_in_order_and_never_the_open_one() {
        assert_eq!(hours_to_close(9, 10 * HOUR + 5), 10..10);
        assert_eq!(hours_to_close(9, 11 * HOUR), 10..11);
        assert_eq!(hours_to_close(9, 13 * HOUR + 1), 10..13);
        // A clock that went back closes nothing.
        assert!(hours_to_close(20, 13 * HOUR).is_empty());
    }

    #[test]
    fn credit_stops_only_running_vms_of_accounts_that_cannot_pay() {
        let t = terms(&[
            ("a", "alice", 10),
            ("b", "bob", 20),
            ("c", "bob", 5),
            ("d", "carol", 1),
        ]);
        let running: BTreeMap<String, bool> = [
            ("a".into(), true),
            ("b".into(), true),
            ("c".into(), false),
            ("d".into(), true),
        ]
        .into();
        let cost = next_hour_cost(&running, &t);
        assert_eq!(cost.get("bob"), Some(&20));
        assert_eq!(cost.get("alice"), Some(&10));
        let verdicts: BTreeMap<String, Credit> = [
            ("alice".into(), Credit::CanPay),
            ("bob".into(), Credit::CannotPay("balance 3 < 20".into())),
            ("carol".into(), Credit::Unknown("chain unreachable".into())),
        ]
        .into();
        let s = to_stop(&running, &t, &verdicts, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "b");
        assert!(
            s[0].1.contains("bob cannot pay: balance 3 < 20"),
            "{}",
            s[0].1
        );
        let s = to_stop(&running, &t, &verdicts, true);
        assert_eq!(
            s.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["b", "d"]
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(
            (1..=9).map(|f| backoff(f, 600)).collect::<Vec<_>>(),
            [5, 10, 20, 40, 80, 160, 320, 600, 600]
        );
        assert_eq!(backoff(u32::MAX, 600), 600);
    }

    proptest! {
        /// Whatever the events, no VM is billed more than the hour, the documents are what
        /// the same events give again, and the total is the sum of the lines.
        #[test]
        fn usage_is_bounded_and_deterministic(
            raw in proptest::collection::vec((0u8..4, any::<bool>(), 0u64..4 * HOUR), 0..40),
            period in 0u64..4,
        ) {
            let mut raw = raw;
            raw.sort_by_key(|r| r.2);
            let events: Vec<Ev> = raw.iter().map(|(v, r, at)| ev(&format!("vm{v}"), *r, *at)).collect();
            let t = terms(&[("vm0", "a", 3600), ("vm1", "a", 7), ("vm2", "b", 1)]);
            let d = usage_for(period, &events, &t);
            prop_assert_eq!(&d, &usage_for(period, &events, &t));
            for doc in &d {
                prop_assert_eq!(doc.period, period);
                prop_assert_eq!(doc.total, doc.lines.iter().map(|l| l.amount).sum::<u128>());
                for l in &doc.lines {
                    prop_assert!(l.seconds <= HOUR && l.seconds > 0);
                    prop_assert!(l.vm_id != "vm3");
                }
            }
        }
    }
}
