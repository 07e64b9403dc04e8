//! The broker-wide policy floor: what every VM's appraisal policy must at least demand.
//!
//! An order's policy may tighten the floor (add checks, raise minimums, restrict chips and
//! images) but never relax it. [`Floor::below`] says where an order asks for less (refused at
//! registration); [`Floor::effective`] is the policy a report is appraised with at release,
//! floor ∧ order, so a raised floor also governs VMs registered before it. Pure functions.

use crate::Product;
use crate::policy::{Policy, SigningKeyName};
use crate::tcb::{Component, TcbMinimum};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The floor, as written in `[floor]` of kbs.toml. Every field defaults to the strict value:
/// an absent section is [`Floor::default`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    /// Per-product minimum of all four TCBs (reported, current, committed, launch). A product
    /// written here replaces its built-in minimum (an empty table: none); a product not
    /// written keeps it ([`Floor::builtin_tcb`]).
    #[serde(
        default = "Floor::builtin_tcb",
        deserialize_with = "over_builtin",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub minimum_tcb: BTreeMap<Product, TcbMinimum>,
    /// Let orders accept debug guests (their memory is readable by the host). Default: no.
    #[serde(default)]
    pub allow_debug: bool,
    /// Let orders accept guests with a migration agent. Default: no.
    #[serde(default)]
    pub allow_migration_agent: bool,
    /// Let orders accept reports from any VMPL. Default: no, VMPL 0 only.
    #[serde(default)]
    pub any_vmpl: bool,
    /// Let orders accept VLEK-signed reports (not bound to one chip). Default: no, VCEK only.
    #[serde(default)]
    pub allow_vlek: bool,
}

fn over_builtin<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<Product, TcbMinimum>, D::Error> {
    let written = BTreeMap::<Product, TcbMinimum>::deserialize(d)?;
    let mut m = Floor::builtin_tcb();
    m.extend(written);
    Ok(m)
}

impl Default for Floor {
    fn default() -> Self {
        Floor {
            minimum_tcb: Floor::builtin_tcb(),
            allow_debug: false,
            allow_migration_agent: false,
            any_vmpl: false,
            allow_vlek: false,
        }
    }
}

/// One way an order's policy asks for less than the floor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Below {
    Debug,
    MigrationAgent,
    /// The order accepts a VMPL other than 0.
    Vmpl,
    Vlek,
    /// The order names a lower minimum for `component` than the floor's for `product`.
    Tcb {
        product: Product,
        component: Component,
        order: u8,
        floor: u8,
    },
}

impl fmt::Display for Below {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Below::Debug => f.write_str("allow_debug"),
            Below::MigrationAgent => f.write_str("allow_migration_agent"),
            Below::Vmpl => f.write_str("vmpl other than 0"),
            Below::Vlek => f.write_str("signing_keys with vlek"),
            Below::Tcb {
                product,
                component,
                order,
                floor,
            } => write!(f, "{product} {component} minimum {order} < floor {floor}"),
        }
    }
}

impl Floor {
    /// The built-in per-product minimums (raise them in kbs.toml as AMD publishes security
    /// bulletins). Milan: SNP 24 as AMD-SB-3019 (CVE-2024-56161) requires, with the
    /// bootloader and microcode of that firmware (1.55.29: 4/0/24/219, as CCF pins it since
    /// 2026-03). Genoa: SNP 23 per AMD-SB-3019; its bootloader and microcode, and all of
    /// Turin's, are those of current firmware seen on real machines (the corpus), not a
    /// bulletin's — no public source pins them.
    pub fn builtin_tcb() -> BTreeMap<Product, TcbMinimum> {
        let t = |fmc, bootloader, tee, snp, microcode| TcbMinimum {
            fmc,
            bootloader: Some(bootloader),
            tee: Some(tee),
            snp: Some(snp),
            microcode: Some(microcode),
        };
        BTreeMap::from([
            (Product::Milan, t(None, 4, 0, 24, 219)),
            (Product::Genoa, t(None, 9, 0, 23, 72)),
            (Product::Turin, t(Some(1), 1, 1, 4, 81)),
        ])
    }

