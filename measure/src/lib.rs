//! SEV-SNP launch measurement: the digest the AMD firmware computes while the host loads a
//! guest (SNP_LAUNCH_UPDATE over each page, then the VMSAs), from the same artifacts the host
//! uses: the OVMF image, optionally a kernel, initrd and command line (direct boot, measured
//! through the SEV hashes table), the vCPU count and type, and the guest features.
//! Must agree with `sev-snp-measure --mode snp` (the test suite checks this).

use aws_lc_rs::digest::{SHA256, SHA384, digest};

const PAGE: usize = 4096;
const FOUR_GB: u64 = 1 << 32;
const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;
const BSP_EIP: u32 = 0xffff_fff0;

// GUIDs as they are stored in OVMF (EFI byte order: the first three fields little-endian).
const FOOTER_GUID: &str = "96b582de-1fb2-45f7-baea-a366c55a082d";
const SEV_HASH_TABLE_RV_GUID: &str = "7255371f-3a3b-4b04-927b-1da6efa8d454";
const SEV_ES_RESET_BLOCK_GUID: &str = "00f771de-1a7e-4fcb-890e-68c77e2fb44e";
const SEV_METADATA_GUID: &str = "dc886566-984a-4798-a75e-5585a7bf67cc";
const HASH_TABLE_HEADER_GUID: &str = "9438d606-4f22-4cc9-b479-a793d411fd21";
const KERNEL_ENTRY_GUID: &str = "4de79437-abd2-427f-b835-d5b172d2045b";
const INITRD_ENTRY_GUID: &str = "44baf731-3a2f-4bd7-9af1-41e29169781d";
const CMDLINE_ENTRY_GUID: &str = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a";

/// A GUID in EFI (mixed-endian) byte order.
pub fn guid_le(s: &str) -> [u8; 16] {
    let h: String = s.chars().filter(char::is_ascii_hexdigit).collect();
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(h.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// Why a launch cannot be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeasureError {
    #[error("OVMF image is {0} bytes: it must be a non-empty multiple of 4096 and at most 4 GiB")]
    BadSize(usize),
    #[error("OVMF image has no GUIDed footer table (not an OVMF build with SEV support)")]
    NoFooterTable,
    #[error("OVMF footer table is malformed: {0}")]
    BadTable(&'static str),
    #[error("OVMF has no SEV metadata (section list for SNP)")]
    NoMetadata,
    #[error("OVMF SEV metadata is malformed: {0}")]
    BadMetadata(&'static str),
    #[error(
        "OVMF has no SEV-ES reset block, so application processors cannot start ({0} vCPUs asked)"
    )]
    NoResetBlock(u32),
    #[error("unknown OVMF metadata section type {0:#x}")]
    UnknownSection(u32),
    #[error(
        "a kernel was given but this OVMF has no SNP_KERNEL_HASHES section (use an AmdSev OVMF build)"
    )]
    NoKernelHashes,
    #[error("the kernel hashes section is {0} bytes; one page was expected")]
    BadHashesSection(u32),
    #[error("unknown vCPU type {0:?} (known: {1})")]
    UnknownVcpuType(String, String),
    #[error("at least one vCPU is needed")]
    NoVcpus,
}

/// SEV metadata section types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    SecMem,
    Secrets,
    Cpuid,
    SvsmCaa,
    KernelHashes,
}

/// A parsed OVMF image: where it sits, its footer table and its SEV metadata.
#[derive(Clone, Debug)]
pub struct Ovmf<'a> {
    data: &'a [u8],
    table: Vec<([u8; 16], &'a [u8])>,
    pub sections: Vec<(u32, u32, Section)>,
}

