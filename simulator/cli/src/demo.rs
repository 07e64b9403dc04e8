//! `attesta-sim demo`: the whole system on one machine, on the mesh. A mesh CA and two
//! lighthouses; a key broker (embedded SQLite) serving on QUIC loopback with its mesh identity;
//! simulated miners whose host agents (mesh role host) create N simulated SEV-SNP VMs, each with
//! a real LUKS2 image; every VM booted twice (first boot formats, second unlocks), each boot
//! binding a mesh key born in the guest that the broker certifies; the guests joining the mesh
//! and reaching their own tenant only; one VM terminated (its next boot denied, its mesh
//! certificate revoked and its connections cut); the attack catalogue against the live broker.

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

/// The approved image of the demo's VMs.
pub const IMAGE: [u8; 48] = [0x4d; 48];

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
    let mut p = [0u8; 32];
    p.copy_from_slice(k.public_key().as_ref());
    p
}

/// One live attack and whether the broker denied it.
pub struct LiveAttack {
    pub name: &'static str,
    pub denied: bool,
    pub reason: String,
    /// The reason code it must be denied for.
    pub expected: &'static str,
}

impl LiveAttack {
    /// Denied, and for the expected reason.
    pub fn as_expected(&self) -> bool {
        self.denied && self.reason.contains(self.expected)
    }
}

/// What the demo observed.
pub struct Summary {
    pub vms: usize,
    /// Host agents (one per simulated machine) and the libvirt domains they created.
    pub hosts: usize,
    pub domains: usize,
    pub unlocked: usize,
    /// Disks actually activated through device-mapper (0 where it is unavailable, as in sandboxes).
    pub activated: usize,
    pub denied: usize,
    /// Every attack, each against a live broker over QUIC: the system's own, the protocol
    /// attacks and the whole catalogue.
    pub attacks: Vec<LiveAttack>,
    pub latencies_ms: Vec<f64>,
    pub mesh: MeshSummary,
}

/// What the demo observed on the mesh.
#[derive(Default)]
pub struct MeshSummary {
    pub lighthouses: usize,
    /// Host agents that reached the broker with mesh certificates (role host).
    pub hosts: usize,
    /// Guests that joined with the identity the broker issued after attestation.
    pub guests: usize,
    /// (reached, tried): guests reaching a guest of their own tenant.
    pub same_tenant: (usize, usize),
    /// Guests whose tenant (by the operator's orders) has another guest: each must be tried.
    pub same_expected: usize,
    /// (denied, tried): guests refused by another tenant's guest's firewall.
    pub cross_tenant: (usize, usize),
    /// Guests with a guest of another tenant (by the orders): each must be tried.
    pub cross_expected: usize,
    /// Every pair tried: from, to, what happened.
    pub pairs: Vec<(String, String, Reach)>,
    /// (nodes holding the terminated guest's certificates as revoked, nodes): lighthouses,
    /// guests, the broker.
    pub revoked_known: (usize, usize),
    /// How long until every node held the revocation, if all did within 5 s.
    pub revoked_everywhere_ms: Option<f64>,
    /// Whether the terminated guest had a live connection to a guest of its tenant to cut.
    pub cut_off_expected: bool,
    /// How long until that connection closed with REVOKED, if it did within 5 s.
    pub revoked_cut_off_ms: Option<f64>,
    /// What the revoked guest's next connection attempt met.
    pub revoked_reconnect: Option<Reach>,
}

impl MeshSummary {
    /// Every guest joined; every guest with a same-tenant peer reached it and every guest was
    /// denied by another tenant's guest, as the orders say; the terminated guest's certificates
    /// were revoked on every node within 5 s, and where it had a live connection, that was cut
    /// within 5 s and its next attempt refused.
    pub fn as_expected(&self, vms: usize) -> bool {
        let cut = !self.cut_off_expected
            || (self.revoked_cut_off_ms.is_some_and(|t| t <= 5000.0)
                && matches!(self.revoked_reconnect, Some(Reach::Refused(_))));
        self.guests == vms
            && self.same_tenant == (self.same_expected, self.same_expected)
            && self.cross_tenant == (self.cross_expected, self.cross_expected)
            && self.revoked_known.1 > 0
            && self.revoked_known.0 == self.revoked_known.1
            && self.revoked_everywhere_ms.is_some()
            && cut
    }
}

