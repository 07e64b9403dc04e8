//! `attesta-sim load --store … [--replicas N]`: the boot storm against real `attesta-kbs serve`
//! processes — one, or several replicas on one PostgreSQL database — rather than a broker inside
//! the load generator. The deployment is made with the broker's own tools (`init`, `allowlist
//! sign`, a bulk `vm register`); each guest knows every replica and boots against the one its
//! number picks, so the storm spreads over them. Measured: releases/s, boot and evidence
//! latency, the brokers' CPU time per release (from /proc, summed over the replicas) and each
//! broker's peak resident memory.

use crate::demo::{IMAGE, order};
use guest_agent::client::{Broker, fetch_on};
use simulator::{Chip, ChipConfig, GuestLaunch, Pki};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
pub struct ProcOptions {
    /// VMs booting at once.
    pub vms: usize,
    /// VMs registered at the broker (at least `vms`): the store's size during the storm.
    pub registered: usize,
    pub chips: usize,
    /// `sqlite` (a file beside the broker) or a `postgres://` URL.
    pub store: String,
    pub replicas: usize,
    pub max_sessions: usize,
    /// The `attesta-kbs` binary.
    pub kbs_bin: PathBuf,
    /// CPUs the brokers run on (empty: unpinned); the guests run on `guest_cpus`.
    pub broker_cpus: Vec<usize>,
    pub guest_cpus: Vec<usize>,
}

/// What a run measured.
pub struct ProcReport {
    pub released: usize,
    pub failed: usize,
    /// Why boots failed: reason → how many.
    pub failures: std::collections::BTreeMap<String, usize>,
    pub storm_secs: f64,
    pub releases_per_sec: f64,
    /// Whole boot and the evidence round trip alone, (p50, p99) in ms.
    pub boot_ms: (f64, f64),
    pub release_ms: (f64, f64),
    /// CPU time of every broker process together per release, in µs.
    pub broker_us_per_release: f64,
    /// Share of the brokers' CPUs they used during the storm.
    pub broker_busy: f64,
    /// Each replica's peak resident memory (VmHWM), MiB.
    pub broker_peak_rss_mib: Vec<f64>,
    /// How long the bulk registration took.
    pub register_secs: f64,
}

