//! Backups as data (no IO): the manifest that describes one backup of a VM's disk, which
//! chunks a new backup must upload (only those that changed since the last one), the objects
//! it lives in, and which backups and packs retention lets go.
//!
//! **Layout.** A disk is cut into fixed chunks (`chunk_bytes`, 8 MiB by default). A backup
//! uploads the chunks that differ from the previous backup's, and are not all zeros, as one
//! *pack* object, each chunk one part of a multipart upload. Its *manifest* names, for every
//! chunk, the pack and offset that hold it (or that it is zeros) and its SHA-256, and the
//! disk's digest (SHA-256 over the chunks' SHA-256s). Object names under the configured prefix:
//! `<prefix>/<vm_id>/packs/<backup>` and `<prefix>/<vm_id>/manifests/<backup>.json`, where
//! `<backup>` is the backup's sequence number, 10 digits, so names sort by age.
//!
//! **What the hashes are for.** They find a chunk that was damaged or swapped in storage or on
//! the way, and a restore that is incomplete. They are not a signature: whoever can write the
//! bucket (the miner) can write a consistent manifest for other bytes. What protects the
//! tenant is that a disk is LUKS2 ciphertext whose key only the broker releases, to an
//! attested VM the order allows; a miner can give a VM an older disk, backed up or not, as
//! it can with the disk on its own machine.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The manifest format's version.
pub const VERSION: u32 = 1;
/// Chunks smaller than S3's smallest multipart part (5 MiB) would not upload as parts.
pub const MIN_CHUNK: u64 = 5 << 20;
/// The largest chunk (and so part): bounds the memory a backup or restore holds (four chunks
/// in flight) and what a manifest from the bucket can make the agent allocate.
pub const MAX_CHUNK: u64 = 512 << 20;
/// S3 allows 10,000 parts per upload, and a pack is one upload: a disk has at most this many
/// chunks ([`chunk_for`] grows the chunk for large disks), so even a first backup fits.
pub const MAX_PARTS: usize = 10_000;
/// At most this many chunks per disk, as [`MAX_PARTS`].
pub const MAX_CHUNKS: u64 = MAX_PARTS as u64;
/// Largest manifest read back (its JSON): about 150 bytes a chunk.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Where one chunk's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// The pack: a backup's sequence number (that backup's or an earlier one's).
    pub pack: u64,
    /// Byte offset in the pack.
    pub offset: u64,
    /// SHA-256 of the chunk, hex.
    pub sha256: String,
}

impl ChunkRef {
    /// The bytes of the pack that hold a chunk of `len` bytes (checked: a manifest comes from
    /// the bucket).
    pub fn range(&self, len: u64) -> Option<std::ops::Range<u64>> {
        Some(self.offset..self.offset.checked_add(len)?)
    }
}

/// One backup of one VM's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub vm_id: String,
    /// 1, 2, … per VM; also the name of this backup and of its pack.
    pub seq: u64,
    /// Unix seconds when it was taken.
    pub created_at: u64,
    pub disk_bytes: u64,
    pub chunk_bytes: u64,
    /// The disk's digest, hex: SHA-256 over every chunk's SHA-256 in disk order (a zero
    /// chunk's is that of its zeros).
    pub disk_root: String,
    /// Bytes this backup uploaded (its pack's size).
    pub uploaded_bytes: u64,
    /// One entry per chunk, in disk order; `None` when the chunk is all zeros.
    pub chunks: Vec<Option<ChunkRef>>,
}

/// Why a manifest or a plan is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("manifest is not valid JSON of version {VERSION}: {0}")]
    Json(String),
    #[error("manifest is for VM {found}, not {wanted}")]
    OtherVm { wanted: String, found: String },
    #[error("manifest {0}")]
    Shape(String),
    #[error("chunk size {0} bytes is not a multiple of 1 MiB from 5 MiB to 512 MiB")]
    ChunkSize(u64),
    #[error("disk of {disk} bytes at {chunk}-byte chunks is more than {MAX_CHUNKS} chunks")]
    TooManyChunks { disk: u64, chunk: u64 },
    #[error("{0} changed chunks are more than one upload's {MAX_PARTS} parts")]
    TooManyParts(usize),
}

