//! `attesta-guest keepalive`: the running VM's lease. On a schedule (`[keepalive]`) the agent
//! re-attests to the broker with a fresh report bound to a new connection and to the mesh key
//! that `unlock` placed on tmpfs (`[mesh] dir`), signs the connection's exporter with that key,
//! and replaces `node.crt` with the renewed certificate, which the mesh node picks up without a
//! restart. A refusal is logged and tried again: if the broker keeps refusing (the image
//! withdrawn, the firmware below the floor, the VM terminated or revoked), the certificate ends
//! and the mesh closes the VM's connections. Tenants' challenges handed over with a renewal are
//! answered with reports bound to their nonces. Nothing here touches the disk or its key.

use crate::client::{Broker, ClientError, Renewed, attest, renew};
use crate::config::GuestConfig;
use crate::unlock::{UnlockError, brokers, place_mesh_identity_cert};
use aws_lc_rs::signature::Ed25519KeyPair;
use snp::device::GuestDevice;
use std::path::Path;
use std::time::Duration;

/// The mesh key `unlock` placed (`node.key`, PKCS#8 PEM on tmpfs).
pub fn mesh_key(dir: &Path) -> Result<Ed25519KeyPair, UnlockError> {
    let path = dir.join("node.key");
    let pem = zeroize::Zeroizing::new(
        std::fs::read(&path)
            .map_err(|e| UnlockError::Config(format!("{}: {e}", path.display())))?,
    );
    let der = snp::certs::pem_blocks(&pem)
        .ok()
        .and_then(|mut b| (b.len() == 1).then(|| zeroize::Zeroizing::new(b.remove(0))))
        .ok_or_else(|| UnlockError::Config(format!("{}: not one PEM key", path.display())))?;
    Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|_| UnlockError::Config(format!("{}: not an Ed25519 key", path.display())))
}

/// One renewal: each of `[broker]`'s addresses in turn until one answers; a signed refusal
/// ends it at once. On success `node.crt` is replaced.
pub async fn renew_once(
    cfg: &GuestConfig,
    device: &impl GuestDevice,
) -> Result<Renewed, UnlockError> {
    let dir = &cfg
        .mesh
        .as_ref()
        .ok_or_else(|| UnlockError::Config("keepalive needs a [mesh] section".into()))?
        .dir;
    let key = mesh_key(dir)?;
    let list: Vec<Broker> = brokers(cfg)?;
    let mut last = None;
    for b in &list {
        match renew(b, &cfg.vm_id, device, &key).await {
            Ok(r) => {
                place_mesh_identity_cert(dir, &r.mesh_cert, &r.mesh_chain)?;
                // Tenants asked this VM to attest with nonces of their own.
                for nonce in &r.challenges {
                    match attest(b, &cfg.vm_id, device, &key, nonce).await {
                        Ok(()) => tracing::info!("a tenant's challenge answered"),
                        Err(e) => tracing::warn!(error = %e, "a tenant's challenge not answered"),
                    }
                }
                return Ok(r);
            }
            Err(e @ ClientError::Connect(_)) => {
                tracing::warn!(broker = %b.addr, error = %e, "the key broker is unreachable");
                last = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last
        .map(UnlockError::from)
        .unwrap_or_else(|| UnlockError::Config("no broker to ask".into())))
}

/// Renews now and then every `interval_secs` (after a failure, every `retry_secs`); with
/// `once`, a single renewal (its outcome is the result).
pub async fn run_with(
    cfg: &GuestConfig,
    device: &impl GuestDevice,
    once: bool,
) -> Result<(), UnlockError> {
    loop {
        let wait = match renew_once(cfg, device).await {
            Ok(r) => {
                tracing::info!(vm_id = %cfg.vm_id, not_after = r.not_after, "lease renewed");
                cfg.keepalive.interval_secs
            }
            Err(e) if once => return Err(e),
            Err(e) => {
                tracing::warn!(vm_id = %cfg.vm_id, error = %e, "lease not renewed");
                cfg.keepalive.retry_secs
            }
        };
        if once {
            return Ok(());
        }
        tokio::time::sleep(jittered(wait)).await;
    }
}

/// `secs` less up to a tenth, at random: VMs booted together do not renew together.
fn jittered(secs: u64) -> Duration {
    let mut r = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut r);
    let tenth_ms = secs.max(1) * 100;
    let off = u64::from(u16::from_le_bytes(r)) % tenth_ms.max(1);
    Duration::from_millis(secs.max(1) * 1000 - off)
}

/// The whole keepalive with the configured device.
pub async fn run(cfg: &GuestConfig, once: bool) -> Result<(), UnlockError> {
    crate::with_device!(cfg, dev => run_with(cfg, dev, once).await)
}

#[cfg(test)]
mod tests {
    #[test]
    fn waits_are_spread_over_the_last_tenth() {
        for secs in [1u64, 60, 900] {
            for _ in 0..50 {
                let d = super::jittered(secs).as_millis() as u64;
                assert!(d <= secs * 1000 && d > secs * 900, "{secs}: {d}");
            }
        }
        assert!(super::jittered(0).as_millis() > 0);
    }
}
