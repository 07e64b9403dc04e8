//! The attack catalogue: what a hostile miner, the network or a stale image can try, each a
//! named scenario that must be denied for a specific reason. Run against the verifier and the
//! appraisal policy here (`attesta-sim attacks`); the key broker's tests run them end to end.

use crate::chip::{Chip, ChipConfig, GuestLaunch};
use crate::pki::Pki;
use crate::seed::Seed;
use snp::certtable::{CertTable, GUID_ARK, GUID_ASK, GUID_VCEK};
use snp::hexbytes::HexBytes;
use snp::policy::{Policy, TcbPolicy};
use snp::reason::Reason;
use snp::report::{KeyInfo, ReportBody, SigningKey};
use snp::tcb::TcbMinimum;
use snp::{Evidence, Product, Revocation, Tcb, Verifier, VerifierConfig};
use std::sync::Arc;

/// 2026-06-01T00:00:00Z: the instant the catalogue is evaluated at.
pub const NOW: u64 = 1_780_272_000;
const DAY: u64 = 86_400;
/// The approved image, an older one, and the tenant's host data.
pub const GOOD_MEASUREMENT: [u8; 48] = [0x4d; 48];
pub const OLD_MEASUREMENT: [u8; 48] = [0x01; 48];
pub const HOST_DATA: [u8; 32] = [0x4a; 32];
pub const TRUSTED_ID_KEY: [u8; 48] = [0x1d; 48];
/// What the broker expects in REPORT_DATA for this session (nonce and guest key bound).
pub const EXPECTED_REPORT_DATA: [u8; 64] = [0xe1; 64];

/// The outcome of one scenario.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub denied: bool,
    /// Whether a reason with the expected code was among the reasons.
    pub expected_reason: bool,
    pub expect: &'static str,
    pub reasons: Vec<Reason>,
}

impl Outcome {
    /// The reason to show: the expected one if present, else the first.
    pub fn reason(&self) -> String {
        self.reasons
            .iter()
            .find(|r| r.code() == self.expect)
            .or(self.reasons.first())
            .map(ToString::to_string)
            .unwrap_or_default()
    }
}

/// Evidence and how to judge it.
struct Case {
    report: Vec<u8>,
    vcek: Vec<u8>,
    ask: Vec<u8>,
    ark: Vec<u8>,
    crls: Vec<Vec<u8>>,
    policy: Policy,
    revocation: Revocation,
}

/// The simulated world the attacks run in: three products, two chips of the tenant's product,
/// and a rogue hierarchy nobody trusts.
#[derive(Clone)]
pub struct Lab {
    milan: Arc<Pki>,
    genoa: Arc<Pki>,
    turin: Arc<Pki>,
    rogue: Arc<Pki>,
    chip_a: Arc<Chip>,
    chip_b: Arc<Chip>,
    turin_chip: Arc<Chip>,
    /// What genuine reports carry in REPORT_DATA: [`EXPECTED_REPORT_DATA`] offline, the live
    /// session's binding when the catalogue runs against a broker.
    report_data: [u8; 64],
}

fn good_launch() -> GuestLaunch {
    GuestLaunch {
        measurement: GOOD_MEASUREMENT,
        host_data: HOST_DATA,
        id_key_digest: TRUSTED_ID_KEY,
        ..Default::default()
    }
}

impl Lab {
    /// Builds the lab from a seed (hierarchies can be passed in to reuse cached ones).
    pub fn new(milan: Pki, genoa: Pki, turin: Pki, rogue: Pki) -> Result<Lab, crate::SimError> {
        Lab::from_shared(
            Arc::new(milan),
            Arc::new(genoa),
            Arc::new(turin),
            Arc::new(rogue),
        )
    }

