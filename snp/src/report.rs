//! The SEV-SNP ATTESTATION_REPORT structure (AMD SEV-SNP ABI, table "ATTESTATION_REPORT").
//!
//! Parsing keeps the bytes exactly as received: the signature is later checked over
//! `raw[0x000..0x2A0]`, never over a re-encoding of the decoded fields. Parsing only fails on
//! the wrong length or an unknown version; everything else a report can say is decoded and
//! judged by the verifier, so that a rejection can list every problem at once.

use crate::Product;
use serde::{Deserialize, Serialize};

/// Size of a report in bytes (0x4A0).
pub const REPORT_LEN: usize = 0x4A0;
/// The signed part of a report: bytes 0x000..0x2A0.
pub const SIGNED_LEN: usize = 0x2A0;
/// Report versions this crate can decode.
pub const SUPPORTED_VERSIONS: [u32; 4] = [2, 3, 4, 5];
/// SIGNATURE_ALGO value for ECDSA P-384 with SHA-384, the only one AMD defines.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// Why bytes are not a report at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("report is {got} bytes, expected {REPORT_LEN}")]
    WrongLength { got: usize },
    #[error("report version {0} is not supported (supported: 2, 3, 4, 5)")]
    UnsupportedVersion(u32),
}

/// Guest policy (report offset 0x08), as set by the host at launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GuestPolicy(pub u64);

impl GuestPolicy {
    pub const SMT: u64 = 1 << 16;
    /// Bit 17 is reserved and must be set.
    pub const RESERVED_MBO: u64 = 1 << 17;
    pub const MIGRATE_MA: u64 = 1 << 18;
    pub const DEBUG: u64 = 1 << 19;
    pub const SINGLE_SOCKET: u64 = 1 << 20;
    pub const CXL_ALLOW: u64 = 1 << 21;
    pub const MEM_AES_256_XTS: u64 = 1 << 22;
    pub const RAPL_DIS: u64 = 1 << 23;
    pub const CIPHERTEXT_HIDING: u64 = 1 << 24;
    pub const PAGE_SWAP_DISABLE: u64 = 1 << 25;

    pub fn abi_minor(self) -> u8 {
        self.0 as u8
    }
    pub fn abi_major(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
    pub fn smt_allowed(self) -> bool {
        self.has(Self::SMT)
    }
    pub fn migrate_ma(self) -> bool {
        self.has(Self::MIGRATE_MA)
    }
    pub fn debug(self) -> bool {
        self.has(Self::DEBUG)
    }
    pub fn single_socket(self) -> bool {
        self.has(Self::SINGLE_SOCKET)
    }
    pub fn cxl_allowed(self) -> bool {
        self.has(Self::CXL_ALLOW)
    }
    pub fn mem_aes_256_xts(self) -> bool {
        self.has(Self::MEM_AES_256_XTS)
    }
    pub fn rapl_disabled(self) -> bool {
        self.has(Self::RAPL_DIS)
    }
    pub fn ciphertext_hiding(self) -> bool {
        self.has(Self::CIPHERTEXT_HIDING)
    }
    pub fn page_swap_disabled(self) -> bool {
        self.has(Self::PAGE_SWAP_DISABLE)
    }
}

/// Platform information (report offset 0x40): how the host configured the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PlatformInfo(pub u64);

impl PlatformInfo {
    pub const SMT_EN: u64 = 1 << 0;
    pub const TSME_EN: u64 = 1 << 1;
    pub const ECC_EN: u64 = 1 << 2;
    pub const RAPL_DIS: u64 = 1 << 3;
    pub const CIPHERTEXT_HIDING_EN: u64 = 1 << 4;
    pub const ALIAS_CHECK_COMPLETE: u64 = 1 << 5;
    pub const TIO_EN: u64 = 1 << 7;

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
}

/// Which key signed the report (KEY_INFO bits 4:2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningKey {
    Vcek,
    Vlek,
    /// 7: the report is unsigned.
    None,
    /// Any other value (reserved by AMD).
    Reserved(u8),
}

/// KEY_INFO (report offset 0x48).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyInfo(pub u32);

