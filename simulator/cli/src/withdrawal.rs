//! What the operator withdraws takes effect at once, driven over the wire: a VM registered and
//! released under one allowlist is denied its next boot once a newer allowlist without its image
//! is installed into the running broker.

use crate::demo::{LiveAttack, Stack, StackOptions, order, stack_with};
use guest_agent::client::{ClientError, fetch};
use proto::order::{Allowlist, ORDER_VERSION};
use serde_bytes::ByteBuf;
use simulator::{Chip, GuestLaunch, Pki};
use std::path::Path;

/// A broker of its own in `dir` (so the demo's fleet keeps its image): register, release, then
/// allowlist epoch 2 without the image, and boot again.
pub async fn image_withdrawn(
    dir: &Path,
    root: &Pki,
    chip: &Chip,
    image: [u8; 48],
) -> Result<LiveAttack, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    } = stack_with(dir, StackOptions::trusting(root, image)).await?;
    let vm = "vm-withdrawn";
    let now = crate::demo::now();
    kbs.register(
        &order(vm, 0, &chip.config.chip_id, &image).sign(&operator),
        now,
    )
    .await
    .map_err(|e| format!("{vm}: {e}"))?;
    let guest = chip.launch(GuestLaunch {
        measurement: image,
        ..Default::default()
    });
    fetch(&broker, vm, &guest)
        .await
        .map_err(|e| format!("{vm}: the first boot under epoch 1 failed: {e}"))?;
    let epoch2 = Allowlist {
        v: ORDER_VERSION,
        epoch: 2,
        measurements: vec![ByteBuf::from(vec![0x77; 48])],
    };
    let allowlist_pub: [u8; 32] = {
        use aws_lc_rs::signature::KeyPair;
        allowlist_key
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| "the allowlist key is not Ed25519".to_string())?
    };
    kbs.set_allowlist(&epoch2.sign(&allowlist_key), &allowlist_pub, now)
        .await
        .map_err(|e| format!("allowlist epoch 2: {e}"))?;
    let (denied, reason) = match fetch(&broker, vm, &guest).await {
        Err(ClientError::Denied(reasons)) => (true, reasons.join(", ")),
        Err(other) => (true, other.to_string()),
        Ok(_) => (false, "released".into()),
    };
    Ok(LiveAttack {
        name: "live-image-withdrawn-from-the-allowlist",
        denied,
        reason,
        expected: "measurement_withdrawn",
    })
}
