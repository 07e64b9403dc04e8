//! What the unit tests of several modules share.

use proto::order::{ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;

/// A register order for VM `vm` (one image, one chip) carrying `policy`.
pub(crate) fn order(policy: &str) -> Order {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: "vm".into(),
        tenant: "t".into(),
        measurements: vec![ByteBuf::from(vec![1; 48])],
        policy: policy.into(),
        chip_ids: vec![ByteBuf::from(vec![2; 64])],
        not_after: 0,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
}