impl KeyInfo {
    /// AUTHOR_KEY_EN: the ID block was signed by an author key, whose digest is in the report.
    pub fn author_key_en(self) -> bool {
        self.0 & 1 != 0
    }
    /// MASK_CHIP_KEY: the report is signed with a zero key (signature is zero).
    pub fn mask_chip_key(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn signing_key(self) -> SigningKey {
        match (self.0 >> 2) & 7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            n => SigningKey::Reserved(n as u8),
        }
    }
    pub fn with_signing_key(self, key: SigningKey) -> KeyInfo {
        let v = match key {
            SigningKey::Vcek => 0,
            SigningKey::Vlek => 1,
            SigningKey::None => 7,
            SigningKey::Reserved(n) => u32::from(n & 7),
        };
        KeyInfo((self.0 & !(7 << 2)) | (v << 2))
    }
}

/// CPUID family/model/stepping (report versions 3 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cpuid {
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
}

/// A firmware version as major.minor, build.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct FirmwareVersion {
    pub major: u8,
    pub minor: u8,
    pub build: u8,
}

/// The report's signature: r and s, little-endian, in 72-byte fields (only 48 are significant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    pub r: [u8; 72],
    pub s: [u8; 72],
}

impl Default for Signature {
    fn default() -> Self {
        Signature {
            r: [0; 72],
            s: [0; 72],
        }
    }
}

impl Signature {
    /// r||s big-endian, 96 bytes, if the bytes past the 48 significant ones are zero.
    pub fn to_fixed_be(&self) -> Option<[u8; 96]> {
        if self.r[48..].iter().chain(&self.s[48..]).any(|&b| b != 0) {
            return None;
        }
        let mut out = [0u8; 96];
        for i in 0..48 {
            out[i] = self.r[47 - i];
            out[48 + i] = self.s[47 - i];
        }
        Some(out)
    }

    /// From r||s big-endian (96 bytes), as a signer produces it.
    pub fn from_fixed_be(rs: &[u8; 96]) -> Signature {
        let mut sig = Signature::default();
        for i in 0..48 {
            sig.r[i] = rs[47 - i];
            sig.s[i] = rs[95 - i];
        }
        sig
    }
}

/// Every field of a report, decoded. `encode` lays them out in AMD's format; reserved
/// bytes are written as zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportBody {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: GuestPolicy,
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub vmpl: u32,
    pub signature_algo: u32,
    pub current_tcb: u64,
    pub platform_info: PlatformInfo,
    pub key_info: KeyInfo,
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
    pub report_id: [u8; 32],
    pub report_id_ma: [u8; 32],
    pub reported_tcb: u64,
    /// Present from version 3.
    pub cpuid: Option<Cpuid>,
    pub chip_id: [u8; 64],
    pub committed_tcb: u64,
    pub current_version: FirmwareVersion,
    pub committed_version: FirmwareVersion,
    pub launch_tcb: u64,
    /// Present from version 5.
    pub launch_mit_vector: Option<u64>,
    /// Present from version 5.
    pub current_mit_vector: Option<u64>,
    pub signature: Signature,
}

impl Default for ReportBody {
    fn default() -> Self {
        ReportBody {
            version: 2,
            guest_svn: 0,
            policy: GuestPolicy(GuestPolicy::RESERVED_MBO),
            family_id: [0; 16],
            image_id: [0; 16],
            vmpl: 0,
            signature_algo: SIG_ALGO_ECDSA_P384_SHA384,
            current_tcb: 0,
            platform_info: PlatformInfo(0),
            key_info: KeyInfo(0),
            report_data: [0; 64],
            measurement: [0; 48],
            host_data: [0; 32],
            id_key_digest: [0; 48],
            author_key_digest: [0; 48],
            report_id: [0; 32],
            report_id_ma: [0; 32],
            reported_tcb: 0,
            cpuid: None,
            chip_id: [0; 64],
            committed_tcb: 0,
            current_version: FirmwareVersion::default(),
            committed_version: FirmwareVersion::default(),
            launch_tcb: 0,
            launch_mit_vector: None,
            current_mit_vector: None,
            signature: Signature::default(),
        }
    }
}