impl Summary {
    pub fn percentile(&self, p: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    }
}

fn progress(quiet: bool, msg: &str) {
    if !quiet {
        let mut e = std::io::stderr();
        let _ = write!(e, "\r\x1b[2K{msg}");
        let _ = e.flush();
    }
}

/// A running broker on loopback, and what guests and the operator need to use it.
pub struct Stack {
    pub kbs: Arc<Kbs>,
    pub broker: Broker,
    pub operator: Ed25519KeyPair,
    /// The offline allowlist key (signs newer allowlists, e.g. one that withdraws an image).
    pub allowlist_key: Ed25519KeyPair,
}

/// How to start a broker for [`stack_with`].
pub struct StackOptions {
    /// The (simulated) ARKs the broker trusts.
    pub trust_roots: Vec<Vec<u8>>,
    pub revocation: Revocation,
    /// CRLs the broker holds; one that does not verify is refused, as `serve` refuses it.
    pub crls: Vec<Vec<u8>>,
    /// The image the offline allowlist approves.
    pub image: [u8; 48],
    /// The broker's clock.
    pub clock: fn() -> u64,
    /// Connections the broker serves at once (`max_sessions` in kbs.toml).
    pub max_sessions: usize,
    /// How many of those one source address may hold (`max_sessions_per_address`); the demo's
    /// fleet boots from one loopback address, so unlimited unless an attack needs it.
    pub max_sessions_per_address: usize,
}

impl StackOptions {
    /// Trusting `root`'s simulated ARK, CRLs if available, approving `image`, the system clock.
    pub fn trusting(root: &Pki, image: [u8; 48]) -> StackOptions {
        StackOptions {
            trust_roots: vec![root.ark.cert.clone()],
            revocation: Revocation::IfAvailable,
            crls: Vec::new(),
            image,
            clock: now,
            max_sessions: kbs::service::DEFAULT_MAX_SESSIONS,
            max_sessions_per_address: usize::MAX,
        }
    }
}

/// Starts a broker in `dir` as `o` says.
pub async fn stack_with(dir: &Path, o: StackOptions) -> Result<Stack, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let clock = o.clock;
    let (kbs, operator, allowlist_key) = broker(dir, o).await?;
    let tls = TlsIdentity::generate("kbs.attesta.local")?;
    let endpoint = kbs::service::server_endpoint(
        tls.server_config()?,
        (std::net::Ipv4Addr::LOCALHOST, 0).into(),
    )
    .map_err(|x| e(&x))?;
    let addr = endpoint.local_addr().map_err(|x| e(&x))?;
    tokio::spawn(serve(endpoint, kbs.clone(), clock));
    let broker = Broker {
        addr,
        server_name: "kbs.attesta.local".into(),
        ca_der: tls.ca_der.clone(),
        response_key: kbs.response_key.public(),
    };
    Ok(Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    })
}

/// A broker in `dir` trusting `root`'s simulated ARK, served on the mesh with its mesh identity.
pub async fn mesh_stack(
    dir: &Path,
    root: &Pki,
    image: [u8; 48],
    mesh: &mut FleetMesh,
) -> Result<Stack, String> {
    let (kbs, operator, allowlist_key) = broker(dir, StackOptions::trusting(root, image)).await?;
    let broker = mesh.serve_broker(kbs.clone()).await?;
    Ok(Stack {
        kbs,
        broker,
        operator,
        allowlist_key,
    })
}

