//! The LUKS2 header as the guest judges it, sans IO: the disk is the host's, and so is every byte
//! of the header on it (in clear, its checksums unkeyed). The agent reads the metadata area once
//! into memory, judges that copy here, and activates from that same copy (see `luks`), so nothing
//! the host changes between the check and the use can matter.
//!
//! Two layers, both required:
//! 1. **Exactly what the agent formats**: LUKS2 with both header copies identical and their
//!    checksums valid; one `crypt` segment, `aes-xts-plain64`, a 512-bit key, data at 16 MiB,
//!    4096-byte sectors; one keyslot, one digest, one Attesta token for this VM id and
//!    generation; no requirements, flags or anything else. Each deviation has its own reason.
//! 2. **Bound to the key**: the token carries an HMAC-SHA256, keyed from the volume key (HKDF),
//!    over the whole JSON metadata (less the MAC itself, canonically serialised) and the binary
//!    header's identifying fields. Only a holder of the volume key — the guest — can write a
//!    header that passes, so no edit of the metadata survives, whatever a future check misses.
//!
//! The JSON parser refuses duplicate object keys, so it cannot read a different header than
//! libcryptsetup does; `luks` also compares libcryptsetup's own view of the loaded copy with ours.

use aws_lc_rs::{hkdf, hmac};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Size of each binary header plus its JSON area (LUKS2 default, what the agent formats).
pub const HDR_SIZE: usize = 16 * 1024;
/// Bytes of the JSON area in each header copy.
pub const JSON_SIZE: usize = HDR_SIZE - 4096;
/// Where the data segment starts: the metadata area the agent reads and judges is this long.
pub const DATA_OFFSET: usize = 16 << 20;
/// Bytes of the keyslots area (everything between the two header copies and the data).
pub const KEYSLOTS_SIZE: usize = DATA_OFFSET - 2 * HDR_SIZE;
/// The data segment's encryption sector size.
pub const SECTOR_SIZE: u64 = 4096;
/// Bytes of the volume key (AES-256-XTS).
pub const KEY_SIZE: u64 = 64;
/// The data cipher, as LUKS2 names it.
pub const ENCRYPTION: &str = "aes-xts-plain64";
/// The token type Attesta writes.
pub const TOKEN_TYPE: &str = "attesta";
/// PBKDF2 iterations of the volume-key digest (libcryptsetup's minimum, without a benchmark).
const DIGEST_ITERATIONS: u64 = 1000;
/// The keyslot's binary area: 64-byte key × 4000 anti-forensic stripes, rounded up to 4 KiB.
const KEYSLOT_AREA_SIZE: u64 = 258_048;

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
const CSUM_AT: usize = 448;
const CSUM_LEN: usize = 64;
const MAC_DOMAIN: &[u8] = b"attesta/luks2-header-mac/v1\n";

/// What the header must name: this VM and the generation of its key.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub vm_id: &'a str,
    pub generation: u64,
}

/// Why a header was refused. Never contains key bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the metadata area is {0} bytes, shorter than the agent formats")]
    Truncated(usize),
    #[error("the {0} header copy is missing (no LUKS2 magic where the agent writes it)")]
    Missing(Copy),
    #[error("the {which} header copy: {what}")]
    Binary { which: Copy, what: String },
    #[error("the {0} header copy's checksum does not match its contents")]
    Checksum(Copy),
    #[error("the two header copies differ (the agent writes them identical)")]
    CopiesDiffer,
    #[error("the JSON metadata cannot be read: {0}")]
    Json(String),
    #[error("the header names the data cipher {0:?}, not {ENCRYPTION}")]
    Cipher(String),
    #[error("the data segment starts at {0}, not at {DATA_OFFSET}")]
    DataOffset(String),
    #[error("the data segment's sector size is {0}, not {SECTOR_SIZE}")]
    SectorSize(String),
    #[error("the volume key size is {0} bytes, not {KEY_SIZE}")]
    KeySize(String),
    #[error("the header has {what} {found:?}; the agent writes exactly {expected:?}")]
    Count {
        what: &'static str,
        found: Vec<String>,
        expected: Vec<String>,
    },
    #[error("the header sets requirements or flags ({0}) the agent never writes")]
    Requirements(String),
    #[error("{0}")]
    Unexpected(String),
    #[error("the header carries no Attesta token")]
    NoToken,
    #[error("the disk belongs to VM {found:?}, not {expected:?}")]
    ForeignVm { found: String, expected: String },
    #[error("the disk is of key generation {found}, not {expected}")]
    Generation { found: u64, expected: u64 },
    #[error("the header's metadata is not bound to this VM's key (its MAC does not verify)")]
    Mac,
}