fn u32le(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

impl<'a> Ovmf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Ovmf<'a>, MeasureError> {
        if data.is_empty() || !data.len().is_multiple_of(PAGE) || data.len() as u64 > FOUR_GB {
            return Err(MeasureError::BadSize(data.len()));
        }
        // The footer entry sits just before the last 32 bytes: size (u16) + GUID.
        let entry = 18usize;
        let start = data
            .len()
            .checked_sub(32 + entry)
            .ok_or(MeasureError::NoFooterTable)?;
        let footer = &data[start..start + entry];
        if footer[2..18] != guid_le(FOOTER_GUID) {
            return Err(MeasureError::NoFooterTable);
        }
        let total = usize::from(u16::from_le_bytes([footer[0], footer[1]]));
        let table_size = total
            .checked_sub(entry)
            .ok_or(MeasureError::BadTable("footer size"))?;
        let mut rest = data
            .get(
                start
                    .checked_sub(table_size)
                    .ok_or(MeasureError::BadTable("table size"))?..start,
            )
            .ok_or(MeasureError::BadTable("table size"))?;
        let mut table = Vec::new();
        while rest.len() >= entry {
            let e = &rest[rest.len() - entry..];
            let size = usize::from(u16::from_le_bytes([e[0], e[1]]));
            if size < entry || size > rest.len() {
                return Err(MeasureError::BadTable("entry size"));
            }
            let mut g = [0u8; 16];
            g.copy_from_slice(&e[2..18]);
            table.push((g, &rest[rest.len() - size..rest.len() - entry]));
            rest = &rest[..rest.len() - size];
        }
        let mut o = Ovmf {
            data,
            table,
            sections: Vec::new(),
        };
        o.sections = o.parse_metadata()?;
        Ok(o)
    }

    fn item(&self, guid: &str) -> Option<&'a [u8]> {
        let g = guid_le(guid);
        self.table.iter().find(|(x, _)| *x == g).map(|(_, d)| *d)
    }

    fn parse_metadata(&self) -> Result<Vec<(u32, u32, Section)>, MeasureError> {
        let Some(e) = self.item(SEV_METADATA_GUID) else {
            return Ok(Vec::new());
        };
        let off = u32le(e).ok_or(MeasureError::BadMetadata("entry"))? as usize;
        let start = self
            .data
            .len()
            .checked_sub(off)
            .ok_or(MeasureError::BadMetadata("offset"))?;
        let h = self
            .data
            .get(start..start + 16)
            .ok_or(MeasureError::BadMetadata("header"))?;
        if &h[..4] != b"ASEV" {
            return Err(MeasureError::BadMetadata("signature is not ASEV"));
        }
        if u32le(&h[8..]) != Some(1) {
            return Err(MeasureError::BadMetadata("version is not 1"));
        }
        let n = u32le(&h[12..]).unwrap_or(0) as usize;
        let mut out = Vec::new();
        for i in 0..n {
            let d = self
                .data
                .get(start + 16 + 12 * i..start + 28 + 12 * i)
                .ok_or(MeasureError::BadMetadata("items"))?;
            let (gpa, size, kind) = (
                u32le(d).unwrap_or(0),
                u32le(&d[4..]).unwrap_or(0),
                u32le(&d[8..]).unwrap_or(0),
            );
            let s = match kind {
                1 => Section::SecMem,
                2 => Section::Secrets,
                3 => Section::Cpuid,
                4 => Section::SvsmCaa,
                0x10 => Section::KernelHashes,
                k => return Err(MeasureError::UnknownSection(k)),
            };
            out.push((gpa, size, s));
        }
        Ok(out)
    }

    /// Where the image is mapped: it ends at 4 GiB.
    pub fn gpa(&self) -> u64 {
        FOUR_GB - self.data.len() as u64
    }

    /// Where application processors start (the SEV-ES reset block), if present.
    pub fn reset_eip(&self) -> Option<u32> {
        self.item(SEV_ES_RESET_BLOCK_GUID).and_then(u32le)
    }

    /// GPA of the SEV hashes table (0 or absent: direct boot is not supported).
    pub fn hashes_table_gpa(&self) -> Option<u32> {
        self.item(SEV_HASH_TABLE_RV_GUID)
            .and_then(u32le)
            .filter(|&g| g != 0)
    }
}