// Offsets from the ABI specification.
mod off {
    pub const VERSION: usize = 0x00;
    pub const GUEST_SVN: usize = 0x04;
    pub const POLICY: usize = 0x08;
    pub const FAMILY_ID: usize = 0x10;
    pub const IMAGE_ID: usize = 0x20;
    pub const VMPL: usize = 0x30;
    pub const SIG_ALGO: usize = 0x34;
    pub const CURRENT_TCB: usize = 0x38;
    pub const PLATFORM_INFO: usize = 0x40;
    pub const KEY_INFO: usize = 0x48;
    pub const REPORT_DATA: usize = 0x50;
    pub const MEASUREMENT: usize = 0x90;
    pub const HOST_DATA: usize = 0xC0;
    pub const ID_KEY_DIGEST: usize = 0xE0;
    pub const AUTHOR_KEY_DIGEST: usize = 0x110;
    pub const REPORT_ID: usize = 0x140;
    pub const REPORT_ID_MA: usize = 0x160;
    pub const REPORTED_TCB: usize = 0x180;
    pub const CPUID_FAM: usize = 0x188;
    pub const CPUID_MOD: usize = 0x189;
    pub const CPUID_STEP: usize = 0x18A;
    pub const CHIP_ID: usize = 0x1A0;
    pub const COMMITTED_TCB: usize = 0x1E0;
    pub const CURRENT_VERSION: usize = 0x1E8;
    pub const COMMITTED_VERSION: usize = 0x1EC;
    pub const LAUNCH_TCB: usize = 0x1F0;
    pub const LAUNCH_MIT: usize = 0x1F8;
    pub const CURRENT_MIT: usize = 0x200;
    pub const SIG_R: usize = 0x2A0;
    pub const SIG_S: usize = 0x2E8;
}

/// Reserved ranges of a report (which must be zero), by version, as (start, end, name).
fn reserved_ranges(version: u32) -> Vec<(usize, usize, &'static str)> {
    let mut v = vec![
        (0x4C, 0x50, "reserved 0x4C"),
        (0x1EB, 0x1EC, "reserved 0x1EB"),
        (0x1EF, 0x1F0, "reserved 0x1EF"),
        (0x330, REPORT_LEN, "signature padding"),
    ];
    if version >= 3 {
        v.push((0x18B, 0x1A0, "reserved 0x18B"));
    } else {
        v.push((0x188, 0x1A0, "reserved 0x188"));
    }
    if version >= 5 {
        v.push((0x208, 0x2A0, "reserved 0x208"));
    } else {
        v.push((0x1F8, 0x2A0, "reserved 0x1F8"));
    }
    v
}

fn u32_at(b: &[u8; REPORT_LEN], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8; REPORT_LEN], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn arr<const N: usize>(b: &[u8; REPORT_LEN], o: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[o..o + N]);
    a
}

fn fw(b: &[u8; REPORT_LEN], o: usize) -> FirmwareVersion {
    FirmwareVersion {
        build: b[o],
        minor: b[o + 1],
        major: b[o + 2],
    }
}

