//! A volume key held k-of-n by independent brokers (k < n), sans IO. Each broker releases only
//! its own random share; no broker deals. On the VM's first boot every share is needed: the
//! guest makes a random volume key and, for every set of k brokers, seals it under a key derived
//! from those k shares (HKDF-SHA256, then AES-256-GCM, the VM and set bound as associated data).
//! The sealed copies ("wraps") live in the disk's Attesta token, covered by the header's MAC
//! like everything else in it. On later boots any k shares open their set's wrap, and the
//! header's key binding then checks the result against the whole header, wraps included.
//!
//! What the host sees is the wraps: each needs k shares, and each share needs its broker's own
//! attestation of this VM. Crypto-shredding: once n − k + 1 brokers have destroyed their
//! shares, no set of k is left. (n-of-n needs no wraps: the key is the XOR of the shares.)

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, KeyType, Salt};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// Bytes of a volume key (and of each share).
pub const KEY_LEN: usize = 64;
/// Brokers a split may name, at most (as many as a client may list).
pub const MAX_SHARES: usize = proto::brokers::MAX_BROKERS;
const TAG_LEN: usize = 16;

/// Why the shares do not open the volume key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error(
        "a split needs 2 <= k < n <= {MAX_SHARES} and at most {MAX_WRAPS} sets of k, not {k}-of-{n}"
    )]
    Shape { k: usize, n: usize },
    #[error("share {0} is not {KEY_LEN} bytes")]
    ShareLength(usize),
    #[error("the disk's token holds no wraps for this split")]
    NoWraps,
    #[error("the disk's token says {found}, not {expected}")]
    OtherSplit { found: String, expected: String },
    #[error("no wrap is for a set of the shares obtained ({0:?})")]
    NoSet(Vec<usize>),
    #[error("the wrap for brokers {0:?} does not open with their shares")]
    Open(Vec<usize>),
    #[error("no randomness")]
    Random,
}

/// Every set of `k` of `0..n`, in lexicographic order: the order the wraps are written in.
pub fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn go(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            go(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    if k <= n {
        go(0, n, k, &mut Vec::new(), &mut out);
    }
    out
}

/// Wraps a header holds at most: each is about 230 bytes of the LUKS2 JSON area's 12 KiB,
/// which also holds the keyslot, digest and segment (2-of-8 needs 28, 3-of-7 would need 35).
pub const MAX_WRAPS: usize = 32;

fn shape(k: usize, n: usize) -> Result<(), SplitError> {
    if k >= 2 && k < n && n <= MAX_SHARES && subsets(n, k).len() <= MAX_WRAPS {
        Ok(())
    } else {
        Err(SplitError::Shape { k, n })
    }
}

/// Whether a k-of-n split (k < n) can be written: 2 <= k, n <= 8, at most [`MAX_WRAPS`] sets.
pub fn fits(k: usize, n: usize) -> bool {
    shape(k, n).is_ok()
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The AEAD key of one set: HKDF over its shares, in order, bound to the VM and the set.
fn set_key(
    shares: &[&[u8]],
    set: &[usize],
    vm_id: &str,
    generation: u64,
) -> Result<LessSafeKey, SplitError> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(KEY_LEN * shares.len()));
    for s in shares {
        ikm.extend_from_slice(s);
    }
    let info = context(set, vm_id, generation);
    let mut out = Zeroizing::new([0u8; 32]);
    Salt::new(HKDF_SHA256, b"attesta-split/1")
        .extract(&ikm)
        .expand(&[&info], Len(32))
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| SplitError::Random)?;
    UnboundKey::new(&AES_256_GCM, &out[..])
        .map(LessSafeKey::new)
        .map_err(|_| SplitError::Random)
}

/// What each wrap is bound to: the VM, its key's generation and the set.
fn context(set: &[usize], vm_id: &str, generation: u64) -> Vec<u8> {
    let mut c = b"attesta-split-wrap/1\0".to_vec();
    c.extend_from_slice(vm_id.as_bytes());
    c.push(0);
    c.extend_from_slice(&generation.to_be_bytes());
    c.extend(set.iter().map(|&i| i as u8));
    c
}

