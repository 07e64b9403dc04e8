//! The unlock benchmark of real VMs (issue 16's item 7; `simulator` feature only, so no
//! production agent carries it): right after the agent has mapped the root by volume key, the
//! same disk is unlocked a second way — as a passphrase-only LUKS2 disk would be, with an
//! argon2id keyslot on cryptsetup's defaults — and both are timed in the same VM.
//!
//! The disk itself is never changed: the passphrase keyslot is added to a copy of the header
//! held in memory (a memfd, as [`luks::unlock`] holds its judged copy), and that copy is
//! activated read-only and shared over the same data device, then removed.

use crate::header::{self, Expect};
use crate::luks::{self, DiskLabel, LuksError, MemHeader, VolumeKey, cs};
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat, LuksType};
use libcryptsetup_rs::{CryptInit, CryptSettingsHandle, Either};
use std::path::Path;
use std::time::Instant;

/// What one passphrase unlock cost, and the keyslot's parameters (cryptsetup's defaults as
/// benchmarked in this VM).
#[derive(Debug)]
pub struct PassphraseUnlock {
    pub ms: f64,
    pub kdf: &'static str,
    pub time_cost: u32,
    pub memory_kib: u32,
    pub threads: u32,
}

/// Adds an argon2id passphrase keyslot (cryptsetup's LUKS2 defaults) to an in-memory copy of
/// `path`'s header and times unlocking the disk through it, as `name` (read-only, shared with
/// the agent's own mapping), which is removed again. The copy is judged as the agent's unlock
/// judges it: the host may have changed the disk since.
pub fn passphrase_unlock(
    path: &Path,
    key: &VolumeKey,
    label: &DiskLabel,
    name: &str,
) -> Result<PassphraseUnlock, LuksError> {
    let meta = luks::read_metadata(path)?;
    header::check(
        &meta,
        &Expect {
            vm_id: &label.vm_id,
            generation: label.generation,
        },
    )?
    .verify_mac(key.as_bytes())?;
    let mem = MemHeader::new(&meta)?;
    let mut pass = zeroize::Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(pass.as_mut()).map_err(|_| LuksError::Cryptsetup {
        op: "make a passphrase",
        why: "no randomness".into(),
    })?;
    let open = || -> Result<libcryptsetup_rs::CryptDevice, LuksError> {
        let mut dev = CryptInit::init_with_data_device(Either::Right((mem.path(), path)))
            .map_err(cs("open the header copy"))?;
        dev.context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .map_err(cs("read the header copy"))?;
        Ok(dev)
    };
    let mut dev = open()?;
    let defaults = CryptSettingsHandle::get_pbkdf_default(&LuksType::Luks2)
        .map_err(cs("read cryptsetup's PBKDF defaults"))?;
    let slot = luks::add_keyslot(&mut dev, &defaults, key, pass.as_ref())?;
    let used = dev
        .keyslot_handle()
        .get_pbkdf(slot)
        .map_err(cs("read the keyslot's PBKDF"))?;
    drop(dev);
    // A fresh context, as a boot would have: the KDF runs inside the timed call.
    let mut dev = open()?;
    let t = Instant::now();
    dev.activate_handle()
        .activate_by_passphrase(
            Some(name),
            Some(slot),
            pass.as_ref(),
            CryptActivate::READONLY | CryptActivate::SHARED,
        )
        .map_err(cs("unlock by passphrase"))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    dev.activate_handle()
        .deactivate(name, CryptDeactivate::empty())
        .map_err(cs("remove the benchmark's mapping"))?;
    Ok(PassphraseUnlock {
        ms,
        kdf: match used.type_ {
            CryptKdf::Pbkdf2 => "pbkdf2",
            CryptKdf::Argon2I => "argon2i",
            CryptKdf::Argon2Id => "argon2id",
        },
        time_cost: used.iterations,
        memory_kib: used.max_memory_kb,
        threads: used.parallel_threads,
    })
}