/// The broker's state in `dir` (SQLite, KEK file), an operator key and a signed allowlist.
async fn broker(
    dir: &Path,
    o: StackOptions,
) -> Result<(Arc<Kbs>, Ed25519KeyPair, Ed25519KeyPair), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let operator = Ed25519KeyPair::generate().map_err(|x| e(&x))?;
    let offline = Ed25519KeyPair::generate().map_err(|x| e(&x))?;
    let verifier = Verifier::new(VerifierConfig {
        trust_roots: o.trust_roots,
        revocation: o.revocation,
        ..Default::default()
    });
    for crl in &o.crls {
        // A forged CRL is refused here, as `attesta-kbs serve` refuses to start with one.
        let _ = kbs::service::add_crl(&verifier, crl);
    }
    let mut kbs = Kbs::new(
        SqliteStore::open(&dir.join("kbs.db"))
            .await
            .map_err(|x| e(&x))?,
        verifier,
        proto::ResponseKey::generate().map_err(|x| e(&x))?,
        Box::new(FileKek::create(&dir.join("kek")).map_err(|x| e(&x))?),
        vec![pk(&operator)],
        30,
    );
    kbs.max_sessions = o.max_sessions.max(1);
    kbs.max_sessions_per_address = o.max_sessions_per_address.max(1);
    let kbs = Arc::new(kbs);
    let allow = Allowlist {
        v: ORDER_VERSION,
        epoch: 1,
        measurements: vec![ByteBuf::from(o.image.to_vec())],
    };
    kbs.set_allowlist(&allow.sign(&offline), &pk(&offline), (o.clock)())
        .await
        .map_err(|x| e(&x))?;
    Ok((kbs, operator, offline))
}

/// The operator's register order for VM number `i` of the demo image on `chip_id`.
pub fn order(vm_id: &str, i: usize, chip_id: &[u8; 64], image: &[u8; 48]) -> Order {
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm_id.into(),
        tenant: format!("tenant-{}", i % 3),
        measurements: vec![ByteBuf::from(image.to_vec())],
        policy: String::new(),
        chip_ids: vec![ByteBuf::from(chip_id.to_vec())],
        not_after: now() + 3600,
        boot_config: ByteBuf::from(format!("ssh-ed25519 AAAA tenant-{}", i % 3).into_bytes()),
        billing: None,
        mesh_ip: None,
    }
}

/// The tenant of demo VM number `i` among `vms`: two tenants for small fleets, three from six
/// VMs on, so every tenant has guests that should reach each other and others that must not.
pub fn tenant_of(i: usize, vms: usize) -> String {
    format!("tenant-{}", i % if vms < 6 { 2 } else { 3 })
}

/// Runs the demo in `dir` with `vms` VMs, everything on the mesh.
pub async fn run(dir: &Path, vms: usize, pkis: [Pki; 4], quiet: bool) -> Result<Summary, String> {
    progress(quiet, "mesh: CA and two lighthouses");
    let mut mesh = FleetMesh::start(dir).await?;
    let r = run_on(dir, vms, pkis, quiet, &mut mesh).await;
    mesh.shutdown().await;
    r
}

