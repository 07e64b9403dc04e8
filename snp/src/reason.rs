//! The closed vocabulary of rejection reasons. Every failed check yields one; a verdict lists
//! them all. `code()` is stable for machines (audit logs, metrics); `Display` is for people.

use crate::report::{ParseError, SigningKey};
use crate::tcb::Component;
use crate::{Product, hexbytes::HexBytes};
use std::fmt;

/// A certificate's place in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// AMD Root Key (self-signed).
    Ark,
    /// AMD SEV Key (signs VCEKs) or AMD SEV VLEK Key (signs VLEKs).
    Ask,
    /// The report-signing certificate: VCEK or VLEK.
    Vcek,
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertRole::Ark => "ARK",
            CertRole::Ask => "ASK/ASVK",
            CertRole::Vcek => "VCEK/VLEK",
        })
    }
}

/// Which TCB field of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcbField {
    Reported,
    Current,
    Committed,
    Launch,
}

impl fmt::Display for TcbField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcbField::Reported => "reported",
            TcbField::Current => "current",
            TcbField::Committed => "committed",
            TcbField::Launch => "launch",
        })
    }
}

/// A report field compared for equality by the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExactField {
    FamilyId,
    ImageId,
    HostData,
    ReportData,
    ReportId,
    ReportIdMa,
}

impl fmt::Display for ExactField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExactField::FamilyId => "family_id",
            ExactField::ImageId => "image_id",
            ExactField::HostData => "host_data",
            ExactField::ReportData => "report_data",
            ExactField::ReportId => "report_id",
            ExactField::ReportIdMa => "report_id_ma",
        })
    }
}