/// The SEV hashes table for direct kernel boot: SHA-256 of command line (NUL-terminated),
/// initrd (empty if none) and kernel, padded to 16 bytes.
pub fn hashes_table(kernel: &[u8], initrd: Option<&[u8]>, cmdline: Option<&str>) -> Vec<u8> {
    let sha = |b: &[u8]| digest(&SHA256, b).as_ref().to_vec();
    let mut cmd = cmdline.unwrap_or("").as_bytes().to_vec();
    cmd.push(0);
    let entry = |guid: &str, hash: Vec<u8>| {
        let mut e = guid_le(guid).to_vec();
        e.extend_from_slice(&50u16.to_le_bytes());
        e.extend(hash);
        e
    };
    let mut t = guid_le(HASH_TABLE_HEADER_GUID).to_vec();
    t.extend_from_slice(&(16u16 + 2 + 3 * 50).to_le_bytes());
    t.extend(entry(CMDLINE_ENTRY_GUID, sha(&cmd)));
    t.extend(entry(INITRD_ENTRY_GUID, sha(initrd.unwrap_or(&[]))));
    t.extend(entry(KERNEL_ENTRY_GUID, sha(kernel)));
    t.resize(t.len().div_ceil(16) * 16, 0);
    t
}

/// The running launch digest (the firmware's GCTX.LD).
#[derive(Clone, Debug)]
pub struct Gctx {
    ld: [u8; 48],
}

impl Default for Gctx {
    fn default() -> Self {
        Gctx { ld: [0; 48] }
    }
}

impl Gctx {
    fn update(&mut self, page_type: u8, gpa: u64, contents: &[u8; 48]) {
        let mut info = [0u8; 0x70];
        info[..48].copy_from_slice(&self.ld);
        info[48..96].copy_from_slice(contents);
        info[96..98].copy_from_slice(&0x70u16.to_le_bytes());
        info[98] = page_type;
        // is_imi, vmpl3/2/1 permissions and a reserved byte stay zero.
        info[104..112].copy_from_slice(&gpa.to_le_bytes());
        self.ld.copy_from_slice(digest(&SHA384, &info).as_ref());
    }

    fn page_hash(p: &[u8]) -> [u8; 48] {
        let mut h = [0u8; 48];
        h.copy_from_slice(digest(&SHA384, p).as_ref());
        h
    }

    pub fn normal_pages(&mut self, gpa: u64, data: &[u8]) {
        for (i, page) in data.chunks(PAGE).enumerate() {
            self.update(0x01, gpa + (i * PAGE) as u64, &Self::page_hash(page));
        }
    }

    fn typed_pages(&mut self, page_type: u8, gpa: u64, len: u32) {
        for off in (0..u64::from(len)).step_by(PAGE) {
            self.update(page_type, gpa + off, &[0; 48]);
        }
    }

    pub fn vmsa_page(&mut self, page: &[u8]) {
        self.update(0x02, VMSA_GPA, &Self::page_hash(page));
    }

    pub fn digest(&self) -> [u8; 48] {
        self.ld
    }
}

/// vCPU models as QEMU names them, with their CPUID signatures (family, model, stepping).
pub const VCPU_TYPES: [(&str, u32, u32, u32); 16] = [
    ("EPYC", 23, 1, 2),
    ("EPYC-v1", 23, 1, 2),
    ("EPYC-v2", 23, 1, 2),
    ("EPYC-IBPB", 23, 1, 2),
    ("EPYC-v3", 23, 1, 2),
    ("EPYC-v4", 23, 1, 2),
    ("EPYC-Rome", 23, 49, 0),
    ("EPYC-Rome-v1", 23, 49, 0),
    ("EPYC-Rome-v2", 23, 49, 0),
    ("EPYC-Rome-v3", 23, 49, 0),
    ("EPYC-Milan", 25, 1, 1),
    ("EPYC-Milan-v1", 25, 1, 1),
    ("EPYC-Milan-v2", 25, 1, 1),
    ("EPYC-Genoa", 25, 17, 0),
    ("EPYC-Genoa-v1", 25, 17, 0),
    ("EPYC-Turin", 26, 0, 0),
];

