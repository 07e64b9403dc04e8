//! Simulated chips and the guests launched on them. A chip has an identity (chip id), TCB
//! versions, firmware and platform info, and a VCEK issued for its reported TCB; a guest gets
//! reports, extended reports and derived keys through the same [`GuestDevice`] trait the guest
//! agent uses for `/dev/sev-guest`.

use crate::pki::{Pki, SimError, Vcek};
use crate::seed::hash;
use aws_lc_rs::hmac;
use snp::certtable::{CertTable, GUID_ARK, GUID_ASK, GUID_VCEK};
use snp::device::{DerivedKeyRequest, DeviceError, GuestDevice};
use snp::report::{
    Cpuid, FirmwareVersion, GuestPolicy, KeyInfo, PlatformInfo, REPORT_LEN, ReportBody,
    SIG_ALGO_ECDSA_P384_SHA384, SigningKey,
};
use snp::{Product, Tcb};
use std::sync::Arc;
use zeroize::Zeroizing;

/// 2025-01-01T00:00:00Z: when simulated VCEKs become valid (seven years, like AMD's).
pub const VCEK_NOT_BEFORE: u64 = 1_735_689_600;

/// What a chip is like. [`ChipConfig::typical`] gives values seen on real machines.
#[derive(Clone, Debug)]
pub struct ChipConfig {
    pub chip_id: [u8; 64],
    pub current_tcb: Tcb,
    /// Defaults to `current_tcb` (firmware committed).
    pub committed_tcb: Option<Tcb>,
    /// What the hypervisor set REPORTED_TCB to; defaults to `current_tcb`.
    pub reported_tcb: Option<Tcb>,
    pub firmware: FirmwareVersion,
    pub platform_info: u64,
    /// The chip id is masked in reports (MASK_CHIP_ID): such reports cannot be bound to a chip.
    pub mask_chip_id: bool,
    /// The report version this firmware produces.
    pub report_version: u32,
}

impl ChipConfig {
    /// Chip `index` of the fleet `attesta-sim` derives from the text `seed` for `product`, with
    /// its key hierarchy (cached under `state_dir`, default `attesta-sim`'s): what the guest
    /// and host agents' simulated devices stand on.
    pub fn typical_cached(
        product: Product,
        seed: &str,
        index: u64,
        state_dir: Option<&std::path::Path>,
        note: impl Fn(&str),
    ) -> Result<(Arc<Pki>, ChipConfig), String> {
        let state = state_dir
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(crate::pki::default_state_dir);
        let pki = Arc::new(Pki::cached(
            product,
            &crate::Seed::from_text(seed),
            &state,
            note,
        )?);
        let config = ChipConfig::typical(&pki, index);
        Ok((pki, config))
    }

    /// A chip like the ones in the real corpus, with its id derived from `index`.
    pub fn typical(pki: &Pki, index: u64) -> ChipConfig {
        let product = pki.product;
        let mut chip_id = [0u8; 64];
        let a = hash(&[&pki.seed.0, b"chip-id", &index.to_le_bytes(), b"a"]);
        let b = hash(&[&pki.seed.0, b"chip-id", &index.to_le_bytes(), b"b"]);
        chip_id[..32].copy_from_slice(&a);
        chip_id[32..].copy_from_slice(&b);
        if product == Product::Turin {
            chip_id[8..].fill(0);
        }
        let (tcb, build, version) = match product {
            Product::Milan => (
                Tcb {
                    fmc: None,
                    bootloader: 4,
                    tee: 0,
                    snp: 24,
                    microcode: 219,
                },
                29,
                3,
            ),
            Product::Genoa => (
                Tcb {
                    fmc: None,
                    bootloader: 9,
                    tee: 0,
                    snp: 23,
                    microcode: 72,
                },
                40,
                3,
            ),
            Product::Turin => (
                Tcb {
                    fmc: Some(1),
                    bootloader: 1,
                    tee: 1,
                    snp: 4,
                    microcode: 81,
                },
                65,
                5,
            ),
        };
        ChipConfig {
            chip_id,
            current_tcb: tcb,
            committed_tcb: None,
            reported_tcb: None,
            firmware: FirmwareVersion {
                major: 1,
                minor: 55,
                build,
            },
            platform_info: PlatformInfo::SMT_EN
                | PlatformInfo::ECC_EN
                | PlatformInfo::ALIAS_CHECK_COMPLETE,
            mask_chip_id: false,
            report_version: version,
        }
    }
}

