//! `attesta-mesh`: the mesh CA and node certificates on the command line.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use mesh::cert::{Claims, Curve, MeshCert, Request, Role, new_root, parse_bundle, sign, verify};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Parser)]
#[command(
    name = "attesta-mesh",
    version,
    about = "Attesta's mesh: certificate authority and node certificates"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Certificate authorities.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Node certificates.
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA: a root, or with --parent an intermediate within its parent's constraints.
    /// Writes ca.crt and ca.key (mode 0600).
    New(CaNew),
}

#[derive(Args)]
struct CaNew {
    #[arg(long)]
    name: String,
    /// Groups the CA may grant (empty: any), comma-separated.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Networks the CA may hand out (empty: any), comma-separated CIDRs.
    #[arg(long, value_delimiter = ',')]
    networks: Vec<String>,
    /// Validity, e.g. 8760h, 30d, 90m, 3600s (default 8760h; an intermediate's ends with its parent's).
    #[arg(long)]
    duration: Option<String>,
    /// Sign with this parent CA directory instead of self-signing (an intermediate CA).
    #[arg(long, value_name = "DIR")]
    parent: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "ed25519")]
    curve: Curve,
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Sign a node certificate with a CA directory. Writes node.crt (with any intermediates)
    /// and node.key (mode 0600). A group or network outside the CA's is refused.
    Sign(CertSign),
    /// Print a certificate (the first in the file).
    Print {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify a certificate (and the intermediates after it in the file) against CA roots.
    /// Exit 0 valid, 1 invalid (the reason is printed), 2 usage error or unreadable file.
    Verify {
        /// The trusted CA certificate(s), PEM.
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
        cert: PathBuf,
        /// Judge at this instant instead of now.
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
    },
}

#[derive(Args)]
struct CertSign {
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    #[arg(long)]
    name: String,
    /// Overlay address(es) with prefix, e.g. 10.42.0.7/16 (comma-separated for several).
    #[arg(long, value_delimiter = ',', required = true)]
    ip: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// Validity (default: until the CA expires).
    #[arg(long)]
    duration: Option<String>,
    #[arg(long, value_enum, default_value = "ed25519")]
    curve: Curve,
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// "8760h", "30d", "90m", "3600s" or plain seconds.
fn duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'd')) => (&s[..i], 86_400),
        Some((i, 'h')) => (&s[..i], 3_600),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 's')) => (&s[..i], 1),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("duration {s:?}: expected e.g. 8760h, 30d, 90m or 3600s"))
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            format!(
                "cannot create {} (it must not exist yet): {e}",
                path.display()
            )
        })?;
    f.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A CA directory: its certificate (first in ca.crt), the chain above it, and its key.
fn load_ca(dir: &Path) -> Result<(Vec<MeshCert>, String), String> {
    let certs = parse_bundle(&read(&dir.join("ca.crt"))?).map_err(|e| e.to_string())?;
    let key = String::from_utf8(read(&dir.join("ca.key"))?)
        .map_err(|_| format!("{}: not PEM", dir.join("ca.key").display()))?;
    Ok((certs, key))
}

fn check_names(groups: &[String], name: &str) -> Result<(), String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
    };
    if !ok(name) {
        return Err(format!("name {name:?}: 1-128 of [A-Za-z0-9-_.:@]"));
    }
    match groups.iter().find(|g| !ok(g)) {
        Some(g) => Err(format!("group {g:?}: 1-128 of [A-Za-z0-9-_.:@]")),
        None => Ok(()),
    }
}

fn ca_new(a: &CaNew) -> Result<String, String> {
    check_names(&a.groups, &a.name)?;
    for n in &a.networks {
        n.parse::<ipnet::IpNet>()
            .map_err(|_| format!("network {n:?} is not a CIDR"))?;
    }
    let start = now();
    let claims = Claims {
        v: 1,
        groups: a.groups.clone(),
        networks: a.networks.clone(),
        role: Some(Role::Ca),
        ips: vec![],
    };
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let (issued, chain_above) = match &a.parent {
        None => {
            let d = duration(a.duration.as_deref().unwrap_or("8760h"))?;
            let req = Request {
                name: &a.name,
                claims,
                is_ca: true,
                not_before: start,
                not_after: start + d,
                curve: a.curve,
            };
            (new_root(&req).map_err(|e| e.to_string())?, String::new())
        }
        Some(p) => {
            let (parents, key) = load_ca(p)?;
            let parent = parents.first().ok_or("the parent CA file is empty")?;
            let end = match &a.duration {
                Some(d) => start + duration(d)?,
                None => parent.not_after,
            };
            let req = Request {
                name: &a.name,
                claims,
                is_ca: true,
                not_before: start.max(parent.not_before),
                not_after: end,
                curve: a.curve,
            };
            let issued = sign(parent, &key, &req).map_err(|e| e.to_string())?;
            // Carry the parent and its intermediates, never a self-signed root.
            let above = std::fs::read_to_string(p.join("ca.crt")).map_err(|e| e.to_string())?;
            let keep: String = parents
                .iter()
                .zip(split_pem(&above))
                .filter(|(c, _)| c.name != c.issuer)
                .map(|(_, pem)| pem)
                .collect();
            (issued, keep)
        }
    };
    write(
        &a.out.join("ca.crt"),
        (issued.cert_pem + &chain_above).as_bytes(),
        false,
    )?;
    write(&a.out.join("ca.key"), issued.key_pem.as_bytes(), true)?;
    Ok(format!("wrote {0}/ca.crt and {0}/ca.key", a.out.display()))
}