impl HeaderError {
    /// Stable code (the closed vocabulary of the agent's failures).
    pub fn code(&self) -> &'static str {
        match self {
            HeaderError::Truncated(_) => "header_truncated",
            HeaderError::Missing(_) => "header_missing",
            HeaderError::Binary { .. } => "header_binary",
            HeaderError::Checksum(_) => "header_checksum",
            HeaderError::CopiesDiffer => "header_copies_differ",
            HeaderError::Json(_) => "header_json",
            HeaderError::Cipher(_) => "header_cipher",
            HeaderError::DataOffset(_) => "header_data_offset",
            HeaderError::SectorSize(_) => "header_sector_size",
            HeaderError::KeySize(_) => "header_key_size",
            HeaderError::Count { .. } => "header_layout",
            HeaderError::Requirements(_) => "header_requirements",
            HeaderError::Unexpected(_) => "header_unexpected",
            HeaderError::NoToken => "header_no_token",
            HeaderError::ForeignVm { .. } => "header_foreign_vm",
            HeaderError::Generation { .. } => "header_generation",
            HeaderError::Mac => "header_mac",
        }
    }
}

/// Which of the two header copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    Primary,
    Secondary,
}

impl fmt::Display for Copy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Copy::Primary => "primary",
            Copy::Secondary => "secondary",
        })
    }
}

/// Whether the metadata area holds a header at all: a blank disk has LUKS2 magic at neither
/// header position. (A disk with one copy only is not blank: it is refused by [`check`].)
pub fn is_blank(meta: &[u8]) -> bool {
    !meta.starts_with(MAGIC_PRIMARY)
        && !meta
            .get(HDR_SIZE..)
            .is_some_and(|s| s.starts_with(MAGIC_SECONDARY))
}

/// A header that passed every structural check (not yet the MAC: that needs the key).
#[derive(Clone, Debug)]
pub struct Checked {
    /// The JSON metadata as parsed (duplicate keys refused).
    pub json: Value,
    /// The binary header's UUID.
    pub uuid: String,
    mac: Vec<u8>,
    message: Vec<u8>,
}

impl Checked {
    /// Verifies the token's MAC with the volume key: the last and decisive check.
    pub fn verify_mac(&self, volume_key: &[u8]) -> Result<(), HeaderError> {
        hmac::verify(&mac_key(volume_key), &self.message, &self.mac).map_err(|_| HeaderError::Mac)
    }
}

/// Judges the metadata area (the disk's first [`DATA_OFFSET`] bytes; only the two header copies
/// at its start are interpreted): both binary headers, then the JSON, against exactly what the
/// agent formats for `expect`.
pub fn check(meta: &[u8], expect: &Expect<'_>) -> Result<Checked, HeaderError> {
    if meta.len() < 2 * HDR_SIZE {
        return Err(HeaderError::Truncated(meta.len()));
    }
    let primary = &meta[..HDR_SIZE];
    let secondary = &meta[HDR_SIZE..2 * HDR_SIZE];
    binary(primary, Copy::Primary)?;
    binary(secondary, Copy::Secondary)?;
    // Identical but for magic, salt, offset and checksum: libcryptsetup would otherwise pick
    // the copy with the higher sequence id, which need not be the one judged.
    let same = |a: usize, b: usize| primary[a..b] == secondary[a..b];
    if !same(6, 104) || !same(168, 256) || !same(264, CSUM_AT) || !same(512, HDR_SIZE) {
        return Err(HeaderError::CopiesDiffer);
    }
    let area = &primary[4096..];
    let end = area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| HeaderError::Json("the JSON area is not NUL-terminated".into()))?;
    let text = std::str::from_utf8(&area[..end])
        .map_err(|_| HeaderError::Json("the JSON area is not UTF-8".into()))?;
    let json = parse_strict(text)?;
    let mac = layout(&json, expect)?;
    let uuid = cstr(&primary[168..208]);
    let message = mac_message(primary, &json);
    Ok(Checked {
        json,
        uuid,
        mac,
        message,
    })
}