    /// As [`new`](Self::new), sharing hierarchies the caller also uses.
    pub fn from_shared(
        milan: Arc<Pki>,
        genoa: Arc<Pki>,
        turin: Arc<Pki>,
        rogue: Arc<Pki>,
    ) -> Result<Lab, crate::SimError> {
        let chip_a = Chip::new(milan.clone(), ChipConfig::typical(&milan, 0))?;
        let chip_b = Chip::new(milan.clone(), ChipConfig::typical(&milan, 1))?;
        let turin_chip = Chip::new(turin.clone(), ChipConfig::typical(&turin, 0))?;
        Ok(Lab {
            milan,
            genoa,
            turin,
            rogue,
            chip_a: Arc::new(chip_a),
            chip_b: Arc::new(chip_b),
            turin_chip: Arc::new(turin_chip),
            report_data: EXPECTED_REPORT_DATA,
        })
    }

    /// Generates every hierarchy from `seed` (about ten seconds: twelve RSA-4096 keys).
    pub fn from_seed(seed: &Seed) -> Result<Lab, crate::SimError> {
        Lab::new(
            Pki::from_seed(Product::Milan, *seed)?,
            Pki::from_seed(Product::Genoa, *seed)?,
            Pki::from_seed(Product::Turin, *seed)?,
            Pki::from_seed(Product::Milan, seed.derive(b"rogue"))?,
        )
    }

    /// The tenant's appraisal policy for a VM placed on `chip`.
    fn policy_for(&self, chip: &Chip) -> Policy {
        let t = chip.config.current_tcb;
        Policy {
            measurements: Some(vec![HexBytes(GOOD_MEASUREMENT)]),
            chip_ids: Some(vec![HexBytes(chip.config.chip_id)]),
            host_data: Some(HexBytes(HOST_DATA)),
            report_data: Some(HexBytes(self.report_data)),
            require_id_block: true,
            trusted_id_keys: vec![HexBytes(TRUSTED_ID_KEY)],
            products: Some(vec![chip.product()]),
            tcb: TcbPolicy {
                minimum_reported: TcbMinimum {
                    fmc: t.fmc,
                    bootloader: Some(t.bootloader),
                    tee: Some(t.tee),
                    snp: Some(t.snp),
                    microcode: Some(t.microcode),
                },
                minimum_launch: TcbMinimum {
                    snp: Some(t.snp),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Policy::default()
        }
    }

    /// A genuine report from `chip`, with the body adjusted by `f` before signing.
    fn signed(&self, chip: &Chip, f: impl Fn(&mut ReportBody)) -> Case {
        let g = good_launch();
        let mut body = chip.report_body(&g, &chip.config.current_tcb, &self.report_data, 0);
        f(&mut body);
        let report = chip.sign(&mut body).map(|b| b.to_vec()).unwrap_or_default();
        Case {
            report,
            vcek: chip.vcek().cert.clone(),
            ask: chip.pki().ask.cert.clone(),
            ark: chip.pki().ark.cert.clone(),
            crls: Vec::new(),
            policy: self.policy_for(chip),
            revocation: Revocation::IfAvailable,
        }
    }

    fn genuine(&self) -> Case {
        self.signed(&self.chip_a, |_| {})
    }

    fn judge(&self, c: &Case) -> Vec<Reason> {
        let v = Verifier::new(VerifierConfig {
            trust_roots: self.trust_roots(),
            revocation: c.revocation,
            ..Default::default()
        });
        let crls: Vec<&[u8]> = c.crls.iter().map(Vec::as_slice).collect();
        let ev = Evidence {
            report: &c.report,
            vcek: Some(&c.vcek),
            ask: Some(&c.ask),
            ark: Some(&c.ark),
            crls: &crls,
        };
        let verdict = v.verify_with_policy(&ev, &c.policy, NOW);
        if verdict.accepted() {
            Vec::new()
        } else {
            verdict.reasons
        }
    }

    /// The control: a genuine report from the right chip must be accepted, or the catalogue
    /// would prove nothing.
    pub fn control(&self) -> Vec<Reason> {
        self.judge(&self.genuine())
    }

    /// Runs every scenario.
    pub fn run_all(&self) -> Vec<Outcome> {
        catalogue()
            .iter()
            .map(|s| {
                let case = (s.build)(self);
                let reasons = self.judge(&case);
                Outcome {
                    name: s.name,
                    denied: !reasons.is_empty(),
                    expected_reason: reasons.iter().any(|r| r.code() == s.expect),
                    expect: s.expect,
                    reasons,
                }
            })
            .collect()
    }
}

/// One named scenario: how to build its evidence and which reason must deny it.
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub expect: &'static str,
    /// The reason a key broker gives when it differs from the verifier's: the broker checks
    /// REPORT_DATA against the session itself (`report_data_mismatch`), not through the policy.
    pub expect_live: Option<&'static str>,
    build: fn(&Lab) -> Case,
}

/// One scenario's evidence as a hostile host would send it to a live key broker, and how that
/// broker must be configured for the scenario to mean what it says.
#[derive(Clone, Debug)]
pub struct LiveCase {
    /// The attestation report (possibly malformed: that is the attack).
    pub report: Vec<u8>,
    /// The extended report's certificate table: the signing certificate under the VCEK GUID,
    /// the ASK and the ARK, as the host supplies them.
    pub cert_table: Vec<u8>,
    /// The VM's appraisal policy; its measurements and chip ids belong in the VM's order.
    /// REPORT_DATA is left out: a broker binds it to the session itself.
    pub policy: Policy,
    /// The broker-wide revocation rule and the CRLs it holds.
    pub revocation: Revocation,
    pub crls: Vec<Vec<u8>>,
}

impl LiveCase {
    fn from_case(c: Case) -> LiveCase {
        let mut entries = Vec::new();
        for (guid, der) in [(GUID_VCEK, c.vcek), (GUID_ASK, c.ask), (GUID_ARK, c.ark)] {
            if !der.is_empty() {
                entries.push((guid, der));
            }
        }
        let mut policy = c.policy;
        policy.report_data = None;
        LiveCase {
            report: c.report,
            cert_table: CertTable { entries }.encode(),
            policy,
            revocation: c.revocation,
            crls: c.crls,
        }
    }
}

impl Scenario {
    /// This scenario's evidence bound to a live session's REPORT_DATA.
    pub fn live(&self, lab: &Lab, report_data: [u8; 64]) -> LiveCase {
        let mut l = lab.clone();
        l.report_data = report_data;
        LiveCase::from_case((self.build)(&l))
    }

