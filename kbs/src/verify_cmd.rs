//! `verify-report` and `verify-dir`: the verifier for security teams and tenants.

use crate::clock::now;
use clap::Args;
use serde_json::json;
use snp::Reason;
use snp::certs::pem_blocks;
use snp::json::{key_name, verdict_json};
use snp::reason::{parse_rfc3339, rfc3339};
use snp::report::SigningKey;
use snp::{
    AttestationReport, CertTable, Evidence, Policy, Product, Revocation, Root, Tcb, Verdict,
    Verifier, VerifierConfig,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("signer").required(true).args(["vcek", "vcek_store", "cert_table"]))]
pub struct VerifyArgs {
    /// The raw attestation report (1184 bytes).
    pub report: PathBuf,
    /// The VCEK or VLEK certificate (DER or PEM, auto-detected).
    #[arg(long, value_name = "FILE")]
    pub vcek: Option<PathBuf>,
    /// An offline VCEK store (trustee layout: vcek/{hwid}/bl{n}_tee{n}_snp{n}_ucode{n}[_fmc{n}]_vcek.der).
    #[arg(long, value_name = "DIR")]
    pub vcek_store: Option<PathBuf>,
    /// With --vcek-store: on a miss, fetch the VCEK from this key server (e.g.
    /// https://kdsintf.amd.com) and keep it in the store.
    #[arg(long, value_name = "URL", requires = "vcek_store", conflicts_with_all = ["vcek", "cert_table"])]
    pub kds_url: Option<String>,
    /// With --kds-url: also fetch the product's ARK-signed CRL (kept in the store until its
    /// nextUpdate) and check revocation against it.
    #[arg(long, requires = "kds_url")]
    pub fetch_crl: bool,
    /// An extended report's certificate table (AMD GUIDs for VCEK/VLEK, ASK, ARK).
    #[arg(long, value_name = "FILE")]
    pub cert_table: Option<PathBuf>,
    /// The ASK (or ASVK for a VLEK), DER or PEM. Default: AMD's built-in one.
    #[arg(long, value_name = "FILE", requires = "ark", conflicts_with = "chain")]
    pub ask: Option<PathBuf>,
    /// The ARK, DER or PEM. Default: AMD's built-in one.
    #[arg(long, value_name = "FILE", requires = "ask", conflicts_with = "chain")]
    pub ark: Option<PathBuf>,
    /// A PEM bundle: ASK (or ASVK), then ARK.
    #[arg(long, value_name = "FILE")]
    pub chain: Option<PathBuf>,
    /// Product (milan, genoa, turin) instead of detecting it from the report.
    #[arg(long, value_name = "P")]
    pub product: Option<Product>,
    /// A CRL (DER or PEM) to check revocation against. It must verify against the ARK and be
    /// current at --at, or the report is rejected.
    #[arg(long, value_name = "FILE")]
    pub crl: Vec<PathBuf>,
    /// Reject when no CRL is given (fail closed); default: revocation is checked only with --crl.
    #[arg(long)]
    pub require_crl: bool,
    /// Check certificate validity at this instant (RFC 3339). Default: now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// An appraisal policy (TOML). Without it only authenticity is checked.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Trust this (non-AMD) root, e.g. the simulator's ark.pem. Verdicts say they are not AMD-rooted.
    #[arg(long, value_name = "FILE")]
    pub trust_root: Vec<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyDirArgs {
    /// Directory of evidence bundles (e.g. ../shared/snp-corpus).
    pub dir: PathBuf,
    /// Check validity at this instant (RFC 3339). Default: now; bundles whose certificate
    /// has expired by then are reported as such.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Writes a line to stdout, ignoring a closed pipe (`| head` must not turn a verdict into a panic).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// A usage problem or unreadable input: exit status 2.
struct UsageError(String);

fn read(p: &Path, what: &str) -> Result<Vec<u8>, UsageError> {
    std::fs::read(p).map_err(|e| UsageError(format!("cannot read {what} {}: {e}", p.display())))
}

fn at_arg(at: &Option<String>) -> Result<u64, UsageError> {
    match at {
        None => Ok(now()),
        Some(s) => parse_rfc3339(s).map_err(UsageError),
    }
}

pub fn verify_report(a: VerifyArgs) -> ExitCode {
    match run_verify(&a) {
        Ok(accepted) => ExitCode::from(if accepted { 0 } else { 1 }),
        Err(UsageError(msg)) => {
            eprintln!("attesta-kbs verify-report: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run_verify(a: &VerifyArgs) -> Result<bool, UsageError> {
    let at = at_arg(&a.at)?;
    let report = read(&a.report, "report")?;
    let policy = match &a.policy {
        None => None,
        Some(p) => {
            let text = String::from_utf8(read(p, "policy")?)
                .map_err(|_| UsageError(format!("policy {} is not UTF-8", p.display())))?;
            Some(
                Policy::from_toml(&text)
                    .map_err(|e| UsageError(format!("{}: {e}", p.display())))?,
            )
        }
    };
    let mut trust_roots = Vec::new();
    for p in &a.trust_root {
        let bytes = read(p, "trust root")?;
        snp::AmdCert::from_der_or_pem(&bytes)
            .map_err(|e| UsageError(format!("trust root {}: {e}", p.display())))?;
        trust_roots.push(bytes);
    }
    let (mut ask, mut ark) = match (&a.ask, &a.ark, &a.chain) {
        (Some(s), Some(r), _) => (Some(read(s, "ASK")?), Some(read(r, "ARK")?)),
        (_, _, Some(c)) => {
            let blocks = pem_blocks(&read(c, "chain")?)
                .map_err(|e| UsageError(format!("chain {}: {e}", c.display())))?;
            if blocks.len() != 2 {
                return Err(UsageError(format!(
                    "chain {} holds {} certificates; expected ASK (or ASVK) then ARK",
                    c.display(),
                    blocks.len()
                )));
            }
            (blocks.first().cloned(), blocks.get(1).cloned())
        }
        _ => (None, None),
    };
    let mut notes = Vec::new();
    let mut extra: Vec<Reason> = Vec::new();
    let mut crls = Vec::new();
    let vcek = if let Some(p) = &a.vcek {
        Some(read(p, "VCEK")?)
    } else if let Some(p) = &a.cert_table {
        // The table is evidence from the host: a malformed one is a rejection, not a usage error.
        match CertTable::parse(&read(p, "certificate table")?) {
            Ok(table) => {
                if ask.is_none() {
                    ask = table.get(&snp::certtable::GUID_ASK).map(<[u8]>::to_vec);
                    ark = table.get(&snp::certtable::GUID_ARK).map(<[u8]>::to_vec);
                    if ask.is_none() != ark.is_none() {
                        extra.push(Reason::CertTableInvalid(
                            "holds only one of ASK and ARK".into(),
                        ));
                        ask = None;
                        ark = None;
                    }
                }
                let key = AttestationReport::from_bytes(&report).map(|r| r.key_info.signing_key());
                let guid = match key {
                    Ok(SigningKey::Vlek) => snp::certtable::GUID_VLEK,
                    _ => snp::certtable::GUID_VCEK,
                };
                table.get(&guid).map(<[u8]>::to_vec)
            }
            Err(e) => {
                extra.push(Reason::CertTableInvalid(e.to_string()));
                None
            }
        }
    } else if let Some(dir) = &a.vcek_store {
        lookup_store(dir, &report, a, &mut notes, &mut crls)?
    } else {
        None
    };
    for p in &a.crl {
        crls.push(read(p, "CRL")?);
    }
    let crl_refs: Vec<&[u8]> = crls.iter().map(Vec::as_slice).collect();
    let revocation = if a.require_crl || a.fetch_crl {
        Revocation::Require
    } else {
        Revocation::IfAvailable
    };
    let verifier = Verifier::new(VerifierConfig {
        trust_roots,
        product: a.product,
        revocation,
    });
    let ev = Evidence {
        report: &report,
        vcek: vcek.as_deref(),
        ask: ask.as_deref(),
        ark: ark.as_deref(),
        crls: &crl_refs,
    };
    let mut verdict = match &policy {
        Some(p) => verifier.verify_with_policy(&ev, p, at),
        None => verifier.verify(&ev, at),
    };
    verdict.reasons.splice(0..0, extra);
    if a.json {
        let mut j = verdict_json(&verdict, &rfc3339(at), policy.is_some());
        if !notes.is_empty() {
            j["notes"] = json!(notes);
        }
        outln!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    } else {
        print_text(&verdict, at, policy.is_some(), &notes);
    }
    Ok(verdict.accepted())
}

fn lookup_store(
    dir: &Path,
    report: &[u8],
    a: &VerifyArgs,
    notes: &mut Vec<String>,
    crls: &mut Vec<Vec<u8>>,
) -> Result<Option<Vec<u8>>, UsageError> {
    if !dir.is_dir() {
        return Err(UsageError(format!(
            "VCEK store {} is not a directory",
            dir.display()
        )));
    }
    // A malformed report is reported as a rejection by the verifier, not here.
    let Ok(r) = AttestationReport::from_bytes(report) else {
        return Ok(None);
    };
    // Milan and Genoa share the hwID length and TCB layout, so either works for the lookup;
    // a version 2 report does not say which, so a fetch tries both.
    let candidates: Vec<Product> = match a.product.or(r.product_hint()) {
        Some(p) => vec![p],
        None => vec![Product::Milan, Product::Genoa],
    };
    let p = candidates[0];
    let tcb = Tcb::decode(r.reported_tcb, p);
    let store = snp_kds::OfflineStore::new(dir);
    let mut found = match store.lookup(p, &r.chip_id, &tcb) {
        Ok(Some((path, der))) => {
            notes.push(format!("VCEK from {}", path.display()));
            Some((p, der))
        }
        Ok(None) => None,
        Err(e) => return Err(UsageError(format!("VCEK store {}: {e}", dir.display()))),
    };
    let Some(url) = &a.kds_url else {
        if found.is_none() {
            notes.push(format!(
                "no VCEK in {} for hwid {} at TCB {tcb} (looked for {})",
                dir.display(),
                snp::kds::hwid_hex(p, &r.chip_id),
                snp::kds::store_candidates(p, &r.chip_id, &tcb).join(", ")
            ));
        }
        return Ok(found.map(|(_, d)| d));
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| UsageError(format!("cannot start the HTTP client: {e}")))?;
    let client = snp_kds::KdsClient::new(url, dir, snp_kds::Backoff::default())
        .map_err(|e| UsageError(e.to_string()))?;
    if found.is_none() {
        for &p in &candidates {
            let tcb = Tcb::decode(r.reported_tcb, p);
            match rt.block_on(client.vcek(p, &r.chip_id, &tcb)) {
                Ok(der) => {
                    notes.push(format!(
                        "VCEK fetched from {url} ({p}) and kept in {}",
                        dir.display()
                    ));
                    found = Some((p, der));
                    break;
                }
                Err(e) => notes.push(format!("fetching the VCEK ({p}): {e}")),
            }
        }
    }
    if a.fetch_crl
        && let Some((p, _)) = &found
    {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match rt.block_on(client.crl(*p, now)) {
            Ok(crl) => {
                notes.push(format!(
                    "CRL for {p} from {url} (cached until its nextUpdate)"
                ));
                crls.push(crl);
            }
            // Without a CRL the verifier's revocation rule decides (use --require-crl to fail closed).
            Err(e) => notes.push(format!("fetching the CRL ({p}): {e}")),
        }
    }
    Ok(found.map(|(_, d)| d))
}

fn print_text(v: &Verdict, at: u64, appraised: bool, notes: &[String]) {
    let status = if v.accepted() { "ACCEPTED" } else { "REJECTED" };
    let root = match v.root {
        Some(Root::Amd(p)) => format!("AMD-rooted ({p})"),
        Some(Root::Configured(fp)) => {
            format!("NOT AMD-rooted: configured root {}", &hex::encode(fp)[..16])
        }
        None => "root not trusted".into(),
    };
    outln!("verdict:       {status} ({root})");
    outln!("checked at:    {}", rfc3339(at));
    outln!(
        "checks:        authenticity{}",
        if appraised {
            " + appraisal policy"
        } else {
            " only (no --policy)"
        }
    );
    outln!(
        "revocation:    {}",
        if v.revocation_checked {
            "checked against a current CRL"
        } else {
            "not checked (no CRL)"
        }
    );
    if let Some(r) = &v.report {
        let p = v
            .product
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into());
        outln!("product:       {p}");
        outln!(
            "report:        version {}, VMPL {}, signed by {}",
            r.version,
            r.vmpl,
            key_name(r.key_info.signing_key()).to_uppercase()
        );
        outln!("measurement:   {}", hex::encode(r.measurement));
        outln!("report_data:   {}", hex::encode(r.report_data));
        outln!("host_data:     {}", hex::encode(r.host_data));
        outln!("chip_id:       {}", hex::encode(r.chip_id));
        let pr = v.product.unwrap_or(Product::Milan);
        outln!("reported TCB:  {}", Tcb::decode(r.reported_tcb, pr));
        outln!(
            "policy:        {:#x} (debug={}, migrate_ma={}, smt={})",
            r.policy.0,
            r.policy.debug(),
            r.policy.migrate_ma(),
            r.policy.smt_allowed()
        );
    }
    for n in notes {
        outln!("note:          {n}");
    }
    if !v.reasons.is_empty() {
        outln!("reasons:");
        for r in &v.reasons {
            outln!("  - [{}] {r}", r.code());
        }
    }
}

/// An evidence bundle in a directory.
struct Bundle {
    report: Vec<u8>,
    vcek: Option<Vec<u8>>,
    ask: Option<Vec<u8>>,
    ark: Option<Vec<u8>>,
    expect_fail: bool,
}

fn load_bundle(d: &Path) -> Option<Bundle> {
    let report = std::fs::read(d.join("report.bin")).ok()?;
    let vcek = ["vcek.der", "vcek.pem", "vlek.der", "vlek.pem"]
        .iter()
        .find_map(|f| std::fs::read(d.join(f)).ok());
    let (ask, ark) = match std::fs::read(d.join("cert_chain.pem"))
        .ok()
        .and_then(|c| pem_blocks(&c).ok())
    {
        Some(b) => (b.first().cloned(), b.get(1).cloned()),
        None => (
            std::fs::read(d.join("ask.pem")).ok(),
            std::fs::read(d.join("ark.pem")).ok(),
        ),
    };
    let expect_fail = std::fs::read_to_string(d.join("EXPECT")).is_ok_and(|s| s.trim() == "FAIL");
    Some(Bundle {
        report,
        vcek,
        ask,
        ark,
        expect_fail,
    })
}

pub fn verify_dir(a: VerifyDirArgs) -> ExitCode {
    let at = match at_arg(&a.at) {
        Ok(t) => t,
        Err(UsageError(m)) => {
            eprintln!("attesta-kbs verify-dir: {m}");
            return ExitCode::from(2);
        }
    };
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&a.dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("report.bin").is_file())
            .collect(),
        Err(e) => {
            eprintln!(
                "attesta-kbs verify-dir: cannot read {}: {e}",
                a.dir.display()
            );
            return ExitCode::from(2);
        }
    };
    dirs.sort();
    let verifier = Verifier::new(VerifierConfig {
        revocation: Revocation::IfAvailable,
        ..Default::default()
    });
    if !a.json {
        outln!(
            "{:<28} {:<6} {:>3} {:>4} {:<5} {:<9} {:<10} {:>9}  first reason",
            "bundle",
            "prod",
            "ver",
            "vmpl",
            "key",
            "verdict",
            "expected",
            "µs"
        );
    }
    let mut unexpected = 0;
    for d in &dirs {
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(b) = load_bundle(d) else { continue };
        let ev = Evidence {
            report: &b.report,
            vcek: b.vcek.as_deref(),
            ask: b.ask.as_deref(),
            ark: b.ark.as_deref(),
            crls: &[],
        };
        let t0 = Instant::now();
        let v = verifier.verify(&ev, at);
        let us = t0.elapsed().as_micros();
        let expected = if b.expect_fail {
            !v.accepted()
        } else {
            v.accepted()
        };
        if !expected {
            unexpected += 1;
        }
        if a.json {
            let mut j = verdict_json(&v, &rfc3339(at), false);
            j["bundle"] = json!(name);
            j["expected"] = json!(if b.expect_fail {
                "rejected"
            } else {
                "accepted"
            });
            outln!("{}", serde_json::to_string(&j).unwrap_or_default());
        } else {
            let r = v.report.as_ref();
            outln!(
                "{:<28} {:<6} {:>3} {:>4} {:<5} {:<9} {:<10} {:>9}  {}",
                name,
                v.product.map(|p| p.name()).unwrap_or("?"),
                r.map(|r| r.version.to_string()).unwrap_or_default(),
                r.map(|r| r.vmpl.to_string()).unwrap_or_default(),
                v.signer
                    .map(|s| format!("{s:?}").to_uppercase())
                    .unwrap_or_default(),
                if v.accepted() { "accepted" } else { "REJECTED" },
                if b.expect_fail {
                    "rejected"
                } else {
                    "accepted"
                },
                us,
                v.reasons
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
        }
    }
    if !a.json {
        outln!(
            "{} bundles, {} as expected, {} unexpected (checked at {})",
            dirs.len(),
            dirs.len() - unexpected,
            unexpected,
            rfc3339(at)
        );
    }
    ExitCode::from(if unexpected == 0 { 0 } else { 1 })
}