    /// Every way `order` asks for less than this floor; empty: it may be registered.
    pub fn below(&self, order: &Policy) -> Vec<Below> {
        let mut out = Vec::new();
        if order.guest_policy.allow_debug && !self.allow_debug {
            out.push(Below::Debug);
        }
        if order.guest_policy.allow_migration_agent && !self.allow_migration_agent {
            out.push(Below::MigrationAgent);
        }
        if !self.any_vmpl && (order.any_vmpl || order.vmpl != Some(0)) {
            out.push(Below::Vmpl);
        }
        if !self.allow_vlek && order.signing_keys.contains(&SigningKeyName::Vlek) {
            out.push(Below::Vlek);
        }
        let t = &order.tcb;
        for (&product, floor_min) in &self.minimum_tcb {
            if order
                .products
                .as_ref()
                .is_some_and(|p| !p.contains(&product))
            {
                continue; // the order never accepts this product
            }
            let by_product = t
                .minimum_by_product
                .get(&product)
                .copied()
                .unwrap_or_default();
            // What the order demands of each TCB on this product; a minimum it names that is
            // lower than the floor's is asking for less (one it does not name is the floor's).
            let fields = [
                t.minimum_reported,
                t.minimum_current,
                t.minimum_committed,
                t.minimum_launch,
            ]
            .map(|m| m.stricter(&by_product));
            for (component, floor) in floor_min.components() {
                if component == Component::Fmc && !product.has_fmc() {
                    continue;
                }
                let lowest = fields.iter().filter_map(|m| m.get(component)).min();
                if let Some(order) = lowest
                    && order < floor
                {
                    out.push(Below::Tcb {
                        product,
                        component,
                        order,
                        floor,
                    });
                }
            }
        }
        out
    }

    /// floor ∧ order: `order` with every check at least as strict as the floor demands.
    /// Where the two cannot both hold (an order naming VMPL 2, or VLEK only, registered
    /// before the floor), the floor's check governs or nothing passes.
    pub fn effective(&self, order: &Policy) -> Policy {
        let mut p = order.clone();
        p.guest_policy.allow_debug &= self.allow_debug;
        p.guest_policy.allow_migration_agent &= self.allow_migration_agent;
        if !self.any_vmpl {
            p.any_vmpl = false;
            p.vmpl = Some(0);
        }
        if !self.allow_vlek {
            p.signing_keys.retain(|k| *k != SigningKeyName::Vlek);
        }
        for (product, min) in &self.minimum_tcb {
            let m = p.tcb.minimum_by_product.entry(*product).or_default();
            *m = m.stricter(min);
        }
        p
    }