/// CPUID Fn0000_0001_EAX for a family/model/stepping (AMD CPUID specification).
pub fn cpu_sig(family: u32, model: u32, stepping: u32) -> u32 {
    let (fam_low, fam_high) = if family > 0xf {
        (0xf, (family - 0xf) & 0xff)
    } else {
        (family, 0)
    };
    (fam_high << 20)
        | (((model >> 4) & 0xf) << 16)
        | (fam_low << 8)
        | ((model & 0xf) << 4)
        | (stepping & 0xf)
}

/// The signature of a named vCPU type.
pub fn vcpu_sig(name: &str) -> Result<u32, MeasureError> {
    VCPU_TYPES
        .iter()
        .find(|t| t.0.eq_ignore_ascii_case(name))
        .map(|&(_, f, m, s)| cpu_sig(f, m, s))
        .ok_or_else(|| {
            MeasureError::UnknownVcpuType(
                name.to_string(),
                VCPU_TYPES
                    .iter()
                    .map(|t| t.0)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

/// The initial VMSA (save area) QEMU/KVM gives a vCPU starting at `eip`.
pub fn vmsa_page(eip: u32, sev_features: u64, vcpu_sig: u32) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    let mut put = |off: usize, v: &[u8]| p[off..off + v.len()].copy_from_slice(v);
    let seg = |sel: u16, attr: u16, limit: u32, base: u64| {
        let mut s = [0u8; 16];
        s[..2].copy_from_slice(&sel.to_le_bytes());
        s[2..4].copy_from_slice(&attr.to_le_bytes());
        s[4..8].copy_from_slice(&limit.to_le_bytes());
        s[8..].copy_from_slice(&base.to_le_bytes());
        s
    };
    // es, cs, ss, ds, fs, gs, gdtr, ldtr, idtr, tr: 16 bytes each from offset 0.
    let segs = [
        seg(0, 0x93, 0xffff, 0),
        seg(0xf000, 0x9b, 0xffff, u64::from(eip & 0xffff_0000)),
        seg(0, 0x93, 0xffff, 0),
        seg(0, 0x93, 0xffff, 0),
        seg(0, 0x93, 0xffff, 0),
        seg(0, 0x93, 0xffff, 0),
        seg(0, 0, 0xffff, 0),
        seg(0, 0x82, 0xffff, 0),
        seg(0, 0, 0xffff, 0),
        seg(0, 0x8b, 0xffff, 0),
    ];
    for (i, s) in segs.iter().enumerate() {
        put(16 * i, s);
    }
    put(0xd0, &0x1000u64.to_le_bytes()); // EFER.SVME
    put(0x148, &0x40u64.to_le_bytes()); // CR4.MCE
    put(0x158, &0x10u64.to_le_bytes()); // CR0.ET
    put(0x160, &0x400u64.to_le_bytes()); // DR7
    put(0x168, &0xffff_0ff0u64.to_le_bytes()); // DR6
    put(0x170, &0x2u64.to_le_bytes()); // RFLAGS
    put(0x178, &u64::from(eip & 0xffff).to_le_bytes()); // RIP
    put(0x268, &0x0007_0406_0007_0406u64.to_le_bytes()); // G_PAT
    put(0x310, &u64::from(vcpu_sig).to_le_bytes()); // RDX: CPUID signature
    put(0x3b0, &sev_features.to_le_bytes()); // SEV_FEATURES
    put(0x3e8, &0x1u64.to_le_bytes()); // XCR0
    put(0x408, &0x1f80u32.to_le_bytes()); // MXCSR
    put(0x410, &0x37fu16.to_le_bytes()); // x87 FCW
    p
}

/// What the host is about to launch.
#[derive(Clone, Debug)]
pub struct LaunchSpec<'a> {
    pub ovmf: &'a [u8],
    pub kernel: Option<&'a [u8]>,
    pub initrd: Option<&'a [u8]>,
    pub cmdline: Option<&'a str>,
    pub vcpus: u32,
    pub vcpu_sig: u32,
    /// SEV_FEATURES of the VMSAs (sev-snp-measure's --guest-features; default 0x1, SNP active).
    pub guest_features: u64,
}

/// What a measurement names: files and the VM shape.
pub struct LaunchFiles<'a> {
    pub ovmf: &'a std::path::Path,
    pub kernel: Option<&'a std::path::Path>,
    pub initrd: Option<&'a std::path::Path>,
    pub append: Option<&'a str>,
    pub vcpus: u32,
    pub vcpu_type: &'a str,
    pub guest_features: u64,
}

/// Guest features as the command lines take them: hex, with or without `0x`.
pub fn parse_guest_features(s: &str) -> Result<u64, String> {
    let t = s.trim();
    u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16)
        .map_err(|e| format!("--guest-features {s:?}: {e}"))
}

