//! `attesta-sim demo`: the whole system on one machine, on the mesh. A mesh CA and two
//! lighthouses; a key broker (embedded SQLite, or N replicas on PostgreSQL) serving on QUIC
//! loopback with its mesh identity;
//! simulated miners whose host agents (mesh role host) create N simulated SEV-SNP VMs, each with
//! a real LUKS2 image; every VM booted twice (first boot formats, second unlocks), each boot
//! binding a mesh key born in the guest that the broker certifies; the guests joining the mesh
//! and reaching their own tenant only; one VM terminated (its next boot denied, its mesh
//! certificate revoked and its connections cut); the attack catalogue against the live broker.

//!
//! One module per scene, under a small [`driver`] (the command line, the order of the scenes,
//! the summary): [`stack`] (the brokers the scenes stand on, the operator's orders),
//! [`replicas`] (the fleet's broker as several replicas, one stopped mid-boot), this file
//! (the fleet: host agents, boots, the mesh, termination), [`attacks`] (the fleet's live
//! attacks on the broker, the protocol, the mesh admission and the whole catalogue; the others are
//! `crate::{disk_attacks, withdrawal, floor_bypass, flood}`), [`real_vms`] (real VMs through a
//! host agent on libvirt), [`tenant`] (a key split between the operator's broker and the
//! tenant's own, and the tenant's offline check of the evidence); [`summary`] holds what each scene observed and its part of the
//! summary.

mod attacks;
pub mod backup;
mod chain;
pub mod driver;
pub mod real_vms;
mod replicas;
mod stack;
mod summary;
pub mod tenant;
mod vm_host;

pub use attacks::catalogue_live;
use attacks::{Target, fleet_attacks, mesh_attacks};
pub use driver::DemoArgs;
pub use stack::*;
pub use summary::{LiveAttack, MeshSummary, ReplicaRun, Summary};

use crate::fleet_mesh::{self, FleetMesh, Reach};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use guest_agent::client::{Broker, ClientError, fetch, fetch_with_mesh_key};
use guest_agent::luks::{self, DiskLabel, VolumeKey as DiskKey};
use guest_agent::unlock::MeshKey;
use kbs::keys::FileKek;
use kbs::service::{Kbs, TlsIdentity, serve};
use kbs::store::SqliteStore;
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use snp::{Product, Revocation, Verifier, VerifierConfig};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn progress(quiet: bool, msg: &str) {
    if !quiet {
        let mut e = std::io::stderr();
        let _ = write!(e, "\r\x1b[2K{msg}");
        let _ = e.flush();
    }
}

/// Runs the demo in `dir` with `vms` VMs, everything on the mesh.
pub async fn run(
    dir: &Path,
    vms: usize,
    pkis: [Pki; 4],
    store: &StoreChoice,
    quiet: bool,
) -> Result<Summary, String> {
    progress(quiet, "mesh: CA and two lighthouses");
    let mut mesh = FleetMesh::start(dir).await?;
    let r = run_on(dir, vms, pkis, store, quiet, &mut mesh).await;
    mesh.shutdown().await;
    r
}

