//! The VM's disk: LUKS2 with AES-256-XTS under a 512-bit volume key that the key broker
//! generated. The key is random, so the keyslot uses a cheap PBKDF (no argon2 on every boot), and
//! every boot unlocks by volume key directly; the keyslot exists so that an operator with the key
//! can open the disk with the `cryptsetup` CLI (`--key-file`).

use libcryptsetup_rs::consts::flags::{CryptActivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat};
use libcryptsetup_rs::{CryptInit, CryptPbkdfType, Either, LibcryptErr, TokenInput};
use std::fmt;
use std::path::Path;
use zeroize::Zeroizing;

/// Bytes of an AES-256-XTS volume key.
pub const VOLUME_KEY_LEN: usize = 64;
/// The LUKS2 token type Attesta writes.
pub const TOKEN_TYPE: &str = "attesta";

/// A volume key. Zeroized on drop; its `Debug` shows nothing.
pub struct VolumeKey(Zeroizing<[u8; VOLUME_KEY_LEN]>);

impl VolumeKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<VolumeKey, LuksError> {
        let arr: [u8; VOLUME_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| LuksError::KeyLength(bytes.len()))?;
        Ok(VolumeKey(Zeroizing::new(arr)))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

/// What is on a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskState {
    /// No LUKS header: a first boot.
    Blank,
    /// A LUKS2 header with this UUID.
    Luks2 { uuid: String },
}

/// What Attesta records in the LUKS2 header (no secrets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskLabel {
    pub vm_id: String,
    pub generation: u64,
}

/// Why the disk could not be formatted, checked or unlocked. Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("volume key must be {VOLUME_KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    #[error("cannot open the disk {path}: {why}")]
    Open { path: String, why: String },
    #[error("the disk already has a LUKS header; refusing to format it again")]
    AlreadyFormatted,
    #[error("the disk has a LUKS header that is not LUKS2")]
    NotLuks2,
    #[error("the volume key does not open this disk")]
    WrongKey,
    #[error(
        "device-mapper is not available here (no /dev/mapper/control): the key was verified but the disk cannot be activated"
    )]
    DeviceMapperUnavailable,
    #[error("libcryptsetup failed to {op}: {why}")]
    Cryptsetup { op: &'static str, why: String },
}

fn cs(op: &'static str) -> impl Fn(LibcryptErr) -> LuksError {
    move |e| LuksError::Cryptsetup {
        op,
        why: e.to_string(),
    }
}

fn errno(e: &LibcryptErr) -> Option<i32> {
    match e {
        LibcryptErr::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// libcryptsetup prints its own messages to stderr; our errors already say what went wrong, so
/// its messages are dropped (they never contain keys, but the console is the operator's).
#[allow(unsafe_code)]
mod quiet {
    use libcryptsetup_rs::consts::vals::CryptLogLevel;

    fn drop_message(_level: CryptLogLevel, _msg: &str, _data: Option<&mut ()>) {}
    libcryptsetup_rs::c_logging_callback!(callback, (), drop_message);

    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| libcryptsetup_rs::set_log_callback::<()>(Some(callback), None));
    }
}