    /// The reason a live broker must deny this scenario for.
    pub fn expected_live(&self) -> &'static str {
        self.expect_live.unwrap_or(self.expect)
    }
}

impl Lab {
    /// The live control: genuine evidence bound to `report_data`, which a correctly configured
    /// broker must release (or the live catalogue proves nothing).
    pub fn control_live(&self, report_data: [u8; 64]) -> LiveCase {
        let mut l = self.clone();
        l.report_data = report_data;
        LiveCase::from_case(l.genuine())
    }

    /// The roots a broker judging the catalogue trusts: the three simulated products' ARKs.
    pub fn trust_roots(&self) -> Vec<Vec<u8>> {
        vec![
            self.milan.ark.cert.clone(),
            self.genoa.ark.cert.clone(),
            self.turin.ark.cert.clone(),
        ]
    }
}

fn flip(mut c: Case, at: usize) -> Case {
    if let Some(b) = c.report.get_mut(at) {
        *b ^= 1;
    }
    c
}

fn with_tcb(l: &Lab, chip: &Chip, f: impl Fn(&mut Tcb)) -> Case {
    // The host lowers the TCB it reports (or runs older firmware) and gets the matching VCEK.
    let mut cfg = chip.config.clone();
    let mut t = cfg.current_tcb;
    f(&mut t);
    cfg.current_tcb = t;
    let old = Chip::new(chip.pki_arc(), cfg).ok();
    match old {
        Some(old) => {
            let mut c = l.signed(&old, |_| {});
            c.policy = l.policy_for(chip);
            c
        }
        None => l.genuine(),
    }
}

