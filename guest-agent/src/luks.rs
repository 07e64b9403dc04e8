//! The VM's disk: LUKS2 with AES-256-XTS under a 512-bit volume key that the key broker
//! generated. The key is random, so the keyslot uses a cheap PBKDF (no argon2 on every boot), and
//! every boot unlocks by volume key directly; the keyslot exists so that an operator with the key
//! can open the disk with the `cryptsetup` CLI (`--key-file`).
//!
//! The header on the disk is the host's to edit. [`unlock`] therefore reads the metadata area
//! once into memory, judges that copy ([`crate::header`]: exactly what [`format`] writes, bound
//! to the key by a MAC in the Attesta token), and activates from that same copy — a detached
//! header in a memfd — so the disk's header is never read again between the check and the use.

use crate::header::{self, Expect, HeaderError};
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat};
use libcryptsetup_rs::{
    CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either, LibcryptErr,
    TokenInput,
};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Bytes of an AES-256-XTS volume key.
pub const VOLUME_KEY_LEN: usize = 64;
/// The LUKS2 token type Attesta writes.
pub const TOKEN_TYPE: &str = header::TOKEN_TYPE;

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
    #[error("refusing the LUKS2 header: {0}")]
    Header(#[from] HeaderError),
    #[error(
        "libcryptsetup reads the header differently from the agent ({0}); refusing to activate"
    )]
    Differential(String),
}