/// A simulated SEV-SNP processor.
pub struct Chip {
    pki: Arc<Pki>,
    pub config: ChipConfig,
    pub committed_firmware: FirmwareVersion,
    vcek: Vcek,
    /// The chip's secret for derived keys (never leaves the simulated firmware).
    secret: Zeroizing<[u8; 32]>,
}

impl Chip {
    pub fn new(pki: Arc<Pki>, config: ChipConfig) -> Result<Chip, SimError> {
        let reported = config.reported_tcb.unwrap_or(config.current_tcb);
        let vcek = pki.issue_vcek(&config.chip_id, &reported, VCEK_NOT_BEFORE)?;
        let secret = Zeroizing::new(hash(&[&pki.seed.0, b"chip-secret", &config.chip_id]));
        let committed_firmware = config.firmware;
        Ok(Chip {
            pki,
            config,
            committed_firmware,
            vcek,
            secret,
        })
    }

    pub fn product(&self) -> Product {
        self.pki.product
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The hierarchy, shared.
    pub fn pki_arc(&self) -> Arc<Pki> {
        self.pki.clone()
    }

    /// The VCEK for the chip's reported TCB.
    pub fn vcek(&self) -> &Vcek {
        &self.vcek
    }

    /// Installs and commits new firmware: the TCB changes and AMD issues a new VCEK.
    pub fn update_firmware(&mut self, tcb: Tcb, firmware: FirmwareVersion) -> Result<(), SimError> {
        self.config.current_tcb = tcb;
        self.config.committed_tcb = None;
        self.config.reported_tcb = None;
        self.config.firmware = firmware;
        self.committed_firmware = firmware;
        self.vcek = self
            .pki
            .issue_vcek(&self.config.chip_id, &tcb, VCEK_NOT_BEFORE)?;
        Ok(())
    }

    /// Launches a guest; its launch TCB is the chip's current TCB now.
    pub fn launch(&self, guest: GuestLaunch) -> SimGuest<'_> {
        SimGuest {
            chip: self,
            launch_tcb: self.config.current_tcb,
            guest,
        }
    }