/// Chunks in flight at once, up or down: four, or fewer so that at most 512 MiB are held.
pub fn in_flight(chunk: u64) -> usize {
    (MAX_CHUNK / chunk.max(1)).clamp(1, 4) as usize
}

/// The chunk size for a disk of `disk` bytes: the configured one, or larger (whole MiB) where
/// the disk would otherwise have more than [`MAX_CHUNKS`] chunks.
pub fn chunk_for(disk: u64, configured: u64) -> Result<u64, PlanError> {
    let least = disk.div_ceil(MAX_CHUNKS).div_ceil(1 << 20) << 20;
    let chunk = configured.max(least);
    chunk_count(disk, chunk)?;
    Ok(chunk)
}

/// The number of chunks a disk of `disk` bytes has at `chunk` bytes each.
pub fn chunk_count(disk: u64, chunk: u64) -> Result<u64, PlanError> {
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) || !chunk.is_multiple_of(1 << 20) {
        return Err(PlanError::ChunkSize(chunk));
    }
    let n = disk.div_ceil(chunk);
    if n > MAX_CHUNKS {
        return Err(PlanError::TooManyChunks { disk, chunk });
    }
    Ok(n)
}

/// The length of chunk `i` (the last one may be short).
pub fn chunk_len(disk: u64, chunk: u64, i: u64) -> u64 {
    disk.saturating_sub(i.saturating_mul(chunk)).min(chunk)
}

/// The object names of a VM's backups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    /// Everything of this VM's (what terminate deletes).
    pub fn vm(&self, vm_id: &str) -> String {
        format!("{}/{vm_id}", self.prefix)
    }
    pub fn manifests(&self, vm_id: &str) -> String {
        format!("{}/{vm_id}/manifests", self.prefix)
    }
    pub fn manifest(&self, vm_id: &str, seq: u64) -> String {
        format!("{}/{vm_id}/manifests/{seq:010}.json", self.prefix)
    }
    pub fn pack(&self, vm_id: &str, seq: u64) -> String {
        format!("{}/{vm_id}/packs/{seq:010}", self.prefix)
    }
    /// The sequence number of a manifest's object name, if it is one of this VM's.
    pub fn manifest_seq(&self, vm_id: &str, name: &str) -> Option<u64> {
        let rest = name
            .strip_prefix(&self.manifests(vm_id))?
            .strip_prefix('/')?;
        ten_digits(rest.strip_suffix(".json")?)
    }
    /// The sequence number of a pack's object name, if it is one of this VM's.
    pub fn pack_seq(&self, vm_id: &str, name: &str) -> Option<u64> {
        ten_digits(name.strip_prefix(&format!("{}/{vm_id}/packs/", self.prefix))?)
    }
}