async fn run_on(
    dir: &Path,
    vms: usize,
    pkis: [Pki; 4],
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

    let Stack {
        kbs: _,
        broker,
        operator,
        ..
    } = mesh_stack(dir, &milan, image, mesh).await?;
    let e = |x: &dyn std::fmt::Display| x.to_string();

    // The miners: one host agent per machine (chip), each on its own libvirt (the test driver),
    // with a mesh certificate (role host) that the broker admits by its role. Each VM is created
    // through its miner's agent: the launch gate, the order relayed to the broker over the mesh,
    // a blank disk, a domain.
    let chip_of = |i: usize| &chips[i % chips.len()];
    let mut agents = Vec::new();
    for (m, chip) in chips.iter().enumerate() {
        progress(
            quiet,
            &format!("starting host agent {}/{}", m + 1, chips.len()),
        );
        agents.push(host_agent_for(dir, m, chip, &broker, mesh, &operator).await?);
    }
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
            let t0 = Instant::now();
            let got = fetch_with_mesh_key(&broker, &vm, &guest, mesh_key.public())
                .await
                .map_err(|x| format!("{vm}: {x}"))?;
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
    let live = |name: &'static str, r: Result<guest_agent::client::Released, ClientError>| {
        let (denied, reason) = match r {
            Err(ClientError::Denied(reasons)) => (true, reasons.join(", ")),
            Err(other) => (true, other.to_string()),
            Ok(_) => (false, "released".into()),
        };
        let expected = match name {
            "live-wrong-image" => "measurement_not_allowed",
            "live-debug-policy" => "policy_flag_forbidden",
            "live-moved-to-another-chip" => "chip_not_allowed",
            "live-unknown-vm" => "unknown_vm",
            "live-terminated-vm" => "vm_terminated",
            "live-non-amd-root" => "ark_not_trusted",
            _ => "not signed by the pinned key",
        };
        LiveAttack {
            name,
            denied,
            reason,
            expected,
        }
    };
    let vm = "vm-1";
    let home = chip_of(1);
    let away = chips
        .iter()
        .find(|c| c.config.chip_id != home.config.chip_id)
        .unwrap_or(home);
    let mut attacks = vec![
        live(
            "live-wrong-image",
            fetch(
                &broker,
                vm,
                &home.launch(GuestLaunch {
                    measurement: [1; 48],
                    ..Default::default()
                }),
            )
            .await,
        ),
        live(
            "live-debug-policy",
            fetch(
                &broker,
                vm,
                &home.launch(GuestLaunch {
                    measurement: image,
                    policy: 0x3_001f | (1 << 19),
                    ..Default::default()
                }),
            )
            .await,
        ),
        live(
            "live-moved-to-another-chip",
            fetch(
                &broker,
                vm,
                &away.launch(GuestLaunch {
                    measurement: image,
                    ..Default::default()
                }),
            )
            .await,
        ),
        live(
            "live-unknown-vm",
            fetch(
                &broker,
                "vm-nobody",
                &home.launch(GuestLaunch {
                    measurement: image,
                    ..Default::default()
                }),
            )
            .await,
        ),
        live("live-terminated-vm", fetch(&broker, "vm-0", &guest0).await),
    ];
    attacks.extend(
        protocol_attacks(
            &broker,
            vm,
            &home.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
        )
        .await?,
    );
    let rogue_chip = Chip::new(rogue.clone(), home.config.clone()).map_err(|x| e(&x))?;
    attacks.push(live(
        "live-non-amd-root",
        fetch(
            &broker,
            vm,
            &rogue_chip.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
        )
        .await,
    ));
    let wrong_pin = Broker {
        response_key: [9; 32],
        ..broker.clone()
    };
    attacks.push(live(
        "live-impostor-broker-key",
        fetch(
            &wrong_pin,
            vm,
            &home.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
        )
        .await,
    ));

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
    })
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

/// Attacks on the broker's mesh admission: a host certificate from a CA the mesh does not
/// trust, a guest's own (attested) mesh identity used to send an order, and the terminated
/// guest's revoked identity.
async fn mesh_attacks(
    broker: &Broker,
    mesh: &FleetMesh,
    identities: &[(usize, MeshKey, Vec<u8>)],
    operator: &Ed25519KeyPair,
) -> Result<Vec<LiveAttack>, String> {
    use kbs::client::{Remote, send_order};
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let doc = order("vm-mesh-attack", 0, &[7; 64], &IMAGE).sign(operator);
    let remote = |cert_pem: &[u8], key_pem: &[u8]| -> Result<Remote, String> {
        let id = mesh::transport::Identity::from_pem(cert_pem, key_pem)?;
        Ok(Remote {
            addr: broker.addr,
            server_name: broker.server_name.clone(),
            ca: broker.ca_der.clone().into(),
            client_chain: id.chain,
            client_key: id.key,
        })
    };
    let judged = |name: &'static str, expected: &'static str, r: Result<String, _>| {
        let (denied, reason) = match r {
            Ok(vm) => (false, format!("registered {vm}")),
            Err(x @ kbs::client::OrderError::Refused { .. })
            | Err(x @ kbs::client::OrderError::Transport(_)) => (true, x.to_string()),
        };
        LiveAttack {
            name,
            denied,
            reason,
            expected,
        }
    };
    let mut out = Vec::new();
    // Same CA name, another key: the broker's mesh verifier refuses it at the handshake.
    let now = now();
    let foreign = mesh::cert::LocalCa::root(&mesh.ca.cert.name, &[], now - 60, now + 3600)
        .map_err(|x| e(&x))?;
    let host = foreign
        .issue(
            "miner-x",
            &fleet_mesh::host_ip(99),
            &["infra"],
            mesh::cert::Role::Host,
            now.saturating_sub(60),
            now + 3600,
        )
        .map_err(|x| e(&x))?;
    out.push(judged(
        "mesh-host-certificate-from-a-foreign-ca",
        "no trusted CA issued it",
        send_order(
            remote(
                host.issued.cert_pem.as_bytes(),
                host.issued.key_pem.as_bytes(),
            )?,
            false,
            doc.clone(),
        )
        .await,
    ));
    // A guest's genuine mesh identity: admitted (attestation), but not to send orders.
    if let Some((_, key, cert)) = identities.iter().find(|(i, _, _)| *i != 0) {
        let pem = snp::certs::pem_encode("CERTIFICATE", cert);
        out.push(judged(
            "mesh-guest-identity-sends-an-order",
            "forbidden",
            send_order(
                remote(pem.as_bytes(), key.pem().as_bytes())?,
                false,
                doc.clone(),
            )
            .await,
        ));
    }
    // Terminated vm-0's identity, revoked: refused at the handshake.
    if let Some((_, key, cert)) = identities.iter().find(|(i, _, _)| *i == 0) {
        let pem = snp::certs::pem_encode("CERTIFICATE", cert);
        out.push(judged(
            "mesh-revoked-guest-identity-at-the-broker",
            "is revoked",
            send_order(remote(pem.as_bytes(), key.pem().as_bytes())?, false, doc).await,
        ));
    }
    Ok(out)
}

