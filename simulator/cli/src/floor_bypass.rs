//! Relaxing the broker's policy floor through an order (invariant 9), over the wire: a genuine
//! host relays a genuine operator-signed order whose policy allows debug guests (whose memory
//! the host can read). The broker's floor forbids debug, so the order is refused at
//! registration with `policy_below_floor` and no key is ever made for it.

use crate::demo::{LiveAttack, order};
use crate::fleet_mesh::{self, FleetMesh};
use aws_lc_rs::signature::Ed25519KeyPair;
use guest_agent::client::Broker;
use kbs::client::{OrderError, Remote, send_order};

/// Sends the debug-allowing order for `chip_id` and `image` as a host certified by the mesh CA.
pub async fn debug_order(
    broker: &Broker,
    mesh: &FleetMesh,
    operator: &Ed25519KeyPair,
    chip_id: &[u8; 64],
    image: &[u8; 48],
) -> Result<LiveAttack, String> {
    let now = crate::demo::now();
    let host = mesh
        .ca
        .issue(
            "miner-floor",
            &fleet_mesh::host_ip(97),
            &["infra"],
            mesh::cert::Role::Host,
            now.saturating_sub(60),
            now + 3600,
        )
        .map_err(|e| format!("miner-floor: {e}"))?;
    let id = mesh::transport::Identity::from_pem(
        host.issued.cert_pem.as_bytes(),
        host.issued.key_pem.as_bytes(),
    )?;
    let remote = Remote {
        addr: broker.addr,
        server_name: broker.server_name.clone(),
        ca: broker.ca_der.clone().into(),
        client_chain: id.chain,
        client_key: id.key,
    };
    let mut o = order("vm-floor-bypass", 0, chip_id, image);
    o.policy = "version = 1\n[guest_policy]\nallow_debug = true\n".into();
    let (denied, reason) = match send_order(remote, false, o.sign(operator)).await {
        Ok(vm) => (false, format!("registered {vm}")),
        Err(OrderError::Refused { code, .. }) => (true, code),
        Err(e @ OrderError::Transport(_)) => (true, e.to_string()),
    };
    Ok(LiveAttack {
        name: "live-policy-floor-bypass",
        denied,
        reason,
        expected: "policy_below_floor",
    })
}
