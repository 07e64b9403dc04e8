//! Metering, as pure functions of lifecycle events and the clock the caller passes in: each
//! VM's running seconds per UTC hour, and at each hour's close one canonical usage document per
//! account with its SHA-256 usage hash — bytes a tenant can rebuild and hash themselves.
//!
//! The document: `{"version":1,"period":P,"total":T,"lines":[...]}` where P is the hour's
//! start ÷ 3600 and T the sum of the lines' amounts; each line is
//! `{"account":A,"amount":N,"rate_per_hour":R,"seconds":S,"vm_id":V}` (lines sorted by vm_id),
//! `amount = floor(S × R / 3600)` in the chain's smallest unit (rounded down: a tenant is never
//! billed for a fraction it did not use). Serialized as JSON with sorted keys, `,`/`:`
//! separators and ASCII only — Python's `json.dumps(doc, sort_keys=True, separators=(",",":"),
//! ensure_ascii=True)` gives the same bytes.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Seconds in an hour.
pub const HOUR: u64 = 3600;

/// A VM's billing terms, from its order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    pub account: String,
    /// Price per running hour, in the chain's smallest unit.
    pub rate_per_hour: u128,
}

/// What the meter hears from the lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Started {
        vm_id: String,
        terms: Terms,
        at: u64,
    },
    Stopped {
        vm_id: String,
        at: u64,
    },
}

/// One VM's use in one hour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub vm_id: String,
    pub account: String,
    pub seconds: u64,
    pub rate_per_hour: u128,
    pub amount: u128,
}

/// The usage of one account in one period, and its canonical bytes and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDoc {
    pub period: u64,
    pub account: String,
    pub total: u128,
    pub lines: Vec<Line>,
    /// The canonical JSON.
    pub json: String,
    /// SHA-256 of `json`.
    pub hash: [u8; 32],
}

/// Running VMs and the seconds they have run in the open hour.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    /// The open hour (its period number); `None` before the first event.
    period: Option<u64>,
    running: BTreeMap<String, (Terms, u64)>,
    /// Seconds already counted in the open hour, per VM, with the terms they ran under.
    counted: BTreeMap<String, (Terms, u64)>,
}

/// Why the meter refused an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeterError {
    #[error("event at {at} is before the open hour (period {period}); close hours in order")]
    Past { at: u64, period: u64 },
    #[error("event at {at} is past the open hour (period {period}); close it first")]
    Future { at: u64, period: u64 },
}

impl Meter {
    pub fn new() -> Meter {
        Meter::default()
    }

    /// The open hour's period.
    pub fn period(&self) -> Option<u64> {
        self.period
    }

    fn check(&mut self, at: u64) -> Result<(), MeterError> {
        let p = *self.period.get_or_insert(at / HOUR);
        if at < p * HOUR {
            return Err(MeterError::Past { at, period: p });
        }
        if at > (p + 1) * HOUR {
            return Err(MeterError::Future { at, period: p });
        }
        Ok(())
    }

    /// Applies a lifecycle event inside the open hour. A start of a running VM or a stop of a
    /// stopped one changes nothing (events may be replayed after a restart).
    pub fn record(&mut self, ev: &Event) -> Result<(), MeterError> {
        match ev {
            Event::Started { vm_id, terms, at } => {
                self.check(*at)?;
                self.running
                    .entry(vm_id.clone())
                    .or_insert((terms.clone(), *at));
            }
            Event::Stopped { vm_id, at } => {
                self.check(*at)?;
                if let Some((terms, since)) = self.running.remove(vm_id) {
                    let e = self.counted.entry(vm_id.clone()).or_insert((terms, 0));
                    e.1 += at.saturating_sub(since);
                }
            }
        }
        Ok(())
    }

    /// Closes the open hour: running VMs are counted to its end and carry on into the next.
    /// Returns one document per account that used anything, sorted by account.
    pub fn close_hour(&mut self) -> Vec<UsageDoc> {
        let Some(p) = self.period else {
            return Vec::new();
        };
        let end = (p + 1) * HOUR;
        let mut counted = std::mem::take(&mut self.counted);
        for (vm, (terms, since)) in self.running.iter_mut() {
            let e = counted.entry(vm.clone()).or_insert((terms.clone(), 0));
            e.1 += end.saturating_sub(*since);
            *since = end;
        }
        self.period = Some(p + 1);
        let mut by_account: BTreeMap<String, Vec<Line>> = BTreeMap::new();
        for (vm_id, (terms, seconds)) in counted {
            if seconds == 0 {
                continue;
            }
            let seconds = seconds.min(HOUR);
            by_account
                .entry(terms.account.clone())
                .or_default()
                .push(Line {
                    amount: u128::from(seconds) * terms.rate_per_hour / u128::from(HOUR),
                    vm_id,
                    account: terms.account,
                    seconds,
                    rate_per_hour: terms.rate_per_hour,
                });
        }
        by_account
            .into_iter()
            .map(|(account, lines)| document(p, account, lines))
            .collect()
    }
}

/// Builds the canonical document of `lines` (one account's) for `period`.
pub fn document(period: u64, account: String, mut lines: Vec<Line>) -> UsageDoc {
    lines.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    let total = lines.iter().map(|l| l.amount).sum();
    let mut json = String::new();
    json.push_str("{\"lines\":[");
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str("{\"account\":");
        push_str(&mut json, &l.account);
        json.push_str(&format!(
            ",\"amount\":{},\"rate_per_hour\":{},\"seconds\":{},\"vm_id\":",
            l.amount, l.rate_per_hour, l.seconds
        ));
        push_str(&mut json, &l.vm_id);
        json.push('}');
    }
    json.push_str(&format!(
        "],\"period\":{period},\"total\":{total},\"version\":1}}"
    ));
    let hash: [u8; 32] = Sha256::digest(json.as_bytes()).into();
    UsageDoc {
        period,
        account,
        total,
        lines,
        json,
        hash,
    }
}

