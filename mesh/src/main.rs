//! `attesta-mesh`: the mesh CA and node certificates, revocation lists, and the node daemon.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use mesh::cert::{Claims, Curve, MeshCert, Request, Role, new_root, parse_bundle, sign, verify};
use mesh::unix_now as now;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "attesta-mesh",
    version,
    about = "Attesta's mesh: certificate authority, node certificates, revocation lists and the node daemon"
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
    /// Sign a numbered revocation list with a root CA. Copy it to a lighthouse's `revocation`
    /// file: the lighthouses push it to every node, which closes live connections to the
    /// revoked within seconds. Reissue it (number + 1) more often than nodes'
    /// `revocation_max_age`, or they fail closed.
    Revoke(Revoke),
    /// Run a mesh node (or a lighthouse) from its configuration file, until SIGINT/SIGTERM.
    Node {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Reach a node's echo service through the mesh, as the node of CONFIG, and print the
    /// round-trip time (exit 0 reached, 1 refused or unreachable).
    Ping {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The target's overlay address.
        ip: std::net::IpAddr,
        #[arg(long, default_value_t = 3)]
        count: u32,
    },
}

#[derive(Args)]
struct Revoke {
    /// The root CA directory (ca.crt, ca.key).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The list's number: higher than every list this CA issued before.
    #[arg(long)]
    number: u64,
    /// Certificates to revoke, by issuer and serial and by key (repeatable).
    #[arg(long, value_name = "FILE")]
    cert: Vec<PathBuf>,
    /// A serial to revoke, as ISSUER:HEX (repeatable).
    #[arg(long, value_name = "ISSUER:HEX")]
    serial: Vec<String>,
    /// A public key to revoke, as the SHA-256 of its SubjectPublicKeyInfo in hex (repeatable).
    #[arg(long, value_name = "HEX")]
    key: Vec<String>,
    /// Carry over every entry of a previous list (its signature is checked).
    #[arg(long, value_name = "FILE")]
    previous: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
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
    /// Roles of the node certificates the CA may sign (empty: any), comma-separated, e.g.
    /// `guest`. An intermediate under a CA with roles must state a subset of them.
    #[arg(long, value_delimiter = ',', value_parser = node_role())]
    roles: Vec<Role>,
    /// Names the CA's certificates may carry (empty: any), comma-separated patterns: `*` one
    /// label without a dot (VM ids; never a service such as kbs.attesta.local), `*.SUFFIX`
    /// one label under SUFFIX, else that exact name. Quote `*` from the shell. An
    /// intermediate under a CA with names must state patterns its parent's cover.
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
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
    /// and node.key (mode 0600). A group, network, role or name outside the CA's is refused.
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
    /// The node's role; required by a CA that limits roles.
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

/// A role a CA may grant: a node's (an intermediate is bound by its parent's roles instead).
fn node_role() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["kbs", "lighthouse", "host", "guest", "operator"])
        .try_map(|s| <Role as clap::ValueEnum>::from_str(&s, false))
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
    for p in &a.names {
        mesh::cert::check_name_pattern(p).map_err(|e| format!("--names: {e}"))?;
        let rest = p.strip_prefix("*.").unwrap_or(p);
        if rest != "*" {
            check_names(&[], rest).map_err(|e| format!("--names {p:?}: {e}"))?;
        }
    }
    let start = now();
    let claims = Claims {
        v: 1,
        groups: a.groups.clone(),
        networks: a.networks.clone(),
        role: Some(Role::Ca),
        ips: vec![],
        roles: a.roles.clone(),
        names: a.names.clone(),
    };
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let (issued, chain_above) = match &a.parent {
        None => {
            let d = mesh::parse_duration(a.duration.as_deref().unwrap_or("8760h"))?;
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
                Some(d) => start + mesh::parse_duration(d)?,
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
        Some(d) => start + mesh::parse_duration(d)?,
        None => ca.not_after,
    };
    let req = Request {
        name: &a.name,
        claims: Claims {
            v: 1,
            ips: a.ip.clone(),
            groups: a.groups.clone(),
            role: a.role,
            ..Default::default()
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
            "roles": c.claims.roles,
            "names": c.claims.names,
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
        "name:        {}\nrole:        {}\nips:         {}\ngroups:      {}\nnetworks:    {}\nroles:       {}\nnames:       {}\nCA:          {}\nnot before:  {}\nnot after:   {}\nissuer:      {}\nserial:      {}\nfingerprint: {}",
        c.name,
        role.unwrap_or_else(|| "-".into()),
        c.claims.ips.join(", "),
        c.claims.groups.join(", "),
        c.claims.networks.join(", "),
        c.claims
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", "),
        c.claims.names.join(", "),
        c.is_ca,
        snp::reason::rfc3339(c.not_before),
        snp::reason::rfc3339(c.not_after),
        c.issuer,
        hex::encode(&c.serial),
        fingerprint
    ))
}

