//! The release state machine under arbitrary interleavings of challenges, requests (good, replayed,
//! late, for the wrong VM, with bad evidence, of another image) terminations and allowlist
//! changes: at most one release per nonce, boot counters only move forward, nothing is released
//! for a terminated VM, nor for an image outside the allowlist in force (or with none).

use kbs::release::{Denial, NonceState, Request, VmState, decide};
use proptest::prelude::*;
use proto::order::{Allowlist, ORDER_VERSION};
use serde_bytes::ByteBuf;
use std::collections::HashMap;

#[derive(Clone, Debug)]
enum Op {
    Challenge {
        vm: u8,
    },
    Request {
        nonce: u8,
        vm: u8,
        late: bool,
        bad_evidence: bool,
        bad_binding: bool,
        other_image: bool,
    },
    Terminate {
        vm: u8,
    },
    Tick(u8),
    /// The allowlist in force becomes: 0 none, 1 both images, 2 only the other image, 3 empty.
    Allowlist(u8),
}

const IMAGE: [u8; 48] = [0x4d; 48];
const OTHER: [u8; 48] = [0x0e; 48];

fn allowlist(which: u8, epoch: u64) -> Option<Allowlist> {
    let images: &[[u8; 48]] = match which {
        0 => return None,
        1 => &[IMAGE, OTHER],
        2 => &[OTHER],
        _ => &[],
    };
    Some(Allowlist {
        v: ORDER_VERSION,
        epoch,
        measurements: images.iter().map(|m| ByteBuf::from(m.to_vec())).collect(),
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(|vm| Op::Challenge { vm }),
        (
            0u8..8,
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(nonce, vm, late, bad_evidence, bad_binding, other_image)| Op::Request {
                    nonce,
                    vm,
                    late,
                    bad_evidence,
                    bad_binding,
                    other_image,
                }
            ),
        (0u8..4).prop_map(Op::Allowlist),
        (0u8..3).prop_map(|vm| Op::Terminate { vm }),
        (0u8..50).prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
        let mut now = 1_000u64;
        let mut nonces: Vec<([u8; 32], NonceState)> = Vec::new();
        let mut vms: HashMap<String, VmState> = (0..3)
            .map(|i| (format!("vm-{i}"), VmState { vm_id: format!("vm-{i}"), generation: 1, boot_counter: 0, terminated: false }))
            .collect();
        let mut releases_per_nonce: HashMap<[u8; 32], u32> = HashMap::new();
        let mut current = allowlist(1, 1);
        for op in ops {
            match op {
                Op::Tick(s) => now += u64::from(s),
                Op::Challenge { vm } => {
                    let mut n = [0u8; 32];
                    n[..8].copy_from_slice(&(nonces.len() as u64).to_le_bytes());
                    nonces.push((n, NonceState::Issued { vm_id: format!("vm-{vm}"), expires_at: now + 30 }));
                }
                Op::Allowlist(which) => {
                    let epoch = current.as_ref().map_or(1, |a| a.epoch + 1);
                    current = allowlist(which, epoch);
                }
                Op::Request { nonce, vm, late, bad_evidence, bad_binding, other_image } => {
                    let measurement = if other_image { OTHER } else { IMAGE };
                    let vm_id = format!("vm-{vm}");
                    let idx = usize::from(nonce);
                    let (n, state) = match nonces.get(idx) {
                        Some((n, s)) => (*n, Some(s.clone())),
                        None => ([0xee; 32], None),
                    };
                    let evidence = if bad_evidence { vec![snp::Reason::ReportSignatureInvalid] } else { vec![] };
                    let before = vms.get(&vm_id).cloned();
                    let d = decide(&Request {
                        now: if late { now + 1_000 } else { now },
                        vm_id: &vm_id,
                        nonce: state.as_ref(),
                        vm: before.as_ref(),
                        report_data: if bad_binding { [0; 64] } else { [1; 64] },
                        expected_report_data: [1; 64],
                        evidence: &evidence,
                        measurement: Some(&measurement),
                        allowlist: current.as_ref(),
                    });
                    // Commit what the decision says, as the store would, before "answering".
                    if d.spend_nonce {
                        nonces[idx].1 = NonceState::Spent;
                    }
                    if let Ok(new) = &d.outcome {
                        let old = before.expect("released for a known VM");
                        prop_assert!(!old.terminated, "released for a terminated VM");
                        prop_assert_eq!(new.boot_counter, old.boot_counter + 1);
                        prop_assert!(!late && !bad_evidence && !bad_binding);
                        let listed = current.as_ref().is_some_and(|a| {
                            a.measurements.iter().any(|m| m.as_slice() == measurement)
                        });
                        prop_assert!(listed, "released an image outside the allowlist in force");
                        *releases_per_nonce.entry(n).or_default() += 1;
                        vms.insert(vm_id.clone(), new.clone());
                    }
                    // Whatever else is wrong, the allowlist's verdict is among the reasons.
                    let why = match &current {
                        None => Some(Denial::NoAllowlist),
                        Some(a) if !a.measurements.iter().any(|m| m.as_slice() == measurement) => {
                            Some(Denial::MeasurementWithdrawn)
                        }
                        Some(_) => None,
                    };
                    if let Some(why) = why {
                        prop_assert!(matches!(&d.outcome, Err(r) if r.contains(&why)), "{:?}", d.outcome);
                    }
                }
                Op::Terminate { vm } => {
                    if let Some(v) = vms.get_mut(&format!("vm-{vm}")) {
                        v.terminated = true;
                    }
                }
            }
            prop_assert!(releases_per_nonce.values().all(|&c| c <= 1), "a nonce released twice");
        }
    }
}
