//! The disk side of a backup: one pass over the disk for each chunk's hash (zeros noted, not
//! hashed as data) and the disk's digest, and a chunk read back for its upload.

use super::plan::{self, Manifest, chunk_len};
use super::{BackupError, disk};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// SHA-256 of `len` zero bytes, from a fixed buffer (a manifest names the length).
fn zero_hash(len: u64) -> [u8; 32] {
    let zeros = [0u8; 64 << 10];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// The disk's digest as the manifest records it: SHA-256 over every chunk's SHA-256 in disk
/// order, a zero chunk's being that of its zeros (cheaper than hashing the disk again, and as
/// binding). None if a chunk's hash is not hex.
pub(super) fn root_of(m: &Manifest) -> Option<String> {
    let mut h = Sha256::new();
    let mut zero: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    for (i, c) in m.chunks.iter().enumerate() {
        match c {
            Some(c) => h.update(hex::decode(&c.sha256).ok()?),
            None => {
                let len = chunk_len(m.disk_bytes, m.chunk_bytes, i as u64);
                h.update(*zero.entry(len).or_insert_with(|| zero_hash(len)));
            }
        }
    }
    Some(hex::encode(h.finalize()))
}

/// Reads the whole disk once: its size, each chunk's hash (`None` for zeros) and the digest.
/// Stops (`Cancelled`) when `cancel` is set.
pub(super) fn scan_disk(
    path: &Path,
    chunk: u64,
    cancel: &AtomicBool,
) -> Result<(u64, plan::Scan, [u8; 32]), BackupError> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(disk(path))?;
    let size = f.metadata().map_err(disk(path))?.len();
    let n = plan::chunk_count(size, chunk)?;
    let mut scan = Vec::with_capacity(n as usize);
    let mut root = Sha256::new();
    let mut buf = vec![0u8; chunk as usize];
    let mut zero: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    for i in 0..n {
        if cancel.load(Ordering::SeqCst) {
            return Err(BackupError::Cancelled);
        }
        let len = chunk_len(size, chunk, i) as usize;
        f.read_exact(&mut buf[..len]).map_err(disk(path))?;
        let b = &buf[..len];
        if b.iter().all(|x| *x == 0) {
            scan.push(None);
            root.update(
                *zero
                    .entry(len as u64)
                    .or_insert_with(|| zero_hash(len as u64)),
            );
        } else {
            let h: [u8; 32] = Sha256::digest(b).into();
            root.update(h);
            scan.push(Some(h));
        }
    }
    Ok((size, scan, root.finalize().into()))
}

/// Chunk `i` of the disk, which must still be `size` bytes.
pub(super) fn read_chunk(
    path: &Path,
    size: u64,
    chunk: u64,
    i: u64,
) -> Result<Vec<u8>, BackupError> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(path).map_err(disk(path))?;
    if f.metadata().map_err(disk(path))?.len() != size {
        return Err(BackupError::Changed(i));
    }
    let mut buf = vec![0u8; chunk_len(size, chunk, i) as usize];
    f.read_exact_at(&mut buf, i * chunk).map_err(disk(path))?;
    Ok(buf)
}