impl ReportBody {
    /// Decodes fields from exactly [`REPORT_LEN`] bytes.
    pub fn decode(b: &[u8; REPORT_LEN]) -> Result<ReportBody, ParseError> {
        let version = u32_at(b, off::VERSION);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(ParseError::UnsupportedVersion(version));
        }
        Ok(ReportBody {
            version,
            guest_svn: u32_at(b, off::GUEST_SVN),
            policy: GuestPolicy(u64_at(b, off::POLICY)),
            family_id: arr(b, off::FAMILY_ID),
            image_id: arr(b, off::IMAGE_ID),
            vmpl: u32_at(b, off::VMPL),
            signature_algo: u32_at(b, off::SIG_ALGO),
            current_tcb: u64_at(b, off::CURRENT_TCB),
            platform_info: PlatformInfo(u64_at(b, off::PLATFORM_INFO)),
            key_info: KeyInfo(u32_at(b, off::KEY_INFO)),
            report_data: arr(b, off::REPORT_DATA),
            measurement: arr(b, off::MEASUREMENT),
            host_data: arr(b, off::HOST_DATA),
            id_key_digest: arr(b, off::ID_KEY_DIGEST),
            author_key_digest: arr(b, off::AUTHOR_KEY_DIGEST),
            report_id: arr(b, off::REPORT_ID),
            report_id_ma: arr(b, off::REPORT_ID_MA),
            reported_tcb: u64_at(b, off::REPORTED_TCB),
            cpuid: (version >= 3).then(|| Cpuid {
                family: b[off::CPUID_FAM],
                model: b[off::CPUID_MOD],
                stepping: b[off::CPUID_STEP],
            }),
            chip_id: arr(b, off::CHIP_ID),
            committed_tcb: u64_at(b, off::COMMITTED_TCB),
            current_version: fw(b, off::CURRENT_VERSION),
            committed_version: fw(b, off::COMMITTED_VERSION),
            launch_tcb: u64_at(b, off::LAUNCH_TCB),
            launch_mit_vector: (version >= 5).then(|| u64_at(b, off::LAUNCH_MIT)),
            current_mit_vector: (version >= 5).then(|| u64_at(b, off::CURRENT_MIT)),
            signature: Signature {
                r: arr(b, off::SIG_R),
                s: arr(b, off::SIG_S),
            },
        })
    }

    /// Lays the fields out in AMD's format. Fields a version lacks (CPUID before v3,
    /// mitigation vectors before v5) are written only when the version has them.
    pub fn encode(&self) -> [u8; REPORT_LEN] {
        let mut b = [0u8; REPORT_LEN];
        let put =
            |b: &mut [u8; REPORT_LEN], o: usize, v: &[u8]| b[o..o + v.len()].copy_from_slice(v);
        put(&mut b, off::VERSION, &self.version.to_le_bytes());
        put(&mut b, off::GUEST_SVN, &self.guest_svn.to_le_bytes());
        put(&mut b, off::POLICY, &self.policy.0.to_le_bytes());
        put(&mut b, off::FAMILY_ID, &self.family_id);
        put(&mut b, off::IMAGE_ID, &self.image_id);
        put(&mut b, off::VMPL, &self.vmpl.to_le_bytes());
        put(&mut b, off::SIG_ALGO, &self.signature_algo.to_le_bytes());
        put(&mut b, off::CURRENT_TCB, &self.current_tcb.to_le_bytes());
        put(
            &mut b,
            off::PLATFORM_INFO,
            &self.platform_info.0.to_le_bytes(),
        );
        put(&mut b, off::KEY_INFO, &self.key_info.0.to_le_bytes());
        put(&mut b, off::REPORT_DATA, &self.report_data);
        put(&mut b, off::MEASUREMENT, &self.measurement);
        put(&mut b, off::HOST_DATA, &self.host_data);
        put(&mut b, off::ID_KEY_DIGEST, &self.id_key_digest);
        put(&mut b, off::AUTHOR_KEY_DIGEST, &self.author_key_digest);
        put(&mut b, off::REPORT_ID, &self.report_id);
        put(&mut b, off::REPORT_ID_MA, &self.report_id_ma);
        put(&mut b, off::REPORTED_TCB, &self.reported_tcb.to_le_bytes());
        if self.version >= 3
            && let Some(c) = self.cpuid
        {
            put(&mut b, off::CPUID_FAM, &[c.family, c.model, c.stepping]);
        }
        put(&mut b, off::CHIP_ID, &self.chip_id);
        put(
            &mut b,
            off::COMMITTED_TCB,
            &self.committed_tcb.to_le_bytes(),
        );
        let v = self.current_version;
        put(&mut b, off::CURRENT_VERSION, &[v.build, v.minor, v.major]);
        let v = self.committed_version;
        put(&mut b, off::COMMITTED_VERSION, &[v.build, v.minor, v.major]);
        put(&mut b, off::LAUNCH_TCB, &self.launch_tcb.to_le_bytes());
        if self.version >= 5 {
            put(
                &mut b,
                off::LAUNCH_MIT,
                &self.launch_mit_vector.unwrap_or(0).to_le_bytes(),
            );
            put(
                &mut b,
                off::CURRENT_MIT,
                &self.current_mit_vector.unwrap_or(0).to_le_bytes(),
            );
        }
        put(&mut b, off::SIG_R, &self.signature.r);
        put(&mut b, off::SIG_S, &self.signature.s);
        b
    }

    /// The product the report names itself: CPUID (v3+), else a Turin-shaped chip id
    /// (only the first 8 bytes set). `None` when the report alone cannot tell.
    pub fn product_hint(&self) -> Option<Product> {
        if let Some(c) = self.cpuid {
            return Product::from_cpuid(c.family, c.model);
        }
        let head = self.chip_id[..8].iter().any(|&b| b != 0);
        let tail = self.chip_id[8..].iter().any(|&b| b != 0);
        if head && !tail {
            Some(Product::Turin)
        } else {
            None
        }
    }
}

