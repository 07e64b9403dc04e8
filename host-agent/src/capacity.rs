//! Capacity and quotas: whether one more VM fits on this host (`[capacity]`). Pure: the VMs
//! that hold resources and the new one's shape in, a verdict out. Every create passes it —
//! from the control socket and from the chain alike — under the daemon's operation lock, so
//! two creates never both take the last room.
//!
//! A VM holds its vCPUs, memory and disk from create to terminate, running or not: a stopped
//! VM's disk is still there, and starting it again must not fail for room. Limits left out of
//! `[capacity]` are not enforced.

use serde::Deserialize;
use std::collections::BTreeMap;

/// `[capacity]` in the host agent's configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// vCPUs all VMs together may have.
    pub vcpus: Option<u64>,
    /// Memory all VMs together may have, MiB.
    pub memory_mib: Option<u64>,
    /// Disk all VMs together may have, GiB.
    pub disk_gib: Option<u64>,
    /// VMs one tenant may have here (unless `tenants` says otherwise for it).
    pub max_vms_per_tenant: Option<u64>,
    /// Per-tenant VM limits, overriding `max_vms_per_tenant`.
    #[serde(default)]
    pub tenants: BTreeMap<String, u64>,
}

/// What one VM holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub tenant: String,
}

/// Why a VM does not fit: a closed vocabulary (`code`), and the numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("capacity_vcpus: {want} vCPUs asked, {used} of {limit} in use")]
    Vcpus { want: u64, used: u64, limit: u64 },
    #[error("capacity_memory: {want} MiB asked, {used} of {limit} MiB in use")]
    Memory { want: u64, used: u64, limit: u64 },
    #[error("capacity_disk: {want} GiB asked, {used} of {limit} GiB in use")]
    Disk { want: u64, used: u64, limit: u64 },
    #[error("tenant_quota: tenant {tenant} has {used} VM(s) here, its limit is {limit}")]
    TenantQuota {
        tenant: String,
        used: u64,
        limit: u64,
    },
}

impl Refusal {
    /// The reason code (what goes on chain).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Vcpus { .. } => "capacity_vcpus",
            Refusal::Memory { .. } => "capacity_memory",
            Refusal::Disk { .. } => "capacity_disk",
            Refusal::TenantQuota { .. } => "tenant_quota",
        }
    }
}

impl CapacityConfig {
    /// The VM limit for `tenant`, if any.
    pub fn tenant_limit(&self, tenant: &str) -> Option<u64> {
        self.tenants
            .get(tenant)
            .copied()
            .or(self.max_vms_per_tenant)
    }

    /// Whether `new` fits beside `live` (the VMs that hold resources now).
    pub fn admit(&self, live: &[Shape], new: &Shape) -> Result<(), Refusal> {
        let sum = |f: fn(&Shape) -> u64| live.iter().map(f).fold(0u64, u64::saturating_add);
        let check = |limit: Option<u64>, used: u64, want: u64| match limit {
            Some(limit) if used.saturating_add(want) > limit => Err((want, used, limit)),
            _ => Ok(()),
        };
        check(self.vcpus, sum(|s| s.vcpus), new.vcpus)
            .map_err(|(want, used, limit)| Refusal::Vcpus { want, used, limit })?;
        check(self.memory_mib, sum(|s| s.memory_mib), new.memory_mib)
            .map_err(|(want, used, limit)| Refusal::Memory { want, used, limit })?;
        check(self.disk_gib, sum(|s| s.disk_gib), new.disk_gib)
            .map_err(|(want, used, limit)| Refusal::Disk { want, used, limit })?;
        let used = live.iter().filter(|s| s.tenant == new.tenant).count() as u64;
        match self.tenant_limit(&new.tenant) {
            Some(limit) if used >= limit => Err(Refusal::TenantQuota {
                tenant: new.tenant.clone(),
                used,
                limit,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(vcpus: u64, memory_mib: u64, disk_gib: u64, tenant: &str) -> Shape {
        Shape {
            vcpus,
            memory_mib,
            disk_gib,
            tenant: tenant.into(),
        }
    }

    #[test]
    fn each_limit_refuses_with_its_code_and_numbers() {
        let cap = CapacityConfig {
            vcpus: Some(8),
            memory_mib: Some(8192),
            disk_gib: Some(100),
            max_vms_per_tenant: Some(2),
            tenants: [("big".to_string(), 3)].into(),
        };
        let live = [vm(4, 4096, 40, "a"), vm(2, 2048, 40, "a")];
        assert_eq!(cap.admit(&live, &vm(2, 2048, 20, "b")), Ok(()));
        let r = cap.admit(&live, &vm(3, 1024, 10, "b")).unwrap_err();
        assert_eq!(
            r,
            Refusal::Vcpus {
                want: 3,
                used: 6,
                limit: 8
            }
        );
        assert_eq!(r.code(), "capacity_vcpus");
        assert!(
            r.to_string()
                .starts_with("capacity_vcpus: 3 vCPUs asked, 6 of 8")
        );
        assert_eq!(
            cap.admit(&live, &vm(1, 4096, 10, "b")).unwrap_err().code(),
            "capacity_memory"
        );
        assert_eq!(
            cap.admit(&live, &vm(1, 1024, 21, "b")).unwrap_err().code(),
            "capacity_disk"
        );
        // Tenant a has its two; tenant big may have three.
        assert_eq!(
            cap.admit(&live, &vm(1, 1, 1, "a")).unwrap_err(),
            Refusal::TenantQuota {
                tenant: "a".into(),
                used: 2,
                limit: 2
            }
        );
        let bigs = [vm(1, 1, 1, "big"), vm(1, 1, 1, "big")];
        assert_eq!(cap.admit(&bigs, &vm(1, 1, 1, "big")), Ok(()));
        // Nothing configured: nothing enforced.
        assert_eq!(
            CapacityConfig::default().admit(&live, &vm(u64::MAX, u64::MAX, u64::MAX, "a")),
            Ok(())
        );
    }

    proptest! {
        /// Admitting VM after VM never takes the host past a limit, and a refusal's numbers
        /// are the host's.
        #[test]
        fn admitted_vms_never_exceed_a_limit(
            shapes in proptest::collection::vec((0u64..16, 0u64..8192, 0u64..200, 0u8..4), 0..40),
            vcpus in proptest::option::of(0u64..64),
            memory in proptest::option::of(0u64..32768),
            disk in proptest::option::of(0u64..800),
            per_tenant in proptest::option::of(0u64..5),
        ) {
            let cap = CapacityConfig {
                vcpus,
                memory_mib: memory,
                disk_gib: disk,
                max_vms_per_tenant: per_tenant,
                tenants: BTreeMap::new(),
            };
            let mut live: Vec<Shape> = Vec::new();
            for (c, m, d, t) in shapes {
                let new = vm(c, m, d, &format!("t{t}"));
                if cap.admit(&live, &new).is_ok() {
                    live.push(new);
                }
                let total = |f: fn(&Shape) -> u64| live.iter().map(f).sum::<u64>();
                prop_assert!(vcpus.is_none_or(|l| total(|s| s.vcpus) <= l));
                prop_assert!(memory.is_none_or(|l| total(|s| s.memory_mib) <= l));
                prop_assert!(disk.is_none_or(|l| total(|s| s.disk_gib) <= l));
                for t in 0..4 {
                    let n = live.iter().filter(|s| s.tenant == format!("t{t}")).count() as u64;
                    prop_assert!(per_tenant.is_none_or(|l| n <= l));
                }
            }
        }
    }
}
