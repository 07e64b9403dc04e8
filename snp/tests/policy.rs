//! Appraisal policy: every rule of `Policy::appraise` with a passing and a failing report, the
//! exact typed `Reason` each failure yields, that every failure is reported (not only the
//! first), and the TOML document format (a full example, and what it refuses).

use snp::Product;
use snp::hexbytes::{HexBytes, HexU64};
use snp::policy::{MajorMinor, Policy, PolicyError, SigningKeyName};
use snp::reason::{ExactField, Reason, TcbField};
use snp::report::{
    Cpuid, FirmwareVersion, GuestPolicy, KeyInfo, PlatformInfo, ReportBody, SigningKey,
};
use snp::tcb::{Component, Tcb, TcbMinimum};

// ---------------------------------------------------------------------------------------------
// Baselines

/// A real Milan TCB: bl=3 tee=0 snp=8 ucode=115.
const MILAN_TCB: Tcb = Tcb {
    fmc: None,
    bootloader: 3,
    tee: 0,
    snp: 8,
    microcode: 115,
};

/// A real Turin TCB: fmc=1 bl=1 tee=1 snp=4 ucode=81.
const TURIN_TCB: Tcb = Tcb {
    fmc: Some(1),
    bootloader: 1,
    tee: 1,
    snp: 4,
    microcode: 81,
};

const FW: FirmwareVersion = FirmwareVersion {
    major: 1,
    minor: 55,
    build: 21,
};

/// ABI 1.51 in the guest policy's low 16 bits.
const ABI: u64 = (1 << 8) | 51;

fn pattern<const N: usize>(seed: u8) -> [u8; N] {
    let mut a = [0u8; N];
    for (i, b) in a.iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8).wrapping_mul(31) | 1;
    }
    a
}

/// A report that passes the default policy on `product`: version 5, VMPL 0, VCEK-signed, bit 17
/// of the guest policy set, SMT allowed, committed = current = reported = launch TCB and
/// committed = current firmware version.
fn good_for(product: Product) -> ReportBody {
    let (tcb, cpuid, chip_id) = match product {
        Product::Turin => {
            let mut chip = [0u8; 64];
            chip[..8].copy_from_slice(&pattern::<8>(0x70));
            (
                TURIN_TCB,
                Cpuid {
                    family: 0x1a,
                    model: 0x02,
                    stepping: 1,
                },
                chip,
            )
        }
        Product::Genoa => (
            MILAN_TCB,
            Cpuid {
                family: 0x19,
                model: 0x11,
                stepping: 1,
            },
            pattern(0x70),
        ),
        Product::Milan => (
            MILAN_TCB,
            Cpuid {
                family: 0x19,
                model: 0x01,
                stepping: 1,
            },
            pattern(0x70),
        ),
    };
    let raw = tcb.encode(product);
    ReportBody {
        version: 5,
        guest_svn: 4,
        policy: GuestPolicy(GuestPolicy::RESERVED_MBO | GuestPolicy::SMT | ABI),
        family_id: pattern(0x10),
        image_id: pattern(0x20),
        vmpl: 0,
        current_tcb: raw,
        platform_info: PlatformInfo(PlatformInfo::SMT_EN),
        key_info: KeyInfo(0).with_signing_key(SigningKey::Vcek),
        report_data: pattern(0x30),
        measurement: pattern(0x40),
        host_data: pattern(0x50),
        id_key_digest: pattern(0x60),
        author_key_digest: pattern(0x68),
        report_id: pattern(0x80),
        report_id_ma: pattern(0x90),
        reported_tcb: raw,
        cpuid: Some(cpuid),
        chip_id,
        committed_tcb: raw,
        current_version: FW,
        committed_version: FW,
        launch_tcb: raw,
        launch_mit_vector: Some(0b1011),
        current_mit_vector: Some(0b1111),
        ..Default::default()
    }
}

fn good() -> ReportBody {
    good_for(Product::Milan)
}

fn appraise(p: &Policy, r: &ReportBody) -> Vec<Reason> {
    p.appraise(r, Product::Milan)
}

/// Asserts the report passes `p` (no reasons at all) on `product`.
#[track_caller]
fn passes_on(p: &Policy, r: &ReportBody, product: Product) {
    let got = p.appraise(r, product);
    assert!(got.is_empty(), "expected no reasons, got {got:?}");
}

#[track_caller]
fn passes(p: &Policy, r: &ReportBody) {
    passes_on(p, r, Product::Milan)
}

/// Asserts the report fails `p` on `product` with exactly `want` (in order) — so each expected
/// reason is present and nothing else is.
#[track_caller]
fn fails_on(p: &Policy, r: &ReportBody, product: Product, want: &[Reason]) {
    let got = p.appraise(r, product);
    for w in want {
        assert!(got.contains(w), "expected {w:?} among {got:?}");
    }
    assert_eq!(got, want, "unexpected set of reasons");
}

#[track_caller]
fn fails(p: &Policy, r: &ReportBody, want: &[Reason]) {
    fails_on(p, r, Product::Milan, want)
}

fn tcb(r: &ReportBody, field: TcbField) -> u64 {
    match field {
        TcbField::Reported => r.reported_tcb,
        TcbField::Current => r.current_tcb,
        TcbField::Committed => r.committed_tcb,
        TcbField::Launch => r.launch_tcb,
    }
}

fn min_of(p: &mut Policy, field: TcbField) -> &mut TcbMinimum {
    match field {
        TcbField::Reported => &mut p.tcb.minimum_reported,
        TcbField::Current => &mut p.tcb.minimum_current,
        TcbField::Committed => &mut p.tcb.minimum_committed,
        TcbField::Launch => &mut p.tcb.minimum_launch,
    }
}

fn set_min(m: &mut TcbMinimum, c: Component, v: u8) {
    match c {
        Component::Fmc => m.fmc = Some(v),
        Component::Bootloader => m.bootloader = Some(v),
        Component::Tee => m.tee = Some(v),
        Component::Snp => m.snp = Some(v),
        Component::Microcode => m.microcode = Some(v),
    }
}

fn bump(t: Tcb, c: Component, by: i16) -> Tcb {
    let f = |v: u8| (i16::from(v) + by) as u8;
    let mut t = t;
    match c {
        Component::Fmc => t.fmc = t.fmc.map(f),
        Component::Bootloader => t.bootloader = f(t.bootloader),
        Component::Tee => t.tee = f(t.tee),
        Component::Snp => t.snp = f(t.snp),
        Component::Microcode => t.microcode = f(t.microcode),
    }
    t
}

const FIELDS: [TcbField; 4] = [
    TcbField::Reported,
    TcbField::Current,
    TcbField::Committed,
    TcbField::Launch,
];