    /// A report body as the firmware would fill it for `guest` (unsigned).
    pub fn report_body(
        &self,
        guest: &GuestLaunch,
        launch_tcb: &Tcb,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> ReportBody {
        let p = self.product();
        let c = &self.config;
        let enc = |t: &Tcb| t.encode(p);
        let v = c.report_version;
        let key_info = KeyInfo(if guest.author_key_digest != [0; 48] {
            1
        } else {
            0
        })
        .with_signing_key(SigningKey::Vcek);
        ReportBody {
            version: v,
            guest_svn: guest.guest_svn,
            policy: GuestPolicy(guest.policy),
            family_id: guest.family_id,
            image_id: guest.image_id,
            vmpl,
            signature_algo: SIG_ALGO_ECDSA_P384_SHA384,
            current_tcb: enc(&c.current_tcb),
            platform_info: PlatformInfo(c.platform_info),
            key_info,
            report_data: *report_data,
            measurement: guest.measurement,
            host_data: guest.host_data,
            id_key_digest: guest.id_key_digest,
            author_key_digest: guest.author_key_digest,
            report_id: hash(&[&self.secret[..], b"report-id", &guest.measurement]),
            report_id_ma: [0xff; 32],
            reported_tcb: enc(&c.reported_tcb.unwrap_or(c.current_tcb)),
            cpuid: (v >= 3).then_some(match p {
                Product::Milan => Cpuid {
                    family: 0x19,
                    model: 0x01,
                    stepping: 0x01,
                },
                Product::Genoa => Cpuid {
                    family: 0x19,
                    model: 0x11,
                    stepping: 0x01,
                },
                Product::Turin => Cpuid {
                    family: 0x1a,
                    model: 0x02,
                    stepping: 0x01,
                },
            }),
            chip_id: if c.mask_chip_id { [0; 64] } else { c.chip_id },
            committed_tcb: enc(&c.committed_tcb.unwrap_or(c.current_tcb)),
            current_version: c.firmware,
            committed_version: self.committed_firmware,
            launch_tcb: enc(launch_tcb),
            launch_mit_vector: (v >= 5).then_some(0),
            current_mit_vector: (v >= 5).then_some(0),
            signature: Default::default(),
        }
    }

    /// Signs a body with the chip's VCEK.
    pub fn sign(&self, body: &mut ReportBody) -> Result<[u8; REPORT_LEN], SimError> {
        self.vcek.sign_report(body)
    }

    /// The certificate table the host would supply with an extended report.
    pub fn cert_table(&self) -> CertTable {
        CertTable {
            entries: vec![
                (GUID_VCEK, self.vcek.cert.clone()),
                (GUID_ASK, self.pki.ask.cert.clone()),
                (GUID_ARK, self.pki.ark.cert.clone()),
            ],
        }
    }
}

/// What the host launched: the guest's measured identity and launch parameters.
#[derive(Clone, Debug)]
pub struct GuestLaunch {
    pub measurement: [u8; 48],
    pub policy: u64,
    pub host_data: [u8; 32],
    pub family_id: [u8; 16],
    pub image_id: [u8; 16],
    pub id_key_digest: [u8; 48],
    pub author_key_digest: [u8; 48],
    pub guest_svn: u32,
}

impl Default for GuestLaunch {
    fn default() -> Self {
        GuestLaunch {
            measurement: [0; 48],
            // ABI 0.31, SMT allowed, reserved bit 17: what real guests launch with.
            policy: 0x3_001f,
            host_data: [0; 32],
            family_id: [0; 16],
            image_id: [0; 16],
            id_key_digest: [0; 48],
            author_key_digest: [0; 48],
            guest_svn: 0,
        }
    }
}

impl GuestLaunch {
    /// A launch whose measurement is computed from the artifacts, as the firmware would.
    pub fn measured(
        spec: &crate::measure::LaunchSpec<'_>,
        policy: u64,
    ) -> Result<GuestLaunch, crate::measure::MeasureError> {
        Ok(GuestLaunch {
            measurement: crate::measure::launch_digest(spec)?,
            policy,
            ..Default::default()
        })
    }
}

/// A guest running on a simulated chip: its `/dev/sev-guest`.
pub struct SimGuest<'a> {
    chip: &'a Chip,
    pub launch_tcb: Tcb,
    pub guest: GuestLaunch,
}

impl SimGuest<'_> {
    pub fn chip(&self) -> &Chip {
        self.chip
    }

    fn report(&self, report_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, DeviceError> {
        if vmpl > 3 {
            return Err(DeviceError::InvalidVmpl(vmpl));
        }
        let mut body = self
            .chip
            .report_body(&self.guest, &self.launch_tcb, report_data, vmpl);
        self.chip
            .sign(&mut body)
            .map(|b| b.to_vec())
            .map_err(|e| DeviceError::Firmware(e.to_string()))
    }
}

impl GuestDevice for SimGuest<'_> {
    fn get_report(&self, report_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, DeviceError> {
        self.report(report_data, vmpl)
    }

    fn get_ext_report(
        &self,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), DeviceError> {
        Ok((
            self.report(report_data, vmpl)?,
            self.chip.cert_table().encode(),
        ))
    }

    /// Deterministic: HMAC-SHA-256 of the chip secret over the selected fields, so a key sealed
    /// by one image opens only for the same selected identity on the same chip.
    fn get_derived_key(&self, req: &DerivedKeyRequest) -> Result<Zeroizing<[u8; 32]>, DeviceError> {
        if req.vmpl > 3 {
            return Err(DeviceError::InvalidVmpl(req.vmpl));
        }
        let f = req.fields;
        let g = &self.guest;
        let mut msg = vec![u8::from(req.use_vmrk)];
        msg.extend_from_slice(&req.vmpl.to_le_bytes());
        let mut add = |on: bool, tag: u8, bytes: &[u8]| {
            if on {
                msg.push(tag);
                msg.extend_from_slice(bytes);
            }
        };
        add(f.guest_policy, 1, &g.policy.to_le_bytes());
        add(f.image_id, 2, &g.image_id);
        add(f.family_id, 3, &g.family_id);
        add(f.measurement, 4, &g.measurement);
        add(f.guest_svn, 5, &req.guest_svn.to_le_bytes());
        add(f.tcb_version, 6, &req.tcb_version.to_le_bytes());
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.chip.secret[..]);
        let tag = hmac::sign(&key, &msg);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }
}