/// A first boot's volume key, random, and its wraps for every set of `k` of the `shares`
/// (all n, in broker order) as the token's `split` value.
pub fn deal(
    k: usize,
    shares: &[&[u8]],
    vm_id: &str,
    generation: u64,
) -> Result<(Zeroizing<Vec<u8>>, Value), SplitError> {
    let n = shares.len();
    shape(k, n)?;
    if let Some(i) = shares.iter().position(|s| s.len() != KEY_LEN) {
        return Err(SplitError::ShareLength(i));
    }
    let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
    aws_lc_rs::rand::fill(&mut key[..]).map_err(|_| SplitError::Random)?;
    let mut wraps = Vec::new();
    for set in subsets(n, k) {
        let mine: Vec<&[u8]> = set.iter().map(|&i| shares[i]).collect();
        let sealer = set_key(&mine, &set, vm_id, generation)?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SplitError::Random)?;
        // Room for the tag from the start: growing the buffer would leave a copy of the key in
        // freed memory.
        let mut ct = Zeroizing::new(Vec::with_capacity(KEY_LEN + TAG_LEN));
        ct.extend_from_slice(&key);
        sealer
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context(&set, vm_id, generation)),
                &mut *ct,
            )
            .map_err(|_| SplitError::Random)?;
        wraps.push(json!({"set": set, "nonce": hex::encode(nonce), "ct": hex::encode(&*ct)}));
    }
    Ok((key, json!({"k": k, "n": n, "wraps": wraps})))
}

/// The volume key from the token's `split` value and the shares obtained (broker index, share):
/// the first wrap whose set the shares cover.
pub fn open(
    split: &Value,
    k: usize,
    n: usize,
    shares: &[(usize, &[u8])],
    vm_id: &str,
    generation: u64,
) -> Result<Zeroizing<Vec<u8>>, SplitError> {
    check(split).map_err(|_| SplitError::NoWraps)?;
    let (found_k, found_n) = (split["k"].as_u64(), split["n"].as_u64());
    if (found_k, found_n) != (Some(k as u64), Some(n as u64)) {
        return Err(SplitError::OtherSplit {
            found: format!("{}-of-{}", split["k"], split["n"]),
            expected: format!("{k}-of-{n}"),
        });
    }
    let have: Vec<usize> = shares.iter().map(|(i, _)| *i).collect();
    if let Some((i, _)) = shares.iter().find(|(_, s)| s.len() != KEY_LEN) {
        return Err(SplitError::ShareLength(*i));
    }
    let share = |i: usize| shares.iter().find(|(j, _)| *j == i).map(|(_, s)| *s);
    let mut failed = None;
    for w in split["wraps"].as_array().into_iter().flatten() {
        let set: Vec<usize> = w["set"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.as_u64().map(|i| i as usize))
            .collect();
        let Some(mine) = set
            .iter()
            .map(|&i| share(i))
            .collect::<Option<Vec<&[u8]>>>()
        else {
            continue;
        };
        match open_one(w, &mine, &set, vm_id, generation) {
            Some(key) => return Ok(key),
            // Another covered set may still open (a share of this one may be a bad broker's).
            None => failed = Some(SplitError::Open(set)),
        }
    }
    Err(failed.unwrap_or(SplitError::NoSet(have)))
}

/// One wrap opened with its set's shares, if it opens.
fn open_one(
    w: &Value,
    shares: &[&[u8]],
    set: &[usize],
    vm_id: &str,
    generation: u64,
) -> Option<Zeroizing<Vec<u8>>> {
    let nonce = w["nonce"].as_str().and_then(|h| hex::decode(h).ok())?;
    let ct = w["ct"].as_str().and_then(|h| hex::decode(h).ok())?;
    let opener = set_key(shares, set, vm_id, generation).ok()?;
    let nonce = Nonce::try_assume_unique_for_key(&nonce).ok()?;
    let mut buf = Zeroizing::new(ct);
    let plain = opener
        .open_in_place(nonce, Aad::from(context(set, vm_id, generation)), &mut buf)
        .ok()?;
    (plain.len() == KEY_LEN).then(|| Zeroizing::new(plain.to_vec()))
}