pub(crate) fn cs(op: &'static str) -> impl Fn(LibcryptErr) -> LuksError {
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

/// Reads the disk's metadata area (the first [`header::DATA_OFFSET`] bytes) into memory: the one
/// copy that is judged and then used.
pub fn read_metadata(path: &Path) -> Result<Vec<u8>, LuksError> {
    let open = |e: std::io::Error| LuksError::Open {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let f = std::fs::File::open(path).map_err(open)?;
    let mut meta = Vec::with_capacity(header::DATA_OFFSET);
    f.take(header::DATA_OFFSET as u64)
        .read_to_end(&mut meta)
        .map_err(open)?;
    if meta.len() < header::DATA_OFFSET {
        return Err(HeaderError::Truncated(meta.len()).into());
    }
    Ok(meta)
}

/// Whether the disk is blank (no LUKS2 header copy where the agent writes one) or not. This
/// judges nothing: [`unlock`] does.
pub fn probe(path: &Path) -> Result<DiskState, LuksError> {
    let meta = read_metadata(path)?;
    if header::is_blank(&meta) {
        return Ok(DiskState::Blank);
    }
    if !meta.starts_with(b"LUKS\xba\xbe") || meta.get(6..8) != Some(&[0, 2]) {
        return Err(LuksError::NotLuks2);
    }
    let uuid = &meta[168..208];
    let end = uuid.iter().position(|&b| b == 0).unwrap_or(uuid.len());
    Ok(DiskState::Luks2 {
        uuid: String::from_utf8_lossy(&uuid[..end]).into_owned(),
    })
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

/// Formats a blank disk as LUKS2 (aes-xts-plain64, 512-bit key, data at 16 MiB, 4096-byte
/// sectors) with `key` as its volume key, a keyslot whose passphrase is the key itself (cheap
/// PBKDF2: the key is uniformly random), and an Attesta token naming the VM and generation and
/// carrying the header's MAC under the key. Refuses a disk that is not blank.
pub fn format(path: &Path, key: &VolumeKey, label: &DiskLabel) -> Result<String, LuksError> {
    format_with(path, key, label, None)
}

/// [`format`], with a k-of-n split's wraps (`crate::split::deal`) kept in the token, under the
/// header's MAC like the rest of it.
pub fn format_with(
    path: &Path,
    key: &VolumeKey,
    label: &DiskLabel,
    split: Option<&serde_json::Value>,
) -> Result<String, LuksError> {
    if !header::is_blank(&read_metadata(path)?) {
        return Err(LuksError::AlreadyFormatted);
    }
    let mut dev = init(path)?;
    let pbkdf = cheap_pbkdf();
    // Before formatting too, so the volume-key digest is not benchmarked for a second either.
    dev.settings_handle()
        .set_pbkdf_type(&pbkdf)
        .map_err(cs("set the PBKDF"))?;
    // Every parameter explicit: the header check expects exactly these, whatever the
    // library's defaults become.
    let params = CryptParamsLuks2 {
        pbkdf: Some(cheap_pbkdf()),
        integrity: None,
        integrity_params: None,
        data_alignment: (header::DATA_OFFSET / 512) as _,
        data_device: None,
        sector_size: header::SECTOR_SIZE as u32,
        label: None,
        subsystem: None,
    };
    let mut params_ref: CryptParamsLuks2Ref<'_> =
        (&params).try_into().map_err(cs("prepare the format"))?;
    dev.context_handle()
        .format(
            EncryptionFormat::Luks2,
            ("aes", "xts-plain64"),
            None,
            Either::Left(key.as_bytes()),
            Some(&mut params_ref),
        )
        .map_err(cs("format LUKS2"))?;
    let slot = add_keyslot(&mut dev, &pbkdf, key, key.as_bytes())?;
    let mut token = serde_json::json!({
        "type": TOKEN_TYPE,
        "keyslots": [slot.to_string()],
        "vm_id": label.vm_id,
        "generation": label.generation,
    });
    if let Some(split) = split {
        token["split"] = split.clone();
    }
    let id = dev
        .token_handle()
        .json_set(TokenInput::AddToken(&token))
        .map_err(cs("write the Attesta token"))?;
    // The MAC covers the metadata as libcryptsetup holds it in memory, less the MAC itself; the
    // token is then rewritten with it. The binary header's fields come from the disk, so the
    // copy read back must match what libcryptsetup wrote (JSON and UUID): a host that edits the
    // header between the write and the read-back cannot have its edit bound to the key.
    let written = dev
        .status_handle()
        .dump_json()
        .map_err(cs("read the metadata"))?;
    let written_uuid = dev
        .status_handle()
        .get_uuid()
        .map_err(cs("read the UUID"))?;
    let meta = read_metadata(path)?;
    let json = header::json_of(&meta)?;
    if json != written || header::uuid_of(&meta) != written_uuid.to_string() {
        return Err(LuksError::Differential(
            "the header read back after formatting is not the one written".into(),
        ));
    }
    let mac = header::compute_mac(&meta, &written, key.as_bytes())?;
    token["mac"] = serde_json::Value::String(mac);
    dev.token_handle()
        .json_set(TokenInput::ReplaceToken(id, &token))
        .map_err(cs("write the Attesta token"))?;
    let uuid = dev
        .status_handle()
        .get_uuid()
        .map_err(cs("read the UUID"))?;
    Ok(uuid.to_string())
}

/// Adds a keyslot opened by `passphrase` for volume key `key`, its KDF `pbkdf`.
pub(crate) fn add_keyslot(
    dev: &mut libcryptsetup_rs::CryptDevice,
    pbkdf: &CryptPbkdfType,
    key: &VolumeKey,
    passphrase: &[u8],
) -> Result<u32, LuksError> {
    dev.settings_handle()
        .set_pbkdf_type(pbkdf)
        .map_err(cs("set the PBKDF"))?;
    dev.keyslot_handle()
        .add_by_key(
            None,
            Some(Either::Left(key.as_bytes())),
            passphrase,
            CryptVolumeKey::empty(),
        )
        .map_err(cs("add the keyslot"))
}

/// Checks with libcryptsetup that `key` is this disk's volume key (the keyslot digest), without
/// judging the header or activating anything. [`unlock`] is what the agent uses.
pub fn verify_key(path: &Path, key: &VolumeKey) -> Result<(), LuksError> {
    let mut dev = init(path)?;
    load_luks2(&mut dev)?;
    verify_digest(&mut dev, key)
}

fn load_luks2(dev: &mut libcryptsetup_rs::CryptDevice) -> Result<(), LuksError> {
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(|e| {
            if errno(&e) == Some(22) {
                LuksError::NotLuks2
            } else {
                cs("read the LUKS header")(e)
            }
        })
}

fn verify_digest(
    dev: &mut libcryptsetup_rs::CryptDevice,
    key: &VolumeKey,
) -> Result<(), LuksError> {
    dev.volume_key_handle()
        .verify(key.as_bytes())
        .map_err(|e| match errno(&e) {
            Some(1) | Some(22) => LuksError::WrongKey, // EPERM / EINVAL: digest mismatch
            _ => cs("verify the volume key")(e),
        })
}

/// The Attesta token of a formatted disk, as its primary header copy says (unjudged).
fn attesta_token(path: &Path) -> Result<Option<serde_json::Value>, LuksError> {
    let json = header::json_of(&read_metadata(path)?)?;
    Ok(json
        .get("tokens")
        .and_then(|t| t.as_object())
        .and_then(|t| {
            t.values()
                .find(|t| t.get("type").and_then(|v| v.as_str()) == Some(TOKEN_TYPE))
        })
        .cloned())
}

/// The VM and generation the disk's Attesta token names (unjudged).
pub fn label(path: &Path) -> Result<Option<DiskLabel>, LuksError> {
    Ok(attesta_token(path)?.map(|t| DiskLabel {
        vm_id: t
            .get("vm_id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        generation: t.get("generation").and_then(|v| v.as_u64()).unwrap_or(0),
    }))
}

/// The wraps of a k-of-n split (`crate::split`) in the disk's Attesta token, unjudged: each is
/// sealed to its set of shares, and the header's MAC is checked with the key they open.
pub fn split_wraps(path: &Path) -> Result<Option<serde_json::Value>, LuksError> {
    Ok(attesta_token(path)?.and_then(|t| t.get("split").cloned()))
}

/// A detached copy of the judged header in an anonymous memory file: what libcryptsetup loads
/// and activates from. Gone when dropped.
pub(crate) struct MemHeader {
    _fd: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl MemHeader {
    #[cfg(feature = "simulator")]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn new(meta: &[u8]) -> Result<MemHeader, LuksError> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        use std::os::fd::AsRawFd;
        let fail = |why: String| LuksError::Cryptsetup {
            op: "hold the header in memory",
            why,
        };
        let fd = memfd_create(c"attesta-luks2-header", MFdFlags::empty())
            .map_err(|e| fail(e.to_string()))?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let mut f = std::fs::File::from(fd.try_clone().map_err(|e| fail(e.to_string()))?);
        f.write_all(meta).map_err(|e| fail(e.to_string()))?;
        Ok(MemHeader { _fd: fd, path })
    }
}

/// Unlocks the disk as `/dev/mapper/{name}` by volume key (no PBKDF), only if its header is
/// exactly what [`format`] writes for `label` and bound to `key`: the metadata area is read
/// once, judged, and activated from that same in-memory copy; libcryptsetup's own view of the
/// copy must agree with the agent's. Every check runs before activation, so a refused header
/// or a wrong key is reported as such even where device-mapper is missing.
pub fn unlock(
    path: &Path,
    name: &str,
    key: &VolumeKey,
    label: &DiskLabel,
) -> Result<(), LuksError> {
    let meta = read_metadata(path)?;
    let checked = header::check(
        &meta,
        &Expect {
            vm_id: &label.vm_id,
            generation: label.generation,
        },
    )?;
    let mem = MemHeader::new(&meta)?;
    drop(meta);
    quiet::install();
    let mut dev =
        CryptInit::init_with_data_device(Either::Right((&mem.path, path))).map_err(|e| {
            LuksError::Open {
                path: path.display().to_string(),
                why: e.to_string(),
            }
        })?;
    load_luks2(&mut dev)?;
    agree(&mut dev, &checked)?;
    // The digest first, so that a wrong key is told apart from a header not bound to the key.
    verify_digest(&mut dev, key)?;
    checked.verify_mac(key.as_bytes())?;
    if !Path::new("/dev/mapper/control").exists() {
        return Err(LuksError::DeviceMapperUnavailable);
    }
    dev.activate_handle()
        .activate_by_volume_key(Some(name), Some(key.as_bytes()), CryptActivate::empty())
        .map_err(|e| match errno(&e) {
            // EOPNOTSUPP / ENODEV / ENOENT: device-mapper cannot be initialised here.
            Some(95) | Some(19) | Some(2) => LuksError::DeviceMapperUnavailable,
            _ => cs("activate the disk")(e),
        })
}

/// What libcryptsetup will activate with must be what the agent judged: cipher, mode, key size,
/// data offset, sector size and the whole JSON metadata.
fn agree(
    dev: &mut libcryptsetup_rs::CryptDevice,
    checked: &header::Checked,
) -> Result<(), LuksError> {
    let mut st = dev.status_handle();
    let cipher = st.get_cipher().map_err(cs("read the cipher"))?;
    let mode = st.get_cipher_mode().map_err(cs("read the cipher mode"))?;
    if format!("{cipher}-{mode}") != header::ENCRYPTION {
        return Err(LuksError::Differential(format!("cipher {cipher}-{mode}")));
    }
    let ks = st.get_volume_key_size();
    if i64::from(ks) != header::KEY_SIZE as i64 {
        return Err(LuksError::Differential(format!("key size {ks}")));
    }
    let off = st.get_data_offset();
    if off != (header::DATA_OFFSET / 512) as u64 {
        return Err(LuksError::Differential(format!(
            "data offset {off} sectors"
        )));
    }
    let json = st.dump_json().map_err(cs("read the metadata"))?;
    if json != checked.json {
        return Err(LuksError::Differential("the JSON metadata".into()));
    }
    let sector = libcryptsetup_rs::get_sector_size(Some(dev));
    if i64::from(sector) != header::SECTOR_SIZE as i64 {
        return Err(LuksError::Differential(format!("sector size {sector}")));
    }
    Ok(())
}
