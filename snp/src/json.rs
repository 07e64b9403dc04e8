//! Reports and verdicts as JSON, for tools that print them (`attesta-kbs verify-report --json`,
//! `attesta-verify --json`): every field a reviewer looks at, TCBs decoded for the product.

use crate::report::{FirmwareVersion, GuestPolicy, PlatformInfo, SigningKey};
use crate::{Product, Root, Tcb, Verdict};
use serde_json::{Value, json};

fn tcb_json(t: &Tcb, raw: u64) -> Value {
    let mut v = json!({
        "raw": format!("{raw:#018x}"),
        "bootloader": t.bootloader,
        "tee": t.tee,
        "snp": t.snp,
        "microcode": t.microcode,
    });
    if let Some(f) = t.fmc {
        v["fmc"] = json!(f);
    }
    v
}

fn policy_json(p: GuestPolicy) -> Value {
    json!({
        "raw": format!("{:#x}", p.0),
        "abi_major": p.abi_major(),
        "abi_minor": p.abi_minor(),
        "smt": p.smt_allowed(),
        "migrate_ma": p.migrate_ma(),
        "debug": p.debug(),
        "single_socket": p.single_socket(),
        "cxl_allow": p.cxl_allowed(),
        "mem_aes_256_xts": p.mem_aes_256_xts(),
        "rapl_dis": p.rapl_disabled(),
        "ciphertext_hiding": p.ciphertext_hiding(),
        "page_swap_disable": p.page_swap_disabled(),
    })
}

fn platform_json(p: PlatformInfo) -> Value {
    json!({
        "raw": format!("{:#x}", p.0),
        "smt_enabled": p.has(PlatformInfo::SMT_EN),
        "tsme_enabled": p.has(PlatformInfo::TSME_EN),
        "ecc_enabled": p.has(PlatformInfo::ECC_EN),
        "rapl_disabled": p.has(PlatformInfo::RAPL_DIS),
        "ciphertext_hiding_enabled": p.has(PlatformInfo::CIPHERTEXT_HIDING_EN),
        "alias_check_complete": p.has(PlatformInfo::ALIAS_CHECK_COMPLETE),
        "tio_enabled": p.has(PlatformInfo::TIO_EN),
    })
}

pub fn key_name(k: SigningKey) -> String {
    match k {
        SigningKey::Vcek => "vcek".into(),
        SigningKey::Vlek => "vlek".into(),
        SigningKey::None => "none".into(),
        SigningKey::Reserved(n) => format!("reserved({n})"),
    }
}

fn root_json(v: &Verdict) -> Value {
    match v.root {
        Some(Root::Amd(p)) => json!(format!("amd-{}", p.name().to_lowercase())),
        Some(Root::Configured(fp)) => json!(format!("configured:{}", hex::encode(fp))),
        None => Value::Null,
    }
}

/// A verdict and its report's fields. `at` is the RFC 3339 instant the chain was checked at;
/// `appraised` whether a policy was applied.
pub fn verdict_json(v: &Verdict, at: &str, appraised: bool) -> Value {
    let mut j = json!({
        "verdict": if v.accepted() { "accepted" } else { "rejected" },
        "reasons": v.reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "reason_codes": v.reasons.iter().map(|r| r.code()).collect::<Vec<_>>(),
        "product": v.product.map(|p| p.name().to_lowercase()),
        "amd_rooted": v.amd_rooted(),
        "root": root_json(v),
        "signer": v.signer,
        "revocation": if v.revocation_checked { "checked" } else { "not_checked" },
        "appraised": appraised,
        "at": at,
        "version": Value::Null,
    });
    let Some(r) = &v.report else { return j };
    report_fields(&mut j, r, v.product);
    j
}

/// Adds a report's fields to `j` (TCBs decoded with `product`'s layout, Milan's when unknown).
pub fn report_fields(j: &mut Value, r: &crate::AttestationReport, product: Option<Product>) {
    j["version"] = json!(r.version);
    j["guest_svn"] = json!(r.guest_svn);
    j["vmpl"] = json!(r.vmpl);
    j["signature_algo"] = json!(r.signature_algo);
    j["signing_key"] = json!(key_name(r.key_info.signing_key()));
    j["author_key_en"] = json!(r.key_info.author_key_en());
    j["mask_chip_key"] = json!(r.key_info.mask_chip_key());
    j["measurement"] = json!(hex::encode(r.measurement));
    j["report_data"] = json!(hex::encode(r.report_data));
    j["host_data"] = json!(hex::encode(r.host_data));
    j["family_id"] = json!(hex::encode(r.family_id));
    j["image_id"] = json!(hex::encode(r.image_id));
    j["id_key_digest"] = json!(hex::encode(r.id_key_digest));
    j["author_key_digest"] = json!(hex::encode(r.author_key_digest));
    j["report_id"] = json!(hex::encode(r.report_id));
    j["report_id_ma"] = json!(hex::encode(r.report_id_ma));
    j["chip_id"] = json!(hex::encode(r.chip_id));
    j["policy"] = policy_json(r.policy);
    j["platform_info"] = platform_json(r.platform_info);
    if let Some(c) = r.cpuid {
        j["cpuid"] = json!({"family": c.family, "model": c.model, "stepping": c.stepping});
    }
    let fw = |f: FirmwareVersion| format!("{}.{}.{}", f.major, f.minor, f.build);
    j["firmware"] = json!({"current": fw(r.current_version), "committed": fw(r.committed_version)});
    if let Some(m) = r.launch_mit_vector {
        j["launch_mit_vector"] = json!(format!("{m:#x}"));
    }
    if let Some(m) = r.current_mit_vector {
        j["current_mit_vector"] = json!(format!("{m:#x}"));
    }
    // TCBs are decoded with the product's layout; Milan's when the product is unknown.
    let p = product.unwrap_or(Product::Milan);
    j["tcb"] = json!({
        "reported": tcb_json(&Tcb::decode(r.reported_tcb, p), r.reported_tcb),
        "current": tcb_json(&Tcb::decode(r.current_tcb, p), r.current_tcb),
        "committed": tcb_json(&Tcb::decode(r.committed_tcb, p), r.committed_tcb),
        "launch": tcb_json(&Tcb::decode(r.launch_tcb, p), r.launch_tcb),
    });
}
