//! The volume key from its brokers: one broker (or its replicas), or a key split across
//! independent brokers (`[split]` in `guest.toml`). n-of-n: one share from each, XORed. k-of-n
//! (k < n): every share on the VM's first boot (the guest deals the key and its wraps, see
//! [`crate::split`]), any k on later boots (they open their set's wrap). Each broker is attested
//! to on its own: its own connection, guest key and report.

use crate::client::{Broker, Released};
use crate::config::GuestConfig;
use crate::luks::{self, DiskState};
use crate::unlock::{UnlockError, fetch_with_retry};
use snp::device::GuestDevice;
use std::time::{Duration, Instant};

/// Fetches one share from each group of brokers in turn (each attested to on its own: its own
/// connection, guest key and report) and combines them: the volume key is the XOR of all the
/// shares. The first group's release gives the generation, the boot configuration and the mesh
/// certificate (only it is asked to certify the mesh key). The boot counter is the highest of
/// all, so a blank disk is formatted only when every broker says this is the VM's first
/// release. Any share missing fails the whole fetch: fail closed.
pub async fn fetch_shares(
    groups: &[Vec<Broker>],
    vm_id: &str,
    device: &impl GuestDevice,
    timeout: Duration,
    mesh_key: Option<&[u8; 32]>,
) -> Result<Released, UnlockError> {
    let start = Instant::now();
    let mut combined: Option<Released> = None;
    for (i, group) in groups.iter().enumerate() {
        // The first is given the whole timeout (its error then names it), the others what is left.
        let left = if i == 0 {
            timeout
        } else {
            timeout.saturating_sub(start.elapsed())
        };
        let mesh = if i == 0 { mesh_key } else { None };
        let share = fetch_with_retry(group, vm_id, device, left, mesh).await?;
        combined = Some(match combined {
            None => share,
            Some(acc) => combine(acc, &share)?,
        });
    }
    let key = combined.ok_or_else(|| UnlockError::Config("no broker to ask".into()))?;
    if key.volume_key.iter().all(|&b| b == 0) {
        return Err(UnlockError::Shares(
            "the shares cancel out (the same broker twice?)".into(),
        ));
    }
    Ok(key)
}

/// Every broker of a split must say the same of what it releases besides its share: the boot
/// configuration (SSH keys and the like, placed in the booted system — one operator alone must
/// not be able to add a key of its own) and the generation.
fn agree(a: &Released, b: &Released) -> Result<(), UnlockError> {
    if a.boot_config != b.boot_config {
        return Err(UnlockError::Shares(
            "the brokers' boot configurations differ (each order must carry the same)".into(),
        ));
    }
    if a.generation != b.generation {
        return Err(UnlockError::Shares(format!(
            "the brokers' key generations differ ({} and {})",
            a.generation, b.generation
        )));
    }
    Ok(())
}

/// XORs a share into the key (in place: no other copy of the key is made).
fn combine(mut acc: Released, share: &Released) -> Result<Released, UnlockError> {
    agree(&acc, share)?;
    if share.volume_key.len() != acc.volume_key.len() {
        return Err(UnlockError::Shares(format!(
            "a share of {} bytes against one of {}",
            share.volume_key.len(),
            acc.volume_key.len()
        )));
    }
    for (k, s) in acc.volume_key.iter_mut().zip(share.volume_key.iter()) {
        *k ^= s;
    }
    acc.boot_counter = acc.boot_counter.max(share.boot_counter);
    Ok(acc)
}