const MILAN_COMPONENTS: [Component; 4] = [
    Component::Bootloader,
    Component::Tee,
    Component::Snp,
    Component::Microcode,
];

const TURIN_COMPONENTS: [Component; 5] = [
    Component::Fmc,
    Component::Bootloader,
    Component::Tee,
    Component::Snp,
    Component::Microcode,
];

#[test]
fn baseline_passes_default_policy() {
    for product in Product::ALL {
        passes_on(&Policy::default(), &good_for(product), product);
    }
    // The struct default and an empty TOML document are the same policy.
    assert_eq!(Policy::from_toml("").unwrap(), Policy::default());
}

// ---------------------------------------------------------------------------------------------
// TCB minimums

fn tcb_minimums(product: Product, components: &[Component]) {
    let r = good_for(product);
    for field in FIELDS {
        let have_tcb = Tcb::decode(tcb(&r, field), product);
        for &c in components {
            let have = have_tcb.get(c).expect("component present");
            // Pass: minimum equal to the value.
            let mut p = Policy::default();
            set_min(min_of(&mut p, field), c, have);
            passes_on(&p, &r, product);
            // Pass: minimum below the value (when there is room).
            if have > 0 {
                let mut p = Policy::default();
                set_min(min_of(&mut p, field), c, have - 1);
                passes_on(&p, &r, product);
            }
            // Fail: minimum one above the value.
            let mut p = Policy::default();
            set_min(min_of(&mut p, field), c, have + 1);
            fails_on(
                &p,
                &r,
                product,
                &[Reason::TcbBelowMinimum {
                    field,
                    component: c,
                    have,
                    need: have + 1,
                }],
            );
        }
    }
}

#[test]
fn tcb_minimums_per_field_and_component_milan() {
    tcb_minimums(Product::Milan, &MILAN_COMPONENTS);
    tcb_minimums(Product::Genoa, &MILAN_COMPONENTS);
}

#[test]
fn tcb_minimums_per_field_and_component_turin_including_fmc() {
    tcb_minimums(Product::Turin, &TURIN_COMPONENTS);
}

#[test]
fn fmc_minimum_is_ignored_on_milan_and_genoa() {
    let mut p = Policy::default();
    for field in FIELDS {
        set_min(min_of(&mut p, field), Component::Fmc, 255);
    }
    passes_on(&p, &good_for(Product::Milan), Product::Milan);
    passes_on(&p, &good_for(Product::Genoa), Product::Genoa);
    // ... but not on Turin.
    let got = p.appraise(&good_for(Product::Turin), Product::Turin);
    assert_eq!(got.len(), 4, "{got:?}");
    for field in FIELDS {
        assert!(got.contains(&Reason::TcbBelowMinimum {
            field,
            component: Component::Fmc,
            have: 1,
            need: 255,
        }));
    }
}

#[test]
fn tcb_minimum_reports_every_component_below() {
    let mut p = Policy::default();
    p.tcb.minimum_launch = TcbMinimum {
        bootloader: Some(4),
        snp: Some(9),
        microcode: Some(116),
        tee: Some(0),
        fmc: None,
    };
    fails(
        &p,
        &good(),
        &[
            Reason::TcbBelowMinimum {
                field: TcbField::Launch,
                component: Component::Bootloader,
                have: 3,
                need: 4,
            },
            Reason::TcbBelowMinimum {
                field: TcbField::Launch,
                component: Component::Snp,
                have: 8,
                need: 9,
            },
            Reason::TcbBelowMinimum {
                field: TcbField::Launch,
                component: Component::Microcode,
                have: 115,
                need: 116,
            },
        ],
    );
}