/// A report signed by a (genuine) VLEK of chip A's TCB; `says_vlek`: whether KEY_INFO says so.
fn vlek_signed(l: &Lab, says_vlek: bool) -> Case {
    let vlek = l
        .milan
        .issue_vlek("csp", &l.chip_a.config.current_tcb, NOW - DAY)
        .ok();
    let mut body = l.chip_a.report_body(
        &good_launch(),
        &l.chip_a.config.current_tcb,
        &l.report_data,
        0,
    );
    if says_vlek {
        body.key_info = KeyInfo(0).with_signing_key(SigningKey::Vlek);
    }
    let report = vlek
        .as_ref()
        .and_then(|v| v.sign_report(&mut body).ok())
        .map(|b| b.to_vec())
        .unwrap_or_default();
    Case {
        report,
        vcek: vlek.map(|v| v.cert).unwrap_or_default(),
        ask: l.milan.asvk.cert.clone(),
        ..l.genuine()
    }
}

/// Chip A's current TCB with its SNP component moved by `delta`, encoded.
fn snp_shifted(l: &Lab, delta: i16) -> u64 {
    let mut t = l.chip_a.config.current_tcb;
    t.snp = u8::try_from(i16::from(t.snp) + delta).unwrap_or(0);
    t.encode(Product::Milan)
}