    /// The built-in floor as commented kbs.toml lines. Dotted keys (`floor.allow_debug = …`)
    /// rather than a `[floor]` table, so that keys appended to the file stay top-level.
    pub fn default_toml() -> String {
        let mut s = String::from(
            "# The policy floor: every VM's appraisal policy is at least this strict. Orders that ask\n\
             # for less (debug, a migration agent, another VMPL, VLEK, a lower TCB) are refused\n\
             # (policy_below_floor), and releases are appraised by floor and order together, so\n\
             # raising it here (a serving broker re-reads it) also governs VMs registered before.\n\
             floor.allow_debug = false\n\
             floor.allow_migration_agent = false\n\
             # false: VMPL 0 only.\n\
             floor.any_vmpl = false\n\
             # false: VCEK-signed reports only (a VLEK cannot be bound to one chip).\n\
             floor.allow_vlek = false\n\
             # Minimum TCB per product, for the reported, current, committed and launch TCBs.\n\
             # Raise them as AMD publishes security bulletins; `{}` removes a product's minimum.\n",
        );
        for (product, m) in Floor::builtin_tcb() {
            let parts: Vec<String> = m
                .components()
                .map(|(c, v)| {
                    let name = match c {
                        Component::Fmc => "fmc",
                        Component::Bootloader => "bootloader",
                        Component::Tee => "tee",
                        Component::Snp => "snp",
                        Component::Microcode => "microcode",
                    };
                    format!("{name} = {v}")
                })
                .collect();
            s.push_str(&format!(
                "floor.minimum_tcb.{} = {{ {} }}\n",
                product.name().to_ascii_lowercase(),
                parts.join(", ")
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MajorMinor;
    use proptest::prelude::*;

    #[derive(Deserialize)]
    struct Wrapper {
        #[serde(default)]
        floor: Floor,
    }

    fn parse(s: &str) -> Floor {
        toml::from_str::<Wrapper>(s).unwrap().floor
    }

    #[test]
    fn absent_is_strict_and_the_written_default_is_the_builtin() {
        let f = parse("");
        assert_eq!(f, Floor::default());
        assert_eq!(parse(&Floor::default_toml()), Floor::default());
        // Keys after it are still top-level.
        let after = format!("{}\nlater = 1\n", Floor::default_toml());
        assert!(
            toml::from_str::<toml::Table>(&after)
                .unwrap()
                .contains_key("later")
        );
        assert!(!f.allow_debug && !f.allow_vlek && !f.any_vmpl && !f.allow_migration_agent);
        assert_eq!(f.minimum_tcb.len(), 3);
    }

    #[test]
    fn a_written_product_replaces_its_builtin_only() {
        let f = parse(
            "[floor]\nallow_vlek = true\n[floor.minimum_tcb.milan]\nsnp = 30\n[floor.minimum_tcb.turin]\n",
        );
        assert!(f.allow_vlek);
        assert_eq!(f.minimum_tcb[&Product::Milan].snp, Some(30));
        assert_eq!(f.minimum_tcb[&Product::Milan].microcode, None);
        assert_eq!(f.minimum_tcb[&Product::Turin], TcbMinimum::default());
        assert_eq!(
            f.minimum_tcb[&Product::Genoa],
            Floor::builtin_tcb()[&Product::Genoa]
        );
        assert!(toml::from_str::<Wrapper>("[floor]\nallow_everything = true\n").is_err());
    }

    #[test]
    fn the_default_policy_meets_the_default_floor() {
        assert_eq!(Floor::default().below(&Policy::default()), vec![]);
    }

    #[test]
    fn what_is_below_the_floor_is_named() {
        let f = Floor::default();
        let mut p = Policy::default();
        p.guest_policy.allow_debug = true;
        p.guest_policy.allow_migration_agent = true;
        p.any_vmpl = true;
        p.signing_keys.push(SigningKeyName::Vlek);
        p.tcb.minimum_reported.snp = Some(3);
        let b = f.below(&p);
        assert!(b.contains(&Below::Debug), "{b:?}");
        assert!(b.contains(&Below::MigrationAgent));
        assert!(b.contains(&Below::Vmpl));
        assert!(b.contains(&Below::Vlek));
        assert!(b.contains(&Below::Tcb {
            product: Product::Milan,
            component: Component::Snp,
            order: 3,
            floor: 24
        }));
        // Another exact VMPL, or none (= any), is below a VMPL-0 floor too.
        for vmpl in [Some(2), None] {
            let p = Policy {
                vmpl,
                ..Policy::default()
            };
            assert_eq!(f.below(&p), vec![Below::Vmpl]);
        }
        // A lower minimum for a product the order never accepts is not below.
        let p = Policy {
            products: Some(vec![Product::Turin]),
            tcb: crate::policy::TcbPolicy {
                minimum_reported: TcbMinimum {
                    snp: Some(4),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Policy::default()
        };
        assert_eq!(f.below(&p), vec![]);
        // A widened floor accepts all of it.
        let wide = Floor {
            minimum_tcb: BTreeMap::new(),
            allow_debug: true,
            allow_migration_agent: true,
            any_vmpl: true,
            allow_vlek: true,
        };
        let mut p = Policy::default();
        p.guest_policy.allow_debug = true;
        p.any_vmpl = true;
        p.signing_keys.push(SigningKeyName::Vlek);
        p.tcb.minimum_reported.snp = Some(0);
        assert_eq!(wide.below(&p), vec![]);
    }

    #[test]
    fn the_effective_policy_holds_the_floor() {
        let mut p = Policy::default();
        p.guest_policy.allow_debug = true;
        p.any_vmpl = true;
        p.signing_keys = vec![SigningKeyName::Vlek];
        p.tcb.minimum_by_product.insert(
            Product::Milan,
            TcbMinimum {
                snp: Some(30),
                ..Default::default()
            },
        );
        let e = Floor::default().effective(&p);
        assert!(!e.guest_policy.allow_debug);
        assert!(!e.any_vmpl);
        assert_eq!(e.vmpl, Some(0));
        assert!(e.signing_keys.is_empty(), "VLEK only: nothing passes");
        let milan = e.tcb.minimum_by_product[&Product::Milan];
        assert_eq!((milan.snp, milan.microcode), (Some(30), Some(219)));
    }

    fn arb_min() -> impl Strategy<Value = TcbMinimum> {
        let c = || proptest::option::of(any::<u8>());
        (c(), c(), c(), c(), c()).prop_map(|(fmc, bootloader, tee, snp, microcode)| TcbMinimum {
            fmc,
            bootloader,
            tee,
            snp,
            microcode,
        })
    }

    fn arb_by_product() -> impl Strategy<Value = BTreeMap<Product, TcbMinimum>> {
        proptest::collection::btree_map(
            prop_oneof![
                Just(Product::Milan),
                Just(Product::Genoa),
                Just(Product::Turin)
            ],
            arb_min(),
            0..3,
        )
    }

    fn arb_floor() -> impl Strategy<Value = Floor> {
        (arb_by_product(), any::<[bool; 4]>()).prop_map(|(minimum_tcb, b)| Floor {
            minimum_tcb,
            allow_debug: b[0],
            allow_migration_agent: b[1],
            any_vmpl: b[2],
            allow_vlek: b[3],
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            arb_by_product(),
            arb_min(),
            any::<[bool; 5]>(),
            proptest::option::of(0u32..4),
            0usize..3,
            any::<u32>(),
        )
            .prop_map(|(by_product, reported, b, vmpl, keys, svn)| {
                let mut p = Policy::default();
                p.tcb.minimum_by_product = by_product;
                p.tcb.minimum_reported = reported;
                p.guest_policy.allow_debug = b[0];
                p.guest_policy.allow_migration_agent = b[1];
                p.guest_policy.minimum_abi = b[2].then_some(MajorMinor(1, 55));
                p.any_vmpl = b[3];
                p.strict_reserved = b[4];
                p.vmpl = vmpl;
                p.signing_keys = match keys {
                    0 => vec![SigningKeyName::Vcek],
                    1 => vec![SigningKeyName::Vlek],
                    _ => vec![SigningKeyName::Vcek, SigningKeyName::Vlek],
                };
                p.minimum_guest_svn = svn;
                p
            })
    }

    /// The VMPLs a policy accepts.
    fn vmpls(any_vmpl: bool, vmpl: Option<u32>) -> Vec<u32> {
        (0..4)
            .filter(|v| any_vmpl || vmpl.is_none_or(|w| w == *v))
            .collect()
    }

    /// Whether `a` demands at least what `b` does, per product and component.
    fn tcb_at_least(a: &BTreeMap<Product, TcbMinimum>, b: &BTreeMap<Product, TcbMinimum>) -> bool {
        b.iter().all(|(p, bm)| {
            let am = a.get(p).copied().unwrap_or_default();
            bm.components()
                .all(|(c, need)| am.get(c).is_some_and(|have| have >= need))
        })
    }

    proptest! {
        /// floor ∧ order is never looser than either, on any field; it is idempotent; and the
        /// result is within the floor (nothing of it is below the floor).
        #[test]
        fn combine_is_never_looser(f in arb_floor(), o in arb_policy()) {
            let e = f.effective(&o);
            // Debug and migration agent: allowed only if both allow.
            prop_assert!(!e.guest_policy.allow_debug || (f.allow_debug && o.guest_policy.allow_debug));
            prop_assert!(!e.guest_policy.allow_migration_agent
                || (f.allow_migration_agent && o.guest_policy.allow_migration_agent));
            // VMPL: within the floor's; within the order's unless the two exclude each other.
            let ev = vmpls(e.any_vmpl, e.vmpl);
            let fv = if f.any_vmpl { vec![0, 1, 2, 3] } else { vec![0] };
            let ov = vmpls(o.any_vmpl, o.vmpl);
            prop_assert!(ev.iter().all(|v| fv.contains(v)));
            if fv.iter().any(|v| ov.contains(v)) {
                prop_assert!(ev.iter().all(|v| ov.contains(v)));
            }
            // Signing keys: a subset of the order's, VLEK only if the floor allows it.
            prop_assert!(e.signing_keys.iter().all(|k| o.signing_keys.contains(k)));
            prop_assert!(f.allow_vlek || !e.signing_keys.contains(&SigningKeyName::Vlek));
            // TCB: at least the floor's and the order's minimums, per product.
            prop_assert!(tcb_at_least(&e.tcb.minimum_by_product, &f.minimum_tcb));
            prop_assert!(tcb_at_least(&e.tcb.minimum_by_product, &o.tcb.minimum_by_product));
            // Everything else the order said is kept.
            prop_assert_eq!(e.tcb.minimum_reported, o.tcb.minimum_reported);
            prop_assert_eq!(e.minimum_guest_svn, o.minimum_guest_svn);
            prop_assert_eq!(e.guest_policy.minimum_abi, o.guest_policy.minimum_abi);
            prop_assert_eq!(e.strict_reserved, o.strict_reserved);
            // Idempotent, and floor ∧ order ⊆ floor.
            prop_assert_eq!(f.effective(&e), e.clone());
            prop_assert_eq!(f.below(&e), vec![]);
        }

        /// An order the floor accepts is judged exactly as written (combining adds only the
        /// floor's TCB minimums, which it already meets or exceeds where it names them).
        #[test]
        fn an_order_at_or_above_the_floor_keeps_its_checks(f in arb_floor(), o in arb_policy()) {
            // Orders meeting the floor: the generated one when it does, and its floor ∧ order.
            let met = f.effective(&o);
            let o = if f.below(&o).is_empty() { o } else { met };
            let e = f.effective(&o);
            prop_assert_eq!(e.guest_policy.allow_debug, o.guest_policy.allow_debug);
            prop_assert_eq!(e.signing_keys, o.signing_keys);
            prop_assert_eq!(vmpls(e.any_vmpl, e.vmpl), vmpls(o.any_vmpl, o.vmpl));
        }
    }
}