/// A client that speaks the release protocol by hand, as an attacker would: it chooses what
/// to put in each message instead of following the guest agent's script.
struct HandClient<'a> {
    ep: quinn::Endpoint,
    broker: &'a Broker,
}

impl<'a> HandClient<'a> {
    fn new(broker: &'a Broker) -> Result<HandClient<'a>, String> {
        let ep = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .map_err(|x| x.to_string())?;
        Ok(HandClient { ep, broker })
    }

    /// A fresh connection and its TLS exporter value.
    async fn connect(&self) -> Result<(quinn::Connection, [u8; 32]), String> {
        let e = |x: &dyn std::fmt::Display| x.to_string();
        let c = self
            .ep
            .connect_with(
                guest_agent::client::client_config(self.broker).map_err(|x| e(&x))?,
                self.broker.addr,
                &self.broker.server_name,
            )
            .map_err(|x| e(&x))?
            .await
            .map_err(|x| e(&x))?;
        let mut x = [0u8; 32];
        c.export_keying_material(&mut x, proto::msg::EXPORTER_LABEL, b"")
            .map_err(|_| "no exporter".to_string())?;
        Ok((c, x))
    }

    /// A challenge nonce for `vm` on `c`.
    async fn challenge(&self, c: &quinn::Connection, vm: &str) -> Result<[u8; 32], String> {
        use proto::msg::{Request, Response, VERSION};
        let r = guest_agent::client::exchange(
            c,
            &Request::Challenge {
                v: VERSION,
                vm_id: vm.into(),
            },
        )
        .await
        .map_err(|x| x.to_string())?;
        match r {
            Response::Challenge { nonce, .. } => nonce
                .try_into()
                .map_err(|_| "nonce of the wrong size".to_string()),
            _ => Err(format!("{vm}: no challenge")),
        }
    }

    /// What the broker's answer means: denied (and why) or released. A release or denial
    /// that is not signed by the pinned response key counts as a denial.
    fn judge(
        &self,
        name: &'static str,
        expected: &'static str,
        r: Result<proto::msg::Response, ClientError>,
    ) -> LiveAttack {
        use proto::msg::{Decision, Response, verify_decision};
        let (denied, reason) = match r {
            Ok(Response::Error { code, .. }) => (true, code),
            Ok(resp) => match verify_decision(&self.broker.response_key, &resp) {
                Ok(Decision::Denial(d)) => (true, d.reasons.join(", ")),
                Ok(Decision::Release(_)) => (false, "released".to_string()),
                Err(x) => (true, x.to_string()),
            },
            Err(x) => (true, x.to_string()),
        };
        LiveAttack {
            name,
            denied,
            reason,
            expected,
        }
    }
}

/// Evidence in the protocol's message: `report` and `cert_table` as given, for `vm` and `nonce`,
/// under the guest key `key`.
fn evidence_request(
    vm: &str,
    nonce: &[u8; 32],
    key: &proto::GuestKey,
    report: Vec<u8>,
    cert_table: Vec<u8>,
) -> proto::msg::Request {
    proto::msg::Request::Evidence {
        v: proto::msg::VERSION,
        vm_id: vm.into(),
        nonce: nonce.to_vec(),
        report,
        cert_table,
        guest_public_key: key.public().to_vec(),
        mesh_key: vec![],
    }
}

/// Attacks on the protocol itself, by a client that speaks it by hand with a genuine guest's
/// device: evidence replayed on another connection, a spent nonce used again, a nonce issued for
/// one VM used for another, and an order sent by a guest.
async fn protocol_attacks(
    broker: &Broker,
    vm: &str,
    guest: &impl snp::device::GuestDevice,
) -> Result<Vec<LiveAttack>, String> {
    use guest_agent::client::exchange;
    use proto::msg::{Request, VERSION};
    let hand = HandClient::new(broker)?;
    let evidence = |vm: &str, nonce: &[u8; 32], exporter: &[u8; 32]| -> Result<Request, String> {
        let key = proto::GuestKey::generate().map_err(|e| e.to_string())?;
        let (report, cert_table) = guest
            .get_ext_report(&proto::report_data(nonce, &key.public(), exporter), 0)
            .map_err(|x| x.to_string())?;
        Ok(evidence_request(vm, nonce, &key, report, cert_table))
    };
    let mut out = Vec::new();
    // A genuine report captured on one connection, replayed on another.
    let (a, xa) = hand.connect().await?;
    let na = hand.challenge(&a, vm).await?;
    let captured = evidence(vm, &na, &xa)?;
    a.close(0u32.into(), b"");
    let (b, _) = hand.connect().await?;
    out.push(hand.judge(
        "live-evidence-replayed-on-another-connection",
        "report_data_mismatch",
        exchange(&b, &captured).await,
    ));
    // The same evidence twice on its own connection: the first releases, the second must not.
    let (c, xc) = hand.connect().await?;
    let nc = hand.challenge(&c, vm).await?;
    let ev = evidence(vm, &nc, &xc)?;
    let _first = exchange(&c, &ev).await;
    out.push(hand.judge(
        "live-nonce-used-twice",
        "spent_nonce",
        exchange(&c, &ev).await,
    ));
    // A nonce issued for another VM.
    let (d, xd) = hand.connect().await?;
    let nd = hand.challenge(&d, "vm-somebody-else").await?;
    out.push(hand.judge(
        "live-nonce-for-another-vm",
        "nonce_for_another_vm",
        exchange(&d, &evidence(vm, &nd, &xd)?).await,
    ));
    // A genuine report that binds no mesh key, sent with somebody's key to certify (a miner
    // trying to get its own key into the tenant's mesh on the guest's evidence).
    let (f, xf) = hand.connect().await?;
    let nf = hand.challenge(&f, vm).await?;
    let mut smuggled = evidence(vm, &nf, &xf)?;
    if let Request::Evidence { mesh_key, .. } = &mut smuggled {
        *mesh_key = vec![0x6d; 32];
    }
    out.push(hand.judge(
        "live-mesh-key-not-bound-in-the-report",
        "report_data_mismatch",
        exchange(&f, &smuggled).await,
    ));
    // A guest (no client certificate) sending an order.
    out.push(
        hand.judge(
            "live-order-from-a-guest",
            "forbidden",
            exchange(
                &d,
                &Request::Register {
                    v: VERSION,
                    order: b"anything".to_vec(),
                },
            )
            .await,
        ),
    );
    Ok(out)
}

/// A register order for `vm` carrying `policy`: its measurements and chips as the order's, the
/// rest as the order's policy document.
fn order_with_policy(vm: &str, policy: &snp::Policy, now: u64) -> Order {
    let mut rest = policy.clone();
    let measurements = rest.measurements.take().unwrap_or_default();
    let chips = rest.chip_ids.take().unwrap_or_default();
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm.into(),
        tenant: "tenant-catalogue".into(),
        measurements: measurements
            .iter()
            .map(|m| ByteBuf::from(m.0.to_vec()))
            .collect(),
        policy: rest.to_toml(),
        chip_ids: chips.iter().map(|c| ByteBuf::from(c.0.to_vec())).collect(),
        not_after: now + 3600,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
    }
}