/// A backup's number as object names carry it: exactly 10 digits.
fn ten_digits(s: &str) -> Option<u64> {
    (s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// What a disk's chunks are now, as read: `None` for all zeros, else the SHA-256.
pub type Scan = Vec<Option<[u8; 32]>>;

/// The next backup: its manifest, and which chunks (disk indexes, ascending) go in its pack,
/// in that order, as parts 0, 1, ….
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub manifest: Manifest,
    pub upload: Vec<u64>,
}

/// Plans backup `seq` of a disk scanned as `scan` against the last backup `previous` (if any):
/// a chunk unchanged since then keeps its place in an earlier pack; a changed one goes in
/// this backup's pack; a zero chunk is stored nowhere. A previous backup of another geometry
/// (size, chunk size) is not built on: everything is uploaded.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    vm_id: &str,
    seq: u64,
    created_at: u64,
    disk_bytes: u64,
    chunk_bytes: u64,
    disk_root: [u8; 32],
    scan: &Scan,
    previous: Option<&Manifest>,
) -> Result<Plan, PlanError> {
    let n = chunk_count(disk_bytes, chunk_bytes)?;
    if scan.len() as u64 != n {
        return Err(PlanError::Shape(format!(
            "scan has {} chunks, the disk {n}",
            scan.len()
        )));
    }
    let previous = previous.filter(|p| p.disk_bytes == disk_bytes && p.chunk_bytes == chunk_bytes);
    let mut chunks = Vec::with_capacity(scan.len());
    let mut upload = Vec::new();
    let mut offset = 0u64;
    for (i, h) in scan.iter().enumerate() {
        let Some(h) = h else {
            chunks.push(None);
            continue;
        };
        let hex = hex::encode(h);
        let kept = previous
            .and_then(|p| p.chunks.get(i))
            .and_then(|c| c.as_ref())
            .filter(|c| c.sha256 == hex);
        match kept {
            Some(c) => chunks.push(Some(c.clone())),
            None => {
                upload.push(i as u64);
                chunks.push(Some(ChunkRef {
                    pack: seq,
                    offset,
                    sha256: hex,
                }));
                offset += chunk_len(disk_bytes, chunk_bytes, i as u64);
            }
        }
    }
    if upload.len() > MAX_PARTS {
        return Err(PlanError::TooManyParts(upload.len()));
    }
    Ok(Plan {
        manifest: Manifest {
            version: VERSION,
            vm_id: vm_id.to_string(),
            seq,
            created_at,
            disk_bytes,
            chunk_bytes,
            disk_root: hex::encode(disk_root),
            uploaded_bytes: offset,
            chunks,
        },
        upload,
    })
}