/// `load --store`: checks the arguments, runs the storm, prints the text or JSON summary.
pub(crate) fn command(
    a: &crate::LoadArgs,
    store: &str,
    milan: Pki,
    dir: &Path,
    place: &crate::load::Placement,
) -> Result<bool, String> {
    let postgres = kbs::store::is_database_url(store);
    if !postgres && store != "sqlite" {
        return Err(format!(
            "--store {store:?}: give sqlite or a postgres:// URL"
        ));
    }
    if a.replicas > 1 && !postgres {
        return Err("--replicas above 1 needs --store postgres://… (replicas share one PostgreSQL database)".into());
    }
    let registered = a.registered.unwrap_or(a.vms);
    if registered < a.vms {
        return Err(format!(
            "--registered {registered} is below --vms {}",
            a.vms
        ));
    }
    let o = ProcOptions {
        vms: a.vms,
        registered,
        chips: a.chips,
        store: store.to_string(),
        replicas: a.replicas,
        max_sessions: a.max_sessions,
        kbs_bin: a.kbs_bin.clone().unwrap_or_else(default_kbs_bin),
        broker_cpus: place.broker.clone(),
        guest_cpus: place.guests.clone(),
    };
    let quiet = a.json;
    let r = run(dir, milan, &o, |m| {
        if !quiet {
            eprintln!("attesta-sim load: {m}");
        }
    })?;
    let kind = if postgres { "postgres" } else { "sqlite" };
    if a.json {
        let j = serde_json::json!({
            "vms": a.vms, "registered": registered, "chips": a.chips,
            "store": kind, "replicas": a.replicas, "broker": "processes",
            "released": r.released, "failed": r.failed, "failures": r.failures,
            "broker_cpus": place.broker, "guest_cpus": place.guests,
            "max_sessions": a.max_sessions,
            "storm_secs": r.storm_secs,
            "releases_per_sec": r.releases_per_sec,
            "boot_ms": {"p50": r.boot_ms.0, "p99": r.boot_ms.1},
            "release_latency_ms": {"p50": r.release_ms.0, "p99": r.release_ms.1},
            "broker_cpu_us": {"per_release": r.broker_us_per_release, "busy_in_storm": r.broker_busy},
            "broker_peak_rss_mib": r.broker_peak_rss_mib,
            "register_secs": r.register_secs,
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    } else {
        println!(
            "attesta load: {} VMs booting at once against {} broker process(es) on {kind} ({registered} VMs registered in {:.1} s)",
            a.vms, a.replicas, r.register_secs
        );
        println!(
            "  released {} ({} failed) in {:.2} s: {:.0} releases/s",
            r.released, r.failed, r.storm_secs, r.releases_per_sec
        );
        println!(
            "  evidence round trip: p50 {:.1} ms, p99 {:.1} ms; whole boot: p50 {:.1} ms, p99 {:.1} ms",
            r.release_ms.0, r.release_ms.1, r.boot_ms.0, r.boot_ms.1
        );
        println!(
            "  broker CPU: {:.0} us per release (all replicas; {:.0}% busy in the storm); peak RSS per broker: {:?} MiB",
            r.broker_us_per_release,
            r.broker_busy * 100.0,
            r.broker_peak_rss_mib
                .iter()
                .map(|m| m.round())
                .collect::<Vec<_>>()
        );
    }
    Ok(r.failed == 0)
}

/// A broker process, stopped (SIGTERM, then SIGKILL) however the run ends.
struct Replica {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `attesta-kbs` beside this binary.
pub fn default_kbs_bin() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("attesta-kbs"))
        .unwrap_or_else(|_| PathBuf::from("attesta-kbs"))
}

fn run_tool(c: &mut Command, what: &str) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_udp_port() -> Result<u16, String> {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Runs the storm in `dir` (which it fills: the deployment, the orders, the SQLite file).
pub fn run(
    dir: &Path,
    milan: Pki,
    o: &ProcOptions,
    progress: impl Fn(&str),
) -> Result<ProcReport, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    if !o.kbs_bin.exists() {
        return Err(format!(
            "{} not found: build it (cargo build -p kbs) or give --kbs-bin",
            o.kbs_bin.display()
        ));
    }
    let kbs = |args: &[&str]| {
        let mut c = Command::new(&o.kbs_bin);
        c.args(args);
        c
    };
    let d = dir.join("kbs");
    let ark = dir.join("ark.der");
    std::fs::write(&ark, &milan.ark.cert).map_err(|x| e(&x))?;
    let listens: Vec<String> = (0..o.replicas)
        .map(|_| free_udp_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    progress("init, allowlist");
    let mut init = kbs(&["init", "--dir"]);
    init.arg(&d)
        .args(["--listen", &listens[0], "--metrics-listen", "none"])
        .arg("--trust-root")
        .arg(&ark);
    run_tool(&mut init, "attesta-kbs init")?;
    let mut sign = kbs(&["allowlist", "sign", "--key"]);
    sign.arg(d.join("allowlist.key"))
        .args([
            "--epoch",
            "1",
            "--measurement",
            &hex::encode(IMAGE),
            "--out",
        ])
        .arg(d.join("allowlist.signed"));
    run_tool(&mut sign, "attesta-kbs allowlist sign")?;
    let cfg = d.join("kbs.toml");
    let mut toml = std::fs::read_to_string(&cfg).map_err(|x| e(&x))?;
    if o.store != "sqlite" {
        toml = toml.replace(
            "database = \"kbs.db\"",
            &format!("database = {:?}", o.store),
        );
    }
    // Every simulated guest comes from this one loopback address: no per-address cap (a cap
    // as large as max_sessions would still refuse the address once it held every slot).
    toml = toml
        .replace(
            "max_sessions = 64\n",
            &format!("max_sessions = {}\n", o.max_sessions),
        )
        .replace(
            "max_sessions_per_address = 16\n",
            "max_sessions_per_address = 1000000\n",
        );
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    std::fs::write(&cfg, &toml).map_err(|x| e(&x))?;
    let mut cfgs = vec![cfg.clone()];
    for (n, l) in listens.iter().enumerate().skip(1) {
        let path = d.join(format!("kbs-{n}.toml"));
        let t = toml.replace(
            &format!("listen = {:?}", listens[0]),
            &format!("listen = {l:?}"),
        );
        std::fs::write(&path, t).map_err(|x| e(&x))?;
        cfgs.push(path);
    }

    // The orders, signed here with the operator key `init` wrote, then registered in bulk.
    let milan = Arc::new(milan);
    let chips: Vec<Arc<Chip>> = (0..o.chips.max(1))
        .map(|i| Chip::new(milan.clone(), ChipConfig::typical(&milan, i as u64)).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(|x| e(&x))?;
    let key = std::fs::read(d.join("operator.key")).map_err(|x| e(&x))?;
    let operator = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(&key)
        .map_err(|_| "operator.key: not an Ed25519 PKCS#8 key".to_string())?;
    let orders = dir.join("orders");
    std::fs::create_dir_all(&orders).map_err(|x| e(&x))?;
    progress(&format!("signing {} orders", o.registered));
    for i in 0..o.registered {
        let doc = order(
            &format!("vm-{i}"),
            i,
            &chips[i % chips.len()].config.chip_id,
            &IMAGE,
        )
        .sign(&operator);
        std::fs::write(orders.join(format!("{i:07}")), doc).map_err(|x| e(&x))?;
    }
    progress(&format!("registering {} VMs", o.registered));
    let t = Instant::now();
    let mut reg = kbs(&["vm", "register"]);
    reg.arg(&orders).arg("--config").arg(&cfg);
    run_tool(&mut reg, "attesta-kbs vm register")?;
    let register_secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&orders);

    progress(&format!("starting {} broker process(es)", o.replicas));
    let mut replicas = Vec::new();
    for (c, l) in cfgs.iter().zip(&listens) {
        let addr = l.parse().map_err(|x| e(&x))?;
        replicas.push(start(&o.kbs_bin, c, &o.broker_cpus, addr)?);
    }
    let ca = std::fs::read(d.join("tls-ca.crt")).map_err(|x| e(&x))?;
    let ca_der = snp::certs::pem_blocks(&ca)
        .map_err(|x| e(&x))?
        .into_iter()
        .next()
        .ok_or("tls-ca.crt: no certificate")?;
    let response_key: [u8; 32] = hex::decode(
        std::fs::read_to_string(d.join("response.pub"))
            .map_err(|x| e(&x))?
            .trim(),
    )
    .ok()
    .and_then(|v| v.try_into().ok())
    .ok_or("response.pub: expected 64 hex digits")?;
    let brokers: Vec<Broker> = replicas
        .iter()
        .map(|r| Broker {
            addr: r.addr,
            server_name: "kbs.attesta.local".into(),
            ca_der: ca_der.clone(),
            response_key,
        })
        .collect();

    let rt = crate::load::runtime("guest", &o.guest_cpus)?;
    crate::load::pin(&o.guest_cpus);
    let _guard = rt.enter();
    let client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        kbs::service::udp_socket((std::net::Ipv4Addr::LOCALHOST, 0).into()).map_err(|x| e(&x))?,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|x| e(&x))?;
    // Warm-up: one release from each replica.
    for (n, b) in brokers.iter().enumerate() {
        let g = chips[n % chips.len()].launch(GuestLaunch {
            measurement: IMAGE,
            ..Default::default()
        });
        rt.block_on(fetch_on(&client, b, &format!("vm-{n}"), &g))
            .map_err(|x| format!("warm-up at {}: {x}", b.addr))?;
    }

    progress(&format!("{} VMs booting at once", o.vms));
    let pids: Vec<u32> = replicas.iter().map(|r| r.child.id()).collect();
    let cpu0 = cpu_secs(&pids);
    let start = Instant::now();
    let crate::load::Storm {
        mut boots,
        mut releases,
        failures,
    } = crate::load::storm(&rt, &client, &chips, &brokers, o.vms);
    for (w, n) in &failures {
        progress(&format!("{n} boots failed: {w}"));
    }
    let failed: usize = failures.values().sum();
    let storm = start.elapsed().as_secs_f64();
    let cpu = cpu_secs(&pids) - cpu0;
    let rss = pids.iter().map(|p| peak_rss_mib(*p)).collect();
    let cores = if o.broker_cpus.is_empty() {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        o.broker_cpus.len()
    };
    use crate::load::pct;
    Ok(ProcReport {
        released: releases.len(),
        failed,
        failures,
        storm_secs: storm,
        releases_per_sec: releases.len() as f64 / storm,
        boot_ms: (pct(&mut boots, 50.0), pct(&mut boots, 99.0)),
        release_ms: (pct(&mut releases, 50.0), pct(&mut releases, 99.0)),
        broker_us_per_release: cpu * 1e6 / releases.len().max(1) as f64,
        broker_busy: cpu / (storm * cores as f64).max(1e-9),
        broker_peak_rss_mib: rss,
        register_secs,
    })
}

/// Starts `serve` (pinned with `taskset` when CPUs are given); returns once it serves.
fn start(
    bin: &Path,
    cfg: &Path,
    cpus: &[usize],
    addr: std::net::SocketAddr,
) -> Result<Replica, String> {
    let mut c = if cpus.is_empty() {
        Command::new(bin)
    } else {
        let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
        let mut c = Command::new("taskset");
        c.args(["-c", &list.join(",")]).arg(bin);
        c
    };
    let mut child = c
        .arg("serve")
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Read to the end, so the broker never blocks on a full pipe; the last lines kept for
    // an error message.
    std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if l.contains("serving") {
                let _ = tx.send(Ok(()));
            }
            tail.push_back(l);
            if tail.len() > 20 {
                tail.pop_front();
            }
        }
        let _ = tx.send(Err(Vec::from(tail).join("\n")));
    });
    let replica = Replica { child, addr };
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => Ok(replica),
        Ok(Err(log)) => Err(format!("attesta-kbs serve exited:\n{log}")),
        Err(_) => Err("attesta-kbs serve did not start within 60 s".into()),
    }
}

/// CPU time (user + system) the processes have used, in seconds (/proc/PID/stat counts in
/// USER_HZ, 100 per second on Linux).
fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may hold spaces) in its parentheses.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / 100.0)
        })
        .sum()
}

/// The process's peak resident set (VmHWM), MiB; 0 when unreadable.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