/// One catalogue session: registers `vm` with the policy `build` gives, then sends what `build`
/// makes of the session's REPORT_DATA on a fresh connection.
async fn session(
    st: &Stack,
    hand: &HandClient<'_>,
    vm: &str,
    build: impl Fn([u8; 64]) -> simulator::attacks::LiveCase,
) -> Result<Result<proto::msg::Response, ClientError>, String> {
    use simulator::attacks::NOW;
    let order = order_with_policy(vm, &build([0; 64]).policy, NOW).sign(&st.operator);
    st.kbs
        .register(&order, NOW)
        .await
        .map_err(|x| format!("{vm}: {x}"))?;
    let (c, x) = hand.connect().await?;
    let nonce = hand.challenge(&c, vm).await?;
    let key = proto::GuestKey::generate().map_err(|e| e.to_string())?;
    let live = build(proto::report_data(&nonce, &key.public(), &x));
    let r = guest_agent::client::exchange(
        &c,
        &evidence_request(vm, &nonce, &key, live.report, live.cert_table),
    )
    .await;
    c.close(0u32.into(), b"");
    Ok(r)
}

/// The whole attack catalogue against live brokers. Each scenario's evidence is bound to a real
/// session (the broker's nonce, a fresh guest key, this connection's TLS exporter) and sent
/// over QUIC by a hand-driven client, for a VM registered with the scenario's policy, to a
/// broker configured as the scenario needs (trust roots, revocation rule, CRLs held: one
/// broker per distinct setting). The brokers run at the catalogue's instant, so its
/// certificates and CRLs mean what they say. A genuine report must be released first by the
/// broker most scenarios use, or the denials would prove nothing.
pub async fn catalogue_live(
    dir: &Path,
    lab: &simulator::attacks::Lab,
) -> Result<Vec<LiveAttack>, String> {
    use simulator::attacks::{GOOD_MEASUREMENT, NOW, Scenario, catalogue};
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let scenarios = catalogue();
    type Setting = (Revocation, Vec<Vec<u8>>);
    let mut groups: Vec<(Setting, Vec<&Scenario>)> = Vec::new();
    for s in &scenarios {
        let c = s.live(lab, [0; 64]);
        let key = (c.revocation, c.crls);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(s),
            None => groups.push((key, vec![s])),
        }
    }
    let mut out = Vec::new();
    let mut controlled = false;
    for (n, ((revocation, crls), members)) in groups.iter().enumerate() {
        let d = dir.join(format!("catalogue-{n}"));
        std::fs::create_dir_all(&d).map_err(|x| e(&x))?;
        let st = stack_with(
            &d,
            StackOptions {
                trust_roots: lab.trust_roots(),
                revocation: *revocation,
                crls: crls.clone(),
                image: GOOD_MEASUREMENT,
                clock: || NOW,
                max_sessions: kbs::service::DEFAULT_MAX_SESSIONS,
                max_sessions_per_address: usize::MAX,
            },
        )
        .await?;
        let hand = HandClient::new(&st.broker)?;
        if *revocation == Revocation::IfAvailable && crls.is_empty() {
            let r = session(&st, &hand, "catalogue-control", |rd| lab.control_live(rd)).await?;
            let control = hand.judge("catalogue-control", "", r);
            if control.denied {
                return Err(format!(
                    "attack catalogue: the broker denied a genuine report ({}), so its denials prove nothing",
                    control.reason
                ));
            }
            controlled = true;
        }
        for s in members {
            let r = session(&st, &hand, s.name, |rd| s.live(lab, rd)).await?;
            out.push(hand.judge(s.name, s.expected_live(), r));
        }
    }
    if !controlled {
        return Err("attack catalogue: no control case was run".into());
    }
    Ok(out)
}

/// The seeds the demo's hierarchies come from (the attack catalogue's, so they are shared).
pub fn seeds(seed: &Seed) -> [(Product, Seed); 4] {
    [
        (Product::Milan, *seed),
        (Product::Genoa, *seed),
        (Product::Turin, *seed),
        (Product::Milan, seed.derive(b"rogue")),
    ]
}