fn split_pem(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

fn cert_sign(a: &CertSign) -> Result<String, String> {
    check_names(&a.groups, &a.name)?;
    let (cas, key) = load_ca(&a.ca)?;
    let ca = cas.first().ok_or("the CA file is empty")?;
    if a.role == Some(Role::Ca) {
        return Err("role ca is for `ca new`".into());
    }
    let start = now().max(ca.not_before);
    let end = match &a.duration {
        Some(d) => start + duration(d)?,
        None => ca.not_after,
    };
    let req = Request {
        name: &a.name,
        claims: Claims {
            v: 1,
            ips: a.ip.clone(),
            groups: a.groups.clone(),
            role: a.role,
            networks: vec![],
        },
        is_ca: false,
        not_before: start,
        not_after: end,
        curve: a.curve,
    };
    for ip in &a.ip {
        ip.parse::<ipnet::IpNet>().map_err(|_| {
            format!("--ip {ip:?}: expected an address with prefix, e.g. 10.42.0.7/16")
        })?;
    }
    let issued = sign(ca, &key, &req).map_err(|e| e.to_string())?;
    // The node's certificate, then the intermediates up to (not including) a root.
    let text = std::fs::read_to_string(a.ca.join("ca.crt")).map_err(|e| e.to_string())?;
    let chain: String = cas
        .iter()
        .zip(split_pem(&text))
        .filter(|(c, _)| c.name != c.issuer)
        .map(|(_, pem)| pem)
        .collect();
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    write(
        &a.out.join("node.crt"),
        (issued.cert_pem + &chain).as_bytes(),
        false,
    )?;
    write(&a.out.join("node.key"), issued.key_pem.as_bytes(), true)?;
    Ok(format!(
        "wrote {0}/node.crt and {0}/node.key",
        a.out.display()
    ))
}

fn print(file: &Path, json: bool) -> Result<String, String> {
    let certs = parse_bundle(&read(file)?).map_err(|e| e.to_string())?;
    let c = certs.first().ok_or("no certificate")?;
    let role = c.claims.role.map(|r| format!("{r:?}").to_lowercase());
    let fingerprint = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &c.der,
    ));
    if json {
        let j = serde_json::json!({
            "name": c.name,
            "ips": c.claims.ips,
            "groups": c.claims.groups,
            "networks": c.claims.networks,
            "role": role,
            "is_ca": c.is_ca,
            "not_before": snp::reason::rfc3339(c.not_before),
            "not_after": snp::reason::rfc3339(c.not_after),
            "issuer": c.issuer,
            "serial": hex::encode(&c.serial),
            "public_key_sha256": hex::encode(c.key_hash),
            "fingerprint": fingerprint,
        });
        return serde_json::to_string_pretty(&j).map_err(|e| e.to_string());
    }
    Ok(format!(
        "name:        {}\nrole:        {}\nips:         {}\ngroups:      {}\nnetworks:    {}\nCA:          {}\nnot before:  {}\nnot after:   {}\nissuer:      {}\nserial:      {}\nfingerprint: {}",
        c.name,
        role.unwrap_or_else(|| "-".into()),
        c.claims.ips.join(", "),
        c.claims.groups.join(", "),
        c.claims.networks.join(", "),
        c.is_ca,
        snp::reason::rfc3339(c.not_before),
        snp::reason::rfc3339(c.not_after),
        c.issuer,
        hex::encode(&c.serial),
        fingerprint
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = |r: Result<String, String>, cmd: &str| match r {
        Ok(m) => {
            println!("{m}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-mesh {cmd}: {e}");
            ExitCode::from(if cmd == "cert sign" || cmd == "ca new" {
                1
            } else {
                2
            })
        }
    };
    match cli.cmd {
        Cmd::Ca(CaCmd::New(a)) => done(ca_new(&a), "ca new"),
        Cmd::Cert(CertCmd::Sign(a)) => done(cert_sign(&a), "cert sign"),
        Cmd::Cert(CertCmd::Print { file, json }) => done(print(&file, json), "cert print"),
        Cmd::Cert(CertCmd::Verify { ca, cert, at }) => {
            let inputs = (|| -> Result<_, String> {
                let roots =
                    parse_bundle(&read(&ca)?).map_err(|e| format!("{}: {e}", ca.display()))?;
                let at = match &at {
                    Some(t) => snp::reason::parse_rfc3339(t).map_err(|e| format!("--at: {e}"))?,
                    None => now(),
                };
                Ok((roots, read(&cert)?, at))
            })();
            let (roots, bytes, at) = match inputs {
                Ok(x) => x,
                Err(e) => return done(Err(e), "cert verify"),
            };
            let verdict = parse_bundle(&bytes).and_then(|chain| verify(&chain, &roots, at));
            match verdict {
                Ok(leaf) => {
                    println!(
                        "valid: {} (issuer {}, until {})",
                        leaf.name,
                        leaf.issuer,
                        snp::reason::rfc3339(leaf.not_after)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("invalid: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
