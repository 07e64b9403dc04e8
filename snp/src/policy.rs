//! The appraisal policy: what a genuine report must also say to be accepted.
//!
//! A versioned TOML (or JSON) document. Every check that applies is evaluated and every
//! failure reported. Defaults deny what is dangerous: debug and migration-agent guests are
//! refused unless allowed, VMPL must be 0 unless set otherwise, provisional firmware is refused.

use crate::Product;
use crate::hexbytes::{HexBytes, HexU64};
use crate::reason::{ExactField, Reason, TcbField};
use crate::report::{GuestPolicy, PlatformInfo, ReportBody, SigningKey};
use crate::tcb::{Tcb, TcbMinimum, regressions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;

/// A field compared for equality: which, the expected value if any, and the report's.
type ExactCheck<'a> = (ExactField, Option<&'a [u8]>, &'a [u8]);

/// The only policy document version this build understands.
pub const POLICY_VERSION: u32 = 1;

/// Why a policy document was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML for this schema: {0}")]
    Toml(String),
    #[error("policy version {0} is not supported (this build reads version {POLICY_VERSION})")]
    Version(u32),
    #[error("policy is inconsistent: {0}")]
    Invalid(String),
}

/// A firmware or ABI version `major.minor`, written as a string `"1.55"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MajorMinor(pub u8, pub u8);

impl FromStr for MajorMinor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('.')
            .ok_or_else(|| format!("expected MAJOR.MINOR, got {s:?}"))?;
        let p = |x: &str| {
            x.parse::<u8>()
                .map_err(|_| format!("expected MAJOR.MINOR with numbers 0-255, got {s:?}"))
        };
        Ok(MajorMinor(p(a)?, p(b)?))
    }
}

impl Serialize for MajorMinor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}.{}", self.0, self.1))
    }
}

impl<'de> Deserialize<'de> for MajorMinor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// TCB requirements.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcbPolicy {
    /// Per-component minimum of REPORTED_TCB (the TCB the VCEK is issued for).
    pub minimum_reported: TcbMinimum,
    /// Per-component minimum of CURRENT_TCB.
    pub minimum_current: TcbMinimum,
    /// Per-component minimum of COMMITTED_TCB (what the firmware cannot roll back below).
    pub minimum_committed: TcbMinimum,
    /// Per-component minimum of LAUNCH_TCB (the TCB when the guest was launched).
    pub minimum_launch: TcbMinimum,
    /// Accept committed < current (firmware loaded but not committed). Default: refuse.
    pub permit_provisional_firmware: bool,
    /// Per-product minimums that apply to all four TCBs above (TCB numbers mean different
    /// things on each product), on top of the product-agnostic ones: the broker's floor.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub minimum_by_product: BTreeMap<Product, TcbMinimum>,
}

/// Requirements on the guest policy the host launched the VM with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestPolicyRules {
    pub allow_debug: bool,
    pub allow_migration_agent: bool,
    pub allow_smt: bool,
    pub allow_cxl: bool,
    pub require_single_socket: bool,
    pub require_aes_256_xts: bool,
    pub require_rapl_disabled: bool,
    pub require_ciphertext_hiding: bool,
    pub require_page_swap_disabled: bool,
    /// Minimum ABI major.minor the guest requires of the firmware.
    pub minimum_abi: Option<MajorMinor>,
}

impl Default for GuestPolicyRules {
    fn default() -> Self {
        GuestPolicyRules {
            allow_debug: false,
            allow_migration_agent: false,
            allow_smt: true,
            allow_cxl: true,
            require_single_socket: false,
            require_aes_256_xts: false,
            require_rapl_disabled: false,
            require_ciphertext_hiding: false,
            require_page_swap_disabled: false,
            minimum_abi: None,
        }
    }
}

/// Requirements on PLATFORM_INFO.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformRules {
    pub allow_smt: bool,
    pub allow_tsme: bool,
    pub allow_tio: bool,
    pub require_ecc: bool,
    pub require_rapl_disabled: bool,
    pub require_ciphertext_hiding: bool,
    pub require_alias_check_complete: bool,
}

impl Default for PlatformRules {
    fn default() -> Self {
        PlatformRules {
            allow_smt: true,
            allow_tsme: true,
            allow_tio: true,
            require_ecc: false,
            require_rapl_disabled: false,
            require_ciphertext_hiding: false,
            require_alias_check_complete: false,
        }
    }
}