/// Why a report was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    // --- the report itself
    Malformed(ParseError),
    UnknownSignatureAlgorithm(u32),
    SignaturePaddingNonZero,
    UnsupportedSigningKey(SigningKey),
    ProductUnknown,
    ProductMismatch {
        report: Product,
        other: Product,
    },
    ProductNotAllowed(Product),
    // --- certificates
    CertTableInvalid(String),
    MissingCertificate(CertRole),
    /// The report came without its VCEK and none could be had from the configured sources
    /// (offline store, key server): why, for the operator.
    VcekUnavailable(String),
    CertUnparsable {
        role: CertRole,
        why: String,
    },
    UnexpectedCertName {
        role: CertRole,
        found: String,
        expected: String,
    },
    ArkNotTrusted,
    CertSignatureInvalid(CertRole),
    IssuerMismatch(CertRole),
    NotACa(CertRole),
    UnknownCriticalExtension {
        role: CertRole,
        oid: String,
    },
    CertNotYetValid {
        role: CertRole,
        not_before: u64,
        at: u64,
    },
    CertExpired {
        role: CertRole,
        not_after: u64,
        at: u64,
    },
    SigningKeyMismatch {
        report: SigningKey,
        cert: &'static str,
    },
    // --- revocation
    CrlInvalid(String),
    CrlStale {
        next_update: Option<u64>,
        at: u64,
    },
    CrlUnavailable,
    CertRevoked(CertRole),
    // --- signature and binding
    ReportSignatureInvalid,
    HwidMissing,
    HwidMismatch,
    TcbExtensionMissing(Component),
    TcbMismatch {
        component: Component,
        report: u8,
        cert: u8,
    },
    // --- appraisal
    TcbBelowMinimum {
        field: TcbField,
        component: Component,
        have: u8,
        need: u8,
    },
    TcbAboveCurrent {
        field: TcbField,
        component: Component,
        value: u8,
        current: u8,
    },
    ProvisionalFirmware,
    PolicyReservedBits(u64),
    PolicyFlagForbidden(&'static str),
    PolicyFlagRequired(&'static str),
    AbiTooOld {
        have: (u8, u8),
        need: (u8, u8),
    },
    PlatformFlagForbidden(&'static str),
    PlatformFlagRequired(&'static str),
    VmplMismatch {
        have: u32,
        want: u32,
    },
    GuestSvnTooLow {
        have: u32,
        need: u32,
    },
    FieldMismatch(ExactField),
    IdBlockRequired,
    IdKeyNotTrusted(HexBytes<48>),
    AuthorKeyRequired,
    AuthorKeyNotTrusted(HexBytes<48>),
    MeasurementNotAllowed(HexBytes<48>),
    ChipNotAllowed,
    FirmwareBuildTooOld {
        have: u8,
        need: u8,
    },
    FirmwareVersionTooOld {
        have: (u8, u8),
        need: (u8, u8),
    },
    MitigationsMissing {
        launch: bool,
        missing: u64,
    },
    MitigationsUnavailable,
    SigningKeyNotAllowed(SigningKey),
    VlekCspNotAllowed(String),
    ReportVersionTooOld {
        have: u32,
        need: u32,
    },
    ReservedNonZero(&'static str),
}

impl Reason {
    /// Whether this reason judges the report against a policy (its TCB, flags, fields, image,
    /// chip, firmware) rather than its authenticity. A report whose reasons are all appraisal
    /// is genuine: signed by an AMD-rooted key for the chip it names. Anything not listed here
    /// counts as authenticity, so a new reason is never taken for proof of a genuine report.
    pub fn is_appraisal(&self) -> bool {
        use Reason::*;
        matches!(
            self,
            ProductNotAllowed(_)
                | TcbBelowMinimum { .. }
                | TcbAboveCurrent { .. }
                | ProvisionalFirmware
                | PolicyReservedBits(_)
                | PolicyFlagForbidden(_)
                | PolicyFlagRequired(_)
                | AbiTooOld { .. }
                | PlatformFlagForbidden(_)
                | PlatformFlagRequired(_)
                | VmplMismatch { .. }
                | GuestSvnTooLow { .. }
                | FieldMismatch(_)
                | IdBlockRequired
                | IdKeyNotTrusted(_)
                | AuthorKeyRequired
                | AuthorKeyNotTrusted(_)
                | MeasurementNotAllowed(_)
                | ChipNotAllowed
                | FirmwareBuildTooOld { .. }
                | FirmwareVersionTooOld { .. }
                | MitigationsMissing { .. }
                | MitigationsUnavailable
                | SigningKeyNotAllowed(_)
                | VlekCspNotAllowed(_)
                | ReportVersionTooOld { .. }
                | ReservedNonZero(_)
        )
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use Reason::*;
        match self {
            Malformed(_) => "malformed_report",
            UnknownSignatureAlgorithm(_) => "unknown_signature_algorithm",
            SignaturePaddingNonZero => "signature_padding_nonzero",
            UnsupportedSigningKey(_) => "unsupported_signing_key",
            ProductUnknown => "product_unknown",
            ProductMismatch { .. } => "product_mismatch",
            ProductNotAllowed(_) => "product_not_allowed",
            CertTableInvalid(_) => "cert_table_invalid",
            MissingCertificate(_) => "missing_certificate",
            VcekUnavailable(_) => "vcek_unavailable",
            CertUnparsable { .. } => "certificate_unparsable",
            UnexpectedCertName { .. } => "unexpected_certificate_name",
            ArkNotTrusted => "ark_not_trusted",
            CertSignatureInvalid(_) => "certificate_signature_invalid",
            IssuerMismatch(_) => "issuer_mismatch",
            NotACa(_) => "issuer_not_ca",
            UnknownCriticalExtension { .. } => "unknown_critical_extension",
            CertNotYetValid { .. } => "certificate_not_yet_valid",
            CertExpired { .. } => "certificate_expired",
            SigningKeyMismatch { .. } => "signing_key_mismatch",
            CrlInvalid(_) => "crl_invalid",
            CrlStale { .. } => "crl_stale",
            CrlUnavailable => "crl_unavailable",
            CertRevoked(_) => "certificate_revoked",
            ReportSignatureInvalid => "report_signature_invalid",
            HwidMissing => "hwid_missing",
            HwidMismatch => "hwid_mismatch",
            TcbExtensionMissing(_) => "tcb_extension_missing",
            TcbMismatch { .. } => "tcb_mismatch",
            TcbBelowMinimum { .. } => "tcb_below_minimum",
            TcbAboveCurrent { .. } => "tcb_above_current",
            ProvisionalFirmware => "provisional_firmware",
            PolicyReservedBits(_) => "policy_reserved_bits",
            PolicyFlagForbidden(_) => "policy_flag_forbidden",
            PolicyFlagRequired(_) => "policy_flag_required",
            AbiTooOld { .. } => "abi_too_old",
            PlatformFlagForbidden(_) => "platform_flag_forbidden",
            PlatformFlagRequired(_) => "platform_flag_required",
            VmplMismatch { .. } => "vmpl_mismatch",
            GuestSvnTooLow { .. } => "guest_svn_too_low",
            FieldMismatch(_) => "field_mismatch",
            IdBlockRequired => "id_block_required",
            IdKeyNotTrusted(_) => "id_key_not_trusted",
            AuthorKeyRequired => "author_key_required",
            AuthorKeyNotTrusted(_) => "author_key_not_trusted",
            MeasurementNotAllowed(_) => "measurement_not_allowed",
            ChipNotAllowed => "chip_not_allowed",
            FirmwareBuildTooOld { .. } => "firmware_build_too_old",
            FirmwareVersionTooOld { .. } => "firmware_version_too_old",
            MitigationsMissing { .. } => "mitigations_missing",
            MitigationsUnavailable => "mitigations_unavailable",
            SigningKeyNotAllowed(_) => "signing_key_not_allowed",
            VlekCspNotAllowed(_) => "vlek_csp_not_allowed",
            ReportVersionTooOld { .. } => "report_version_too_old",
            ReservedNonZero(_) => "reserved_nonzero",
        }
    }
}

fn key_name(k: &SigningKey) -> String {
    match k {
        SigningKey::Vcek => "VCEK".into(),
        SigningKey::Vlek => "VLEK".into(),
        SigningKey::None => "none".into(),
        SigningKey::Reserved(n) => format!("reserved value {n}"),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Reason::*;
        match self {
            Malformed(e) => write!(f, "malformed report: {e}"),
            UnknownSignatureAlgorithm(a) => write!(f, "unknown signature algorithm {a} (only 1, ECDSA P-384/SHA-384, exists)"),
            SignaturePaddingNonZero => f.write_str("signature has non-zero bytes past the 48 significant bytes of r or s"),
            UnsupportedSigningKey(k) => write!(f, "report signing key is {}: only VCEK or VLEK signed reports are accepted", key_name(k)),
            ProductUnknown => f.write_str("cannot tell the product (Milan/Genoa/Turin) from the report or certificates; pass it explicitly"),
            ProductMismatch { report, other } => write!(f, "product mismatch: the report is from {report} but the certificates are for {other}"),
            ProductNotAllowed(p) => write!(f, "reports from {p} are not allowed by the policy"),
            CertTableInvalid(why) => write!(f, "certificate table unusable: {why}"),
            MissingCertificate(r) => write!(f, "missing {r} certificate"),
            VcekUnavailable(why) => write!(f, "the report carries no VCEK and none could be had: {why}"),
            CertUnparsable { role, why } => write!(f, "{role} certificate unusable: {why}"),
            UnexpectedCertName { role, found, expected } => write!(f, "{role} certificate is named {found:?}, expected {expected:?}"),
            ArkNotTrusted => f.write_str("ARK is not AMD's root for this product and no such trust root is configured"),
            CertSignatureInvalid(r) => write!(f, "{r} certificate signature does not verify with its issuer's key"),
            IssuerMismatch(r) => write!(f, "{r} certificate's issuer name does not match its issuer's subject"),
            NotACa(r) => write!(f, "{r} certificate signs certificates but is not a CA with keyCertSign usage"),
            UnknownCriticalExtension { role, oid } => write!(f, "{role} certificate has unknown critical extension {oid}"),
            CertNotYetValid { role, not_before, at } => write!(f, "{role} certificate not valid until {} (checked at {})", rfc3339(*not_before), rfc3339(*at)),
            CertExpired { role, not_after, at } => write!(f, "{role} certificate expired at {} (checked at {})", rfc3339(*not_after), rfc3339(*at)),
            SigningKeyMismatch { report, cert } => write!(f, "report says it is signed by the {} but the certificate is a {cert}", key_name(report)),
            CrlInvalid(why) => write!(f, "CRL cannot be used ({why}): revocation cannot be checked"),
            CrlStale { next_update, at } => match next_update {
                Some(n) => write!(f, "CRL is not current: next update was due {} (checked at {})", rfc3339(*n), rfc3339(*at)),
                None => write!(f, "CRL is not current at {} (no nextUpdate or issued later)", rfc3339(*at)),
            },
            CrlUnavailable => f.write_str("no current CRL is available and revocation checking is required"),
            CertRevoked(r) => write!(f, "{r} certificate is revoked"),
            ReportSignatureInvalid => f.write_str("report signature does not verify with the VCEK/VLEK"),
            HwidMissing => f.write_str("VCEK has no usable hwID extension"),
            HwidMismatch => f.write_str("VCEK hwID does not equal the report's CHIP_ID (VCEK of another chip, or a masked chip id)"),
            TcbExtensionMissing(c) => write!(f, "VCEK/VLEK lacks the {c} SPL extension"),
            TcbMismatch { component, report, cert } => write!(f, "reported TCB {component}={report} but the VCEK/VLEK is for {component}={cert}"),
            TcbBelowMinimum { field, component, have, need } => write!(f, "{field} TCB {component}={have} is below the minimum {need}"),
            TcbAboveCurrent { field, component, value, current } => write!(f, "{field} TCB {component}={value} is above the current TCB {component}={current} (rollback or a VCEK for firmware not running)"),
            ProvisionalFirmware => f.write_str("committed TCB/firmware differs from current: provisional firmware is not permitted"),
            PolicyReservedBits(v) => write!(f, "guest policy {v:#x} has reserved bits wrong (bit 17 must be 1, bits 63:26 must be 0)"),
            PolicyFlagForbidden(n) => write!(f, "guest policy allows {n}, which the appraisal policy forbids"),
            PolicyFlagRequired(n) => write!(f, "guest policy lacks {n}, which the appraisal policy requires"),
            AbiTooOld { have, need } => write!(f, "guest policy ABI {}.{} is below the minimum {}.{}", have.0, have.1, need.0, need.1),
            PlatformFlagForbidden(n) => write!(f, "platform has {n} enabled, which the appraisal policy forbids"),
            PlatformFlagRequired(n) => write!(f, "platform lacks {n}, which the appraisal policy requires"),
            VmplMismatch { have, want } => write!(f, "report is from VMPL {have}, policy requires VMPL {want}"),
            GuestSvnTooLow { have, need } => write!(f, "guest SVN {have} is below the minimum {need}"),
            FieldMismatch(n) => write!(f, "{n} does not equal the expected value"),
            IdBlockRequired => f.write_str("an ID block signed by a trusted ID or author key is required"),
            IdKeyNotTrusted(d) => write!(f, "ID key digest {d} is not trusted"),
            AuthorKeyRequired => f.write_str("an author key is required (AUTHOR_KEY_EN is not set)"),
            AuthorKeyNotTrusted(d) => write!(f, "author key digest {d} is not trusted"),
            MeasurementNotAllowed(m) => write!(f, "measurement {m} is not in the allowlist"),
            ChipNotAllowed => f.write_str("chip id is not in the allowlist"),
            FirmwareBuildTooOld { have, need } => write!(f, "firmware build {have} is below the minimum {need}"),
            FirmwareVersionTooOld { have, need } => write!(f, "firmware version {}.{} is below the minimum {}.{}", have.0, have.1, need.0, need.1),
            MitigationsMissing { launch, missing } => write!(f, "{} mitigation vector lacks required bits {missing:#x}", if *launch { "launch" } else { "current" }),
            MitigationsUnavailable => f.write_str("mitigation vectors are required but the report (version < 5) has none"),
            SigningKeyNotAllowed(k) => write!(f, "reports signed by a {} are not allowed by the policy", key_name(k)),
            VlekCspNotAllowed(c) => write!(f, "VLEK of cloud provider {c:?} is not allowed by the policy"),
            ReportVersionTooOld { have, need } => write!(f, "report version {have} is below the minimum {need}"),
            ReservedNonZero(n) => write!(f, "report field {n} must be zero"),
        }
    }
}

/// Formats Unix seconds as RFC 3339 UTC (days-from-civil, no dependency on a clock).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses an RFC 3339 timestamp (`2025-01-31T12:00:00Z`, offsets and fractions allowed) to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid RFC 3339 time {s:?} (expected e.g. 2025-06-01T00:00:00Z)");
    if !s.is_ascii() {
        return Err(bad());
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(bad());
        }
        rest = &frac[n..];
    }
    let digits = |t: &str| t.len() == 2 && t.bytes().all(|c| c.is_ascii_digit());
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6
            && (o.starts_with('+') || o.starts_with('-'))
            && &o[3..4] == ":"
            && digits(&o[1..3])
            && digits(&o[4..6]) =>
        {
            let oh: i64 = o[1..3].parse().map_err(|_| bad())?;
            let om: i64 = o[4..6].parse().map_err(|_| bad())?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let v = oh * 3600 + om * 60;
            if o.starts_with('+') { v } else { -v }
        }
        _ => return Err(bad()),
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if d > month_days[(mo - 1) as usize] {
        return Err(bad());
    }
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy.rem_euclid(400);
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(t).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trip() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2025-12-10T22:14:21Z"), Ok(1_765_404_861));
        assert_eq!(rfc3339(1_765_404_861), "2025-12-10T22:14:21Z");
        assert_eq!(
            parse_rfc3339("2025-12-10T23:14:21+01:00"),
            Ok(1_765_404_861)
        );
        assert_eq!(parse_rfc3339("2025-12-10T22:14:21.5Z"), Ok(1_765_404_861));
        assert!(parse_rfc3339("2025-13-10T22:14:21Z").is_err());
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(parse_rfc3339("2025-12-10T22:14:21").is_err());
        assert!(parse_rfc3339("2025-02-29T00:00:00Z").is_err());
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_ok());
        assert!(parse_rfc3339("2025-12-10T22:14:21+-1:00").is_err());
        assert!(parse_rfc3339("2025-12-10T22:14:21+99:00").is_err());
        assert!(parse_rfc3339("2025-12-10T22:14:21+1\u{e9}:0").is_err());
        for t in [0u64, 951_782_400, 4_102_444_800, 1_709_164_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Ok(t));
        }
    }
}