async fn run_on(
    dir: &Path,
    vms: usize,
    pkis: [Pki; 4],
    store: &StoreChoice,
    quiet: bool,
    mesh: &mut FleetMesh,
) -> Result<Summary, String> {
    let [milan, genoa, turin, rogue] = pkis.map(Arc::new);
    let chips: Vec<Chip> = (0..vms.div_ceil(4).max(2))
        .map(|i| Chip::new(milan.clone(), ChipConfig::typical(&milan, i as u64)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;

    // The image every VM runs: synthetic firmware, kernel and initrd; its launch digest is what
    // the host agents compute before launching, the allowlist approves and the orders name.
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|x| x.to_string())?;
    std::fs::write(images.join("ovmf.fd"), measure::synthetic_ovmf(262_144, 9))
        .map_err(|x| x.to_string())?;
    std::fs::write(images.join("vmlinuz"), vec![0x5a; 1 << 20]).map_err(|x| x.to_string())?;
    std::fs::write(images.join("initrd.img"), vec![0xa5; 1 << 19]).map_err(|x| x.to_string())?;
    let spec_of = |vm: &str| vm_spec(dir, &images, vm);
    let image = host_agent::gate::launch_digest(
        &host_agent::spec::VmSpec::parse(&spec_of("vm-0")).map_err(|x| x.to_string())?,
    )
    .map_err(|x| x.to_string())?;

    progress(
        quiet,
        &format!(
            "key broker: {} replica(s) on {}",
            store.replicas,
            store.kind()
        ),
    );
    let Fleet {
        stack:
            Stack {
                kbs: first,
                broker,
                operator,
                ..
            },
        others,
    } = mesh_stack(dir, &milan, image, mesh, store).await?;
    let mut replicas = replicas::Replicas::new(&broker, &others, vms);
    let e = |x: &dyn std::fmt::Display| x.to_string();

    // The miners: one host agent per machine (chip), each on its own libvirt (the test driver),
    // with a mesh certificate (role host) that the broker admits by its role. Each VM is created
    // through its miner's agent: the launch gate, the order relayed to the broker over the mesh,
    // a blank disk, a domain.
    let chip_of = |i: usize| &chips[i % chips.len()];
    // The chain, where Chopsticks is installed: the first miner takes vm-0 from a validator's
    // assignment there and records its VMs' lifecycle there.
    progress(quiet, "chain: starting Chopsticks");
    let demo_chain = match chain::DemoChain::start()? {
        Ok(c) => Some(c),
        Err(why) => {
            if !quiet {
                eprintln!("\rattesta-sim demo: no chain: {why}");
            }
            None
        }
    };
    let chain_url = demo_chain.as_ref().map(chain::DemoChain::url);
    let mut agents = Vec::new();
    for (m, chip) in chips.iter().enumerate() {
        progress(
            quiet,
            &format!("starting host agent {}/{}", m + 1, chips.len()),
        );
        let on_chain = chain_url.as_deref().filter(|_| m == 0);
        agents.push(host_agent_for(dir, m, chip, &broker, mesh, &operator, on_chain).await?);
    }
    let mut chain_run = chain::ChainSummary::default();
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let mut domains = 0;
    for i in 0..vms {
        let vm = format!("vm-{i}");
        progress(quiet, &format!("host agents: creating VM {}/{vms}", i + 1));
        let mut o = order(&vm, i, &chip_of(i).config.chip_id, &image);
        // The operator places the VM in its tenant and on the overlay.
        o.tenant = tenant_of(i, vms);
        o.boot_config = ByteBuf::from(format!("ssh-ed25519 AAAA {}", o.tenant).into_bytes());
        o.mesh_ip = Some(fleet_mesh::guest_ip(i));
        if let (0, Some(url)) = (i, &chain_url) {
            // vm-0 from the chain: the validator assigns it to the first miner, with a task
            // that miner cannot honour (an order for another machine's chip) beside it.
            progress(
                quiet,
                "chain: a validator assigns vm-0 (and a task for another chip)",
            );
            let mut elsewhere = order("vm-elsewhere", 1, &chips[1].config.chip_id, &image);
            elsewhere.tenant = o.tenant.clone();
            for (v, doc) in [
                (vm.as_str(), o.sign(&operator)),
                ("vm-elsewhere", elsewhere.sign(&operator)),
            ] {
                let task =
                    host_agent::intake::assignment_remark(chain::MINER, &b64(&doc), &spec_of(v));
                chain::remark(url, "//Alice", &task).await?;
            }
            let f = host_agent::chain::Follower::connect(url).await?;
            let round = agents[0].intake_once(&f).await?;
            chain_run.assignments_taken = round.created.len();
            chain_run.refused_with_reason = round.refused.len();
            if round.created != [vm.clone()] {
                return Err(format!("vm-0 from the chain: {round:?}"));
            }
            domains += 1;
            continue;
        }
        let r = agents[i % chips.len()]
            .handle(host_agent::control::ControlRequest::Create {
                spec: spec_of(&vm),
                order: b64(&o.sign(&operator)),
                start: true,
            })
            .await;
        match (r.ok, r.error) {
            (true, _) => domains += 1,
            (false, why) => return Err(format!("{vm}: host agent: {}", why.unwrap_or_default())),
        }
    }

    // Boot every VM twice: the first boot formats its LUKS2 disk, the second unlocks it. Each
    // boot's guest binds a mesh key born inside it in its report; the broker certifies that key.
    let mut identities = Vec::new();
    let mut issued = Vec::new();
    let mut latencies = Vec::new();
    let mut unlocked = 0;
    let mut activated = 0;
    for boot in 1..=2 {
        for i in 0..vms {
            progress(quiet, &format!("boot {boot}/2: VM {}/{vms}", i + 1));
            let vm = format!("vm-{i}");
            let guest = chip_of(i).launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            });
            let mesh_key = MeshKey::generate().map_err(|x| e(&x))?;
            // With replicas, one is stopped halfway through the second boots: the guests that
            // start at it pass over it to another.
            replicas.before_boot(boot, i, &guest).await;
            let t0 = Instant::now();
            let got = if replicas.brokers.len() == 1 {
                fetch_with_mesh_key(&broker, &vm, &guest, mesh_key.public())
                    .await
                    .map_err(|x| format!("{vm}: {x}"))?
            } else {
                guest_agent::unlock::fetch_with_retry(
                    &replicas.brokers,
                    &vm,
                    &guest,
                    Duration::from_secs(60),
                    Some(mesh_key.public()),
                )
                .await
                .map_err(|x| format!("{vm}: {x}"))?
            };
            latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            if got.mesh_cert.is_empty() {
                return Err(format!("{vm}: the broker issued no mesh certificate"));
            }
            issued.push((vm.clone(), got.mesh_cert.clone()));
            if boot == 2 {
                identities.push((i, mesh_key, got.mesh_cert.clone()));
            }
            let key = DiskKey::from_bytes(&got.volume_key).map_err(|x| e(&x))?;
            // The blank disk the host agent created; the guest formats it with its released key.
            let img = dir.join(format!("{vm}.img"));
            if boot == 1 {
                luks::format(
                    &img,
                    &key,
                    &DiskLabel {
                        vm_id: vm.clone(),
                        generation: got.generation,
                    },
                )
                .map_err(|x| e(&x))?;
            } else {
                let label = DiskLabel {
                    vm_id: vm.clone(),
                    generation: got.generation,
                };
                match luks::unlock(&img, &format!("attesta-{vm}"), &key, &label) {
                    Ok(()) => {
                        unlocked += 1;
                        activated += 1;
                        let _ = std::process::Command::new("cryptsetup")
                            .args(["close", &format!("attesta-{vm}")])
                            .stdout(std::process::Stdio::null())
                            .status();
                    }
                    Err(luks::LuksError::DeviceMapperUnavailable) => unlocked += 1,
                    Err(x) => return Err(format!("{vm}: {x}")),
                }
            }
        }
    }
    progress(quiet, "");

    // Every guest joins the mesh with the identity the broker issued it (checked against its
    // order), and tries a guest of its own tenant (must be reached) and one of another tenant
    // (that guest's firewall must deny it).
    let n_ids = identities.len();
    for (k, (i, key, cert)) in identities.iter().enumerate() {
        progress(quiet, &format!("mesh: guest {}/{n_ids} joins", k + 1));
        let (vm, tenant, ip) = (
            format!("vm-{i}"),
            tenant_of(*i, vms),
            fleet_mesh::guest_ip(*i),
        );
        let want = fleet_mesh::Expected {
            vm_id: &vm,
            tenant: &tenant,
            ip: &ip,
        };
        mesh.join(want, key, cert).await?;
    }
    progress(quiet, "mesh: guests announced to both lighthouses");
    mesh.wait_announced(mesh.guests.len(), Duration::from_secs(20))
        .await?;
    let tenants: Vec<String> = (0..vms).map(|i| tenant_of(i, vms)).collect();
    let has = |i: usize, same: bool| (0..vms).any(|j| j != i && (tenants[j] == tenants[i]) == same);
    let mut m = MeshSummary {
        lighthouses: mesh.lighthouses(),
        hosts: chips.len().min(vms),
        guests: mesh.guests.len(),
        same_expected: (0..vms).filter(|&i| has(i, true)).count(),
        cross_expected: (0..vms).filter(|&i| has(i, false)).count(),
        ..Default::default()
    };
    let guests = &mesh.guests;
    let n = guests.len();
    for (k, g) in guests.iter().enumerate() {
        progress(
            quiet,
            &format!("mesh: tenant isolation, guest {}/{n}", k + 1),
        );
        // The next guest round the fleet of the same tenant, and of another.
        let next = |same: bool| {
            (1..n)
                .map(|d| &guests[(k + d) % n])
                .find(|p| (p.tenant == g.tenant) == same)
        };
        if let Some(p) = next(true) {
            let r = fleet_mesh::reach_within(&g.node, p.ip, Duration::from_secs(10)).await;
            m.same_tenant.1 += 1;
            m.same_tenant.0 += usize::from(r == Reach::Reached);
            m.pairs.push((g.vm_id.clone(), p.vm_id.clone(), r));
        }
        if let Some(p) = next(false) {
            let r = fleet_mesh::reach_within(&g.node, p.ip, Duration::from_secs(10)).await;
            m.cross_tenant.1 += 1;
            m.cross_tenant.0 += usize::from(r == Reach::Denied);
            m.pairs.push((g.vm_id.clone(), p.vm_id.clone(), r));
        }
    }
    // vm-0 keeps a connection open to a guest of its tenant, to be cut off when it is revoked.
    let doomed = match guests.split_first() {
        Some((g0, rest)) => match rest.iter().find(|p| p.tenant == g0.tenant) {
            Some(p) => Some((
                g0.node.clone(),
                p.ip,
                fleet_mesh::open_echo(&g0.node, p.ip)
                    .await
                    .map_err(|x| format!("vm-0 to {}: {x}", p.vm_id))?,
            )),
            None => None,
        },
        None => None,
    };
    m.cut_off_expected = doomed.is_some();
    progress(quiet, "");

    // The operator terminates one VM: its key is crypto-shredded, its next boot denied.
    let mut denied = 0;
    let terminate = Order {
        v: ORDER_VERSION,
        kind: OrderKind::Terminate,
        vm_id: "vm-0".into(),
        tenant: "tenant-0".into(),
        measurements: vec![],
        policy: String::new(),
        chip_ids: vec![],
        not_after: now() + 600,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    };
    let r = agents[0]
        .handle(host_agent::control::ControlRequest::Terminate {
            vm_id: "vm-0".into(),
            order: b64(&terminate.sign(&operator)),
        })
        .await;
    if !r.ok {
        return Err(format!("vm-0: terminate: {}", r.error.unwrap_or_default()));
    }
    if dir.join("vm-0.img").exists() {
        return Err("vm-0: terminated, but its disk was not wiped".into());
    }
    // …and revokes every mesh certificate vm-0 was issued (one per boot): one signed list,
    // dropped on a lighthouse and beside the broker, reaches every node, which closes its live
    // connections to vm-0 and refuses it from then on.
    let vm0_certs = issued
        .iter()
        .filter(|(vm, _)| vm == "vm-0")
        .map(|(_, der)| mesh::cert::MeshCert::parse(der).map_err(|x| e(&x)))
        .collect::<Result<Vec<_>, _>>()?;
    let t0 = Instant::now();
    mesh.revoke(&vm0_certs)?;
    if let Some((node0, peer, conn)) = &doomed {
        m.revoked_cut_off_ms =
            fleet_mesh::closed_with(conn, mesh::node::close::REVOKED, Duration::from_secs(5))
                .await
                .ok()
                .map(|_| t0.elapsed().as_secs_f64() * 1000.0);
        m.revoked_reconnect = Some(fleet_mesh::reach(node0, *peer).await);
    }
    loop {
        let known = vm0_certs
            .iter()
            .map(|c| mesh.revoked_on(c))
            .min()
            .unwrap_or((0, 0));
        m.revoked_known = known;
        if known.1 > 0 && known.0 == known.1 {
            m.revoked_everywhere_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let guest0 = chip_of(0).launch(GuestLaunch {
        measurement: image,
        ..Default::default()
    });
    if matches!(
        fetch(&broker, "vm-0", &guest0).await,
        Err(ClientError::Denied(_))
    ) {
        denied += 1;
    }

    // Attacks against the live broker.
    let vm = "vm-1";
    let home = chip_of(1);
    let away = chips
        .iter()
        .find(|c| c.config.chip_id != home.config.chip_id)
        .unwrap_or(home);
    let others_serving: Vec<&Broker> = replicas.running().collect();
    let mut attacks = fleet_attacks(
        &Target {
            broker: &broker,
            replicas: others_serving,
            vm,
            home,
            away,
            rogue: &rogue,
            image,
        },
        &guest0,
    )
    .await?;

    attacks.extend(
        crate::disk_attacks::run(
            &broker,
            vm,
            &home.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
            &dir.join(format!("{vm}.img")),
        )
        .await?,
    );
    attacks.push(
        crate::withdrawal::image_withdrawn(&dir.join("withdrawal"), &milan, home, image).await?,
    );
    attacks.push(
        crate::floor_bypass::debug_order(&broker, mesh, &operator, &home.config.chip_id, &image)
            .await?,
    );
    attacks.push(crate::flood::one_address(&dir.join("flood"), &milan, home, image).await?);
    attacks.extend(mesh_attacks(&broker, mesh, &identities, &operator).await?);

    // The whole catalogue, over the wire, against live brokers.
    let lab = simulator::attacks::Lab::from_shared(milan.clone(), genoa, turin, rogue)
        .map_err(|x| e(&x))?;
    attacks.extend(catalogue_live(dir, &lab).await?);
    if let Some(url) = &chain_url {
        progress(quiet, "chain: lifecycle records and answers to the chain");
        chain_lifecycle(&agents[0], url, &mut chain_run).await?;
    }
    drop(demo_chain);
    Ok(Summary {
        vms,
        mesh: m,
        hosts: agents.len(),
        domains,
        unlocked,
        activated,
        denied,
        attacks,
        latencies_ms: latencies,
        store: store.kind(),
        replicas: store.replicas,
        replica: replicas.outcome(&first, vms),
        chain: chain_url.map(|_| chain_run),
    })
}

/// The first miner batches its VMs' lifecycle and drains its outbox (the answer and the
/// batches) to the chain; counts what got there.
async fn chain_lifecycle(
    agent: &host_agent::daemon::Daemon,
    url: &str,
    run: &mut chain::ChainSummary,
) -> Result<(), String> {
    agent.flush_lifecycle().await?;
    agent.drain_if_due().await?;
    let on_chain = chain::remarked(url).await?;
    let mut all = true;
    for r in agent.outbox().records().await.map_err(|e| e.to_string())? {
        if !r.account.starts_with('#') {
            continue;
        }
        let (doc, _) = agent
            .outbox()
            .doc_and_tx(r.period, &r.account)
            .await
            .map_err(|e| e.to_string())?;
        all &= r.state == host_agent::billing::State::Done
            && on_chain.contains(&host_agent::chain::blake2_256(doc.as_bytes()));
        if r.account == host_agent::intake::LIFECYCLE_ACCOUNT {
            run.lifecycle_records += doc.matches("\"event\":").count();
        }
    }
    run.all_on_chain = all;
    Ok(())
}

/// The VM spec the demo's host agents launch `vm` with.
fn vm_spec(dir: &Path, images: &Path, vm: &str) -> String {
    format!(
        "vm_id = \"{vm}\"\nvcpus = 2\nmemory_mib = 2048\nvcpu_type = \"EPYC-Milan\"\n\
         [boot]\novmf = \"{ovmf}\"\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\n\
         cmdline = \"console=ttyS0 root=/dev/mapper/attesta-root ro\"\n\
         [disk]\npath = \"{disk}\"\nsize_gib = 1\n\
         [snp]\npolicy = \"0x30000\"\nguest_features = \"0x1\"\n",
        ovmf = images.join("ovmf.fd").display(),
        kernel = images.join("vmlinuz").display(),
        initrd = images.join("initrd.img").display(),
        disk = dir.join(format!("{vm}.img")).display(),
    )
}

/// A host agent for simulated machine `m` (its own libvirt test driver, configuration and
/// state under `dir/miners/miner-m`, a mesh certificate with role host).
async fn host_agent_for(
    dir: &Path,
    m: usize,
    chip: &Chip,
    broker: &Broker,
    mesh: &FleetMesh,
    operator: &Ed25519KeyPair,
    chain: Option<&str>,
) -> Result<Arc<host_agent::daemon::Daemon>, String> {
    let home = dir.join("miners").join(format!("miner-{m}"));
    std::fs::create_dir_all(&home).map_err(|x| x.to_string())?;
    let w = |name: &str, data: &[u8]| {
        std::fs::write(home.join(name), data).map_err(|x| format!("{name}: {x}"))
    };
    w("node.xml", b"<node/>\n")?;
    // The miner's mesh identity (role host): the broker admits it by that role.
    w("mesh-ca.crt", mesh.ca.pem.as_bytes())?;
    mesh.issue_files(
        &home,
        &format!("miner-{m}"),
        &fleet_mesh::host_ip(m),
        &["infra"],
        mesh::cert::Role::Host,
    )?;
    let config = home.join("host.toml");
    let text = format!(
        "libvirt_uri = \"test://{node}\"\nstate_dir = \"state\"\ncontrol_socket = \"control.sock\"\n\
         operator_keys = [\"{op}\"]\nstop_grace_secs = 1\n\
         [sev]\ncbitpos = 51\nreduced_phys_bits = 1\n\
         [kbs]\naddress = \"{addr}\"\nserver_name = \"{name}\"\nca = \"mesh-ca.crt\"\n\
         client_cert = \"node.crt\"\nclient_key = \"node.key\"\n",
        node = home.join("node.xml").display(),
        op = hex::encode(pk(operator)),
        addr = broker.addr,
        name = broker.server_name,
    );
    // On the chain: billing with //Bob's key (its answers and lifecycle records), tasks from
    // //Alice, the validator.
    let text = match chain {
        Some(url) => {
            simulator::pki::write_file(&home.join("billing.secret"), b"//Bob\n", true)
                .map_err(|x| format!("billing.secret: {x}"))?;
            format!(
                "{text}[billing]\nchain = \"{url}\"\nsigner_file = \"billing.secret\"\n\
                 call = \"System.remark_with_event\"\n\
                 [chain]\nvalidators = [\"{}\"]\nfrom_block = 1\nimage_dirs = [{:?}]\ndisk_dir = {:?}\n\
                 [capacity]\nvcpus = 256\nmemory_mib = 1048576\ndisk_gib = 16384\n",
                chain::VALIDATOR,
                dir.join("images"),
                dir,
            )
        }
        None => text,
    };
    w("host.toml", text.as_bytes())?;
    let cfg = host_agent::config::HostConfig::parse(&text, &config).map_err(|x| x.to_string())?;
    let platform = host_agent::platform::Platform {
        product: chip.product(),
        chip_id: chip.config.chip_id.to_vec(),
        reported_tcb: chip.config.reported_tcb.unwrap_or(chip.config.current_tcb),
        current_tcb: chip.config.current_tcb,
        source: "simulator",
    };
    host_agent::daemon::Daemon::open_with(cfg, host_agent::daemon::system_clock(), Ok(platform))
        .await
        .map_err(|x| format!("host agent {m}: {x}"))
}