fn default_version() -> u32 {
    POLICY_VERSION
}
fn default_vmpl() -> Option<u32> {
    Some(0)
}
fn default_signing_keys() -> Vec<SigningKeyName> {
    vec![SigningKeyName::Vcek]
}

/// A signing key kind, as written in a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningKeyName {
    Vcek,
    Vlek,
}

/// The appraisal policy document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Document version; must be [`POLICY_VERSION`].
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default)]
    pub tcb: TcbPolicy,
    #[serde(default)]
    pub guest_policy: GuestPolicyRules,
    #[serde(default)]
    pub platform: PlatformRules,
    /// Exact VMPL the report must come from. Default 0; set `any_vmpl = true` to accept any.
    #[serde(default = "default_vmpl")]
    pub vmpl: Option<u32>,
    /// Accept a report from any VMPL (overrides `vmpl`).
    #[serde(default)]
    pub any_vmpl: bool,
    #[serde(default)]
    pub minimum_guest_svn: u32,
    #[serde(default)]
    pub minimum_report_version: Option<u32>,
    pub family_id: Option<HexBytes<16>>,
    pub image_id: Option<HexBytes<16>>,
    pub host_data: Option<HexBytes<32>>,
    pub report_data: Option<HexBytes<64>>,
    pub report_id: Option<HexBytes<32>>,
    pub report_id_ma: Option<HexBytes<32>>,
    /// Require an ID block signed by a trusted ID key or a trusted author key.
    #[serde(default)]
    pub require_id_block: bool,
    /// Require AUTHOR_KEY_EN with a trusted author key digest (implies `require_id_block`).
    #[serde(default)]
    pub require_author_key: bool,
    /// SHA-384 digests of trusted ID public keys (AMD's public-key format).
    #[serde(default)]
    pub trusted_id_keys: Vec<HexBytes<48>>,
    /// SHA-384 digests of trusted author public keys.
    #[serde(default)]
    pub trusted_author_keys: Vec<HexBytes<48>>,
    /// Allowed launch measurements. Absent: any; present and empty: none.
    pub measurements: Option<Vec<HexBytes<48>>>,
    /// Allowed chip ids (64 bytes; Turin: first 8 bytes significant, rest zero). Absent: any.
    pub chip_ids: Option<Vec<HexBytes<64>>>,
    /// Minimum CURRENT_BUILD of the firmware; with `minimum_firmware`, it applies only to
    /// firmware of exactly that major.minor (newer versions pass whatever their build).
    #[serde(default)]
    pub minimum_build: u8,
    /// Minimum CURRENT_MAJOR.CURRENT_MINOR of the firmware.
    pub minimum_firmware: Option<MajorMinor>,
    /// Bits that must be set in LAUNCH_MIT_VECTOR (report v5+).
    pub required_launch_mitigations: Option<HexU64>,
    /// Bits that must be set in CURRENT_MIT_VECTOR (report v5+).
    pub required_current_mitigations: Option<HexU64>,
    /// Which report-signing keys are acceptable. Default: VCEK only, because a VLEK-signed
    /// report cannot be bound to a chip (its chip id may be masked).
    #[serde(default = "default_signing_keys")]
    pub signing_keys: Vec<SigningKeyName>,
    /// Reject reports whose reserved fields are not zero.
    #[serde(default)]
    pub strict_reserved: bool,
    /// Cloud providers (VLEK CSP_ID) whose VLEK-signed reports are acceptable, when VLEKs are
    /// allowed at all. Absent: any provider.
    #[serde(default)]
    pub vlek_csp_ids: Option<Vec<String>>,
    /// Products this policy is written for (TCB numbers mean different things on each).
    /// Absent: any.
    #[serde(default)]
    pub products: Option<Vec<Product>>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            version: POLICY_VERSION,
            tcb: TcbPolicy::default(),
            guest_policy: GuestPolicyRules::default(),
            platform: PlatformRules::default(),
            vmpl: default_vmpl(),
            any_vmpl: false,
            minimum_guest_svn: 0,
            minimum_report_version: None,
            family_id: None,
            image_id: None,
            host_data: None,
            report_data: None,
            report_id: None,
            report_id_ma: None,
            require_id_block: false,
            require_author_key: false,
            trusted_id_keys: Vec::new(),
            trusted_author_keys: Vec::new(),
            measurements: None,
            chip_ids: None,
            minimum_build: 0,
            minimum_firmware: None,
            required_launch_mitigations: None,
            required_current_mitigations: None,
            signing_keys: default_signing_keys(),
            strict_reserved: false,
            products: None,
            vlek_csp_ids: None,
        }
    }
}