/// How the firmware's SEV metadata is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Firmware {
    /// As built: a direct boot needs the firmware's own SNP_KERNEL_HASHES section. What real
    /// SEV-SNP hardware measures; the only choice for a production launch.
    #[default]
    AsBuilt,
    /// For simulated platforms only (no SNP hardware, e.g. Debian's OVMF under TCG): a firmware
    /// without a kernel hashes section is measured as if it had edk2 AmdSev's, one page at
    /// [`ASSUMED_HASHES_GPA`] carved out of the pre-validated memory there. Such a firmware
    /// never checks the hashes itself; the simulated PSP's measurement still covers the kernel,
    /// initrd and command line, so a host that swaps one is denied.
    ///
    /// A measurement computed this way must never be allowed for a broker that trusts AMD's
    /// roots: on real hardware that firmware would boot any kernel the host hands it while
    /// reporting this measurement.
    AssumeHashesTable,
}

/// Where edk2's AmdSev build keeps the SEV hashes table (its SNP_KERNEL_HASHES section).
pub const ASSUMED_HASHES_GPA: u32 = 0x80_f000;

/// As [`digest_of_files`], with the firmware taken as `fw` says.
pub fn digest_of_files_with(f: &LaunchFiles<'_>, fw: Firmware) -> Result<[u8; 48], String> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
    };
    let ovmf = read(f.ovmf, "OVMF")?;
    let kernel = f.kernel.map(|p| read(p, "kernel")).transpose()?;
    let initrd = f.initrd.map(|p| read(p, "initrd")).transpose()?;
    let spec = LaunchSpec {
        ovmf: &ovmf,
        kernel: kernel.as_deref(),
        initrd: initrd.as_deref(),
        cmdline: f.append,
        vcpus: f.vcpus,
        vcpu_sig: vcpu_sig(f.vcpu_type).map_err(|e| format!("--vcpu-type: {e}"))?,
        guest_features: f.guest_features,
    };
    launch_digest_with(&spec, fw).map_err(|e| format!("{}: {e}", f.ovmf.display()))
}

/// Reads the files and computes their launch digest; errors say which input was wrong. Shared
/// by `attesta-sim measure` and `attesta-host measure`, whose output must be identical.
pub fn digest_of_files(f: &LaunchFiles<'_>) -> Result<[u8; 48], String> {
    digest_of_files_with(f, Firmware::AsBuilt)
}

/// The launch digest (MEASUREMENT) the firmware will report for this launch.
pub fn launch_digest(spec: &LaunchSpec<'_>) -> Result<[u8; 48], MeasureError> {
    launch_digest_with(spec, Firmware::AsBuilt)
}