/// Every scenario, in order.
pub fn catalogue() -> Vec<Scenario> {
    macro_rules! s {
        ($name:literal, $desc:literal, $expect:literal, live: $live:literal, $build:expr) => {
            Scenario {
                name: $name,
                description: $desc,
                expect: $expect,
                expect_live: Some($live),
                build: $build,
            }
        };
        ($name:literal, $desc:literal, $expect:literal, $build:expr) => {
            Scenario {
                name: $name,
                description: $desc,
                expect: $expect,
                expect_live: None,
                build: $build,
            }
        };
    }
    vec![
        s!(
            "debug-policy",
            "the host launches the VM with the DEBUG policy bit, so it can read guest memory",
            "policy_flag_forbidden",
            |l| l.signed(&l.chip_a, |b| b.policy.0 |= snp::report::GuestPolicy::DEBUG)
        ),
        s!(
            "migration-agent",
            "the host allows a migration agent that could export guest memory",
            "policy_flag_forbidden",
            |l| l.signed(&l.chip_a, |b| b.policy.0 |=
                snp::report::GuestPolicy::MIGRATE_MA)
        ),
        s!(
            "wrong-measurement",
            "the host boots software that is not the approved image",
            "measurement_not_allowed",
            |l| l.signed(&l.chip_a, |b| b.measurement = [0xba; 48])
        ),
        s!(
            "older-image",
            "the host boots an older, once approved image with known flaws",
            "measurement_not_allowed",
            |l| l.signed(&l.chip_a, |b| b.measurement = OLD_MEASUREMENT)
        ),
        s!(
            "vm-moved-to-another-chip",
            "the host runs the VM on a chip the order did not place it on",
            "chip_not_allowed",
            |l| {
                let mut c = l.signed(&l.chip_b, |_| {});
                c.policy = l.policy_for(&l.chip_a);
                c
            }
        ),
        s!(
            "vcek-of-another-chip",
            "the host presents another chip's (genuine) VCEK",
            "hwid_mismatch",
            |l| Case {
                vcek: l.chip_b.vcek().cert.clone(),
                ..l.genuine()
            }
        ),
        s!(
            "ask-of-another-product",
            "the host presents the Genoa ASK in a Milan chain",
            "certificate_signature_invalid",
            |l| Case {
                ask: l.genoa.ask.cert.clone(),
                ..l.genuine()
            }
        ),
        s!(
            "ark-of-another-product",
            "the host presents the Turin ARK for a Milan report",
            "certificate_signature_invalid",
            |l| Case {
                ark: l.turin.ark.cert.clone(),
                ..l.genuine()
            }
        ),
        s!(
            "vlek-presented-as-vcek",
            "a VLEK-signed report claims (in KEY_INFO) to be VCEK-signed",
            "signing_key_mismatch",
            |l| vlek_signed(l, false)
        ),
        s!(
            "vcek-presented-as-vlek",
            "a VCEK-signed report claims to be VLEK-signed",
            "signing_key_mismatch",
            |l| l.signed(&l.chip_a, |b| b.key_info =
                KeyInfo(0).with_signing_key(SigningKey::Vlek))
        ),
        s!(
            "vlek-not-allowed",
            "a genuine VLEK-signed report, which cannot be bound to a chip",
            "signing_key_not_allowed",
            |l| vlek_signed(l, true)
        ),
        s!(
            "unsigned-report",
            "KEY_INFO says no key signed the report",
            "unsupported_signing_key",
            |l| l.signed(&l.chip_a, |b| b.key_info =
                KeyInfo(0).with_signing_key(SigningKey::None))
        ),
        s!(
            "forged-signature",
            "the host replaces the signature with one of its own",
            "report_signature_invalid",
            |l| {
                let mut c = l.genuine();
                for (i, b) in c.report[0x2A0..0x2A0 + 48].iter_mut().enumerate() {
                    *b = i as u8;
                }
                c
            }
        ),
        s!(
            "zeroed-signature",
            "the signature is all zero",
            "report_signature_invalid",
            |l| {
                let mut c = l.genuine();
                c.report[0x2A0..].fill(0);
                c
            }
        ),
        s!(
            "padded-signature",
            "non-zero bytes past the 48 significant bytes of r",
            "signature_padding_nonzero",
            |l| {
                let mut c = l.genuine();
                c.report[0x2A0 + 60] = 1;
                c
            }
        ),
        s!(
            "edited-after-signing",
            "the host edits the measurement of a genuine report",
            "report_signature_invalid",
            |l| flip(l.genuine(), 0x90)
        ),
        s!(
            "unknown-signature-algorithm",
            "SIGNATURE_ALGO names an algorithm that does not exist",
            "unknown_signature_algorithm",
            |l| l.signed(&l.chip_a, |b| b.signature_algo = 2)
        ),
        s!(
            "tcb-rollback-snp",
            "old SNP firmware (and its genuine VCEK)",
            "tcb_below_minimum",
            |l| with_tcb(l, &l.chip_a, |t| t.snp -= 1)
        ),
        s!(
            "tcb-rollback-microcode",
            "old microcode",
            "tcb_below_minimum",
            |l| with_tcb(l, &l.chip_a, |t| t.microcode -= 1)
        ),
        s!(
            "tcb-rollback-bootloader",
            "an old bootloader",
            "tcb_below_minimum",
            |l| with_tcb(l, &l.chip_a, |t| t.bootloader -= 1)
        ),
        s!(
            "tcb-rollback-fmc-turin",
            "old FMC firmware on Turin",
            "tcb_below_minimum",
            |l| with_tcb(l, &l.turin_chip, |t| t.fmc =
                t.fmc.map(|f| f.saturating_sub(1)))
        ),
        s!(
            "launch-tcb-old",
            "the VM was launched under older firmware than allowed",
            "tcb_below_minimum",
            |l| l.signed(&l.chip_a, |b| b.launch_tcb = snp_shifted(l, -2))
        ),
        s!(
            "launch-tcb-above-current",
            "the VM was launched under (uncommitted) firmware newer than what runs now: a rollback after launch",
            "tcb_above_current",
            |l| l.signed(&l.chip_a, |b| b.launch_tcb = snp_shifted(l, 1))
        ),
        s!(
            "tcb-rollback-tee-turin",
            "an old TEE (PSP OS) on Turin",
            "tcb_below_minimum",
            |l| with_tcb(l, &l.turin_chip, |t| t.tee = t.tee.saturating_sub(1))
        ),
        s!(
            "reported-tcb-above-current",
            "REPORTED_TCB claims firmware newer than what runs",
            "tcb_above_current",
            |l| l.signed(&l.chip_a, |b| b.current_tcb = snp_shifted(l, -1))
        ),
        s!(
            "uncommitted-firmware",
            "committed TCB below current: firmware that can still be rolled back",
            "provisional_firmware",
            |l| l.signed(&l.chip_a, |b| b.committed_tcb = snp_shifted(l, -1))
        ),
        s!(
            "vmpl-not-zero",
            "the report is requested from VMPL 1, below a paravisor the tenant does not trust",
            "vmpl_mismatch",
            |l| l.signed(&l.chip_a, |b| b.vmpl = 1)
        ),
        s!(
            "masked-chip-id",
            "the host launches with MASK_CHIP_ID so the chip cannot be identified",
            "hwid_mismatch",
            |l| l.signed(&l.chip_a, |b| b.chip_id = [0; 64])
        ),
        s!(
            "report-data-unbound",
            "REPORT_DATA does not bind this session's nonce and guest key",
            "field_mismatch",
            live: "report_data_mismatch",
            |l| l.signed(&l.chip_a, |b| b.report_data = [0; 64])
        ),
        s!(
            "replayed-report",
            "a genuine report from an earlier session (older nonce) is replayed",
            "field_mismatch",
            live: "report_data_mismatch",
            |l| l.signed(&l.chip_a, |b| b.report_data = [0xe0; 64])
        ),
        s!(
            "host-data-mismatch",
            "HOST_DATA is not the order's",
            "field_mismatch",
            |l| l.signed(&l.chip_a, |b| b.host_data = [0; 32])
        ),
        s!(
            "untrusted-id-key",
            "the ID block is signed by a key the tenant does not trust",
            "id_key_not_trusted",
            |l| l.signed(&l.chip_a, |b| b.id_key_digest = [0x66; 48])
        ),
        s!(
            "guest-svn-too-low",
            "the image's security version is below the minimum",
            "guest_svn_too_low",
            |l| {
                let mut c = l.genuine();
                c.policy.minimum_guest_svn = 2;
                c
            }
        ),
        s!(
            "expired-vcek",
            "a VCEK past its validity",
            "certificate_expired",
            |l| {
                let v = l
                    .milan
                    .issue_endorsement(
                        &l.milan.ask,
                        "SEV-VCEK",
                        l.milan.endorsement_exts(
                            &l.chip_a.config.current_tcb,
                            Some(&l.chip_a.config.chip_id),
                            None,
                        ),
                        NOW - 900 * DAY,
                        NOW - DAY,
                    )
                    .ok();
                let mut body = l.chip_a.report_body(
                    &good_launch(),
                    &l.chip_a.config.current_tcb,
                    &l.report_data,
                    0,
                );
                let report = v
                    .as_ref()
                    .and_then(|v| v.sign_report(&mut body).ok())
                    .map(|b| b.to_vec())
                    .unwrap_or_default();
                Case {
                    report,
                    vcek: v.map(|v| v.cert).unwrap_or_default(),
                    ..l.genuine()
                }
            }
        ),
        s!(
            "revoked-vcek",
            "AMD's CRL lists the VCEK",
            "certificate_revoked",
            |l| Case {
                crls: l
                    .milan
                    .ark
                    .sign_crl(&[vec![0]], NOW - DAY, Some(NOW + 7 * DAY))
                    .into_iter()
                    .collect(),
                revocation: Revocation::Require,
                ..l.genuine()
            }
        ),
        s!(
            "revoked-ask",
            "AMD's CRL lists the ASK",
            "certificate_revoked",
            |l| {
                let serial = snp::AmdCert::from_der(l.milan.ask.cert.clone())
                    .map(|c| c.serial)
                    .unwrap_or_default();
                Case {
                    crls: l
                        .milan
                        .ark
                        .sign_crl(&[serial], NOW - DAY, Some(NOW + 7 * DAY))
                        .into_iter()
                        .collect(),
                    revocation: Revocation::Require,
                    ..l.genuine()
                }
            }
        ),
        s!(
            "stale-crl",
            "only a CRL past its nextUpdate is offered (a revocation may be hidden)",
            "crl_stale",
            |l| Case {
                crls: l
                    .milan
                    .ark
                    .sign_crl(&[], NOW - 30 * DAY, Some(NOW - DAY))
                    .into_iter()
                    .collect(),
                revocation: Revocation::Require,
                ..l.genuine()
            }
        ),
        s!(
            "forged-crl",
            "revocation must be checked and the only CRL offered is not signed by the ARK (a \
             broker refuses to hold it)",
            "crl_invalid",
            live: "crl_unavailable",
            |l| Case {
                crls: l
                    .rogue
                    .ark
                    .sign_crl(&[], NOW - DAY, Some(NOW + 7 * DAY))
                    .into_iter()
                    .collect(),
                revocation: Revocation::Require,
                ..l.genuine()
            }
        ),
        s!(
            "no-crl",
            "revocation must be checked but the host withholds the CRL",
            "crl_unavailable",
            |l| Case {
                revocation: Revocation::Require,
                ..l.genuine()
            }
        ),
        s!(
            "non-amd-root",
            "a complete chain under a root nobody configured",
            "ark_not_trusted",
            |l| {
                let chip = Chip::new(l.rogue.clone(), l.chip_a.config.clone()).ok();
                match chip {
                    Some(c) => {
                        let mut case = l.signed(&c, |_| {});
                        case.policy = l.policy_for(&l.chip_a);
                        case
                    }
                    None => l.genuine(),
                }
            }
        ),
        s!(
            "amd-ark-with-rogue-ask",
            "AMD's genuine ARK, but an ASK the host made",
            "certificate_signature_invalid",
            |l| Case {
                ark: snp::roots::der(Product::Milan, snp::roots::Builtin::Ark).to_vec(),
                ask: l.rogue.ask.cert.clone(),
                ..l.genuine()
            }
        ),
        s!(
            "product-confusion",
            "a Milan report claims to come from a Genoa CPU",
            "product_mismatch",
            |l| l.signed(&l.chip_a, |b| b.cpuid = Some(snp::report::Cpuid {
                family: 0x19,
                model: 0x11,
                stepping: 1
            }))
        ),
        s!(
            "truncated-report",
            "the report is cut short",
            "malformed_report",
            |l| {
                let mut c = l.genuine();
                c.report.truncate(1000);
                c
            }
        ),
        s!(
            "oversized-report",
            "the report has trailing bytes",
            "malformed_report",
            |l| {
                let mut c = l.genuine();
                c.report.extend_from_slice(&[0; 16]);
                c
            }
        ),
        s!(
            "unknown-report-version",
            "a report version this verifier does not know",
            "malformed_report",
            |l| {
                let mut c = l.genuine();
                c.report[0] = 6;
                c
            }
        ),
        s!(
            "certificate-table-swap",
            "an extended report's table carries another chip's VCEK",
            "hwid_mismatch",
            |l| {
                let t = CertTable {
                    entries: vec![
                        (GUID_VCEK, l.chip_b.vcek().cert.clone()),
                        (GUID_ASK, l.milan.ask.cert.clone()),
                        (GUID_ARK, l.milan.ark.cert.clone()),
                    ],
                };
                let parsed = CertTable::parse(&t.encode()).unwrap_or_default();
                Case {
                    vcek: parsed
                        .signing_cert()
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default(),
                    ..l.genuine()
                }
            }
        ),
    ]
}