fn init(path: &Path) -> Result<libcryptsetup_rs::CryptDevice, LuksError> {
    quiet::install();
    CryptInit::init(path).map_err(|e| LuksError::Open {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Whether the disk is blank or LUKS2.
pub fn probe(path: &Path) -> Result<DiskState, LuksError> {
    let mut dev = init(path)?;
    match dev.context_handle().load::<()>(None, None) {
        Ok(()) => {}
        // EINVAL: no LUKS header at all.
        Err(e) if errno(&e) == Some(libc_einval()) => return Ok(DiskState::Blank),
        Err(e) => return Err(cs("read the LUKS header")(e)),
    }
    if dev
        .format_handle()
        .get_type()
        .map_err(cs("read the header type"))?
        != EncryptionFormat::Luks2
    {
        return Err(LuksError::NotLuks2);
    }
    let uuid = dev
        .status_handle()
        .get_uuid()
        .map_err(cs("read the UUID"))?;
    Ok(DiskState::Luks2 {
        uuid: uuid.to_string(),
    })
}

const fn libc_einval() -> i32 {
    22
}

/// PBKDF2-SHA256 with the minimum iterations and no benchmark: the passphrase is the 512-bit
/// random volume key, so stretching it adds nothing but boot time.
fn cheap_pbkdf() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".to_string()),
        time_ms: 0,
        iterations: 1000,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// Formats a blank disk as LUKS2 (aes-xts-plain64, 512-bit key) with `key` as its volume key,
/// a keyslot whose passphrase is the key itself (cheap PBKDF2: the key is uniformly random), and
/// an Attesta token. Refuses a disk that already has a LUKS header.
pub fn format(path: &Path, key: &VolumeKey, label: &DiskLabel) -> Result<String, LuksError> {
    if probe(path)? != DiskState::Blank {
        return Err(LuksError::AlreadyFormatted);
    }
    let mut dev = init(path)?;
    let pbkdf = cheap_pbkdf();
    // Before formatting too, so the volume-key digest is not benchmarked for a second either.
    dev.settings_handle()
        .set_pbkdf_type(&pbkdf)
        .map_err(cs("set the PBKDF"))?;
    dev.context_handle()
        .format::<()>(
            EncryptionFormat::Luks2,
            ("aes", "xts-plain64"),
            None,
            Either::Left(key.as_bytes()),
            None,
        )
        .map_err(cs("format LUKS2"))?;
    dev.settings_handle()
        .set_pbkdf_type(&pbkdf)
        .map_err(cs("set the PBKDF"))?;
    let slot = dev
        .keyslot_handle()
        .add_by_key(
            None,
            Some(Either::Left(key.as_bytes())),
            key.as_bytes(),
            CryptVolumeKey::empty(),
        )
        .map_err(cs("add the keyslot"))?;
    let token = serde_json::json!({
        "type": TOKEN_TYPE,
        "keyslots": [slot.to_string()],
        "vm_id": label.vm_id,
        "generation": label.generation,
    });
    dev.token_handle()
        .json_set(TokenInput::AddToken(&token))
        .map_err(cs("write the Attesta token"))?;
    let uuid = dev
        .status_handle()
        .get_uuid()
        .map_err(cs("read the UUID"))?;
    Ok(uuid.to_string())
}

/// Checks that `key` is this disk's volume key, without activating anything.
pub fn verify_key(path: &Path, key: &VolumeKey) -> Result<(), LuksError> {
    let mut dev = init(path)?;
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(|e| {
            if errno(&e) == Some(libc_einval()) {
                LuksError::NotLuks2
            } else {
                cs("read the LUKS header")(e)
            }
        })?;
    dev.volume_key_handle()
        .verify(key.as_bytes())
        .map_err(|e| match errno(&e) {
            Some(1) | Some(22) => LuksError::WrongKey, // EPERM / EINVAL: digest mismatch
            _ => cs("verify the volume key")(e),
        })
}

/// The Attesta token of a formatted disk.
pub fn label(path: &Path) -> Result<Option<DiskLabel>, LuksError> {
    let mut dev = init(path)?;
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(cs("read the LUKS header"))?;
    for t in 0..32u32 {
        let Ok(j) = dev.token_handle().json_get(t) else {
            continue;
        };
        if j.get("type").and_then(|v| v.as_str()) == Some(TOKEN_TYPE) {
            return Ok(Some(DiskLabel {
                vm_id: j
                    .get("vm_id")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
                generation: j.get("generation").and_then(|v| v.as_u64()).unwrap_or(0),
            }));
        }
    }
    Ok(None)
}

/// Unlocks the disk as `/dev/mapper/{name}` by volume key (no PBKDF). The key is verified
/// first, so a wrong key is reported as such even where device-mapper is missing.
pub fn unlock(path: &Path, name: &str, key: &VolumeKey) -> Result<(), LuksError> {
    verify_key(path, key)?;
    if !Path::new("/dev/mapper/control").exists() {
        return Err(LuksError::DeviceMapperUnavailable);
    }
    let mut dev = init(path)?;
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(cs("read the LUKS header"))?;
    dev.activate_handle()
        .activate_by_volume_key(Some(name), Some(key.as_bytes()), CryptActivate::empty())
        .map_err(|e| match errno(&e) {
            // EOPNOTSUPP / ENODEV / ENOENT: device-mapper cannot be initialised here.
            Some(95) | Some(19) | Some(2) => LuksError::DeviceMapperUnavailable,
            _ => cs("activate the disk")(e),
        })
}