/// The token's `split` value has exactly the shape [`deal`] writes: `k`, `n` (2 <= k < n <= 8)
/// and one wrap per set of k, in order, each a 12-byte nonce and an 80-byte sealed key.
pub fn check(v: &Value) -> Result<(), String> {
    let m = v.as_object().ok_or("split is not an object")?;
    let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["k", "n", "wraps"] {
        return Err(format!("split has the fields {keys:?}"));
    }
    let (k, n) = match (m["k"].as_u64(), m["n"].as_u64()) {
        (Some(k), Some(n)) => (k as usize, n as usize),
        _ => return Err("split's k and n are not numbers".into()),
    };
    shape(k, n).map_err(|e| e.to_string())?;
    let wraps = m["wraps"]
        .as_array()
        .ok_or("split's wraps are not a list")?;
    let sets = subsets(n, k);
    if wraps.len() != sets.len() {
        return Err(format!(
            "{} wraps for {k}-of-{n}, not {}",
            wraps.len(),
            sets.len()
        ));
    }
    for (w, set) in wraps.iter().zip(&sets) {
        let o = w.as_object().ok_or("a wrap is not an object")?;
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        if keys != ["ct", "nonce", "set"] || o["set"] != json!(set) {
            return Err(format!("the wrap for {set:?} is not as written"));
        }
        let len = |f: &str| {
            o[f].as_str()
                .and_then(|h| hex::decode(h).ok())
                .map(|b| b.len())
        };
        if len("nonce") != Some(NONCE_LEN) || len("ct") != Some(KEY_LEN + TAG_LEN) {
            return Err(format!("the wrap for {set:?} has the wrong sizes"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8 + 1; KEY_LEN]).collect()
    }

    #[test]
    fn any_k_shares_open_the_key_and_fewer_or_wrong_ones_do_not() {
        let s = shares(3);
        let refs: Vec<&[u8]> = s.iter().map(Vec::as_slice).collect();
        let (key, split) = deal(2, &refs, "vm-1", 1).unwrap();
        assert_eq!(check(&split), Ok(()));
        assert_eq!(split["wraps"].as_array().unwrap().len(), 3);
        for set in subsets(3, 2) {
            let have: Vec<(usize, &[u8])> = set.iter().map(|&i| (i, refs[i])).collect();
            assert_eq!(open(&split, 2, 3, &have, "vm-1", 1).unwrap(), key);
        }
        assert_eq!(
            open(&split, 2, 3, &[(1, refs[1])], "vm-1", 1),
            Err(SplitError::NoSet(vec![1]))
        );
        // A wrong share for its set, another VM, another generation: the wrap does not open.
        let wrong = vec![9u8; KEY_LEN];
        assert_eq!(
            open(&split, 2, 3, &[(0, refs[0]), (1, &wrong)], "vm-1", 1),
            Err(SplitError::Open(vec![0, 1]))
        );
        assert!(open(&split, 2, 3, &[(0, refs[0]), (1, refs[1])], "vm-2", 1).is_err());
        assert!(open(&split, 2, 3, &[(0, refs[0]), (1, refs[1])], "vm-1", 2).is_err());
        assert!(matches!(
            open(&split, 2, 4, &[(0, refs[0]), (1, refs[1])], "vm-1", 1),
            Err(SplitError::OtherSplit { .. })
        ));
    }

    #[test]
    fn only_the_shape_deal_writes_is_accepted() {
        let s = shares(4);
        let refs: Vec<&[u8]> = s.iter().map(Vec::as_slice).collect();
        let (_, good) = deal(3, &refs, "v", 1).unwrap();
        assert_eq!(subsets(4, 3).len(), 4);
        let mut extra = good.clone();
        extra["x"] = json!(1);
        let mut short = good.clone();
        short["wraps"].as_array_mut().unwrap().pop();
        let mut swapped = good.clone();
        swapped["wraps"].as_array_mut().unwrap().swap(0, 1);
        let mut one = good.clone();
        one["k"] = json!(1);
        for bad in [
            extra,
            short,
            swapped,
            one,
            json!([]),
            json!({"k":2,"n":2,"wraps":[]}),
        ] {
            assert!(check(&bad).is_err(), "{bad}");
        }
        assert!(matches!(
            deal(1, &refs, "v", 1),
            Err(SplitError::Shape { .. })
        ));
        assert!(matches!(
            deal(4, &refs, "v", 1),
            Err(SplitError::Shape { .. })
        ));
        assert_eq!(
            deal(2, &[&[1; 64], &[2; 3], &[3; 64]], "v", 1).unwrap_err(),
            SplitError::ShareLength(1)
        );
    }
}