/// A JSON string as Python's `json.dumps(..., ensure_ascii=True)` writes it: `"` and `\`
/// escaped, `\n \r \t \b \f` by name, everything else outside space..`~` as `\uXXXX` (UTF-16).
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            c => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn terms(account: &str, rate: u128) -> Terms {
        Terms {
            account: account.into(),
            rate_per_hour: rate,
        }
    }

    fn start(vm: &str, account: &str, rate: u128, at: u64) -> Event {
        Event::Started {
            vm_id: vm.into(),
            terms: terms(account, rate),
            at,
        }
    }

    fn stop(vm: &str, at: u64) -> Event {
        Event::Stopped {
            vm_id: vm.into(),
            at,
        }
    }

    #[test]
    fn an_hour_split_by_stop_and_start_and_a_vm_running_across_hours() {
        let h = 500_000 * HOUR;
        let mut m = Meter::new();
        m.record(&start("vm-1", "alice", 3600, h + 600)).unwrap();
        m.record(&stop("vm-1", h + 1200)).unwrap();
        m.record(&start("vm-1", "alice", 3600, h + 1800)).unwrap();
        m.record(&start("vm-2", "bob", 7200, h)).unwrap();
        let docs = m.close_hour();
        assert_eq!(docs.len(), 2);
        let (a, b) = (&docs[0], &docs[1]);
        assert_eq!(
            (a.account.as_str(), a.period, a.lines[0].seconds, a.total),
            ("alice", 500_000, 600 + 1800, 2400)
        );
        assert_eq!(
            (b.account.as_str(), b.lines[0].seconds, b.total),
            ("bob", 3600, 7200)
        );
        assert_eq!(
            a.json,
            "{\"lines\":[{\"account\":\"alice\",\"amount\":2400,\"rate_per_hour\":3600,\"seconds\":2400,\"vm_id\":\"vm-1\"}],\"period\":500000,\"total\":2400,\"version\":1}"
        );
        assert_eq!(
            hex::encode(a.hash),
            hex::encode(Sha256::digest(a.json.as_bytes()))
        );
        // Both still run in the next hour.
        let next = m.close_hour();
        assert_eq!(
            next.iter().map(|d| d.lines[0].seconds).collect::<Vec<_>>(),
            vec![3600, 3600]
        );
        assert_eq!(next[0].period, 500_001);
        // Out-of-hour events are refused.
        assert!(matches!(
            m.record(&stop("vm-1", h)),
            Err(MeterError::Past { .. })
        ));
        assert!(matches!(
            m.record(&stop("vm-1", h + 10 * HOUR)),
            Err(MeterError::Future { .. })
        ));
    }

    #[test]
    fn strings_are_ascii_like_python() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\nd\u{7f}é😀\u{1}");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u007f\\u00e9\\ud83d\\ude00\\u0001\"");
    }

    #[test]
    fn amounts_round_down() {
        let d = document(
            1,
            "a".into(),
            vec![Line {
                vm_id: "v".into(),
                account: "a".into(),
                seconds: 1,
                rate_per_hour: 3599,
                amount: 3599 / 3600,
            }],
        );
        assert_eq!(d.total, 0);
    }

    proptest! {
        /// Whatever the events, no VM is billed more than an hour per hour, and the seconds
        /// billed over all hours equal the time it ran.
        #[test]
        fn billed_time_is_run_time(toggles in proptest::collection::vec((0u8..3, 1u64..5000), 1..60)) {
            let base = 400_000 * HOUR;
            let mut m = Meter::new();
            let mut now = base;
            let mut running = [None::<u64>; 3];
            let mut ran = [0u64; 3];
            let mut billed = [0u64; 3];
            let bill = |docs: Vec<UsageDoc>, billed: &mut [u64; 3]| {
                for d in docs {
                    for l in d.lines {
                        assert!(l.seconds <= HOUR);
                        let i: usize = l.vm_id[3..].parse().unwrap();
                        billed[i] += l.seconds;
                    }
                }
            };
            for (vm, dt) in toggles {
                let target = now + dt;
                // Close every hour that ends before the event.
                while m.period().is_some_and(|p| (p + 1) * HOUR < target) {
                    bill(m.close_hour(), &mut billed);
                }
                now = target;
                let i = vm as usize;
                let id = format!("vm-{i}");
                match running[i] {
                    None => { m.record(&start(&id, "t", 1, now)).unwrap(); running[i] = Some(now); }
                    Some(s) => { m.record(&stop(&id, now)).unwrap(); ran[i] += now - s; running[i] = None; }
                }
            }
            // Stop everything at the end and close the last hour.
            for (i, r) in running.iter().enumerate() {
                if let Some(s) = r {
                    while m.period().is_some_and(|p| (p + 1) * HOUR < now) {
                        bill(m.close_hour(), &mut billed);
                    }
                    m.record(&stop(&format!("vm-{i}"), now)).unwrap();
                    ran[i] += now - s;
                }
            }
            bill(m.close_hour(), &mut billed);
            prop_assert_eq!(billed, ran);
        }
    }
}