/// The MAC the token must carry for `json` (its own `mac` field ignored) and the binary header
/// `primary`, under `volume_key`: what [`crate::luks::format`] writes.
pub fn compute_mac(primary: &[u8], json: &Value, volume_key: &[u8]) -> Result<String, HeaderError> {
    if primary.len() < 4096 {
        return Err(HeaderError::Truncated(primary.len()));
    }
    let message = mac_message(primary, json);
    Ok(hex::encode(
        hmac::sign(&mac_key(volume_key), &message).as_ref(),
    ))
}

/// What the MAC covers: the binary header's fixed identity (version, size, label, checksum
/// algorithm, UUID, subsystem; not the sequence id or salt, which a rewrite may change) and the
/// JSON metadata without the MAC.
fn mac_message(primary: &[u8], json: &Value) -> Vec<u8> {
    let mut m = MAC_DOMAIN.to_vec();
    m.extend_from_slice(&primary[6..16]); // version, hdr_size
    m.extend_from_slice(&primary[24..104]); // label, checksum algorithm
    m.extend_from_slice(&primary[168..256]); // uuid, subsystem
    m.extend_from_slice(&mac_input(json));
    m
}

/// The UUID in a binary header.
pub fn uuid_of(primary: &[u8]) -> String {
    primary.get(168..208).map(cstr).unwrap_or_default()
}

/// Reads the JSON area of a header copy (for writing the MAC after formatting).
pub fn json_of(primary: &[u8]) -> Result<Value, HeaderError> {
    let area = primary
        .get(4096..HDR_SIZE)
        .ok_or(HeaderError::Truncated(primary.len()))?;
    let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let text = std::str::from_utf8(&area[..end])
        .map_err(|_| HeaderError::Json("the JSON area is not UTF-8".into()))?;
    parse_strict(text)
}

fn mac_key(volume_key: &[u8]) -> hmac::Key {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"attesta luks2 header");
    let prk = salt.extract(volume_key);
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    // expand/fill fail only for an output longer than 255 hashes; 32 bytes never is.
    if let Ok(okm) = prk.expand(&[b"header-mac v1"], Len) {
        let _ = okm.fill(&mut k[..]);
    }
    hmac::Key::new(hmac::HMAC_SHA256, &k[..])
}

/// The JSON the MAC covers: everything, with the Attesta token's `mac` removed, canonically
/// serialised (object keys sorted, no whitespace) so that a rewrite by libcryptsetup that keeps
/// the meaning keeps the MAC.
fn mac_input(json: &Value) -> Vec<u8> {
    let mut v = json.clone();
    if let Some(tokens) = v.get_mut("tokens").and_then(Value::as_object_mut) {
        for t in tokens.values_mut() {
            if t.get("type").and_then(Value::as_str) == Some(TOKEN_TYPE)
                && let Some(o) = t.as_object_mut()
            {
                o.remove("mac");
            }
        }
    }
    let mut out = Vec::new();
    canonical(&v, &mut out);
    out
}

fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                if let Some(x) = m.get(k) {
                    canonical(x, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// One binary header: magic, version, size, checksum algorithm, offset and checksum.
fn binary(h: &[u8], which: Copy) -> Result<(), HeaderError> {
    let (magic, offset) = match which {
        Copy::Primary => (MAGIC_PRIMARY, 0),
        Copy::Secondary => (MAGIC_SECONDARY, HDR_SIZE as u64),
    };
    if !h.starts_with(magic) {
        return Err(HeaderError::Missing(which));
    }
    let bad = |what: String| HeaderError::Binary { which, what };
    let version = u16::from_be_bytes([h[6], h[7]]);
    if version != 2 {
        return Err(bad(format!("version {version}, not 2")));
    }
    let size = be64(h, 8);
    if size != HDR_SIZE as u64 {
        return Err(bad(format!("header size {size}, not {HDR_SIZE}")));
    }
    // Text fields end in NULs only: nothing hidden after the string for the MAC to cover.
    for (at, len) in [(72, 32), (168, 40)] {
        let f = &h[at..at + len];
        let end = f.iter().position(|&b| b == 0).unwrap_or(len);
        if f[end..].iter().any(|&b| b != 0) {
            return Err(bad(format!("bytes after the string at offset {at}")));
        }
    }
    if cstr(&h[72..104]) != "sha256" {
        return Err(bad(format!(
            "checksum algorithm {:?}, not sha256",
            cstr(&h[72..104])
        )));
    }
    // The agent sets neither a label nor a subsystem.
    if h[24..72].iter().chain(&h[208..256]).any(|&b| b != 0) {
        return Err(bad("a label or subsystem the agent never writes".into()));
    }
    let at = be64(h, 256);
    if at != offset {
        return Err(bad(format!("says it is at offset {at}, not {offset}")));
    }
    let mut copy = h.to_vec();
    copy[CSUM_AT..CSUM_AT + CSUM_LEN].fill(0);
    let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &copy);
    let stored = &h[CSUM_AT..CSUM_AT + CSUM_LEN];
    if stored[..32] != *sum.as_ref() || stored[32..].iter().any(|&b| b != 0) {
        return Err(HeaderError::Checksum(which));
    }
    Ok(())
}

/// The JSON's structure, field by field; returns the token's MAC bytes.
fn layout(j: &Value, expect: &Expect<'_>) -> Result<Vec<u8>, HeaderError> {
    let top = object(j, "the metadata")?;
    exact_keys(
        top,
        &["config", "digests", "keyslots", "segments", "tokens"],
        "the metadata",
    )?;

    let config = object(&top["config"], "config")?;
    for k in ["requirements", "flags"] {
        if let Some(v) = config.get(k) {
            return Err(HeaderError::Requirements(format!("config.{k} = {v}")));
        }
    }
    exact_keys(config, &["json_size", "keyslots_size"], "config")?;
    want_str(config, "json_size", &JSON_SIZE.to_string(), "config")?;
    want_str(
        config,
        "keyslots_size",
        &KEYSLOTS_SIZE.to_string(),
        "config",
    )?;

    let segments = object(&top["segments"], "segments")?;
    count(segments, "segments")?;
    let seg = object(&segments["0"], "segment 0")?;
    if let Some(v) = seg.get("flags").or(seg.get("integrity")) {
        return Err(HeaderError::Requirements(format!("segment 0: {v}")));
    }
    let enc = seg.get("encryption").and_then(Value::as_str).unwrap_or("");
    if enc != ENCRYPTION {
        return Err(HeaderError::Cipher(enc.to_string()));
    }
    let off = seg.get("offset").map(show).unwrap_or_default();
    if seg.get("offset") != Some(&Value::String(DATA_OFFSET.to_string())) {
        return Err(HeaderError::DataOffset(off));
    }
    if seg.get("sector_size") != Some(&Value::from(SECTOR_SIZE)) {
        return Err(HeaderError::SectorSize(
            seg.get("sector_size").map(show).unwrap_or_default(),
        ));
    }
    exact_keys(
        seg,
        &[
            "encryption",
            "iv_tweak",
            "offset",
            "sector_size",
            "size",
            "type",
        ],
        "segment 0",
    )?;
    want_str(seg, "type", "crypt", "segment 0")?;
    want_str(seg, "size", "dynamic", "segment 0")?;
    want_str(seg, "iv_tweak", "0", "segment 0")?;

    let keyslots = object(&top["keyslots"], "keyslots")?;
    count(keyslots, "keyslots")?;
    let ks = object(&keyslots["0"], "keyslot 0")?;
    exact_keys(ks, &["af", "area", "kdf", "key_size", "type"], "keyslot 0")?;
    if ks.get("key_size") != Some(&Value::from(KEY_SIZE)) {
        return Err(HeaderError::KeySize(
            ks.get("key_size").map(show).unwrap_or_default(),
        ));
    }
    want_str(ks, "type", "luks2", "keyslot 0")?;
    let area = object(&ks["area"], "keyslot 0's area")?;
    exact_keys(
        area,
        &["encryption", "key_size", "offset", "size", "type"],
        "keyslot 0's area",
    )?;
    want_str(area, "type", "raw", "keyslot 0's area")?;
    want_str(
        area,
        "offset",
        &(2 * HDR_SIZE).to_string(),
        "keyslot 0's area",
    )?;
    want_str(
        area,
        "size",
        &KEYSLOT_AREA_SIZE.to_string(),
        "keyslot 0's area",
    )?;
    want_str(area, "encryption", ENCRYPTION, "keyslot 0's area")?;
    if area.get("key_size") != Some(&Value::from(KEY_SIZE)) {
        return Err(unexpected("keyslot 0's area", "key_size"));
    }
    let kdf = object(&ks["kdf"], "keyslot 0's kdf")?;
    want_str(kdf, "type", "pbkdf2", "keyslot 0's kdf")?;
    want_str(kdf, "hash", "sha256", "keyslot 0's kdf")?;

    let digests = object(&top["digests"], "digests")?;
    count(digests, "digests")?;
    let d = object(&digests["0"], "digest 0")?;
    want_str(d, "type", "pbkdf2", "digest 0")?;
    // The key is checked against this digest before the MAC (to tell a wrong key from an edited
    // header), so its cost is pinned: the host cannot make the guest spin on 2^32 iterations.
    want_str(d, "hash", "sha256", "digest 0")?;
    if d.get("iterations") != Some(&Value::from(DIGEST_ITERATIONS)) {
        return Err(unexpected("digest 0", "iterations"));
    }
    let zero = Value::Array(vec![Value::String("0".into())]);
    if d.get("keyslots") != Some(&zero) || d.get("segments") != Some(&zero) {
        return Err(unexpected("digest 0", "keyslots or segments"));
    }

    let tokens = object(&top["tokens"], "tokens")?;
    if tokens.is_empty() {
        return Err(HeaderError::NoToken);
    }
    count(tokens, "tokens")?;
    let t = object(&tokens["0"], "token 0")?;
    if t.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
        return Err(HeaderError::NoToken);
    }
    // A key split k-of-n (k < n) keeps its wraps here (`crate::split`), in exactly their shape.
    if let Some(split) = t.get("split") {
        exact_keys(
            t,
            &["generation", "keyslots", "mac", "split", "type", "vm_id"],
            "the Attesta token",
        )?;
        crate::split::check(split)
            .map_err(|why| HeaderError::Unexpected(format!("the Attesta token: {why}")))?;
    } else {
        exact_keys(
            t,
            &["generation", "keyslots", "mac", "type", "vm_id"],
            "the Attesta token",
        )?;
    }
    if t.get("keyslots") != Some(&zero) {
        return Err(unexpected("the Attesta token", "keyslots"));
    }
    let vm = t.get("vm_id").and_then(Value::as_str).unwrap_or("");
    if vm != expect.vm_id {
        return Err(HeaderError::ForeignVm {
            found: vm.to_string(),
            expected: expect.vm_id.to_string(),
        });
    }
    let generation = t
        .get("generation")
        .and_then(Value::as_u64)
        .ok_or_else(|| unexpected("the Attesta token", "generation"))?;
    if generation != expect.generation {
        return Err(HeaderError::Generation {
            found: generation,
            expected: expect.generation,
        });
    }
    t.get("mac")
        .and_then(Value::as_str)
        .and_then(|s| hex::decode(s).ok())
        .filter(|m| m.len() == 32)
        .ok_or_else(|| unexpected("the Attesta token", "mac"))
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn unexpected(what: &str, field: &str) -> HeaderError {
    HeaderError::Unexpected(format!("{what}: unexpected {field}"))
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, HeaderError> {
    v.as_object()
        .ok_or_else(|| HeaderError::Unexpected(format!("{what} is not a JSON object")))
}

fn exact_keys(m: &Map<String, Value>, keys: &[&str], what: &str) -> Result<(), HeaderError> {
    let mut found: Vec<&str> = m.keys().map(String::as_str).collect();
    found.sort_unstable();
    if found != keys {
        return Err(HeaderError::Unexpected(format!(
            "{what} has the fields {found:?}; the agent writes exactly {keys:?}"
        )));
    }
    Ok(())
}

fn want_str(m: &Map<String, Value>, key: &str, want: &str, what: &str) -> Result<(), HeaderError> {
    match m.get(key).and_then(Value::as_str) {
        Some(s) if s == want => Ok(()),
        _ => Err(HeaderError::Unexpected(format!(
            "{what}: {key} is {}, not {want:?}",
            m.get(key).map(|v| v.to_string()).unwrap_or("absent".into())
        ))),
    }
}

/// Exactly one entry, under id "0" (what the agent writes).
fn count(m: &Map<String, Value>, what: &'static str) -> Result<(), HeaderError> {
    if m.len() != 1 || !m.contains_key("0") {
        return Err(HeaderError::Count {
            what,
            found: m.keys().cloned().collect(),
            expected: vec!["0".into()],
        });
    }
    Ok(())
}

/// Parses JSON refusing duplicate object keys (parsers disagree on which one wins).
pub fn parse_strict(text: &str) -> Result<Value, HeaderError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = StrictValue::deserialize(&mut de).map_err(|e| HeaderError::Json(e.to_string()))?;
    de.end().map_err(|e| HeaderError::Json(e.to_string()))?;
    Ok(v.0)
}

struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Both binary header copies of `meta` (the metadata area, as read) with their JSON edited by
/// `edit` and their checksums fixed: what a host with the disk can do. For the attack tests
/// and the demo's live attacks; the judge above must refuse every such edit it did not make.
pub fn forge_json_edit(meta: &[u8], edit: impl Fn(&mut String)) -> Result<Vec<u8>, String> {
    let mut hdr = meta
        .get(..2 * HDR_SIZE)
        .ok_or("the metadata area is too short")?
        .to_vec();
    for copy in hdr.chunks_mut(HDR_SIZE) {
        let area = &copy[4096..];
        let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
        let mut text = String::from_utf8_lossy(&area[..end]).into_owned();
        let before = text.clone();
        edit(&mut text);
        if text == before || text.len() >= JSON_SIZE {
            return Err("the header edit did not apply".into());
        }
        copy[4096..].fill(0);
        copy[4096..4096 + text.len()].copy_from_slice(text.as_bytes());
        copy[448..512].fill(0);
        let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, copy);
        copy[448..480].copy_from_slice(sum.as_ref());
    }
    Ok(hdr)
}

