//! The launch gate: before the agent launches a VM it checks the operator's signed order and
//! computes the launch measurement of exactly what it is about to start (firmware, kernel,
//! initrd, command line, vCPU count and model, guest features — the spec), refusing to launch
//! when that digest is not among the order's measurements. A VM the broker would deny anyway
//! is never started, and a spec that drifted from the order is caught on the host.

use crate::spec::Checked;
use measure::{Firmware, LaunchFiles, digest_of_files_with};
use proto::order::{DocumentError, Order, OrderKind};

/// Why a launch (or a terminate) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("order: {0}")]
    Order(#[from] DocumentError),
    #[error("the order is a {found} order, expected a {expected} order")]
    WrongKind {
        found: &'static str,
        expected: &'static str,
    },
    #[error("the order is for VM {order:?} but the spec is for {spec:?}")]
    VmMismatch { order: String, spec: String },
    #[error("cannot measure the launch: {0}")]
    Measure(String),
    #[error(
        "launch measurement {digest} is not among the order's {allowed} allowed measurement(s): refusing to launch"
    )]
    NotAllowed { digest: String, allowed: usize },
}

fn kind(k: OrderKind) -> &'static str {
    match k {
        OrderKind::Register => "register",
        OrderKind::Terminate => "terminate",
    }
}

/// The launch digest of what `spec` would start.
pub fn launch_digest(c: &Checked) -> Result<[u8; 48], GateError> {
    launch_digest_with(c, Firmware::AsBuilt)
}

/// As [`launch_digest`], the firmware taken as `fw` says (a simulated host's PSP assumes a
/// hashes table; see [`Firmware`]).
pub fn launch_digest_with(c: &Checked, fw: Firmware) -> Result<[u8; 48], GateError> {
    let s = &c.spec;
    digest_of_files_with(
        &LaunchFiles {
            ovmf: &s.boot.ovmf,
            kernel: s.boot.kernel.as_deref(),
            initrd: s.boot.initrd.as_deref(),
            append: s.boot.cmdline.as_deref(),
            vcpus: s.vcpus,
            vcpu_type: &s.vcpu_type,
            guest_features: c.guest_features,
        },
        fw,
    )
    .map_err(GateError::Measure)
}

/// A register order verified against the operator keys, with the launch digest it allows.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub order: Order,
    pub digest: [u8; 48],
}

/// Checks the order (signature, expiry, kind, VM id) and the spec's launch digest against it.
pub fn admit(
    c: &Checked,
    order_doc: &[u8],
    operator_keys: &[[u8; 32]],
    now: u64,
) -> Result<Admitted, GateError> {
    admit_with(c, order_doc, operator_keys, now, Firmware::AsBuilt)
}

/// As [`admit`], measuring as `fw` says.
pub fn admit_with(
    c: &Checked,
    order_doc: &[u8],
    operator_keys: &[[u8; 32]],
    now: u64,
    fw: Firmware,
) -> Result<Admitted, GateError> {
    let order = Order::verify(order_doc, operator_keys, now)?;
    if order.kind != OrderKind::Register {
        return Err(GateError::WrongKind {
            found: kind(order.kind),
            expected: "register",
        });
    }
    if order.vm_id != c.spec.vm_id {
        return Err(GateError::VmMismatch {
            order: order.vm_id,
            spec: c.spec.vm_id.clone(),
        });
    }
    let digest = launch_digest_with(c, fw)?;
    if !order.measurements.iter().any(|m| m.as_slice() == digest) {
        return Err(GateError::NotAllowed {
            digest: hex::encode(digest),
            allowed: order.measurements.len(),
        });
    }
    Ok(Admitted { order, digest })
}

/// Checks an operator-signed terminate order for `vm_id` (the host destroys and wipes only on one).
pub fn terminate_order(
    vm_id: &str,
    order_doc: &[u8],
    operator_keys: &[[u8; 32]],
    now: u64,
) -> Result<Order, GateError> {
    let order = Order::verify(order_doc, operator_keys, now)?;
    if order.kind != OrderKind::Terminate {
        return Err(GateError::WrongKind {
            found: kind(order.kind),
            expected: "terminate",
        });
    }
    if order.vm_id != vm_id {
        return Err(GateError::VmMismatch {
            order: order.vm_id,
            spec: vm_id.into(),
        });
    }
    Ok(order)
}
