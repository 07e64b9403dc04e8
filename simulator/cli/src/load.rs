//! `attesta-sim load`: the broker under a boot storm. N simulated VMs on M simulated chips all
//! boot at once against a broker on loopback (durable SQLite, group commit); we measure
//! releases/s and latency, then the verifier's own rate on the same cores over the same reports,
//! and a guest's boot-to-unlocked time against a default argon2id passphrase unlock of the same
//! kind of image. Ratios, not absolute numbers, are what carry from one machine to another.

use crate::demo::{IMAGE, Stack, StackOptions, order, stack_with};
use guest_agent::client::fetch_on;
use guest_agent::luks::{self, DiskLabel, VolumeKey as DiskKey};
use simulator::{Chip, ChipConfig, GuestLaunch, Pki};
use snp::device::GuestDevice;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What a load run measured.
pub struct LoadReport {
    pub vms: usize,
    pub chips: usize,
    /// Where the broker and the guests ran (empty: shared, unpinned).
    pub broker_cpus: Vec<usize>,
    pub guest_cpus: Vec<usize>,
    pub released: usize,
    pub failed: usize,
    pub storm_secs: f64,
    pub releases_per_sec: f64,
    /// Whole boot: connect, challenge, report, evidence, release (ms).
    pub boot_ms: (f64, f64),
    /// Evidence round trip only: verify, decide, durable commit, seal (ms).
    pub release_ms: (f64, f64),
    pub verifier_per_sec: f64,
    /// QUIC + TLS handshakes per second with the same concurrency, nothing else.
    pub handshakes_per_sec: f64,
    pub transactions: u64,
    pub writes: u64,
    /// CPU time the broker's threads (runtime and SQLite workers) spent per release in the storm,
    /// per handshake in the handshakes-alone run, and what one verification costs (µs): the
    /// costs behind the rates, whichever side a run was limited by.
    pub broker_us_per_release: f64,
    pub broker_us_per_handshake: f64,
    pub verifier_us_per_report: f64,
    /// Share of the broker's CPUs its threads used during the storm (1.0: saturated, so
    /// releases/s is the broker's capacity).
    pub broker_busy: f64,
    pub boot_to_unlocked_ms: f64,
    pub argon2id_unlock_ms: Option<f64>,
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    pct(&mut v, 50.0)
}

/// What a storm's boots came to: the whole-boot and evidence round-trip times (ms) of those
/// that got their key, and why the others did not (reason → how many).
pub(crate) struct Storm {
    pub boots: Vec<f64>,
    pub releases: Vec<f64>,
    pub failures: std::collections::BTreeMap<String, usize>,
}

/// Boots `vms` simulated guests at once on `rt`, all over `client`: guest `i` on chip
/// `i % chips`, against broker `i % brokers`.
pub(crate) fn storm(
    rt: &tokio::runtime::Runtime,
    client: &quinn::Endpoint,
    chips: &[Arc<Chip>],
    brokers: &[guest_agent::client::Broker],
    vms: usize,
) -> Storm {
    let tasks: Vec<_> = (0..vms)
        .map(|i| {
            let (chip, broker, client) = (
                chips[i % chips.len()].clone(),
                brokers[i % brokers.len()].clone(),
                client.clone(),
            );
            rt.spawn(async move {
                let g = chip.launch(GuestLaunch {
                    measurement: IMAGE,
                    ..Default::default()
                });
                let t = Instant::now();
                let r = fetch_on(&client, &broker, &format!("vm-{i}"), &g).await;
                r.map(|r| (t.elapsed(), r.evidence_rtt))
            })
        })
        .collect();
    let mut s = Storm {
        boots: Vec::with_capacity(vms),
        releases: Vec::with_capacity(vms),
        failures: Default::default(),
    };
    for t in tasks {
        let why = match rt.block_on(t) {
            Ok(Ok((b, r))) => {
                s.boots.push(b.as_secs_f64() * 1000.0);
                s.releases.push(r.as_secs_f64() * 1000.0);
                continue;
            }
            Ok(Err(x)) => x.to_string(),
            Err(x) => x.to_string(),
        };
        *s.failures.entry(why).or_default() += 1;
    }
    s
}

/// Which CPUs the broker and the simulated guests run on. Empty: no pinning (everything shares
/// every core, the load generator competing with the broker it measures).
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub broker: Vec<usize>,
    pub guests: Vec<usize>,
}

impl Placement {
    /// The broker on `broker`, the guests on every other online CPU; unpinned (everything
    /// shares) when that leaves either side nothing, as on one CPU.
    pub fn split(broker: Vec<usize>) -> Result<Placement, String> {
        let online = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if let Some(c) = broker.iter().find(|c| **c >= online) {
            return Err(format!(
                "--broker-cpus: CPU {c} is not online (0..{online})"
            ));
        }
        let guests: Vec<usize> = (0..online).filter(|c| !broker.contains(c)).collect();
        if broker.is_empty() || guests.is_empty() {
            return Ok(Placement::default());
        }
        Ok(Placement { broker, guests })
    }