/// A parsed report together with the bytes it was parsed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationReport {
    body: ReportBody,
    raw: Box<[u8; REPORT_LEN]>,
}

impl AttestationReport {
    /// Parses a raw report. Never panics, whatever the input.
    pub fn from_bytes(bytes: &[u8]) -> Result<AttestationReport, ParseError> {
        let raw: Box<[u8; REPORT_LEN]> = bytes
            .try_into()
            .map(Box::new)
            .map_err(|_| ParseError::WrongLength { got: bytes.len() })?;
        let body = ReportBody::decode(&raw)?;
        Ok(AttestationReport { body, raw })
    }

    /// The decoded fields.
    pub fn body(&self) -> &ReportBody {
        &self.body
    }

    /// The bytes as received.
    pub fn raw(&self) -> &[u8; REPORT_LEN] {
        &self.raw
    }

    /// The bytes the signature covers, as received.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// Names of reserved ranges and bits that are not zero.
    pub fn reserved_nonzero(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = reserved_ranges(self.body.version)
            .into_iter()
            .filter(|&(s, e, _)| self.raw[s..e].iter().any(|&b| b != 0))
            .map(|(_, _, n)| n)
            .collect();
        if self.body.key_info.0 >> 5 != 0 {
            v.push("key_info bits 31:5");
        }
        v
    }
}

impl std::ops::Deref for AttestationReport {
    type Target = ReportBody;
    fn deref(&self) -> &ReportBody {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_length_and_version() {
        assert_eq!(
            AttestationReport::from_bytes(&[]),
            Err(ParseError::WrongLength { got: 0 })
        );
        assert_eq!(
            AttestationReport::from_bytes(&[0u8; REPORT_LEN + 1]),
            Err(ParseError::WrongLength {
                got: REPORT_LEN + 1
            })
        );
        let mut b = [0u8; REPORT_LEN];
        b[0] = 6;
        assert_eq!(
            AttestationReport::from_bytes(&b),
            Err(ParseError::UnsupportedVersion(6))
        );
        b[0] = 1;
        assert_eq!(
            AttestationReport::from_bytes(&b),
            Err(ParseError::UnsupportedVersion(1))
        );
    }

    #[test]
    fn signature_endianness() {
        let mut rs = [0u8; 96];
        for (i, b) in rs.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let sig = Signature::from_fixed_be(&rs);
        assert_eq!(sig.r[0], 48); // least significant byte of r first
        assert_eq!(sig.s[47], 49);
        assert_eq!(sig.to_fixed_be(), Some(rs));
        let mut bad = sig;
        bad.s[71] = 1;
        assert_eq!(bad.to_fixed_be(), None);
    }

    #[test]
    fn product_from_cpuid_or_chip_id_shape() {
        let mut b = ReportBody {
            version: 2,
            ..Default::default()
        };
        assert_eq!(b.product_hint(), None, "all-zero chip id: cannot tell");
        b.chip_id[..8].copy_from_slice(&[1; 8]);
        assert_eq!(
            b.product_hint(),
            Some(Product::Turin),
            "only the first 8 bytes set: Turin's shape"
        );
        b.chip_id[63] = 1;
        assert_eq!(
            b.product_hint(),
            None,
            "a full chip id is Milan or Genoa: the certificates decide"
        );
        b.version = 3;
        b.cpuid = Some(Cpuid {
            family: 0x19,
            model: 0x11,
            stepping: 1,
        });
        assert_eq!(
            b.product_hint(),
            Some(Product::Genoa),
            "CPUID wins from version 3"
        );
    }

    #[test]
    fn key_info_bits() {
        let k = KeyInfo(0b1_0101);
        assert!(k.author_key_en());
        assert!(!k.mask_chip_key());
        assert_eq!(k.signing_key(), SigningKey::Reserved(5));
        assert_eq!(
            k.with_signing_key(SigningKey::Vlek).signing_key(),
            SigningKey::Vlek
        );
        assert!(k.with_signing_key(SigningKey::Vlek).author_key_en());
    }
}