impl Manifest {
    /// Reads a manifest fetched from the bucket, for `vm_id`, and checks that it describes a
    /// disk consistently (every reference inside the disk's packs, in order, no overlap), so
    /// that a restore may follow it without further checks. Never panics.
    pub fn parse(bytes: &[u8], vm_id: &str) -> Result<Manifest, PlanError> {
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(PlanError::Shape(format!(
                "of {} bytes is too large",
                bytes.len()
            )));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| PlanError::Json(e.to_string()))?;
        if m.version != VERSION {
            return Err(PlanError::Json(format!("version {}", m.version)));
        }
        if m.vm_id != vm_id {
            return Err(PlanError::OtherVm {
                wanted: vm_id.into(),
                found: m.vm_id,
            });
        }
        m.check()?;
        Ok(m)
    }

    /// The consistency `parse` checks.
    pub fn check(&self) -> Result<(), PlanError> {
        let bad = |s: String| Err(PlanError::Shape(s));
        if self.seq == 0 {
            return bad("has sequence number 0".into());
        }
        let n = chunk_count(self.disk_bytes, self.chunk_bytes)?;
        if self.chunks.len() as u64 != n {
            return bad(format!(
                "lists {} chunks for a disk of {n}",
                self.chunks.len()
            ));
        }
        if !is_sha256_hex(&self.disk_root) {
            return bad("has a disk hash that is not SHA-256 hex".into());
        }
        // This backup's own pack holds its chunks end to end in disk order; an earlier pack
        // still holds them in disk order, with gaps where a chunk changed since.
        let mut next: BTreeMap<u64, u64> = BTreeMap::new();
        for (i, c) in self.chunks.iter().enumerate() {
            let Some(c) = c else { continue };
            if c.pack == 0 || c.pack > self.seq {
                return bad(format!("chunk {i} names pack {}", c.pack));
            }
            if !is_sha256_hex(&c.sha256) {
                return bad(format!("chunk {i} has a hash that is not SHA-256 hex"));
            }
            let len = chunk_len(self.disk_bytes, self.chunk_bytes, i as u64);
            let Some(end) = c.range(len).map(|r| r.end) else {
                return bad(format!("chunk {i} ends beyond any pack"));
            };
            let at = next.entry(c.pack).or_insert(0);
            let misplaced = if c.pack == self.seq {
                c.offset != *at
            } else {
                c.offset < *at
            };
            if misplaced {
                return bad(format!(
                    "chunk {i} is at offset {} of pack {}, before the end of the one before it ({at})",
                    c.offset, c.pack
                ));
            }
            *at = end;
        }
        if next.get(&self.seq).copied().unwrap_or(0) != self.uploaded_bytes {
            return bad(format!(
                "says {} bytes were uploaded, its chunks {}",
                self.uploaded_bytes,
                next.get(&self.seq).copied().unwrap_or(0)
            ));
        }
        Ok(())
    }

    /// The packs this backup reads.
    pub fn packs(&self) -> BTreeSet<u64> {
        self.chunks.iter().flatten().map(|c| c.pack).collect()
    }

    /// Bytes a restore writes that are not zeros.
    pub fn data_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| chunk_len(self.disk_bytes, self.chunk_bytes, i as u64))
            .sum()
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What retention removes: every backup but the newest `keep` (at least 1), and every pack no
/// kept backup reads. `backups` maps each backup's sequence number to the packs it reads;
/// `packs` are the packs found in the bucket (a pack without a manifest, from an upload that
/// completed just before a crash, goes once a newer backup exists; one numbered as the newest
/// or later may be an upload still under way).
pub fn retention(
    keep: usize,
    backups: &BTreeMap<u64, BTreeSet<u64>>,
    packs: &BTreeSet<u64>,
) -> (Vec<u64>, Vec<u64>) {
    let keep = keep.max(1);
    let mut drop: Vec<u64> = backups.keys().rev().skip(keep).copied().collect();
    drop.reverse();
    let kept: BTreeSet<u64> = backups
        .iter()
        .rev()
        .take(keep)
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    let newest = backups.keys().next_back().copied().unwrap_or(0);
    let orphans = packs
        .iter()
        .filter(|p| !kept.contains(p) && **p < newest)
        .copied()
        .collect();
    (drop, orphans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn h(b: u8) -> Option<[u8; 32]> {
        Some([b; 32])
    }

    #[test]
    fn a_first_backup_uploads_every_chunk_that_is_not_zero() {
        let scan = vec![h(1), None, h(2), h(1)];
        let p = plan("vm", 1, 5, 32 * MIB, 8 * MIB, [9; 32], &scan, None).unwrap();
        assert_eq!(p.upload, vec![0, 2, 3]);
        assert_eq!(p.manifest.uploaded_bytes, 24 * MIB);
        assert_eq!(p.manifest.chunks[1], None);
        assert_eq!(p.manifest.chunks[3].as_ref().unwrap().offset, 16 * MIB);
        p.manifest.check().unwrap();
    }

    #[test]
    fn the_next_backup_uploads_only_what_changed() {
        let first = plan(
            "vm",
            1,
            5,
            32 * MIB,
            8 * MIB,
            [9; 32],
            &vec![h(1), None, h(2), h(3)],
            None,
        )
        .unwrap();
        let p = plan(
            "vm",
            2,
            6,
            32 * MIB,
            8 * MIB,
            [8; 32],
            &vec![h(1), h(4), h(2), None],
            Some(&first.manifest),
        )
        .unwrap();
        assert_eq!(p.upload, vec![1]);
        assert_eq!(p.manifest.uploaded_bytes, 8 * MIB);
        assert_eq!(p.manifest.chunks[0], first.manifest.chunks[0]);
        assert_eq!(p.manifest.chunks[3], None);
        assert_eq!(p.manifest.packs(), BTreeSet::from([1, 2]));
        p.manifest.check().unwrap();
        // Another geometry is not built on.
        let resized = plan(
            "vm",
            3,
            7,
            40 * MIB,
            8 * MIB,
            [8; 32],
            &vec![h(1), h(4), h(2), None, None],
            Some(&p.manifest),
        )
        .unwrap();
        assert_eq!(resized.upload, vec![0, 1, 2]);
    }

    #[test]
    fn a_short_last_chunk_and_bad_geometry() {
        assert_eq!(chunk_len(21 * MIB, 8 * MIB, 2), 5 * MIB);
        assert_eq!(chunk_count(21 * MIB, 8 * MIB), Ok(3));
        assert_eq!(
            chunk_count(MIB, 4 * MIB),
            Err(PlanError::ChunkSize(4 * MIB))
        );
        assert_eq!(
            chunk_count(MIB, 5 * MIB + 1),
            Err(PlanError::ChunkSize(5 * MIB + 1))
        );
        assert!(matches!(
            chunk_count(u64::MAX, 8 * MIB),
            Err(PlanError::TooManyChunks { .. })
        ));
        assert_eq!(
            chunk_count(MIB, 1024 * MIB),
            Err(PlanError::ChunkSize(1024 * MIB))
        );
        // Large disks get larger chunks, so that a first backup fits one upload.
        assert_eq!(chunk_for(20 << 30, 8 * MIB), Ok(8 * MIB));
        assert_eq!(chunk_for(1 << 40, 8 * MIB), Ok(105 * MIB));
        assert_eq!(chunk_count(1 << 40, 105 * MIB), Ok(9987));
        assert!(chunk_for(64 << 40, 8 * MIB).is_err());
        assert!(matches!(
            plan("vm", 1, 0, 16 * MIB, 8 * MIB, [0; 32], &vec![h(1)], None),
            Err(PlanError::Shape(_))
        ));
    }

    #[test]
    fn manifests_that_do_not_add_up_are_refused() {
        let good = plan(
            "vm",
            2,
            5,
            24 * MIB,
            8 * MIB,
            [9; 32],
            &vec![h(1), h(2), h(3)],
            None,
        )
        .unwrap()
        .manifest;
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(Manifest::parse(&json, "vm").unwrap(), good);
        assert!(matches!(
            Manifest::parse(&json, "other"),
            Err(PlanError::OtherVm { .. })
        ));
        let bad = |f: &dyn Fn(&mut Manifest)| {
            let mut m = good.clone();
            f(&mut m);
            Manifest::parse(&serde_json::to_vec(&m).unwrap(), "vm").unwrap_err()
        };
        bad(&|m| m.version = 2);
        bad(&|m| m.seq = 0);
        bad(&|m| m.chunks.pop().map(|_| ()).unwrap_or(()));
        bad(&|m| m.chunks[1].as_mut().unwrap().offset = 0);
        bad(&|m| m.chunks[1].as_mut().unwrap().pack = 3);
        bad(&|m| m.chunks[1].as_mut().unwrap().pack = 0);
        bad(&|m| m.chunks[2].as_mut().unwrap().sha256 = "AB".repeat(32));
        bad(&|m| m.disk_root = "00".into());
        bad(&|m| m.uploaded_bytes = 1);
        bad(&|m| m.chunk_bytes = 3 * MIB);
        bad(&|m| m.chunk_bytes = 4096 * MIB);
        bad(&|m| m.chunks[0].as_mut().unwrap().offset = u64::MAX - 1);
        assert!(matches!(
            Manifest::parse(b"{\"version\":1}", "vm"),
            Err(PlanError::Json(_))
        ));
        let mut extra: serde_json::Value = serde_json::to_value(&good).unwrap();
        extra["more"] = serde_json::json!(1);
        assert!(Manifest::parse(&serde_json::to_vec(&extra).unwrap(), "vm").is_err());
    }

    #[test]
    fn object_names_read_back_only_as_this_vms() {
        let n = Names {
            prefix: "attesta".into(),
        };
        assert_eq!(
            n.manifest("vm-1", 7),
            "attesta/vm-1/manifests/0000000007.json"
        );
        assert_eq!(n.manifest_seq("vm-1", &n.manifest("vm-1", 7)), Some(7));
        assert_eq!(n.pack_seq("vm-1", &n.pack("vm-1", 12)), Some(12));
        assert_eq!(n.manifest_seq("vm-1", &n.manifest("vm-2", 7)), None);
        assert_eq!(n.manifest_seq("vm", &n.manifest("vm-1", 7)), None);
        assert_eq!(
            n.manifest_seq("vm-1", "attesta/vm-1/manifests/7.json"),
            None
        );
        assert_eq!(n.pack_seq("vm-1", "attesta/vm-1/packs/000000001x"), None);
    }

    #[test]
    fn retention_keeps_the_newest_and_every_pack_they_read() {
        let backups = BTreeMap::from([
            (1, BTreeSet::from([1])),
            (2, BTreeSet::from([1, 2])),
            (3, BTreeSet::from([1, 3])),
        ]);
        let packs = BTreeSet::from([1, 2, 3, 4]);
        let (drop, orphans) = retention(2, &backups, &packs);
        assert_eq!(drop, vec![1]);
        // Pack 4 is newer than every manifest: an upload in progress, not an orphan.
        assert_eq!(orphans, Vec::<u64>::new());
        let (drop, orphans) = retention(1, &backups, &packs);
        assert_eq!(drop, vec![1, 2]);
        assert_eq!(orphans, vec![2]);
        // Pack 3 unread by backup 3 (another host's upload of that number): not yet an orphan.
        let (_, orphans) = retention(1, &BTreeMap::from([(3, BTreeSet::from([1]))]), &packs);
        assert_eq!(orphans, vec![2]);
        let (drop, _) = retention(0, &backups, &packs);
        assert_eq!(drop, vec![1, 2]);
    }

    fn scans() -> impl Strategy<Value = Vec<Vec<Option<u8>>>> {
        prop::collection::vec(prop::collection::vec(prop::option::of(0u8..4), 6), 1..6)
    }

    proptest! {
        /// Any series of backups: each manifest is consistent, describes exactly the disk
        /// scanned, and its chunks are in packs that retention of the newest keeps.
        #[test]
        fn every_backup_in_a_series_describes_its_disk(series in scans(), keep in 1usize..4) {
            let mut done: Vec<Manifest> = Vec::new();
            for (k, s) in series.iter().enumerate() {
                let scan: Scan = s.iter().map(|c| c.map(|b| [b + 1; 32])).collect();
                let p = plan("vm", k as u64 + 1, 0, 48 * MIB, 8 * MIB, [0; 32], &scan, done.last()).unwrap();
                p.manifest.check().unwrap();
                let json = serde_json::to_vec(&p.manifest).unwrap();
                prop_assert_eq!(&Manifest::parse(&json, "vm").unwrap(), &p.manifest);
                for (i, c) in p.manifest.chunks.iter().enumerate() {
                    prop_assert_eq!(c.as_ref().map(|c| c.sha256.clone()), scan[i].map(hex::encode));
                }
                for i in &p.upload {
                    prop_assert_eq!(p.manifest.chunks[*i as usize].as_ref().unwrap().pack, k as u64 + 1);
                }
                done.push(p.manifest);
            }
            let backups: BTreeMap<u64, BTreeSet<u64>> = done.iter().map(|m| (m.seq, m.packs())).collect();
            let packs: BTreeSet<u64> = (1..=done.len() as u64).collect();
            let (drop, orphans) = retention(keep, &backups, &packs);
            for m in done.iter().filter(|m| !drop.contains(&m.seq)) {
                for p in m.packs() {
                    prop_assert!(!orphans.contains(&p));
                }
            }
            prop_assert_eq!(done.len() - drop.len(), keep.min(done.len()));
        }

        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::parse(&bytes, "vm");
        }

        /// A manifest from the bucket with any numbers in it: parsed without a panic, and if
        /// accepted, every chunk's range is within u64 and its pack is an earlier backup's.
        #[test]
        fn a_hostile_manifests_numbers_never_overflow(
            disk in any::<u64>(), chunk in any::<u64>(), seq in any::<u64>(),
            refs in prop::collection::vec(prop::option::of((any::<u64>(), any::<u64>())), 0..8),
        ) {
            let m = Manifest {
                version: VERSION, vm_id: "vm".into(), seq, created_at: 0, disk_bytes: disk,
                chunk_bytes: chunk, disk_root: "00".repeat(32), uploaded_bytes: 0,
                chunks: refs.iter().map(|r| r.map(|(pack, offset)| ChunkRef {
                    pack, offset, sha256: "11".repeat(32),
                })).collect(),
            };
            if let Ok(m) = Manifest::parse(&serde_json::to_vec(&m).unwrap(), "vm") {
                for (i, c) in m.chunks.iter().enumerate() {
                    if let Some(c) = c {
                        prop_assert!(c.range(chunk_len(m.disk_bytes, m.chunk_bytes, i as u64)).is_some());
                        prop_assert!(c.pack >= 1 && c.pack <= m.seq);
                    }
                }
            }
        }
    }
}