use serde::Deserialize as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused() {
        assert!(parse_strict(r#"{"a":1,"b":{"c":2}}"#).is_ok());
        let e = parse_strict(r#"{"a":1,"a":2}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
        assert!(parse_strict(r#"{"x":{"e":"aes","e":"cipher_null"}}"#).is_err());
        assert!(parse_strict(r#"{"a":1} trailing"#).is_err());
    }

    #[test]
    fn the_mac_input_ignores_key_order_and_the_mac_itself() {
        let a =
            parse_strict(r#"{"tokens":{"0":{"type":"attesta","mac":"00","vm_id":"v"}},"b":[1,2]}"#)
                .unwrap();
        let b =
            parse_strict(r#"{"b":[1,2],"tokens":{"0":{"vm_id":"v","type":"attesta"}}}"#).unwrap();
        assert_eq!(mac_input(&a), mac_input(&b));
        let c =
            parse_strict(r#"{"b":[2,1],"tokens":{"0":{"vm_id":"v","type":"attesta"}}}"#).unwrap();
        assert_ne!(mac_input(&a), mac_input(&c));
    }

    #[test]
    fn short_or_blank_areas_never_panic() {
        assert!(is_blank(&[]));
        assert!(is_blank(&[0u8; 100]));
        assert!(matches!(
            check(
                &[0u8; 10],
                &Expect {
                    vm_id: "v",
                    generation: 1
                }
            ),
            Err(HeaderError::Truncated(10))
        ));
        let zero = vec![0u8; 2 * HDR_SIZE];
        assert_eq!(
            check(
                &zero,
                &Expect {
                    vm_id: "v",
                    generation: 1
                }
            )
            .unwrap_err(),
            HeaderError::Missing(Copy::Primary)
        );
    }
}
