//! The operator's commands on a deployment: `vm register|terminate` (into the store or over
//! QUIC), `audit export`, `allowlist install`, `kek rotate`.

use crate::clock::now;
use crate::init_cmd::write_file;
use crate::serve_cmd::{build, fail, load_allowlist, runtime};
use clap::{Args, Subcommand};
use kbs::config::{Config, KekConfig};
use kbs::keys::{FileKek, Kek};
use kbs::service::Kbs;
use kbs::store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where an order goes: straight into this machine's store (`--config`), or to a running
/// broker over QUIC with a host or operator client certificate (`--kbs`).
#[derive(Args)]
pub struct Target {
    /// The broker's configuration (writes to its database directly; works while it serves).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "kbs",
        required_unless_present = "kbs"
    )]
    pub config: Option<PathBuf>,
    /// A running broker's UDP address, or several replicas' separated by commas (tried in
    /// turn until one can be reached; once sent, an order is not sent again elsewhere).
    #[arg(long, value_name = "ADDR[,ADDR…]", requires_all = ["ca", "cert", "key"])]
    pub kbs: Option<String>,
    /// The broker's TLS CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Our client certificate (PEM, role host or operator) and its key.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The name in the broker's certificate.
    #[arg(long, default_value = "kbs.attesta.local")]
    pub server_name: String,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Register a VM from an operator-signed order (generates and wraps its volume key); or
    /// many: several files, or folders of them (registered concurrently with `--config`, a
    /// failure reported and the rest still registered).
    Register {
        /// The signed order documents (`attesta-kbs order register` writes one), or folders
        /// holding only such documents.
        #[arg(required = true, num_args = 1..)]
        orders: Vec<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Crypto-shred a VM's key with an operator-signed terminate order.
    Terminate {
        /// The signed terminate order (`attesta-kbs order terminate`).
        order: PathBuf,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum AllowlistCmd {
    /// Install a newer signed allowlist (an older epoch is refused).
    Install {
        allowlist: PathBuf,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Sign an allowlist with the offline allowlist key.
    Sign(crate::ops_cmd::AllowlistSign),
}

#[derive(Subcommand)]
pub enum KekCmd {
    /// Re-wrap every live volume key under a new KEK file (the volume keys stay the same),
    /// point the configuration at it, and destroy the old KEK file. Stop the broker first (a
    /// broker left running cannot release or register until restarted with the new KEK).
    Rotate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The new KEK file: created (32 random bytes, mode 0600) unless it exists.
        #[arg(long, value_name = "FILE")]
        new_kek: PathBuf,
    },
}

pub fn vm_cmd(c: &VmCmd) -> ExitCode {
    let (orders, target, terminate, verb) = match c {
        VmCmd::Register { orders, target } => (orders.clone(), target, false, "register"),
        VmCmd::Terminate { order, target } => (vec![order.clone()], target, true, "terminate"),
    };
    // A terminate is one order, never a folder: one crypto-shred at a time, on purpose.
    let files = match order_files(&orders) {
        _ if terminate && orders.iter().any(|p| p.is_dir()) => Err(format!(
            "{}: give one terminate order, not a folder",
            orders[0].display()
        )),
        Ok(f) if f.is_empty() => Err("no orders: the folder is empty".to_string()),
        other => other,
    };
    let files = match files {
        Ok(f) => f,
        Err(e) => {
            eprintln!("attesta-kbs vm {verb}: {e}");
            return ExitCode::from(1);
        }
    };
    if let [one] = files.as_slice() {
        return match send_one(one, target, terminate) {
            Ok(vm) => {
                println!("{verb}ed {vm}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("attesta-kbs vm {verb}: {e}");
                ExitCode::from(1)
            }
        };
    }
    match register_many(&files, target) {
        Ok((done, failed)) => {
            println!("registered {done} VMs ({failed} failed)");
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("attesta-kbs vm register: {e}");
            ExitCode::from(1)
        }
    }
}

/// The order files named: files as given, folders expanded to their files (sorted).
fn order_files(given: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for p in given {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", p.display()))?;
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// One order, to this machine's store or to a running broker; the VM's id.
fn send_one(order: &Path, target: &Target, terminate: bool) -> Result<String, String> {
    let doc = std::fs::read(order).map_err(|e| format!("{}: {e}", order.display()))?;
    let rt = runtime()?;
    let _g = rt.enter();
    if let Some(list) = &target.kbs {
        let (addrs, remote) = remote(target, list)?;
        return rt
            .block_on(kbs::client::send_order_any(&addrs, remote, terminate, doc))
            .map_err(|e| e.to_string());
    }
    let kbs = local_broker(&rt, target, !terminate)?;
    if terminate {
        return rt
            .block_on(kbs.terminate(&doc, now()))
            .map_err(|e| e.to_string());
    }
    rt.block_on(kbs.register(&doc, now()))
        .map_err(|e| e.to_string())
}

/// The broker `--config` names, on this machine's store; for registrations, with an allowlist
/// in force (installed, or the configured file).
fn local_broker(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    registering: bool,
) -> Result<Kbs, String> {
    let config = target
        .config
        .as_ref()
        .ok_or("--config or --kbs is required")?;
    let c = Config::load(config)?;
    let (kbs, ..) = build(&c)?;
    if registering && load_allowlist(rt, &kbs, &c)?.is_none() {
        return Err(
            "no allowlist: install one (`attesta-kbs allowlist install`) or set `allowlist`".into(),
        );
    }
    Ok(kbs)
}

/// Registrations in flight at once in a bulk registration: enough to fill the store's group
/// commits.
const BULK_IN_FLIGHT: usize = 256;

/// Registers every order in `files`: concurrently into this machine's store, or one after the
/// other to a running broker. Each failure is reported with its file; (registered, failed).
fn register_many(files: &[PathBuf], target: &Target) -> Result<(usize, usize), String> {
    let rt = runtime()?;
    let _g = rt.enter();
    let total = files.len();
    let report_every = (total / 20).max(1000);
    let (mut done, mut failed) = (0usize, 0usize);
    let note = |file: &Path, r: Result<String, String>, done: &mut usize, failed: &mut usize| {
        match r {
            Ok(_) => *done += 1,
            Err(e) => {
                *failed += 1;
                eprintln!("attesta-kbs vm register: {}: {e}", file.display());
            }
        }
        let n = *done + *failed;
        if n.is_multiple_of(report_every) && n < total {
            eprintln!("attesta-kbs vm register: {n}/{total}");
        }
    };
    if let Some(list) = &target.kbs {
        let (addrs, _) = remote(target, list)?;
        for f in files {
            let r = std::fs::read(f).map_err(|e| e.to_string()).and_then(|doc| {
                let (_, remote) = remote(target, list)?;
                rt.block_on(kbs::client::send_order_any(&addrs, remote, false, doc))
                    .map_err(|e| e.to_string())
            });
            note(f, r, &mut done, &mut failed);
        }
        return Ok((done, failed));
    }
    let kbs = std::sync::Arc::new(local_broker(&rt, target, true)?);
    for wave in files.chunks(BULK_IN_FLIGHT) {
        let mut set = tokio::task::JoinSet::new();
        for (n, f) in wave.iter().enumerate() {
            let (kbs, f) = (kbs.clone(), f.clone());
            set.spawn(async move {
                let r = match tokio::fs::read(&f).await {
                    Ok(doc) => kbs.register(&doc, now()).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (n, r)
            });
        }
        let mut results: Vec<(usize, Result<String, String>)> = rt.block_on(set.join_all());
        results.sort_by_key(|(n, _)| *n);
        for (n, r) in results {
            note(&wave[n], r, &mut done, &mut failed);
        }
    }
    Ok((done, failed))
}

/// The brokers `--kbs` lists, and how to reach them.
pub(crate) fn remote(
    t: &Target,
    list: &str,
) -> Result<(Vec<std::net::SocketAddr>, kbs::client::Remote), String> {
    let need = |p: &Option<PathBuf>, what: &str| {
        p.clone()
            .ok_or_else(|| format!("--{what} is required with --kbs"))
    };
    let addrs = list
        .split(',')
        .map(|a| {
            a.trim()
                .parse()
                .map_err(|e| format!("--kbs {a:?}: {e} (give IP:PORT, comma-separated)"))
        })
        .collect::<Result<Vec<std::net::SocketAddr>, String>>()?;
    let remote = kbs::client::Remote::from_pem_files(
        addrs[0],
        t.server_name.clone(),
        &need(&t.ca, "ca")?,
        &need(&t.cert, "cert")?,
        &need(&t.key, "key")?,
    )?;
    Ok((addrs, remote))
}

pub fn audit_export(config: &Path, out: Option<PathBuf>) -> ExitCode {
    let r = (|| -> Result<String, String> {
        let c = Config::load(config)?;
        if c.audit_key.is_none() {
            return Err("no audit_key configured: the log cannot be checkpointed".into());
        }
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        rt.block_on(async {
            kbs.store.checkpoint().await.map_err(|e| e.to_string())?;
            kbs.store.audit_log().await.map_err(|e| e.to_string())
        })
    })();
    match r {
        Ok(log) => {
            let w = match &out {
                Some(p) => std::fs::write(p, &log).map_err(|e| format!("{}: {e}", p.display())),
                None => {
                    print!("{log}");
                    Ok(())
                }
            };
            match w {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("audit export", e),
            }
        }
        Err(e) => fail("audit export", e),
    }
}

pub fn allowlist_cmd(c: &AllowlistCmd) -> ExitCode {
    let AllowlistCmd::Install { allowlist, config } = c else {
        return ExitCode::from(2);
    };
    let r = (|| -> Result<u64, String> {
        let c = Config::load(config)?;
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        let doc = std::fs::read(allowlist).map_err(|e| format!("{}: {e}", allowlist.display()))?;
        rt.block_on(kbs.set_allowlist(&doc, &c.allowlist_key()?, now()))
            .map_err(|e| e.to_string())
    })();
    match r {
        Ok(e) => {
            println!(
                "allowlist epoch {e} installed (a broker serving this database puts it in force within a second)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs allowlist install: {e}");
            ExitCode::from(1)
        }
    }
}

/// `text` (a kbs.toml) with its top-level `kek = ...` line replaced by one naming `path`;
/// refused unless there is exactly one such line and the result reads back with that KEK.
pub(crate) fn config_with_kek(text: &str, path: &Path, config: &Path) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut replaced = 0;
    let mut top = true;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        top &= !t.starts_with('[');
        let key = t.split('=').next().unwrap_or("").trim();
        if top && key == "kek" {
            out.push_str(&format!(
                "kek = {{ file = {:?} }}\n",
                path.display().to_string()
            ));
            replaced += 1;
        } else {
            out.push_str(line);
        }
    }
    let c: Config = toml::from_str(&out).map_err(|e| e.to_string())?;
    if replaced != 1 || c.kek != KekConfig::File(path.to_path_buf()) {
        return Err(format!(
            "{}: expected one line `kek = ...` before any [section] to rewrite; edit it by hand first",
            config.display()
        ));
    }
    Ok(out)
}

/// Overwrites a retired KEK file with zeros and removes it. (On flash or a copy-on-write
/// file system the old blocks may survive: destroy its backups and media too.)
pub(crate) fn destroy_file(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let len = std::fs::metadata(path).map_err(err)?.len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    f.write_all(&vec![0u8; usize::try_from(len).unwrap_or(32)])
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::remove_file(path).map_err(err)
}

pub fn kek_cmd(c: &KekCmd) -> ExitCode {
    let KekCmd::Rotate { config, new_kek } = c;
    let r = (|| -> Result<String, String> {
        let text = std::fs::read_to_string(config)
            .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
        let c = Config::load(config)?;
        // The new KEK as kbs.toml will name it: relative to its folder if inside it.
        let dir = match config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let absolute = std::path::absolute(new_kek).map_err(|e| e.to_string())?;
        let named =
            match absolute.strip_prefix(std::path::absolute(dir).map_err(|e| e.to_string())?) {
                Ok(rel) => rel.to_path_buf(),
                Err(_) => absolute.clone(),
            };
        let edited = config_with_kek(&text, &named, config)?;
        if let KekConfig::File(old) = &c.kek
            && std::path::absolute(old).ok() == Some(absolute.clone())
        {
            return Err("--new-kek is the current KEK file".into());
        }
        let rt = runtime()?;
        let _g = rt.enter();
        let (kbs, ..) = build(&c)?;
        let new = if absolute.exists() {
            FileKek::load(&absolute)
        } else {
            FileKek::create(&absolute)
        }
        .map_err(|e| e.to_string())?;
        let n = rt
            .block_on(kbs.rotate_kek(&new, now()))
            .map_err(|e| e.to_string())?;
        // Read back: every live key opens under the new KEK before the old one is destroyed.
        for (vm_id, generation, wrapped) in rt
            .block_on(kbs.store.live_keys())
            .map_err(|e| e.to_string())?
        {
            new.unwrap_key(&vm_id, generation, &wrapped)
                .map_err(|e| format!("{vm_id}: {e}; the old KEK is kept"))?;
        }
        drop(kbs);
        let tmp = config.with_extension("toml.rotating");
        write_file(&tmp, edited.as_bytes(), false, true)
            .and_then(|()| std::fs::rename(&tmp, config).map_err(|e| e.to_string()))
            .map_err(|e| {
                format!(
                    "{n} keys are now wrapped under {} but {} could not be rewritten ({e}): set kek = {{ file = {:?} }} by hand; the old KEK is kept",
                    absolute.display(),
                    config.display(),
                    named.display().to_string()
                )
            })?;
        // The new KEK file's and the configuration's directory entries durable before the old
        // KEK goes: a power loss now must not leave keys wrapped under a KEK nobody can find.
        for dir in [absolute.parent(), config.parent()].into_iter().flatten() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    format!(
                        "{}: {e}; keys are wrapped under {}, the old KEK is kept",
                        dir.display(),
                        absolute.display()
                    )
                })?;
        }
        let retired = match &c.kek {
            KekConfig::File(old) => {
                destroy_file(old)?;
                format!("the old KEK file {} destroyed", old.display())
            }
            KekConfig::Pkcs11 { key_label, .. } => {
                format!("destroy the old KEK {key_label:?} on its token to retire it")
            }
        };
        Ok(format!(
            "{n} keys re-wrapped under {}; {} now names it; {retired}",
            absolute.display(),
            config.display()
        ))
    })();
    match r {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs kek rotate: {e}");
            ExitCode::from(1)
        }
    }
}
