//! The broker's policy floor at registration (invariant 9: an order can tighten the floor,
//! never relax it). The floor itself and floor ∧ order are in [`snp::floor`]; at release the
//! service appraises with [`snp::Floor::effective`], so a raised floor also governs VMs
//! registered before it (invariant 8). A serving broker re-reads it from kbs.toml every
//! [`FLOOR_POLL`] ([`follow`]), so raising it needs no restart.

use crate::service::{Kbs, RegisterError};
use proto::order::Order;
use snp::{Floor, Policy};
use std::path::PathBuf;
use std::sync::Arc;

/// How often a serving broker re-reads kbs.toml for its floor.
pub const FLOOR_POLL: std::time::Duration = std::time::Duration::from_secs(2);

impl Kbs {
    /// The floor in force (a poisoned lock still holds a whole floor: it is only ever replaced).
    pub fn floor(&self) -> Floor {
        self.floor.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `floor` in force for every later registration and release; says whether it changed.
    pub fn set_floor(&self, floor: Floor) -> bool {
        let mut f = self.floor.write().unwrap_or_else(|e| e.into_inner());
        let changed = *f != floor;
        *f = floor;
        changed
    }
}

/// Follows kbs.toml's floor while serving. A file that cannot be read or parsed changes
/// nothing (logged once per distinct error): the floor in force stays.
pub async fn follow(kbs: Arc<Kbs>, config: PathBuf) {
    let mut tick = tokio::time::interval(FLOOR_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        let path = config.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::config::Config::load(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match loaded {
            Ok(c) => {
                last_error.clear();
                if kbs.set_floor(c.floor) {
                    tracing::info!(
                        "policy floor changed: in force for every later registration and release"
                    );
                }
            }
            Err(e) if e != last_error => {
                tracing::warn!(error = %e, "kbs.toml cannot be read: the policy floor in force stays");
                last_error = e;
            }
            Err(_) => {}
        }
    }
}

/// Checks a register order's policy: it must parse, and ask for nothing below `floor`. An
/// empty policy is the built-in [`Policy::default`].
pub fn check_order(floor: &Floor, order: &Order) -> Result<(), RegisterError> {
    let policy = if order.policy.is_empty() {
        Policy::default()
    } else {
        Policy::from_toml(&order.policy).map_err(|e| RegisterError::Policy(e.to_string()))?
    };
    let below = floor.below(&policy);
    if below.is_empty() {
        Ok(())
    } else {
        Err(RegisterError::BelowFloor(
            below.iter().map(ToString::to_string).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::order;

    #[test]
    fn orders_below_the_floor_are_refused_with_their_own_code() {
        let floor = Floor::default();
        assert!(check_order(&floor, &order("")).is_ok());
        assert!(check_order(&floor, &order("version = 1\nminimum_guest_svn = 2\n")).is_ok());
        for (policy, what) in [
            (
                "version = 1\n[guest_policy]\nallow_debug = true\n",
                "allow_debug",
            ),
            (
                "version = 1\n[guest_policy]\nallow_migration_agent = true\n",
                "allow_migration_agent",
            ),
            ("version = 1\nany_vmpl = true\n", "vmpl"),
            ("version = 1\nvmpl = 2\n", "vmpl"),
            ("version = 1\nsigning_keys = [\"vcek\", \"vlek\"]\n", "vlek"),
            (
                "version = 1\n[tcb.minimum_reported]\nsnp = 1\n",
                "Milan snp minimum 1 < floor 24",
            ),
            (
                "version = 1\n[tcb.minimum_by_product.turin]\nfmc = 0\n",
                "Turin fmc minimum 0 < floor 1",
            ),
        ] {
            let e = check_order(&floor, &order(policy)).unwrap_err();
            assert_eq!(e.code(), "policy_below_floor", "{policy}");
            assert!(e.to_string().contains(what), "{policy}: {e}");
        }
        // A policy that does not parse keeps its own code.
        let e = check_order(&floor, &order("not toml ==")).unwrap_err();
        assert_eq!(e.code(), "order_policy");
        // A widened floor lets debug through (explicitly).
        let wide = Floor {
            allow_debug: true,
            ..Floor::default()
        };
        let debug = order("version = 1\n[guest_policy]\nallow_debug = true\n");
        assert!(check_order(&wide, &debug).is_ok());
    }
}