/// The volume key as the configuration says to obtain it and — on a k-of-n split's first boot —
/// the wraps the token must carry. The disk is looked at first: blank (a first boot) needs every
/// share, a formatted one any k.
pub async fn obtain(
    cfg: &GuestConfig,
    groups: &[Vec<Broker>],
    device: &impl GuestDevice,
    timeout: Duration,
    mesh_key: Option<&[u8; 32]>,
) -> Result<(Released, Option<serde_json::Value>), UnlockError> {
    let n = groups.len();
    let k = cfg.split.as_ref().map_or(n, |s| s.threshold);
    if k >= n {
        let r = fetch_shares(groups, &cfg.vm_id, device, timeout, mesh_key).await?;
        return Ok((r, None));
    }
    let blank = matches!(luks::probe(&cfg.disk.path)?, DiskState::Blank);
    let want = if blank { n } else { k };
    let got = gather(groups, &cfg.vm_id, device, timeout, mesh_key, want).await?;
    let Some((_, first)) = got.first() else {
        return Err(UnlockError::Shares("no broker released a share".into()));
    };
    for (_, other) in &got[1..] {
        agree(first, other)?;
    }
    // The wraps are bound to the key's generation as the first broker to answer states it (a
    // split's brokers all keep generation 1: a broker with another fails the boot closed).
    let generation = first.generation;
    let bad = |e: crate::split::SplitError| UnlockError::Shares(e.to_string());
    let (key, wraps) = if blank {
        let all: Vec<&[u8]> = got.iter().map(|(_, r)| &r.volume_key[..]).collect();
        let (key, wraps) = crate::split::deal(k, &all, &cfg.vm_id, generation).map_err(bad)?;
        (key, Some(wraps))
    } else {
        let wraps = luks::split_wraps(&cfg.disk.path)?.ok_or_else(|| {
            UnlockError::Shares("the disk's token holds no wraps for this split".into())
        })?;
        let have: Vec<(usize, &[u8])> = got.iter().map(|(i, r)| (*i, &r.volume_key[..])).collect();
        let key = crate::split::open(&wraps, k, n, &have, &cfg.vm_id, generation).map_err(bad)?;
        (key, None)
    };
    let boot_counter = got.iter().map(|(_, r)| r.boot_counter).max().unwrap_or(0);
    let mut released = got
        .into_iter()
        .next()
        .map(|(_, r)| r)
        .ok_or_else(|| UnlockError::Shares("no broker released a share".into()))?;
    // The first release to arrive carries the rest (its boot configuration; the mesh
    // certificate when it is [broker]'s). Not a first boot unless every share says so.
    released.volume_key = key;
    released.boot_counter = boot_counter;
    Ok((released, wraps))
}

/// Asks the groups in turn until `want` of them released a share, each with an equal part of
/// the time left (an unreachable broker cannot use up the others' time). A broker that refuses
/// or cannot be reached is passed over; fewer than `want` shares fail closed, saying why.
pub async fn gather(
    groups: &[Vec<Broker>],
    vm_id: &str,
    device: &impl GuestDevice,
    timeout: Duration,
    mesh_key: Option<&[u8; 32]>,
    want: usize,
) -> Result<Vec<(usize, Released)>, UnlockError> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut why = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        // Enough already, or too few left to reach `want`.
        if got.len() >= want || got.len() + (groups.len() - i) < want {
            break;
        }
        let slice = timeout.saturating_sub(start.elapsed()) / (groups.len() - i) as u32;
        let mesh = if i == 0 { mesh_key } else { None };
        match fetch_with_retry(group, vm_id, device, slice, mesh).await {
            Ok(r) => got.push((i, r)),
            Err(e) => {
                tracing::warn!(broker = i, error = %e, "no share from this broker");
                why.push(format!("broker {i}: {e}"));
            }
        }
    }
    if got.len() < want {
        return Err(UnlockError::Shares(format!(
            "{} of the {want} shares needed ({})",
            got.len(),
            why.join("; ")
        )));
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(key: &[u8], boot_counter: u64) -> Released {
        Released {
            volume_key: zeroize::Zeroizing::new(key.to_vec()),
            boot_config: b"first".to_vec(),
            generation: 1,
            boot_counter,
            evidence_rtt: Duration::ZERO,
            mesh_cert: vec![],
            mesh_chain: vec![],
        }
    }

    #[test]
    fn shares_combine_by_xor_and_the_highest_boot_counter_wins() {
        let c = combine(release(&[0b1100; 64], 1), &release(&[0b1010; 64], 3)).unwrap();
        assert_eq!(&c.volume_key[..], &[0b0110; 64][..]);
        assert_eq!(
            c.boot_counter, 3,
            "not a first boot unless every broker says so"
        );
        assert_eq!(
            c.boot_config, b"first",
            "the first broker's boot configuration"
        );
        let e = combine(release(&[1; 64], 1), &release(&[1; 32], 1)).unwrap_err();
        assert!(matches!(e, UnlockError::Shares(_)), "{e}");
        // One operator's boot configuration (an SSH key of its own, say) is not taken alone.
        let mut other = release(&[2; 64], 1);
        other.boot_config = b"ssh-ed25519 AAAA operator".to_vec();
        let e = combine(release(&[1; 64], 1), &other).unwrap_err();
        assert!(e.to_string().contains("boot configurations differ"), "{e}");
        other.boot_config = b"first".to_vec();
        other.generation = 2;
        let e = combine(release(&[1; 64], 1), &other).unwrap_err();
        assert!(e.to_string().contains("generations differ"), "{e}");
    }
}