/// The sections with a kernel hashes page carved out at [`ASSUMED_HASHES_GPA`] (see
/// [`Firmware::AssumeHashesTable`]); unchanged when the firmware has its own.
fn assume_hashes_table(
    sections: &[(u32, u32, Section)],
) -> Result<Vec<(u32, u32, Section)>, MeasureError> {
    if sections.iter().any(|s| s.2 == Section::KernelHashes) {
        return Ok(sections.to_vec());
    }
    let page = PAGE as u32;
    let mut out = Vec::with_capacity(sections.len() + 1);
    let mut placed = false;
    for &(gpa, size, kind) in sections {
        let end = u64::from(gpa) + u64::from(size);
        if kind == Section::SecMem
            && gpa <= ASSUMED_HASHES_GPA
            && u64::from(ASSUMED_HASHES_GPA) + u64::from(page) <= end
        {
            if gpa < ASSUMED_HASHES_GPA {
                out.push((gpa, ASSUMED_HASHES_GPA - gpa, Section::SecMem));
            }
            out.push((ASSUMED_HASHES_GPA, page, Section::KernelHashes));
            let after = ASSUMED_HASHES_GPA + page;
            if u64::from(after) < end {
                out.push((after, (end - u64::from(after)) as u32, Section::SecMem));
            }
            placed = true;
        } else {
            out.push((gpa, size, kind));
        }
    }
    if !placed {
        return Err(MeasureError::NoKernelHashes);
    }
    Ok(out)
}

/// As [`launch_digest`], with the firmware taken as `fw` says.
pub fn launch_digest_with(spec: &LaunchSpec<'_>, fw: Firmware) -> Result<[u8; 48], MeasureError> {
    if spec.vcpus == 0 {
        return Err(MeasureError::NoVcpus);
    }
    let mut ovmf = Ovmf::parse(spec.ovmf)?;
    if ovmf.sections.is_empty() {
        return Err(MeasureError::NoMetadata);
    }
    if fw == Firmware::AssumeHashesTable && spec.kernel.is_some() {
        ovmf.sections = assume_hashes_table(&ovmf.sections)?;
    }
    let mut g = Gctx::default();
    g.normal_pages(ovmf.gpa(), spec.ovmf);
    let table = spec
        .kernel
        .map(|k| hashes_table(k, spec.initrd, spec.cmdline));
    if table.is_some() && !ovmf.sections.iter().any(|s| s.2 == Section::KernelHashes) {
        return Err(MeasureError::NoKernelHashes);
    }
    for &(gpa, size, kind) in &ovmf.sections {
        let gpa = u64::from(gpa);
        match kind {
            Section::SecMem | Section::SvsmCaa => g.typed_pages(0x03, gpa, size),
            Section::Secrets => g.update(0x05, gpa, &[0; 48]),
            Section::Cpuid => g.update(0x06, gpa, &[0; 48]),
            Section::KernelHashes => match &table {
                None => g.typed_pages(0x03, gpa, size),
                Some(t) => {
                    if size as usize != PAGE {
                        return Err(MeasureError::BadHashesSection(size));
                    }
                    let off = ovmf.hashes_table_gpa().map_or(0, |a| (a & 0xfff) as usize);
                    let mut page = vec![0u8; PAGE];
                    let end = (off + t.len()).min(PAGE);
                    page[off..end].copy_from_slice(&t[..end - off]);
                    g.normal_pages(gpa, &page);
                }
            },
        }
    }
    let bsp = vmsa_page(BSP_EIP, spec.guest_features, spec.vcpu_sig);
    g.vmsa_page(&bsp);
    if spec.vcpus > 1 {
        let ap_eip = ovmf
            .reset_eip()
            .filter(|&e| e != 0)
            .ok_or(MeasureError::NoResetBlock(spec.vcpus))?;
        let ap = vmsa_page(ap_eip, spec.guest_features, spec.vcpu_sig);
        for _ in 1..spec.vcpus {
            g.vmsa_page(&ap);
        }
    }
    Ok(g.digest())
}