impl Policy {
    /// Parses and validates a TOML policy document.
    pub fn from_toml(s: &str) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(s).map_err(|e| PolicyError::Toml(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// A policy no report passes (no measurement, no chip): what fail-closed appraisal uses.
    pub fn nothing() -> Policy {
        Policy {
            measurements: Some(Vec::new()),
            chip_ids: Some(Vec::new()),
            ..Policy::default()
        }
    }

    /// The appraisal policy for one VM: `policy` (TOML; empty means the default) restricted to
    /// the VM's measurements and chip ids (each of the wrong length is dropped). A policy that
    /// cannot be read allows nothing: fail closed.
    pub fn for_vm<M: AsRef<[u8]>, C: AsRef<[u8]>>(
        policy: &str,
        measurements: &[M],
        chip_ids: &[C],
    ) -> Policy {
        let parsed = if policy.is_empty() {
            Ok(Policy::default())
        } else {
            Policy::from_toml(policy)
        };
        let Ok(mut p) = parsed else {
            return Policy::nothing();
        };
        p.measurements = Some(
            measurements
                .iter()
                .filter_map(|b| <[u8; 48]>::try_from(b.as_ref()).ok().map(HexBytes))
                .collect(),
        );
        p.chip_ids = Some(
            chip_ids
                .iter()
                .filter_map(|b| <[u8; 64]>::try_from(b.as_ref()).ok().map(HexBytes))
                .collect(),
        );
        p
    }

    /// Serializes to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks a deserialized policy (from any serde format) for consistency.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.version != POLICY_VERSION {
            return Err(PolicyError::Version(self.version));
        }
        if let Some(v) = self.vmpl
            && v > 3
        {
            return Err(PolicyError::Invalid(format!(
                "vmpl {v} does not exist (0-3)"
            )));
        }
        if self.signing_keys.is_empty() {
            return Err(PolicyError::Invalid(
                "signing_keys is empty: nothing could ever be accepted".into(),
            ));
        }
        if self.products.as_ref().is_some_and(Vec::is_empty) {
            return Err(PolicyError::Invalid(
                "products is empty: nothing could ever be accepted".into(),
            ));
        }
        if self.require_author_key && self.trusted_author_keys.is_empty() {
            return Err(PolicyError::Invalid(
                "require_author_key without trusted_author_keys".into(),
            ));
        }
        if self.require_id_block
            && self.trusted_id_keys.is_empty()
            && self.trusted_author_keys.is_empty()
        {
            return Err(PolicyError::Invalid(
                "require_id_block without trusted_id_keys or trusted_author_keys".into(),
            ));
        }
        Ok(())
    }

    /// Appraises a decoded report from `product` against this policy. Returns every failure.
    pub fn appraise(&self, r: &ReportBody, product: Product) -> Vec<Reason> {
        let mut out = Vec::new();
        if let Some(allowed) = &self.products
            && !allowed.contains(&product)
        {
            out.push(Reason::ProductNotAllowed(product));
        }
        self.check_tcb(r, product, &mut out);
        self.check_guest_policy(r.policy, &mut out);
        self.check_platform(r.platform_info, &mut out);
        self.check_identity(r, &mut out);
        self.check_firmware(r, &mut out);
        out
    }

    fn check_tcb(&self, r: &ReportBody, product: Product, out: &mut Vec<Reason>) {
        let reported = Tcb::decode(r.reported_tcb, product);
        let current = Tcb::decode(r.current_tcb, product);
        let committed = Tcb::decode(r.committed_tcb, product);
        let launch = Tcb::decode(r.launch_tcb, product);
        let by_product = self
            .tcb
            .minimum_by_product
            .get(&product)
            .copied()
            .unwrap_or_default();
        for (field, tcb, min) in [
            (TcbField::Reported, &reported, &self.tcb.minimum_reported),
            (TcbField::Current, &current, &self.tcb.minimum_current),
            (TcbField::Committed, &committed, &self.tcb.minimum_committed),
            (TcbField::Launch, &launch, &self.tcb.minimum_launch),
        ] {
            for (component, have, need) in tcb.below(&min.stricter(&by_product)) {
                out.push(Reason::TcbBelowMinimum {
                    field,
                    component,
                    have,
                    need,
                });
            }
        }
        // Anti-rollback: neither the TCB the VCEK certifies, nor the committed TCB, nor the TCB
        // the guest was launched under may exceed the running firmware's TCB (firmware only moves
        // forward under a running guest; migration is refused by default).
        for (field, tcb) in [
            (TcbField::Reported, &reported),
            (TcbField::Committed, &committed),
            (TcbField::Launch, &launch),
        ] {
            for (component, current, value) in regressions(&current, tcb) {
                out.push(Reason::TcbAboveCurrent {
                    field,
                    component,
                    value,
                    current,
                });
            }
        }
        if !self.tcb.permit_provisional_firmware
            && (r.committed_tcb != r.current_tcb || r.committed_version != r.current_version)
        {
            out.push(Reason::ProvisionalFirmware);
        }
    }

