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
use zeroize::Zeroizing;

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
/// share, a formatted one any k. A share that does not fit (a broker releasing a wrong share,
/// or another boot configuration) makes the guest ask the brokers not asked yet: one bad
/// broker must not stop a VM that k good ones could open.
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
    let start = Instant::now();
    let vm_id = &cfg.vm_id;
    if matches!(luks::probe(&cfg.disk.path)?, DiskState::Blank) {
        let got = gather(groups, 0, vm_id, device, timeout, mesh_key, n).await?;
        let refs: Vec<&Released> = got.iter().map(|(_, r)| r).collect();
        for other in &refs[1..] {
            agree(refs[0], other)?;
        }
        // The wraps are bound to the key's generation (a split's brokers keep generation 1).
        let generation = refs[0].generation;
        let all: Vec<&[u8]> = refs.iter().map(|r| &r.volume_key[..]).collect();
        let (key, wraps) = crate::split::deal(k, &all, vm_id, generation)
            .map_err(|e| UnlockError::Shares(e.to_string()))?;
        return Ok((with_key(got, key, &[])?, Some(wraps)));
    }
    let wraps = luks::split_wraps(&cfg.disk.path)?.ok_or_else(|| {
        UnlockError::Shares("the disk's token holds no wraps for this split".into())
    })?;
    let mut got = gather(groups, 0, vm_id, device, timeout, mesh_key, k).await?;
    let mut asked = got.last().map_or(n, |(i, _)| i + 1);
    loop {
        match open_with(&wraps, k, n, &got, vm_id) {
            Ok((key, set)) => return Ok((with_key(got, key, &set)?, None)),
            Err(e) if asked >= n => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "the shares at hand do not open the disk; asking the other brokers");
                let left = timeout.saturating_sub(start.elapsed());
                // The rest, whatever they give (none may be needed if one more fits).
                got.extend(gather(groups, asked, vm_id, device, left, None, 0).await?);
                asked = n;
            }
        }
    }
}

/// The key from the first set of k shares at hand that agree (boot configuration, generation)
/// and open their wrap; the set it came from.
fn open_with(
    wraps: &serde_json::Value,
    k: usize,
    n: usize,
    got: &[(usize, Released)],
    vm_id: &str,
) -> Result<(Zeroizing<Vec<u8>>, Vec<usize>), UnlockError> {
    let mut last = UnlockError::Shares(format!("{} of the {k} shares needed", got.len()));
    for set in crate::split::subsets(got.len(), k) {
        let members: Vec<&(usize, Released)> = set.iter().map(|&j| &got[j]).collect();
        if let Some(e) = members[1..]
            .iter()
            .find_map(|(_, r)| agree(&members[0].1, r).err())
        {
            last = e;
            continue;
        }
        let have: Vec<(usize, &[u8])> = members
            .iter()
            .map(|(i, r)| (*i, &r.volume_key[..]))
            .collect();
        match crate::split::open(wraps, k, n, &have, vm_id, members[0].1.generation) {
            Ok(key) => return Ok((key, members.iter().map(|(i, _)| *i).collect())),
            Err(e) => last = UnlockError::Shares(e.to_string()),
        }
    }
    Err(last)
}

/// The release that carries the rest — the first of `set` (or of all) to arrive: its boot
/// configuration; the mesh certificate when it is [broker]'s — with the volume key in place of
/// its share. Not a first boot unless every share says so.
fn with_key(
    got: Vec<(usize, Released)>,
    key: Zeroizing<Vec<u8>>,
    set: &[usize],
) -> Result<Released, UnlockError> {
    let boot_counter = got.iter().map(|(_, r)| r.boot_counter).max().unwrap_or(0);
    let mut released = got
        .into_iter()
        .find(|(i, _)| set.is_empty() || set.contains(i))
        .map(|(_, r)| r)
        .ok_or_else(|| UnlockError::Shares("no broker released a share".into()))?;
    released.volume_key = key;
    released.boot_counter = boot_counter;
    Ok(released)
}

/// Asks the groups from `from` on, in turn, until `want` of them released a share (0: all of
/// them), each with an equal part of the time left (an unreachable broker cannot use up the
/// others' time). A broker that refuses or cannot be reached is passed over; fewer than `want`
/// shares fail closed, saying why.
pub async fn gather(
    groups: &[Vec<Broker>],
    from: usize,
    vm_id: &str,
    device: &impl GuestDevice,
    timeout: Duration,
    mesh_key: Option<&[u8; 32]>,
    want: usize,
) -> Result<Vec<(usize, Released)>, UnlockError> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut why = Vec::new();
    let all = want == 0;
    for (i, group) in groups.iter().enumerate().skip(from) {
        // Enough already, or too few left to reach `want`.
        if !all && (got.len() >= want || got.len() + (groups.len() - i) < want) {
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