#[test]
fn tcb_minimum_reads_the_product_layout() {
    // Milan puts SNP at byte 6; Turin at byte 3. A Turin TCB read as Milan has snp=0.
    let r = good_for(Product::Turin);
    let mut p = Policy::default();
    p.tcb.minimum_current.snp = Some(4);
    passes_on(&p, &r, Product::Turin);
    let got = p.appraise(&r, Product::Milan);
    assert!(
        got.contains(&Reason::TcbBelowMinimum {
            field: TcbField::Current,
            component: Component::Snp,
            have: 0,
            need: 4,
        }),
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Anti-rollback and provisional firmware

fn rollback(product: Product, components: &[Component]) {
    let base = good_for(product);
    let cur = Tcb::decode(base.current_tcb, product);
    for &c in components {
        let high = cur.get(c).unwrap();
        let newer = bump(cur, c, 1).encode(product);

        // Reported above current: rollback (the VCEK certifies a TCB the firmware is not at).
        let mut r = base.clone();
        r.reported_tcb = newer;
        let want = Reason::TcbAboveCurrent {
            field: TcbField::Reported,
            component: c,
            value: high + 1,
            current: high,
        };
        fails_on(&Policy::default(), &r, product, &[want]);
        // Reported below current is fine (the hypervisor may report an older TCB).
        if high > 0 {
            let mut r = base.clone();
            r.reported_tcb = bump(cur, c, -1).encode(product);
            passes_on(&Policy::default(), &r, product);
        }

        // Committed above current: rollback, and also provisional (committed != current).
        let mut r = base.clone();
        r.committed_tcb = newer;
        let want = Reason::TcbAboveCurrent {
            field: TcbField::Committed,
            component: c,
            value: high + 1,
            current: high,
        };
        fails_on(
            &Policy::default(),
            &r,
            product,
            &[want.clone(), Reason::ProvisionalFirmware],
        );
        // Permitting provisional firmware does not permit a rollback.
        let mut p = Policy::default();
        p.tcb.permit_provisional_firmware = true;
        fails_on(&p, &r, product, &[want]);
    }
}

#[test]
fn anti_rollback_milan() {
    rollback(Product::Milan, &MILAN_COMPONENTS);
}

#[test]
fn anti_rollback_turin_including_fmc() {
    rollback(Product::Turin, &TURIN_COMPONENTS);
}

#[test]
fn provisional_firmware_tcb_refused_by_default_and_permitted_explicitly() {
    // Firmware loaded (current) newer than committed: provisional.
    let mut r = good();
    r.committed_tcb = bump(MILAN_TCB, Component::Snp, -1).encode(Product::Milan);
    fails(&Policy::default(), &r, &[Reason::ProvisionalFirmware]);
    let mut p = Policy::default();
    p.tcb.permit_provisional_firmware = true;
    passes(&p, &r);
    // Equal committed and current: not provisional.
    passes(&Policy::default(), &good());
}

#[test]
fn provisional_firmware_version_refused_by_default_and_permitted_explicitly() {
    let mut p = Policy::default();
    for committed in [
        FirmwareVersion { build: 20, ..FW },
        FirmwareVersion { minor: 54, ..FW },
        FirmwareVersion { major: 0, ..FW },
    ] {
        let mut r = good();
        r.committed_version = committed;
        fails(&Policy::default(), &r, &[Reason::ProvisionalFirmware]);
        p.tcb.permit_provisional_firmware = true;
        passes(&p, &r);
    }
}

// ---------------------------------------------------------------------------------------------
// Guest policy

fn with_policy(bits: u64) -> ReportBody {
    ReportBody {
        policy: GuestPolicy(bits),
        ..good()
    }
}

const BASE_POLICY: u64 = GuestPolicy::RESERVED_MBO | GuestPolicy::SMT | ABI;

#[test]
fn guest_policy_reserved_bits() {
    passes(&Policy::default(), &with_policy(BASE_POLICY));
    // Bit 17 must be one.
    let v = BASE_POLICY & !GuestPolicy::RESERVED_MBO;
    fails(
        &Policy::default(),
        &with_policy(v),
        &[Reason::PolicyReservedBits(v)],
    );
    // Bits 63:26 must be zero.
    for bit in 26..64 {
        let v = BASE_POLICY | 1 << bit;
        fails(
            &Policy::default(),
            &with_policy(v),
            &[Reason::PolicyReservedBits(v)],
        );
    }
    // Bits 25:18 are defined flags, not reserved.
    let flags = GuestPolicy::SINGLE_SOCKET
        | GuestPolicy::CXL_ALLOW
        | GuestPolicy::MEM_AES_256_XTS
        | GuestPolicy::RAPL_DIS
        | GuestPolicy::CIPHERTEXT_HIDING
        | GuestPolicy::PAGE_SWAP_DISABLE;
    passes(&Policy::default(), &with_policy(BASE_POLICY | flags));
}

#[test]
fn guest_policy_debug_refused_by_default_allowed_explicitly() {
    let r = with_policy(BASE_POLICY | GuestPolicy::DEBUG);
    fails(
        &Policy::default(),
        &r,
        &[Reason::PolicyFlagForbidden("debug")],
    );
    let mut p = Policy::default();
    p.guest_policy.allow_debug = true;
    passes(&p, &r);
}

#[test]
fn guest_policy_migration_agent_refused_by_default_allowed_explicitly() {
    let r = with_policy(BASE_POLICY | GuestPolicy::MIGRATE_MA);
    fails(
        &Policy::default(),
        &r,
        &[Reason::PolicyFlagForbidden("a migration agent")],
    );
    let mut p = Policy::default();
    p.guest_policy.allow_migration_agent = true;
    passes(&p, &r);
}

#[test]
fn guest_policy_smt_ceiling() {
    let mut p = Policy::default();
    p.guest_policy.allow_smt = false;
    fails(
        &p,
        &with_policy(BASE_POLICY),
        &[Reason::PolicyFlagForbidden("SMT")],
    );
    passes(&p, &with_policy(BASE_POLICY & !GuestPolicy::SMT));
    // Allowed by default.
    passes(&Policy::default(), &with_policy(BASE_POLICY));
}

#[test]
fn guest_policy_cxl_ceiling() {
    let r = with_policy(BASE_POLICY | GuestPolicy::CXL_ALLOW);
    passes(&Policy::default(), &r);
    let mut p = Policy::default();
    p.guest_policy.allow_cxl = false;
    fails(&p, &r, &[Reason::PolicyFlagForbidden("CXL")]);
    passes(&p, &with_policy(BASE_POLICY));
}

#[test]
fn guest_policy_required_flags() {
    type Setter = fn(&mut Policy);
    let cases: [(u64, Setter, &str); 5] = [
        (
            GuestPolicy::SINGLE_SOCKET,
            |p| p.guest_policy.require_single_socket = true,
            "single-socket",
        ),
        (
            GuestPolicy::MEM_AES_256_XTS,
            |p| p.guest_policy.require_aes_256_xts = true,
            "AES-256-XTS memory encryption",
        ),
        (
            GuestPolicy::RAPL_DIS,
            |p| p.guest_policy.require_rapl_disabled = true,
            "RAPL disabled",
        ),
        (
            GuestPolicy::CIPHERTEXT_HIDING,
            |p| p.guest_policy.require_ciphertext_hiding = true,
            "ciphertext hiding",
        ),
        (
            GuestPolicy::PAGE_SWAP_DISABLE,
            |p| p.guest_policy.require_page_swap_disabled = true,
            "page swap disabled",
        ),
    ];
    for (bit, set, name) in cases {
        let mut p = Policy::default();
        set(&mut p);
        // Pass: the flag is set.
        passes(&p, &with_policy(BASE_POLICY | bit));
        // Fail: the flag is clear.
        fails(
            &p,
            &with_policy(BASE_POLICY),
            &[Reason::PolicyFlagRequired(name)],
        );
        // Not required by default.
        passes(&Policy::default(), &with_policy(BASE_POLICY));
    }
}

#[test]
fn guest_policy_minimum_abi() {
    let r = good(); // ABI 1.51
    for ok in [MajorMinor(1, 51), MajorMinor(1, 50), MajorMinor(0, 99)] {
        let mut p = Policy::default();
        p.guest_policy.minimum_abi = Some(ok);
        passes(&p, &r);
    }
    for need in [MajorMinor(1, 52), MajorMinor(2, 0)] {
        let mut p = Policy::default();
        p.guest_policy.minimum_abi = Some(need);
        fails(
            &p,
            &r,
            &[Reason::AbiTooOld {
                have: (1, 51),
                need: (need.0, need.1),
            }],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Platform info

fn with_platform(bits: u64) -> ReportBody {
    ReportBody {
        platform_info: PlatformInfo(bits),
        ..good()
    }
}

#[test]
fn platform_ceilings() {
    type Setter = fn(&mut Policy);
    let cases: [(u64, Setter, &str); 3] = [
        (
            PlatformInfo::SMT_EN,
            |p| p.platform.allow_smt = false,
            "SMT",
        ),
        (
            PlatformInfo::TSME_EN,
            |p| p.platform.allow_tsme = false,
            "TSME",
        ),
        (
            PlatformInfo::TIO_EN,
            |p| p.platform.allow_tio = false,
            "TIO",
        ),
    ];
    for (bit, set, name) in cases {
        // Allowed by default.
        passes(&Policy::default(), &with_platform(bit));
        let mut p = Policy::default();
        set(&mut p);
        fails(
            &p,
            &with_platform(bit),
            &[Reason::PlatformFlagForbidden(name)],
        );
        passes(&p, &with_platform(0));
    }
}

#[test]
fn platform_floors() {
    type Setter = fn(&mut Policy);
    let cases: [(u64, Setter, &str); 4] = [
        (
            PlatformInfo::ECC_EN,
            |p| p.platform.require_ecc = true,
            "ECC memory",
        ),
        (
            PlatformInfo::RAPL_DIS,
            |p| p.platform.require_rapl_disabled = true,
            "RAPL disabled",
        ),
        (
            PlatformInfo::CIPHERTEXT_HIDING_EN,
            |p| p.platform.require_ciphertext_hiding = true,
            "ciphertext hiding",
        ),
        (
            PlatformInfo::ALIAS_CHECK_COMPLETE,
            |p| p.platform.require_alias_check_complete = true,
            "alias check complete",
        ),
    ];
    for (bit, set, name) in cases {
        let mut p = Policy::default();
        set(&mut p);
        passes(&p, &with_platform(PlatformInfo::SMT_EN | bit));
        fails(
            &p,
            &with_platform(PlatformInfo::SMT_EN),
            &[Reason::PlatformFlagRequired(name)],
        );
        passes(&Policy::default(), &with_platform(PlatformInfo::SMT_EN));
    }
}

// ---------------------------------------------------------------------------------------------
// Identity

#[test]
fn vmpl_defaults_to_zero_exactly() {
    assert_eq!(Policy::default().vmpl, Some(0));
    passes(&Policy::default(), &good());
    for vmpl in 1..=3 {
        let r = ReportBody { vmpl, ..good() };
        fails(
            &Policy::default(),
            &r,
            &[Reason::VmplMismatch {
                have: vmpl,
                want: 0,
            }],
        );
    }
}

#[test]
fn vmpl_exact_value_and_any_vmpl() {
    let mut p = Policy {
        vmpl: Some(2),
        ..Default::default()
    };
    passes(&p, &ReportBody { vmpl: 2, ..good() });
    fails(&p, &good(), &[Reason::VmplMismatch { have: 0, want: 2 }]);
    // Exact, not a ceiling.
    fails(
        &p,
        &ReportBody { vmpl: 1, ..good() },
        &[Reason::VmplMismatch { have: 1, want: 2 }],
    );
    // any_vmpl overrides vmpl.
    p.any_vmpl = true;
    for vmpl in 0..=3 {
        passes(&p, &ReportBody { vmpl, ..good() });
    }
    // So does an absent vmpl.
    let p = Policy {
        vmpl: None,
        ..Default::default()
    };
    passes(&p, &ReportBody { vmpl: 3, ..good() });
}

#[test]
fn minimum_guest_svn() {
    let p = Policy {
        minimum_guest_svn: 5,
        ..Default::default()
    };
    passes(
        &p,
        &ReportBody {
            guest_svn: 5,
            ..good()
        },
    );
    passes(
        &p,
        &ReportBody {
            guest_svn: 6,
            ..good()
        },
    );
    fails(
        &p,
        &ReportBody {
            guest_svn: 4,
            ..good()
        },
        &[Reason::GuestSvnTooLow { have: 4, need: 5 }],
    );
}

fn v(version: u32) -> ReportBody {
    let mut r = good();
    r.version = version;
    if version < 5 {
        r.launch_mit_vector = None;
        r.current_mit_vector = None;
    }
    if version < 3 {
        r.cpuid = None;
    }
    r
}

#[test]
fn minimum_report_version() {
    let p = Policy {
        minimum_report_version: Some(3),
        ..Default::default()
    };
    for ok in [3, 4, 5] {
        passes(&p, &v(ok));
    }
    fails(
        &p,
        &v(2),
        &[Reason::ReportVersionTooOld { have: 2, need: 3 }],
    );
    // No minimum by default.
    passes(&Policy::default(), &v(2));
}

#[test]
fn exact_fields() {
    type Field = (
        ExactField,
        fn(&mut Policy, &ReportBody),
        fn(&mut ReportBody),
    );
    let fields: [Field; 6] = [
        (
            ExactField::FamilyId,
            |p, r| p.family_id = Some(HexBytes(r.family_id)),
            |r| r.family_id[15] ^= 1,
        ),
        (
            ExactField::ImageId,
            |p, r| p.image_id = Some(HexBytes(r.image_id)),
            |r| r.image_id[0] ^= 0x80,
        ),
        (
            ExactField::HostData,
            |p, r| p.host_data = Some(HexBytes(r.host_data)),
            |r| r.host_data[31] ^= 1,
        ),
        (
            ExactField::ReportData,
            |p, r| p.report_data = Some(HexBytes(r.report_data)),
            |r| r.report_data[63] ^= 1,
        ),
        (
            ExactField::ReportId,
            |p, r| p.report_id = Some(HexBytes(r.report_id)),
            |r| r.report_id[7] ^= 1,
        ),
        (
            ExactField::ReportIdMa,
            |p, r| p.report_id_ma = Some(HexBytes(r.report_id_ma)),
            |r| r.report_id_ma = [0xff; 32],
        ),
    ];
    for (field, expect, mutate) in fields {
        let r = good();
        let mut p = Policy::default();
        expect(&mut p, &r);
        passes(&p, &r);
        let mut bad = r.clone();
        mutate(&mut bad);
        fails(&p, &bad, &[Reason::FieldMismatch(field)]);
        // Unconstrained by default.
        passes(&Policy::default(), &bad);
    }
}

const KEY_A: [u8; 48] = [0xaa; 48];
const KEY_B: [u8; 48] = [0xbb; 48];
const KEY_C: [u8; 48] = [0xcc; 48];

fn with_keys(id: [u8; 48], author: Option<[u8; 48]>) -> ReportBody {
    let mut r = good();
    r.id_key_digest = id;
    match author {
        Some(a) => {
            r.key_info = KeyInfo(r.key_info.0 | 1);
            r.author_key_digest = a;
        }
        None => {
            r.key_info = KeyInfo(r.key_info.0 & !1);
            r.author_key_digest = [0; 48];
        }
    }
    r
}

#[test]
fn require_id_block_with_trusted_id_key() {
    let p = Policy {
        require_id_block: true,
        trusted_id_keys: vec![HexBytes(KEY_A), HexBytes(KEY_C)],
        ..Default::default()
    };
    passes(&p, &with_keys(KEY_A, None));
    passes(&p, &with_keys(KEY_C, None));
    fails(
        &p,
        &with_keys(KEY_B, None),
        &[Reason::IdKeyNotTrusted(HexBytes(KEY_B))],
    );
    // No ID block at all (zero digest) is not trusted either.
    fails(
        &p,
        &with_keys([0; 48], None),
        &[Reason::IdKeyNotTrusted(HexBytes([0; 48]))],
    );
}

#[test]
fn require_id_block_with_trusted_author_key() {
    let p = Policy {
        require_id_block: true,
        trusted_author_keys: vec![HexBytes(KEY_B)],
        ..Default::default()
    };
    // Trusted author key with AUTHOR_KEY_EN.
    passes(&p, &with_keys(KEY_A, Some(KEY_B)));
    // The right digest without AUTHOR_KEY_EN does not count.
    let mut r = with_keys(KEY_A, None);
    r.author_key_digest = KEY_B;
    fails(&p, &r, &[Reason::IdBlockRequired]);
    // An untrusted author key is named as such.
    fails(
        &p,
        &with_keys(KEY_A, Some(KEY_C)),
        &[Reason::AuthorKeyNotTrusted(HexBytes(KEY_C))],
    );
}

#[test]
fn require_id_block_with_either_key() {
    let p = Policy {
        require_id_block: true,
        trusted_id_keys: vec![HexBytes(KEY_A)],
        trusted_author_keys: vec![HexBytes(KEY_B)],
        ..Default::default()
    };
    passes(&p, &with_keys(KEY_A, None));
    passes(&p, &with_keys(KEY_C, Some(KEY_B)));
    fails(
        &p,
        &with_keys(KEY_C, Some(KEY_C)),
        &[
            Reason::IdKeyNotTrusted(HexBytes(KEY_C)),
            Reason::AuthorKeyNotTrusted(HexBytes(KEY_C)),
        ],
    );
    // Not required by default.
    passes(&Policy::default(), &with_keys(KEY_C, None));
}

#[test]
fn require_author_key() {
    let p = Policy {
        require_author_key: true,
        trusted_author_keys: vec![HexBytes(KEY_B)],
        // A trusted ID key does not stand in for the author key.
        trusted_id_keys: vec![HexBytes(KEY_A)],
        ..Default::default()
    };
    passes(&p, &with_keys(KEY_A, Some(KEY_B)));
    fails(&p, &with_keys(KEY_A, None), &[Reason::AuthorKeyRequired]);
    fails(
        &p,
        &with_keys(KEY_A, Some(KEY_C)),
        &[Reason::AuthorKeyNotTrusted(HexBytes(KEY_C))],
    );
}

#[test]
fn measurement_allowlist() {
    let r = good();
    let other = [0x5a; 48];
    // Absent: any measurement.
    passes(&Policy::default(), &r);
    // Listed.
    let p = Policy {
        measurements: Some(vec![HexBytes(other), HexBytes(r.measurement)]),
        ..Default::default()
    };
    passes(&p, &r);
    // Not listed.
    let p = Policy {
        measurements: Some(vec![HexBytes(other)]),
        ..Default::default()
    };
    fails(
        &p,
        &r,
        &[Reason::MeasurementNotAllowed(HexBytes(r.measurement))],
    );
    // Present and empty: nothing.
    let p = Policy {
        measurements: Some(vec![]),
        ..Default::default()
    };
    fails(
        &p,
        &r,
        &[Reason::MeasurementNotAllowed(HexBytes(r.measurement))],
    );
}

#[test]
fn chip_id_allowlist() {
    let r = good();
    passes(&Policy::default(), &r);
    let p = Policy {
        chip_ids: Some(vec![HexBytes([1; 64]), HexBytes(r.chip_id)]),
        ..Default::default()
    };
    passes(&p, &r);
    let p = Policy {
        chip_ids: Some(vec![HexBytes([1; 64])]),
        ..Default::default()
    };
    fails(&p, &r, &[Reason::ChipNotAllowed]);
    let p = Policy {
        chip_ids: Some(vec![]),
        ..Default::default()
    };
    fails(&p, &r, &[Reason::ChipNotAllowed]);
    // Turin: 8 significant bytes, rest zero, compared as 64 bytes.
    let t = good_for(Product::Turin);
    let p = Policy {
        chip_ids: Some(vec![HexBytes(t.chip_id)]),
        ..Default::default()
    };
    passes_on(&p, &t, Product::Turin);
}

// ---------------------------------------------------------------------------------------------
// Firmware

#[test]
fn minimum_build() {
    let r = good(); // build 21
    for ok in [0, 20, 21] {
        let p = Policy {
            minimum_build: ok,
            ..Default::default()
        };
        passes(&p, &r);
    }
    let p = Policy {
        minimum_build: 22,
        ..Default::default()
    };
    fails(
        &p,
        &r,
        &[Reason::FirmwareBuildTooOld { have: 21, need: 22 }],
    );
}

#[test]
fn minimum_build_applies_within_the_minimum_version_only() {
    let mut r = good();
    let p = Policy {
        minimum_firmware: Some("1.55".parse().unwrap()),
        minimum_build: 21,
        ..Default::default()
    };
    r.current_version = snp::report::FirmwareVersion {
        major: 1,
        minor: 57,
        build: 1,
    };
    r.committed_version = r.current_version;
    passes(&p, &r);
    r.current_version = snp::report::FirmwareVersion {
        major: 1,
        minor: 55,
        build: 20,
    };
    r.committed_version = r.current_version;
    fails(
        &p,
        &r,
        &[Reason::FirmwareBuildTooOld { have: 20, need: 21 }],
    );
    r.current_version = snp::report::FirmwareVersion {
        major: 1,
        minor: 54,
        build: 99,
    };
    r.committed_version = r.current_version;
    fails(
        &p,
        &r,
        &[Reason::FirmwareVersionTooOld {
            have: (1, 54),
            need: (1, 55),
        }],
    );
}

#[test]
fn minimum_firmware_version() {
    let r = good(); // 1.55
    for ok in [MajorMinor(1, 55), MajorMinor(1, 54), MajorMinor(0, 200)] {
        let p = Policy {
            minimum_firmware: Some(ok),
            ..Default::default()
        };
        passes(&p, &r);
    }
    for need in [MajorMinor(1, 56), MajorMinor(2, 0)] {
        let p = Policy {
            minimum_firmware: Some(need),
            ..Default::default()
        };
        fails(
            &p,
            &r,
            &[Reason::FirmwareVersionTooOld {
                have: (1, 55),
                need: (need.0, need.1),
            }],
        );
    }
}

#[test]
fn required_launch_mitigations() {
    let r = good(); // launch 0b1011
    for ok in [0b1011, 0b0001, 0b1000, 0] {
        let p = Policy {
            required_launch_mitigations: Some(HexU64(ok)),
            ..Default::default()
        };
        passes(&p, &r);
    }
    let p = Policy {
        required_launch_mitigations: Some(HexU64(0b0111)),
        ..Default::default()
    };
    fails(
        &p,
        &r,
        &[Reason::MitigationsMissing {
            launch: true,
            missing: 0b0100,
        }],
    );
}

#[test]
fn required_current_mitigations() {
    let r = good(); // current 0b1111
    let p = Policy {
        required_current_mitigations: Some(HexU64(0b1111)),
        ..Default::default()
    };
    passes(&p, &r);
    let p = Policy {
        required_current_mitigations: Some(HexU64(0x8000_0000_0000_0011)),
        ..Default::default()
    };
    fails(
        &p,
        &r,
        &[Reason::MitigationsMissing {
            launch: false,
            missing: 0x8000_0000_0000_0010,
        }],
    );
}

#[test]
fn mitigations_unavailable_before_version_5() {
    let p = Policy {
        required_launch_mitigations: Some(HexU64(1)),
        required_current_mitigations: Some(HexU64(1)),
        ..Default::default()
    };
    passes(&p, &v(5));
    for version in [2, 3, 4] {
        // Reported once even though both vectors are required.
        fails(&p, &v(version), &[Reason::MitigationsUnavailable]);
    }
    // Only one required: still unavailable.
    let p = Policy {
        required_current_mitigations: Some(HexU64(4)),
        ..Default::default()
    };
    fails(&p, &v(4), &[Reason::MitigationsUnavailable]);
    // A zero requirement needs nothing, so an old report passes.
    let p = Policy {
        required_launch_mitigations: Some(HexU64(0)),
        ..Default::default()
    };
    passes(&p, &v(3));
}

#[test]
fn signing_keys() {
    let vcek = good();
    let vlek = ReportBody {
        key_info: vcek.key_info.with_signing_key(SigningKey::Vlek),
        ..good()
    };
    // VCEK only by default: a VLEK-signed report cannot be bound to a chip.
    passes(&Policy::default(), &vcek);
    fails(
        &Policy::default(),
        &vlek,
        &[Reason::SigningKeyNotAllowed(SigningKey::Vlek)],
    );
    let both = Policy {
        signing_keys: vec![SigningKeyName::Vcek, SigningKeyName::Vlek],
        ..Default::default()
    };
    passes(&both, &vcek);
    passes(&both, &vlek);
    let only_vcek = Policy {
        signing_keys: vec![SigningKeyName::Vcek],
        ..Default::default()
    };
    passes(&only_vcek, &vcek);
    fails(
        &only_vcek,
        &vlek,
        &[Reason::SigningKeyNotAllowed(SigningKey::Vlek)],
    );
    let only_vlek = Policy {
        signing_keys: vec![SigningKeyName::Vlek],
        ..Default::default()
    };
    passes(&only_vlek, &vlek);
    fails(
        &only_vlek,
        &vcek,
        &[Reason::SigningKeyNotAllowed(SigningKey::Vcek)],
    );
    // Unsigned and reserved kinds are never allowed.
    for k in [SigningKey::None, SigningKey::Reserved(3)] {
        let r = ReportBody {
            key_info: vcek.key_info.with_signing_key(k),
            ..good()
        };
        fails(&Policy::default(), &r, &[Reason::SigningKeyNotAllowed(k)]);
    }
}

// ---------------------------------------------------------------------------------------------
// Every failure is reported

#[test]
fn every_failure_is_reported() {
    let mut r = good();
    r.vmpl = 1;
    r.guest_svn = 1;
    r.policy = GuestPolicy(BASE_POLICY | GuestPolicy::DEBUG | GuestPolicy::MIGRATE_MA);
    r.platform_info = PlatformInfo(PlatformInfo::SMT_EN | PlatformInfo::TSME_EN);
    r.reported_tcb = bump(MILAN_TCB, Component::Snp, 1).encode(Product::Milan);
    r.committed_version = FirmwareVersion { build: 20, ..FW };
    r.measurement = [0x11; 48];
    r.host_data = [0x22; 32];
    r.key_info = r.key_info.with_signing_key(SigningKey::Vlek);
    r.launch_mit_vector = Some(0);

    let p = Policy {
        minimum_guest_svn: 2,
        measurements: Some(vec![HexBytes([0x33; 48])]),
        host_data: Some(HexBytes([0x44; 32])),
        signing_keys: vec![SigningKeyName::Vcek],
        minimum_firmware: Some(MajorMinor(1, 58)),
        required_launch_mitigations: Some(HexU64(3)),
        chip_ids: Some(vec![]),
        platform: snp::policy::PlatformRules {
            allow_tsme: false,
            require_ecc: true,
            ..Default::default()
        },
        guest_policy: snp::policy::GuestPolicyRules {
            require_single_socket: true,
            minimum_abi: Some(MajorMinor(1, 55)),
            ..Default::default()
        },
        tcb: snp::policy::TcbPolicy {
            minimum_launch: TcbMinimum {
                microcode: Some(200),
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let got = appraise(&p, &r);
    let want = [
        Reason::TcbBelowMinimum {
            field: TcbField::Launch,
            component: Component::Microcode,
            have: 115,
            need: 200,
        },
        Reason::TcbAboveCurrent {
            field: TcbField::Reported,
            component: Component::Snp,
            value: 9,
            current: 8,
        },
        Reason::ProvisionalFirmware,
        Reason::PolicyFlagForbidden("debug"),
        Reason::PolicyFlagForbidden("a migration agent"),
        Reason::PolicyFlagRequired("single-socket"),
        Reason::AbiTooOld {
            have: (1, 51),
            need: (1, 55),
        },
        Reason::PlatformFlagForbidden("TSME"),
        Reason::PlatformFlagRequired("ECC memory"),
        Reason::VmplMismatch { have: 1, want: 0 },
        Reason::GuestSvnTooLow { have: 1, need: 2 },
        Reason::FieldMismatch(ExactField::HostData),
        Reason::MeasurementNotAllowed(HexBytes([0x11; 48])),
        Reason::ChipNotAllowed,
        Reason::SigningKeyNotAllowed(SigningKey::Vlek),
        Reason::FirmwareVersionTooOld {
            have: (1, 55),
            need: (1, 58),
        },
        Reason::MitigationsMissing {
            launch: true,
            missing: 3,
        },
    ];
    for w in &want {
        assert!(got.contains(w), "missing {w:?} in {got:?}");
    }
    assert_eq!(got.len(), want.len(), "{got:?}");
    // Each reason has a stable code and a message.
    for g in &got {
        assert!(!g.code().is_empty());
        assert!(!g.to_string().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// The TOML document

const EXAMPLE: &str = r#"
# Appraisal policy for the "payments" confidential VMs on Milan hosts.
# Every check listed here must pass; the verifier reports every one that fails.
version = 1

# The guest kernel itself asks for the report (no paravisor below it).
vmpl = 0
any_vmpl = false

# Guest images older than SVN 3 had the key-handling bug; refuse them.
minimum_guest_svn = 3
# CPUID in the report (version 3+) lets the verifier tell the product by itself.
minimum_report_version = 3

# Identity of the image, from the ID block.
family_id = "00112233445566778899aabbccddeeff"
image_id = "0x0f0e0d0c0b0a09080706050403020100"
# The host must bind the tenant's configuration digest.
host_data = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5"

# An ID block signed by our release key (its SHA-384 over AMD's public-key format).
require_id_block = true
require_author_key = true
trusted_id_keys = [
  "111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111",
]
trusted_author_keys = [
  "222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222222",
]

# Launch digests of the two released images (current and previous).
measurements = [
  "333333333333333333333333333333333333333333333333333333333333333333333333333333333333333333333333",
  "0x444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444",
]

# Firmware: 1.55 build 21 or later.
minimum_build = 21
minimum_firmware = "1.55"

# Mitigation vectors (report version 5): bit 0 at launch, bits 0 and 1 now.
required_launch_mitigations = "0x1"
required_current_mitigations = 3

# Only chip-bound keys: a VLEK-signed report cannot be tied to a machine.
signing_keys = ["vcek"]
strict_reserved = true

[tcb]
# Firmware loaded but not committed could still be rolled back.
permit_provisional_firmware = false

[tcb.minimum_reported]
bootloader = 3
tee = 0
snp = 8
microcode = 115

[tcb.minimum_current]
snp = 8
microcode = 115

[tcb.minimum_committed]
snp = 8

[tcb.minimum_launch]
snp = 8
# Ignored on Milan and Genoa, which have no FMC.
fmc = 1

[guest_policy]
allow_debug = false
allow_migration_agent = false
allow_smt = true
allow_cxl = false
require_single_socket = false
require_aes_256_xts = false
require_rapl_disabled = false
require_ciphertext_hiding = false
require_page_swap_disabled = false
minimum_abi = "1.51"

[platform]
allow_smt = true
allow_tsme = true
allow_tio = false
require_ecc = true
require_rapl_disabled = false
require_ciphertext_hiding = false
require_alias_check_complete = false
"#;

#[test]
fn full_example_policy_parses() {
    let p = Policy::from_toml(EXAMPLE).expect("example parses");
    assert_eq!(p.version, 1);
    assert_eq!(p.vmpl, Some(0));
    assert!(!p.any_vmpl);
    assert_eq!(p.minimum_guest_svn, 3);
    assert_eq!(p.minimum_report_version, Some(3));
    assert_eq!(
        p.family_id,
        Some(HexBytes([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ]))
    );
    assert_eq!(
        p.image_id,
        Some(HexBytes([
            15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0
        ]))
    );
    assert_eq!(p.host_data, Some(HexBytes([0xa5; 32])));
    assert_eq!(p.report_data, None);
    assert_eq!(p.report_id, None);
    assert_eq!(p.report_id_ma, None);
    assert!(p.require_id_block && p.require_author_key);
    assert_eq!(p.trusted_id_keys, vec![HexBytes([0x11; 48])]);
    assert_eq!(p.trusted_author_keys, vec![HexBytes([0x22; 48])]);
    assert_eq!(
        p.measurements,
        Some(vec![HexBytes([0x33; 48]), HexBytes([0x44; 48])])
    );
    assert_eq!(p.chip_ids, None);
    assert_eq!(p.minimum_build, 21);
    assert_eq!(p.minimum_firmware, Some(MajorMinor(1, 55)));
    assert_eq!(p.required_launch_mitigations, Some(HexU64(1)));
    assert_eq!(p.required_current_mitigations, Some(HexU64(3)));
    assert_eq!(p.signing_keys, vec![SigningKeyName::Vcek]);
    assert!(p.strict_reserved);
    assert!(!p.tcb.permit_provisional_firmware);
    assert_eq!(
        p.tcb.minimum_reported,
        TcbMinimum {
            fmc: None,
            bootloader: Some(3),
            tee: Some(0),
            snp: Some(8),
            microcode: Some(115),
        }
    );
    assert_eq!(p.tcb.minimum_launch.fmc, Some(1));
    assert_eq!(p.tcb.minimum_committed.snp, Some(8));
    assert!(!p.guest_policy.allow_cxl);
    assert_eq!(p.guest_policy.minimum_abi, Some(MajorMinor(1, 51)));
    assert!(!p.platform.allow_tio && p.platform.require_ecc);

    // A report that meets it passes; the baseline (other identity) fails on identity only.
    let mut r = good();
    r.guest_svn = 3;
    r.family_id = p.family_id.unwrap().0;
    r.image_id = p.image_id.unwrap().0;
    r.host_data = [0xa5; 32];
    r.id_key_digest = [0x11; 48];
    r.key_info = KeyInfo(1);
    r.author_key_digest = [0x22; 48];
    r.measurement = [0x44; 48];
    r.platform_info = PlatformInfo(PlatformInfo::SMT_EN | PlatformInfo::ECC_EN);
    passes(&p, &r);

    // The serialized form reads back as the same policy, in TOML and JSON.
    assert_eq!(
        Policy::from_toml(&p.to_toml()).expect("to_toml reads back"),
        p
    );
    let json = serde_json::to_string(&p).unwrap();
    let back: Policy = serde_json::from_str(&json).unwrap();
    back.validate().unwrap();
    assert_eq!(back, p);
}

#[test]
fn default_policy_round_trips_through_toml() {
    let p = Policy::default();
    let s = p.to_toml();
    assert!(!s.is_empty());
    assert_eq!(Policy::from_toml(&s).unwrap(), p);
}

fn toml_err(s: &str) -> String {
    match Policy::from_toml(s) {
        Ok(p) => panic!("accepted {s:?} as {p:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_keys_are_rejected() {
    for (doc, key) in [
        ("version = 1\nallow_debug = true\n", "allow_debug"),
        ("[guest_policy]\nallow_dbug = true\n", "allow_dbug"),
        ("[platform]\nrequire_smt = true\n", "require_smt"),
        ("[tcb]\npermit_rollback = true\n", "permit_rollback"),
        ("[tcb.minimum_reported]\nucode = 115\n", "ucode"),
        ("[identity]\nvmpl = 0\n", "identity"),
    ] {
        let e = Policy::from_toml(doc).expect_err(doc);
        assert!(matches!(e, PolicyError::Toml(_)), "{doc}: {e:?}");
        assert!(e.to_string().contains(key), "{doc}: {e}");
    }
}

#[test]
fn version_2_is_rejected() {
    assert!(matches!(
        Policy::from_toml("version = 2\n"),
        Err(PolicyError::Version(2))
    ));
    assert!(matches!(
        Policy::from_toml("version = 0\n"),
        Err(PolicyError::Version(0))
    ));
    assert!(Policy::from_toml("version = 1\n").is_ok());
}

#[test]
fn vmpl_4_is_rejected() {
    let e = Policy::from_toml("vmpl = 4\n").unwrap_err();
    assert!(matches!(e, PolicyError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("vmpl 4"), "{e}");
    for ok in 0..=3 {
        assert_eq!(
            Policy::from_toml(&format!("vmpl = {ok}\n")).unwrap().vmpl,
            Some(ok)
        );
    }
    // Out of range with any_vmpl is still a mistake.
    assert!(Policy::from_toml("vmpl = 7\nany_vmpl = true\n").is_err());
}

#[test]
fn require_author_key_without_keys_is_rejected() {
    let e = Policy::from_toml("require_author_key = true\n").unwrap_err();
    assert!(matches!(e, PolicyError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("trusted_author_keys"), "{e}");
    // ID keys alone do not satisfy require_author_key.
    let doc = format!(
        "require_author_key = true\ntrusted_id_keys = [\"{}\"]\n",
        "11".repeat(48)
    );
    assert!(matches!(
        Policy::from_toml(&doc),
        Err(PolicyError::Invalid(_))
    ));
    let doc = format!(
        "require_author_key = true\ntrusted_author_keys = [\"{}\"]\n",
        "22".repeat(48)
    );
    assert!(Policy::from_toml(&doc).is_ok());
}

#[test]
fn require_id_block_without_keys_and_empty_signing_keys_are_rejected() {
    assert!(matches!(
        Policy::from_toml("require_id_block = true\n"),
        Err(PolicyError::Invalid(_))
    ));
    assert!(matches!(
        Policy::from_toml("signing_keys = []\n"),
        Err(PolicyError::Invalid(_))
    ));
    assert!(matches!(
        Policy::from_toml("signing_keys = [\"ask\"]\n"),
        Err(PolicyError::Toml(_))
    ));
}

#[test]
fn hex_of_wrong_length_is_rejected_with_a_message() {
    for (doc, msg) in [
        (
            format!("measurements = [\"{}\"]\n", "ab".repeat(47)),
            "expected 48 bytes (96 hex digits), got 47",
        ),
        (
            format!("family_id = \"{}\"\n", "ab".repeat(17)),
            "expected 16 bytes (32 hex digits), got 17",
        ),
        (
            format!("host_data = \"0x{}\"\n", "ab".repeat(31)),
            "expected 32 bytes (64 hex digits), got 31",
        ),
        (
            format!("report_data = \"{}\"\n", "ab".repeat(32)),
            "expected 64 bytes (128 hex digits), got 32",
        ),
        (
            format!("chip_ids = [\"{}\"]\n", "ab".repeat(8)),
            "expected 64 bytes (128 hex digits), got 8",
        ),
        (
            format!("trusted_id_keys = [\"{}\"]\n", "ab".repeat(49)),
            "expected 48 bytes (96 hex digits), got 49",
        ),
        (
            format!("image_id = \"{}\"\n", "a".repeat(31)),
            "invalid hex",
        ),
        (
            format!("image_id = \"{}zz\"\n", "a".repeat(30)),
            "invalid hex",
        ),
        ("minimum_firmware = \"1\"\n".to_string(), "MAJOR.MINOR"),
        ("minimum_firmware = \"1.256\"\n".to_string(), "MAJOR.MINOR"),
        (
            "required_launch_mitigations = \"0xzz\"\n".to_string(),
            "invalid number",
        ),
    ] {
        let e = toml_err(&doc);
        assert!(e.contains(msg), "{doc}: {e}");
    }
}

#[test]
fn the_documented_example_policy_parses() {
    let p = Policy::from_toml(include_str!("../../examples/policy.toml"))
        .expect("examples/policy.toml");
    assert_eq!(p.vmpl, Some(0));
    assert_eq!(p.measurements.as_ref().map(Vec::len), Some(1));
    assert!(p.strict_reserved);
    assert!(!p.guest_policy.allow_debug);
    // As an order's policy it meets the broker's built-in floor.
    assert_eq!(snp::Floor::default().below(&p), vec![]);
}

#[test]
fn products_allowlist() {
    let r = good_for(Product::Turin);
    passes_on(&Policy::default(), &r, Product::Turin);
    let p = Policy::from_toml("products = [\"milan\", \"genoa\"]\n").unwrap();
    passes_on(&p, &good_for(Product::Genoa), Product::Genoa);
    fails_on(
        &p,
        &r,
        Product::Turin,
        &[Reason::ProductNotAllowed(Product::Turin)],
    );
    assert!(Policy::from_toml("products = []\n").is_err());
    assert!(Policy::from_toml("products = [\"rome\"]\n").is_err());
}

#[test]
fn launch_tcb_above_current_is_a_rollback() {
    let base = good();
    let cur = Tcb::decode(base.current_tcb, Product::Milan);
    let mut r = base.clone();
    r.launch_tcb = Tcb {
        snp: cur.snp + 1,
        ..cur
    }
    .encode(Product::Milan);
    fails(
        &Policy::default(),
        &r,
        &[Reason::TcbAboveCurrent {
            field: TcbField::Launch,
            component: Component::Snp,
            value: cur.snp + 1,
            current: cur.snp,
        }],
    );
    // An older launch TCB (firmware updated since launch) is fine.
    let mut r = base;
    r.launch_tcb = Tcb {
        snp: cur.snp - 1,
        ..cur
    }
    .encode(Product::Milan);
    passes(&Policy::default(), &r);
}

/// A per-product minimum (the broker's floor) applies to all four TCBs of that product's
/// reports only, and the stricter of it and a product-agnostic minimum is what is required.
#[test]
fn per_product_minimums_apply_to_every_tcb_of_that_product() {
    let mut p = Policy::default();
    p.tcb.minimum_by_product.insert(
        Product::Milan,
        TcbMinimum {
            snp: Some(MILAN_TCB.snp + 1),
            ..Default::default()
        },
    );
    p.tcb.minimum_reported.snp = Some(2);
    let want: Vec<Reason> = [
        TcbField::Reported,
        TcbField::Current,
        TcbField::Committed,
        TcbField::Launch,
    ]
    .into_iter()
    .map(|field| Reason::TcbBelowMinimum {
        field,
        component: Component::Snp,
        have: MILAN_TCB.snp,
        need: MILAN_TCB.snp + 1,
    })
    .collect();
    fails(&p, &good(), &want);
    // Another product's reports are not held to Milan's numbers.
    passes_on(&p, &good_for(Product::Turin), Product::Turin);
    // Written in TOML as a table per product, and read back the same.
    let again = Policy::from_toml(&p.to_toml()).unwrap();
    assert_eq!(again, p);
    assert!(
        p.to_toml().contains("[tcb.minimum_by_product.milan]"),
        "{}",
        p.to_toml()
    );
}