    fn check_guest_policy(&self, p: GuestPolicy, out: &mut Vec<Reason>) {
        let g = &self.guest_policy;
        if !p.has(GuestPolicy::RESERVED_MBO) || p.0 >> 26 != 0 {
            out.push(Reason::PolicyReservedBits(p.0));
        }
        for (set, allowed, name) in [
            (p.debug(), g.allow_debug, "debug"),
            (p.migrate_ma(), g.allow_migration_agent, "a migration agent"),
            (p.smt_allowed(), g.allow_smt, "SMT"),
            (p.cxl_allowed(), g.allow_cxl, "CXL"),
        ] {
            if set && !allowed {
                out.push(Reason::PolicyFlagForbidden(name));
            }
        }
        for (set, required, name) in [
            (p.single_socket(), g.require_single_socket, "single-socket"),
            (
                p.mem_aes_256_xts(),
                g.require_aes_256_xts,
                "AES-256-XTS memory encryption",
            ),
            (p.rapl_disabled(), g.require_rapl_disabled, "RAPL disabled"),
            (
                p.ciphertext_hiding(),
                g.require_ciphertext_hiding,
                "ciphertext hiding",
            ),
            (
                p.page_swap_disabled(),
                g.require_page_swap_disabled,
                "page swap disabled",
            ),
        ] {
            if required && !set {
                out.push(Reason::PolicyFlagRequired(name));
            }
        }
        if let Some(MajorMinor(maj, min)) = g.minimum_abi
            && (p.abi_major(), p.abi_minor()) < (maj, min)
        {
            out.push(Reason::AbiTooOld {
                have: (p.abi_major(), p.abi_minor()),
                need: (maj, min),
            });
        }
    }

    fn check_platform(&self, pi: PlatformInfo, out: &mut Vec<Reason>) {
        let r = &self.platform;
        for (bit, allowed, name) in [
            (PlatformInfo::SMT_EN, r.allow_smt, "SMT"),
            (PlatformInfo::TSME_EN, r.allow_tsme, "TSME"),
            (PlatformInfo::TIO_EN, r.allow_tio, "TIO"),
        ] {
            if pi.has(bit) && !allowed {
                out.push(Reason::PlatformFlagForbidden(name));
            }
        }
        for (bit, required, name) in [
            (PlatformInfo::ECC_EN, r.require_ecc, "ECC memory"),
            (
                PlatformInfo::RAPL_DIS,
                r.require_rapl_disabled,
                "RAPL disabled",
            ),
            (
                PlatformInfo::CIPHERTEXT_HIDING_EN,
                r.require_ciphertext_hiding,
                "ciphertext hiding",
            ),
            (
                PlatformInfo::ALIAS_CHECK_COMPLETE,
                r.require_alias_check_complete,
                "alias check complete",
            ),
        ] {
            if required && !pi.has(bit) {
                out.push(Reason::PlatformFlagRequired(name));
            }
        }
    }