/// Builds a small synthetic OVMF image carrying what the measurement reads: the GUIDed footer
/// table, SEV metadata (pre-validated memory, secrets, CPUID, kernel hashes) and the SEV-ES reset
/// block. Used where no OVMF built with the hashes table is at hand, to cross-check tools.
pub fn synthetic_ovmf(size: usize, fill_seed: u8) -> Vec<u8> {
    let size = size.max(4 * PAGE).div_ceil(PAGE) * PAGE;
    let mut img: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(fill_seed))
        .collect();
    let hashes_gpa: u32 = 0x80_f000;
    let metadata = {
        let items: [(u32, u32, u32); 5] = [
            (0x80_0000, 0x9000, 1),
            (0x80_d000, 0x1000, 2),
            (0x80_e000, 0x1000, 3),
            (hashes_gpa, 0x1000, 0x10),
            (0x81_0000, 0x10000, 1),
        ];
        let mut m = b"ASEV".to_vec();
        m.extend_from_slice(&((16 + 12 * items.len()) as u32).to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for (gpa, len, kind) in items {
            for v in [gpa, len, kind] {
                m.extend_from_slice(&v.to_le_bytes());
            }
        }
        m
    };
    // Metadata 2 KiB before the end; the footer table right before the last 32 bytes.
    let meta_off = 2048usize;
    let meta_start = size - meta_off;
    img[meta_start..meta_start + metadata.len()].copy_from_slice(&metadata);
    let entry = |guid: &str, data: &[u8]| {
        let mut e = data.to_vec();
        e.extend_from_slice(&((data.len() + 18) as u16).to_le_bytes());
        e.extend_from_slice(&guid_le(guid));
        e
    };
    let mut table = Vec::new();
    table.extend(entry(
        SEV_HASH_TABLE_RV_GUID,
        &[hashes_gpa.to_le_bytes(), 0x400u32.to_le_bytes()].concat(),
    ));
    table.extend(entry(SEV_METADATA_GUID, &(meta_off as u32).to_le_bytes()));
    table.extend(entry(
        SEV_ES_RESET_BLOCK_GUID,
        &0x0080_b004u32.to_le_bytes(),
    ));
    // The footer entry's size covers the whole table and itself.
    let total = table.len() + 18;
    table.extend_from_slice(&(total as u16).to_le_bytes());
    table.extend_from_slice(&guid_le(FOOTER_GUID));
    let end = size - 32;
    img[end - table.len()..end].copy_from_slice(&table);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_byte_order_and_signatures() {
        assert_eq!(&guid_le(FOOTER_GUID)[..4], &[0xde, 0x82, 0xb5, 0x96]);
        assert_eq!(cpu_sig(25, 1, 1), 0x00a0_0f11);
        assert_eq!(vcpu_sig("EPYC-Genoa"), Ok(cpu_sig(25, 17, 0)));
        assert!(vcpu_sig("Pentium").is_err());
        assert_eq!(hashes_table(b"k", None, None).len(), 176);
    }

    #[test]
    fn a_missing_hashes_table_is_carved_where_amdsev_keeps_it() {
        // Debian's OVMF.fd (OvmfPkgX64): pre-validated memory runs on through 0x80f000.
        let debian = [
            (0x80_0000, 0x9000, Section::SecMem),
            (0x80_d000, 0x1000, Section::Secrets),
            (0x80_f000, 0x11000, Section::SecMem),
        ];
        assert_eq!(
            assume_hashes_table(&debian).unwrap(),
            vec![
                (0x80_0000, 0x9000, Section::SecMem),
                (0x80_d000, 0x1000, Section::Secrets),
                (0x80_f000, 0x1000, Section::KernelHashes),
                (0x81_0000, 0x10000, Section::SecMem),
            ]
        );
        let elsewhere = [(0x90_0000, 0x9000, Section::SecMem)];
        assert_eq!(
            assume_hashes_table(&elsewhere),
            Err(MeasureError::NoKernelHashes)
        );
        let own = [(0x70_0000, 0x1000, Section::KernelHashes)];
        assert_eq!(assume_hashes_table(&own).unwrap(), own.to_vec());
    }

    #[test]
    fn only_a_simulated_platform_assumes_the_hashes_table() {
        // The synthetic image with its kernel hashes section turned into plain memory.
        let mut img = synthetic_ovmf(64 * 1024, 7);
        let o = Ovmf::parse(&img).unwrap();
        assert!(o.sections.iter().any(|s| s.2 == Section::KernelHashes));
        let entry = [0x00, 0xf0, 0x80, 0, 0, 0x10, 0, 0, 0x10, 0, 0, 0];
        let at = img.windows(12).position(|w| w == entry).unwrap();
        img[at + 8] = 1;
        let spec = LaunchSpec {
            ovmf: &img,
            kernel: Some(b"kernel"),
            initrd: Some(b"initrd"),
            cmdline: Some("console=ttyS0"),
            vcpus: 1,
            vcpu_sig: 0,
            guest_features: 1,
        };
        assert_eq!(launch_digest(&spec), Err(MeasureError::NoKernelHashes));
        let a = launch_digest_with(&spec, Firmware::AssumeHashesTable).unwrap();
        let swapped = LaunchSpec {
            initrd: Some(b"initrd from the host"),
            ..spec.clone()
        };
        let b = launch_digest_with(&swapped, Firmware::AssumeHashesTable).unwrap();
        assert_ne!(a, b, "the initrd is measured through the assumed table");
        // Without a kernel nothing is assumed: both ways agree.
        let no_kernel = LaunchSpec {
            kernel: None,
            initrd: None,
            cmdline: None,
            ..spec
        };
        assert_eq!(
            launch_digest(&no_kernel).unwrap(),
            launch_digest_with(&no_kernel, Firmware::AssumeHashesTable).unwrap()
        );
        // A firmware with its own table is measured as built either way.
        let real = synthetic_ovmf(64 * 1024, 7);
        let with_own = LaunchSpec {
            ovmf: &real,
            ..swapped
        };
        assert_eq!(
            launch_digest(&with_own).unwrap(),
            launch_digest_with(&with_own, Firmware::AssumeHashesTable).unwrap()
        );
    }

    #[test]
    fn synthetic_image_parses() {
        let img = synthetic_ovmf(64 * 1024, 7);
        let o = Ovmf::parse(&img).unwrap();
        assert_eq!(o.sections.len(), 5);
        assert_eq!(o.reset_eip(), Some(0x0080_b004));
        assert_eq!(o.hashes_table_gpa(), Some(0x80_f000));
        let spec = LaunchSpec {
            ovmf: &img,
            kernel: Some(b"kernel"),
            initrd: None,
            cmdline: Some("console=ttyS0"),
            vcpus: 2,
            vcpu_sig: 0,
            guest_features: 1,
        };
        let a = launch_digest(&spec).unwrap();
        let b = launch_digest(&LaunchSpec {
            cmdline: Some("console=ttyS1"),
            ..spec.clone()
        })
        .unwrap();
        assert_ne!(a, b, "the command line is measured");
    }

    #[test]
    fn malformed_images_are_errors_not_panics() {
        assert_eq!(Ovmf::parse(&[]).unwrap_err(), MeasureError::BadSize(0));
        assert_eq!(
            Ovmf::parse(&[0u8; 4096]).unwrap_err(),
            MeasureError::NoFooterTable
        );
        let mut img = synthetic_ovmf(16 * 1024, 1);
        let n = img.len();
        img[n - 50] = 0xff; // footer size far too large
        img[n - 49] = 0xff;
        assert!(Ovmf::parse(&img).is_err());
    }
}