fn revoke(a: &Revoke) -> Result<String, String> {
    use mesh::revocation::{Body, RevocationList, SerialEntry, sign};
    let (certs, key) = load_ca(&a.ca)?;
    let ca = certs.first().ok_or("ca.crt holds no certificate")?;
    if !ca.is_ca || ca.issuer != ca.name {
        return Err(format!("{} is not a root CA", ca.name));
    }
    let mut body = Body {
        v: 1,
        ca: ca.name.clone(),
        number: a.number,
        issued_at: now(),
        serials: Vec::new(),
        keys: Vec::new(),
    };
    if let Some(p) = &a.previous {
        let prev = RevocationList::verify(&read(p)?, &certs[..1], now())
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if prev.body.number >= a.number {
            return Err(format!(
                "--number {} must be higher than the previous list's {}",
                a.number, prev.body.number
            ));
        }
        body.serials = prev.body.serials;
        body.keys = prev.body.keys;
    }
    for f in &a.cert {
        let c = parse_bundle(&read(f)?).map_err(|e| format!("{}: {e}", f.display()))?;
        body.revoke(c.first().ok_or("no certificate")?);
    }
    for s in &a.serial {
        let (issuer, serial) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("--serial {s:?}: expected ISSUER:HEX"))?;
        hex::decode(serial).map_err(|_| format!("--serial {s:?}: the serial is not hex"))?;
        body.serials.push(SerialEntry {
            issuer: issuer.into(),
            serial: serial.to_lowercase(),
        });
    }
    for k in &a.key {
        if hex::decode(k).map(|v| v.len()) != Ok(32) {
            return Err(format!("--key {k:?}: expected 64 hex digits"));
        }
        body.keys.push(k.to_lowercase());
    }
    body.normalize();
    let bytes = sign(ca, &key, &body).map_err(|e| e.to_string())?;
    // Replacing the previous list in place (on a lighthouse) is the normal workflow.
    mesh::watch::write_atomic(&a.out, &bytes)
        .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    Ok(format!(
        "revocation list {} by {}: {} serial(s), {} key(s) → {}",
        body.number,
        body.ca,
        body.serials.len(),
        body.keys.len(),
        a.out.display()
    ))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn run_node(config: &Path, json_logs: bool) -> Result<String, String> {
    // The same filter variable as the broker and the host agent.
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATTESTA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json_logs {
        sub.json().init();
    } else {
        sub.init();
    }
    let cfg = mesh::node::NodeConfig::load(config).map_err(|e| e.to_string())?;
    runtime()?.block_on(async move {
        let node = mesh::node::Node::start(cfg, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        node.shutdown().await;
        Ok("stopped".into())
    })
}

fn ping(config: &Path, ip: std::net::IpAddr, count: u32) -> Result<String, String> {
    let mut cfg = mesh::node::NodeConfig::load(config).map_err(|e| e.to_string())?;
    // A one-shot client: any free port, no lighthouse duties, no echo.
    cfg.listen = std::net::SocketAddr::new(cfg.listen.ip(), 0);
    cfg.lighthouse = false;
    cfg.echo = false;
    cfg.announce = false;
    cfg.tun = None;
    cfg.advertise.clear();
    runtime()?.block_on(async move {
        let node = mesh::node::Node::start(cfg, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        // Give the lighthouse connections a moment to come up.
        for _ in 0..20 {
            if !node.peers().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let conn = node
            .connect(ip, mesh::node::ECHO_ALPN)
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        for i in 0..count.max(1) {
            let t = std::time::Instant::now();
            let probe = format!("attesta ping {i}");
            mesh::node::echo_once(&conn, probe.as_bytes(), std::time::Duration::from_secs(10))
                .await?;
            lines.push(format!(
                "reply from {ip}: seq={i} time={:.2} ms",
                t.elapsed().as_secs_f64() * 1e3
            ));
        }
        conn.close(0u32.into(), b"done");
        node.shutdown().await;
        Ok(lines.join("\n"))
    })
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
            ExitCode::from(
                if cmd == "cert sign" || cmd == "ca new" || cmd == "revoke" {
                    1
                } else {
                    2
                },
            )
        }
    };
    match cli.cmd {
        Cmd::Ca(CaCmd::New(a)) => done(ca_new(&a), "ca new"),
        Cmd::Cert(CertCmd::Sign(a)) => done(cert_sign(&a), "cert sign"),
        Cmd::Cert(CertCmd::Print { file, json }) => done(print(&file, json), "cert print"),
        Cmd::Revoke(a) => done(revoke(&a), "revoke"),
        Cmd::Node { config, json_logs } => done(run_node(&config, json_logs), "node"),
        Cmd::Ping { config, ip, count } => match ping(&config, ip, count) {
            Ok(m) => {
                println!("{m}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("attesta-mesh ping: {e}");
                ExitCode::from(1)
            }
        },
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