    fn check_identity(&self, r: &ReportBody, out: &mut Vec<Reason>) {
        if !self.any_vmpl
            && let Some(want) = self.vmpl
            && r.vmpl != want
        {
            out.push(Reason::VmplMismatch { have: r.vmpl, want });
        }
        if r.guest_svn < self.minimum_guest_svn {
            out.push(Reason::GuestSvnTooLow {
                have: r.guest_svn,
                need: self.minimum_guest_svn,
            });
        }
        if let Some(min) = self.minimum_report_version
            && r.version < min
        {
            out.push(Reason::ReportVersionTooOld {
                have: r.version,
                need: min,
            });
        }
        let exact: [ExactCheck<'_>; 6] = [
            (
                ExactField::FamilyId,
                self.family_id.as_ref().map(|h| &h.0[..]),
                &r.family_id,
            ),
            (
                ExactField::ImageId,
                self.image_id.as_ref().map(|h| &h.0[..]),
                &r.image_id,
            ),
            (
                ExactField::HostData,
                self.host_data.as_ref().map(|h| &h.0[..]),
                &r.host_data,
            ),
            (
                ExactField::ReportData,
                self.report_data.as_ref().map(|h| &h.0[..]),
                &r.report_data,
            ),
            (
                ExactField::ReportId,
                self.report_id.as_ref().map(|h| &h.0[..]),
                &r.report_id,
            ),
            (
                ExactField::ReportIdMa,
                self.report_id_ma.as_ref().map(|h| &h.0[..]),
                &r.report_id_ma,
            ),
        ];
        for (field, want, have) in exact {
            if let Some(w) = want
                && w != have
            {
                out.push(Reason::FieldMismatch(field));
            }
        }
        // ID block: the firmware checked the ID block's signatures at launch; we check whose keys.
        let author_trusted = r.key_info.author_key_en()
            && self
                .trusted_author_keys
                .iter()
                .any(|k| k.0 == r.author_key_digest);
        let id_trusted = self.trusted_id_keys.iter().any(|k| k.0 == r.id_key_digest);
        if self.require_author_key {
            if !r.key_info.author_key_en() {
                out.push(Reason::AuthorKeyRequired);
            } else if !author_trusted {
                out.push(Reason::AuthorKeyNotTrusted(HexBytes(r.author_key_digest)));
            }
        } else if self.require_id_block && !(author_trusted || id_trusted) {
            // Name every key that was offered and not trusted; if none was, say an ID block is needed.
            let before = out.len();
            if !self.trusted_id_keys.is_empty() {
                out.push(Reason::IdKeyNotTrusted(HexBytes(r.id_key_digest)));
            }
            if r.key_info.author_key_en() && !self.trusted_author_keys.is_empty() {
                out.push(Reason::AuthorKeyNotTrusted(HexBytes(r.author_key_digest)));
            }
            if out.len() == before {
                out.push(Reason::IdBlockRequired);
            }
        }
        if let Some(allowed) = &self.measurements
            && !allowed.iter().any(|m| m.0 == r.measurement)
        {
            out.push(Reason::MeasurementNotAllowed(HexBytes(r.measurement)));
        }
        if let Some(chips) = &self.chip_ids
            && !chips.iter().any(|c| c.0 == r.chip_id)
        {
            out.push(Reason::ChipNotAllowed);
        }
        let key = r.key_info.signing_key();
        let allowed = match key {
            SigningKey::Vcek => self.signing_keys.contains(&SigningKeyName::Vcek),
            SigningKey::Vlek => self.signing_keys.contains(&SigningKeyName::Vlek),
            _ => false,
        };
        if !allowed {
            out.push(Reason::SigningKeyNotAllowed(key));
        }
    }

    fn check_firmware(&self, r: &ReportBody, out: &mut Vec<Reason>) {
        let v = r.current_version;
        // A build number only means something within one major.minor: with a minimum version,
        // the minimum build applies to that version only (1.57 build 1 is newer than 1.55 build 21).
        let build_applies = match self.minimum_firmware {
            Some(MajorMinor(maj, min)) => (v.major, v.minor) == (maj, min),
            None => true,
        };
        if build_applies && v.build < self.minimum_build {
            out.push(Reason::FirmwareBuildTooOld {
                have: v.build,
                need: self.minimum_build,
            });
        }
        if let Some(MajorMinor(maj, min)) = self.minimum_firmware
            && (v.major, v.minor) < (maj, min)
        {
            out.push(Reason::FirmwareVersionTooOld {
                have: (v.major, v.minor),
                need: (maj, min),
            });
        }
        for (launch, need, have) in [
            (true, self.required_launch_mitigations, r.launch_mit_vector),
            (
                false,
                self.required_current_mitigations,
                r.current_mit_vector,
            ),
        ] {
            let Some(HexU64(need)) = need else { continue };
            if need == 0 {
                continue;
            }
            match have {
                None => {
                    if !out.contains(&Reason::MitigationsUnavailable) {
                        out.push(Reason::MitigationsUnavailable);
                    }
                }
                Some(have) if have & need != need => {
                    out.push(Reason::MitigationsMissing {
                        launch,
                        missing: need & !have,
                    });
                }
                Some(_) => {}
            }
        }
    }
}