    pub fn pinned(&self) -> bool {
        !self.broker.is_empty()
    }
}

/// CPU time (ns) used so far by this process's broker threads: the broker runtime's ("kbs")
/// and the SQLite workers sqlx starts for it, from each thread's schedstat.
fn broker_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("kbs") || c.starts_with("sqlx-sqlite"))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Pins the calling thread to `cpus` (nothing if empty). Threads it creates inherit the mask.
pub(crate) fn pin(cpus: &[usize]) {
    use nix::sched::{CpuSet, sched_setaffinity};
    if cpus.is_empty() {
        return;
    }
    let mut set = CpuSet::new();
    for c in cpus {
        let _ = set.set(*c);
    }
    let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// A multi-threaded runtime whose threads (workers and blocking) run on `cpus`.
pub(crate) fn runtime(name: &str, cpus: &[usize]) -> Result<tokio::runtime::Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if !cpus.is_empty() {
        let cpus = cpus.to_vec();
        b.worker_threads(cpus.len());
        b.on_thread_start(move || pin(&cpus));
    }
    b.thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Runs the storm in `dir`: the broker's runtime on `place.broker`, the guests' on
/// `place.guests`, the verifier alone on the broker's CPUs (as many threads as it has).
pub fn run(
    dir: &Path,
    vms: usize,
    chips: usize,
    milan: Pki,
    place: &Placement,
    max_sessions: usize,
    progress: impl Fn(&str),
) -> Result<LoadReport, String> {
    let milan = Arc::new(milan);
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let broker_rt = runtime("kbs", &place.broker)?;
    let guest_rt = runtime("guest", &place.guests)?;
    let chips: Vec<Arc<Chip>> = (0..chips.max(1))
        .map(|i| Chip::new(milan.clone(), ChipConfig::typical(&milan, i as u64)).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(|x| e(&x))?;
    // The store is opened from this thread while it is on the broker's CPUs, so the SQLite
    // worker thread it starts inherits them; then this thread moves to drive the guests.
    pin(&place.broker);
    let Stack {
        kbs,
        broker,
        operator,
        ..
    } = broker_rt.block_on(stack_with(
        dir,
        StackOptions {
            max_sessions,
            ..StackOptions::trusting(&milan, IMAGE)
        },
    ))?;
    progress(&format!("registering {vms} VMs"));
    for i in 0..vms {
        let o = order(
            &format!("vm-{i}"),
            i,
            &chips[i % chips.len()].config.chip_id,
            &IMAGE,
        );
        broker_rt
            .block_on(kbs.register(&o.sign(&operator), now()))
            .map_err(|x| e(&x))?;
    }
    pin(&place.guests);
    let _guard = guest_rt.enter();
    // Warm-up: one release, so the chain cache and the connection path are warm as in a fleet.
    // All simulated guests share one client socket (with large buffers, like the broker's).
    let client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        kbs::service::udp_socket((std::net::Ipv4Addr::LOCALHOST, 0).into()).map_err(|x| e(&x))?,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|x| e(&x))?;
    let g0 = chips[0].launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    });
    let first = guest_rt
        .block_on(fetch_on(&client, &broker, "vm-0", &g0))
        .map_err(|x| format!("warm-up: {x}"))?;

    // The storm: every VM boots at once.
    progress(&format!("{vms} VMs booting at once"));
    let stat = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let tx0 = stat(&kbs.store.stats.transactions);
    let w0 = stat(&kbs.store.stats.writes);
    let cpu0 = broker_cpu_ns();
    let start = Instant::now();
    let Storm {
        mut boots,
        mut releases,
        failures,
    } = storm(
        &guest_rt,
        &client,
        &chips,
        std::slice::from_ref(&broker),
        vms,
    );
    let failed: usize = failures.values().sum();
    let storm = start.elapsed().as_secs_f64();
    let storm_cpu = broker_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
    let transactions = stat(&kbs.store.stats.transactions) - tx0;
    let writes = stat(&kbs.store.stats.writes) - w0;

    // The QUIC + TLS 1.3 handshakes alone, as many at once: the floor under any protocol that
    // opens one connection per boot.
    progress("handshakes alone");
    let cpu0 = broker_cpu_ns();
    let t = Instant::now();
    let hs: Vec<_> = (0..vms)
        .map(|_| {
            let (broker, client) = (broker.clone(), client.clone());
            guest_rt.spawn(async move {
                let cfg = guest_agent::client::client_config(&broker).ok()?;
                let c = client
                    .connect_with(cfg, broker.addr, &broker.server_name)
                    .ok()?
                    .await
                    .ok()?;
                c.close(0u32.into(), b"");
                Some(())
            })
        })
        .collect();
    let mut handshakes = 0usize;
    for h in hs {
        if let Ok(Some(())) = guest_rt.block_on(h) {
            handshakes += 1;
        }
    }
    let handshakes_per_sec = handshakes as f64 / t.elapsed().as_secs_f64();
    let handshake_cpu = broker_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;

    // The verifier alone, on the broker's cores, over the same kind of evidence.
    progress("the verifier's own rate");
    let reports: Vec<(Vec<u8>, Vec<u8>)> = (0..vms)
        .map(|i| {
            let g = chips[i % chips.len()].launch(GuestLaunch {
                measurement: IMAGE,
                ..Default::default()
            });
            g.get_ext_report(&[i as u8; 64], 0)
        })
        .collect::<Result<_, _>>()
        .map_err(|x| e(&x))?;
    let policy = kbs::service::vm_policy(Some(&order("vm-0", 0, &chips[0].config.chip_id, &IMAGE)));
    let verifier = &kbs.verifier;
    let at = now();
    let threads = if place.pinned() {
        place.broker.len()
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    };
    let t = Instant::now();
    let ok = std::thread::scope(|s| {
        let handles: Vec<_> = reports
            .chunks(vms.div_ceil(threads).max(1))
            .map(|chunk| {
                let policy = &policy;
                s.spawn(move || {
                    pin(&place.broker);
                    chunk
                        .iter()
                        .filter(|(report, table)| {
                            let table = snp::CertTable::parse(table).unwrap_or_default();
                            let ev = snp::Evidence {
                                report,
                                vcek: table.signing_cert(),
                                ask: table.get(&snp::certtable::GUID_ASK),
                                ark: table.get(&snp::certtable::GUID_ARK),
                                crls: &[],
                            };
                            // Chip binding differs per chip here; authenticity is what is timed.
                            verifier
                                .verify_with_policy(&ev, policy, at)
                                .report
                                .is_some()
                        })
                        .count()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .sum::<usize>()
    });
    let verifier_per_sec = ok as f64 / t.elapsed().as_secs_f64();

    // Boot to unlocked: a whole attested fetch plus opening the LUKS2 header by volume key,
    // against cryptsetup's default argon2id passphrase unlock of the same size of image.
    progress("boot-to-unlocked against argon2id");
    let img = dir.join("attesta.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(32 << 20))
        .map_err(|x| e(&x))?;
    luks::format(
        &img,
        &DiskKey::from_bytes(&first.volume_key).map_err(|x| e(&x))?,
        &DiskLabel {
            vm_id: "vm-0".into(),
            generation: first.generation,
        },
    )
    .map_err(|x| e(&x))?;
    let mut ours = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        let r = guest_rt
            .block_on(fetch_on(&client, &broker, "vm-0", &g0))
            .map_err(|x| e(&x))?;
        let key = DiskKey::from_bytes(&r.volume_key).map_err(|x| e(&x))?;
        let label = DiskLabel {
            vm_id: "vm-0".into(),
            generation: r.generation,
        };
        match luks::unlock(&img, "attesta-load", &key, &label) {
            Ok(()) => {
                let _ = std::process::Command::new("cryptsetup")
                    .args(["close", "attesta-load"])
                    .stdout(std::process::Stdio::null())
                    .status();
            }
            Err(luks::LuksError::DeviceMapperUnavailable) => {}
            Err(x) => return Err(x.to_string()),
        }
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let argon = argon2id_unlock_ms(dir);
    Ok(LoadReport {
        vms,
        chips: chips.len(),
        broker_cpus: place.broker.clone(),
        guest_cpus: place.guests.clone(),
        released: releases.len(),
        failed,
        storm_secs: storm,
        releases_per_sec: releases.len() as f64 / storm,
        boot_ms: (pct(&mut boots, 50.0), pct(&mut boots, 99.0)),
        release_ms: (pct(&mut releases, 50.0), pct(&mut releases, 99.0)),
        verifier_per_sec,
        handshakes_per_sec,
        transactions,
        writes,
        broker_us_per_release: storm_cpu * 1e6 / releases.len().max(1) as f64,
        broker_us_per_handshake: handshake_cpu * 1e6 / handshakes.max(1) as f64,
        verifier_us_per_report: threads as f64 * 1e6 / verifier_per_sec.max(1e-9),
        broker_busy: storm_cpu / (storm * threads as f64).max(1e-9),
        boot_to_unlocked_ms: median(ours),
        argon2id_unlock_ms: argon,
    })
}

/// `cryptsetup luksFormat` with its defaults (argon2id, benchmarked to ~2 s) and a passphrase,
/// then the median of three `cryptsetup open --test-passphrase` (the KDF runs, nothing is
/// activated). `None` if the cryptsetup CLI is missing or fails.
/// Their standard output goes nowhere: `load --json` owns this process's stdout.
fn argon2id_unlock_ms(dir: &Path) -> Option<f64> {
    use std::process::{Command, Stdio};
    let img = dir.join("argon2id.img");
    let pass = dir.join("passphrase");
    std::fs::File::create(&img).ok()?.set_len(32 << 20).ok()?;
    std::fs::write(&pass, b"correct horse battery staple").ok()?;
    let st = Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--key-file",
        ])
        .arg(&pass)
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let st = Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&pass)
            .arg(&img)
            .stdout(Stdio::null())
            .status()
            .ok()?;
        if !st.success() {
            return None;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Some(median(times))
}
