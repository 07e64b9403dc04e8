//! The tenant in control: one VM whose volume key is split 2-of-2 between the network
//! operator's broker and the tenant's own, each a broker of its own (keys, KEK, store, audit
//! key) on QUIC loopback. The guest attests to each and combines the shares; neither share
//! alone opens the disk, and the tenant's broker alone can stop the boot (it withdraws the
//! image). Then the operator's broker exports the VM's evidence and the tenant's own
//! `attesta-verify` checks it (accepted), and a copy with an edited entry (a finding).
//!
//! The files an outsider needs to repeat the check are left in `evidence/`: `bundle`,
//! `order.signed`, `broker.pub`, `audit.pub`, the simulator's chain `sim-chain.pem` (the chip
//! is simulated, so its root is named explicitly) and `verify.sh`, the exact command run.

use super::summary::LiveAttack;
use super::{IMAGE, StackOptions, now, order, pk, stack_with};
use crate::fleet_mesh::{self, Expected, FleetMesh};
use aws_lc_rs::signature::Ed25519KeyPair;
use guest_agent::client::{ClientError, fetch, fetch_with_mesh_key, renew};
use guest_agent::luks::{self, DiskLabel, LuksError, VolumeKey};
use guest_agent::shares::fetch_shares;
use guest_agent::unlock::{MeshKey, place_mesh_identity_cert};
use proto::order::{Allowlist, ORDER_VERSION, Split};
use serde_bytes::ByteBuf;
use serde_json::{Value, json};
use simulator::{Chip, GuestLaunch, Pki};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The VM whose key is split.
const VM: &str = "tenant-vm";
/// Another VM of the same tenant (on the operator's broker alone), its peer on the mesh.
const PEER: &str = "tenant-peer";
/// The lease the operator's broker gives here (its mesh certificates' lifetime), seconds: short,
/// so that a VM no longer renewed is seen dropping off the mesh.
const LEASE_SECS: u64 = 4;

/// What the scene observed.
pub struct Tenant {
    pub split: String,
    /// First boot formatted with the combined key, second boot opened the disk with it.
    pub unlocked: bool,
    /// Neither broker's share alone opens the disk.
    pub share_alone_opens_nothing: bool,
    /// The tenant's broker, withdrawing the image, stopped the next boot on its own.
    pub tenant_withdrawal_stopped_boot: bool,
    pub bundle_verified: bool,
    pub tampered_bundle_rejected: bool,
    /// Where the evidence and `verify.sh` are.
    pub evidence: PathBuf,
    /// Renewals of the VM's lease (fresh reports, new certificates).
    pub lease_renewals: u64,
    /// From the operator's broker withdrawing the image to the VM's mesh connection closing
    /// (its certificate not renewed, run out); `None`: it did not close.
    pub withdrawn_vm_dropped_ms: Option<f64>,
    /// From a clone's keepalive (the lease revoked) to the VM's mesh connection closing — the
    /// broker's list through the lighthouses, long before its freshly renewed certificate
    /// ends; `None`: it did not close.
    pub revoked_vm_dropped_ms: Option<f64>,
    /// The scene's attacks, for the catalogue.
    pub attacks: Vec<LiveAttack>,
}

impl Tenant {
    pub fn one_broker_alone_denied(&self) -> bool {
        self.share_alone_opens_nothing && self.tenant_withdrawal_stopped_boot
    }

    pub fn as_expected(&self) -> bool {
        self.unlocked
            && self.one_broker_alone_denied()
            && self.bundle_verified
            && self.tampered_bundle_rejected
            && self.lease_renewals >= 2
            && self
                .withdrawn_vm_dropped_ms
                .is_some_and(|ms| ms <= (LEASE_SECS as f64 + 2.0) * 1000.0)
            && self
                .revoked_vm_dropped_ms
                .is_some_and(|ms| ms < LEASE_SECS as f64 * 1000.0 / 2.0)
            && self.attacks.iter().all(LiveAttack::as_expected)
    }

    pub fn json(&self) -> Value {
        json!({
            "split": self.split,
            "unlocked": self.unlocked,
            "one_broker_alone_denied": self.one_broker_alone_denied(),
            "share_alone_opens_nothing": self.share_alone_opens_nothing,
            "tenant_withdrawal_stopped_boot": self.tenant_withdrawal_stopped_boot,
            "bundle_verified": self.bundle_verified,
            "tampered_bundle_rejected": self.tampered_bundle_rejected,
            "lease_renewals": self.lease_renewals,
            "withdrawn_vm_dropped_ms": self.withdrawn_vm_dropped_ms.map(|ms| ms.round() as u64),
            "revoked_vm_dropped_ms": self.revoked_vm_dropped_ms.map(|ms| ms.round() as u64),
            "lease_secs": LEASE_SECS,
            "evidence": self.evidence.display().to_string(),
        })
    }

    pub fn print(&self) {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "  the tenant in control: VM {VM}, key split {} between the operator's broker and the tenant's own",
            self.split
        );
        println!(
            "    unlocked with both shares (format, then unlock): {}",
            yes(self.unlocked)
        );
        println!(
            "    either share alone opens nothing:              {}",
            yes(self.share_alone_opens_nothing)
        );
        println!(
            "    the tenant's broker alone stopped a boot:        {}",
            yes(self.tenant_withdrawal_stopped_boot)
        );
        println!(
            "    attesta-verify on the exported bundle:           {}",
            if self.bundle_verified {
                "accepted"
            } else {
                "NOT ACCEPTED"
            }
        );
        println!(
            "    attesta-verify on a bundle with an edited entry: {}",
            if self.tampered_bundle_rejected {
                "finding"
            } else {
                "NOT FOUND"
            }
        );
        println!(
            "    lease ({LEASE_SECS} s here) renewed with fresh reports: {} times",
            self.lease_renewals
        );
        println!(
            "    image withdrawn: not renewed, off the mesh in     {}",
            self.withdrawn_vm_dropped_ms
                .map_or("NOT DROPPED".into(), |ms| format!("{ms:.0} ms"))
        );
        println!(
            "    a clone's keepalive: lease revoked, off the mesh in {}",
            self.revoked_vm_dropped_ms
                .map_or("NOT CUT OFF".into(), |ms| format!("{ms:.0} ms"))
        );
        println!(
            "    evidence and the command: {}/verify.sh",
            self.evidence.display()
        );
    }
}

/// An echo connection from the tenant's console to the VM, retried for a few seconds while the
/// VM (back with a valid certificate) reconnects to the lighthouses.
async fn echo_within(
    console: &mesh::node::Node,
    vm: std::net::IpAddr,
) -> Result<quinn::Connection, String> {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match fleet_mesh::open_echo(console, vm).await {
            Ok(c) => return Ok(c),
            Err(x) if Instant::now() >= end => return Err(format!("console -> {VM}: {x}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `attesta-verify`, beside this binary (`cargo build` and `scripts/demo.sh` build both).
fn verifier_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("attesta-verify");
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(format!(
            "{} is missing: build it (cargo build -p attesta-verify)",
            exe.display()
        ))
    }
}

/// Runs the scene in `dir`, leaving the evidence in `evidence`.
pub async fn run(
    dir: &Path,
    root: &Arc<Pki>,
    chip: &Chip,
    evidence: &Path,
    note: &dyn Fn(&str),
) -> Result<Tenant, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let verify_bin = verifier_binary()?;
    note("tenant: the operator's broker and the tenant's own");
    let audit = Arc::new(Ed25519KeyPair::generate().map_err(|x| e(&x))?);
    let mut brokers = Vec::new();
    for (name, key) in [
        ("operator", audit.clone()),
        (
            "tenant",
            Arc::new(Ed25519KeyPair::generate().map_err(|x| e(&x))?),
        ),
    ] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).map_err(|x| e(&x))?;
        let s = stack_with(
            &d,
            StackOptions {
                audit_key: Some(key),
                // The scene's lease is LEASE_SECS: renewals come well within a second.
                lease_min_interval: 0,
                ..StackOptions::trusting(root, IMAGE)
            },
        )
        .await?;
        brokers.push(s);
    }
    // The operator's broker also serves on a mesh of its own here, certifying guests' mesh
    // keys for LEASE_SECS: the lease.
    let mut mesh = FleetMesh::start(dir).await?;
    mesh.guest_cert_secs = LEASE_SECS;
    let on_mesh = mesh.serve_broker(brokers[0].kbs.clone()).await?;
    let split = Split {
        threshold: 2,
        brokers: vec!["operator".into(), "tenant".into()],
    };
    let mut signed = Vec::new();
    for s in &brokers {
        let mut o = order(VM, 0, &chip.config.chip_id, &IMAGE);
        o.split = Some(split.clone());
        o.mesh_ip = Some(fleet_mesh::guest_ip(0));
        let doc = o.sign(&s.operator);
        s.kbs.register(&doc, now()).await.map_err(|x| e(&x))?;
        signed.push(doc);
    }
    let mut peer = order(PEER, 0, &chip.config.chip_id, &IMAGE);
    peer.mesh_ip = Some(fleet_mesh::guest_ip(1));
    brokers[0]
        .kbs
        .register(&peer.sign(&brokers[0].operator), now())
        .await
        .map_err(|x| e(&x))?;
    let tenant = peer.tenant.clone();
    let groups = vec![vec![on_mesh.clone()], vec![brokers[1].broker.clone()]];
    let boot = || {
        chip.launch(GuestLaunch {
            measurement: IMAGE,
            ..Default::default()
        })
    };
    let img = dir.join(format!("{VM}.img"));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(32 << 20))
        .map_err(|x| e(&x))?;
    let label = DiskLabel {
        vm_id: VM.into(),
        generation: 1,
    };
    // `None`: the key opened the disk; else why the disk refused it.
    let refusal = |key: &[u8]| -> Result<Option<String>, String> {
        let key = VolumeKey::from_bytes(key).map_err(|x| e(&x))?;
        match luks::unlock(&img, "attesta-tenant-vm", &key, &label) {
            Ok(()) => {
                let _ = std::process::Command::new("cryptsetup")
                    .args(["close", "attesta-tenant-vm"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                Ok(None)
            }
            Err(LuksError::DeviceMapperUnavailable) => Ok(None),
            Err(x) => Ok(Some(x.to_string())),
        }
    };
    let opens = |key: &[u8]| refusal(key).map(|r| r.is_none());

    // Two boots with both shares: the first formats, the second opens the disk.
    let mut attacks = Vec::new();
    // Each boot binds a mesh key born in the guest; the operator's broker certifies it.
    let mut unlocked = true;
    let mut identity = None;
    for n in 1..=2u64 {
        note(&format!("tenant: boot {n} (a share from each broker)"));
        let g = boot();
        let key = MeshKey::generate().map_err(|x| e(&x))?;
        let got = fetch_shares(&groups, VM, &g, Duration::from_secs(30), Some(key.public()))
            .await
            .map_err(|x| format!("{VM}: {x}"))?;
        identity = Some((key, got.mesh_cert.clone()));
        if n == 1 {
            let key = VolumeKey::from_bytes(&got.volume_key).map_err(|x| e(&x))?;
            luks::format(&img, &key, &label).map_err(|x| e(&x))?;
        }
        unlocked &= got.boot_counter == n && opens(&got.volume_key)?;
    }

    // The lease: the VM and its peer join the mesh, and the tenant's console watches; the VM's
    // keepalive renews its certificate with fresh reports; the operator withdraws the image,
    // renewals stop, and the VM's connection closes when its certificate runs out. Listed
    // again, the VM renews and is back; then its key, used from another chip, revokes the
    // lease, and the broker's list cuts the VM off at once.
    note("tenant: the VM's lease on the mesh");
    let (key, cert) = identity.ok_or("no boot")?;
    let vm_ip = mesh
        .join(
            Expected {
                vm_id: VM,
                tenant: &tenant,
                ip: &fleet_mesh::guest_ip(0),
            },
            &key,
            &cert,
        )
        .await?
        .ip;
    let peer_key = MeshKey::generate().map_err(|x| e(&x))?;
    let peer_release = fetch_with_mesh_key(&on_mesh, PEER, &boot(), peer_key.public())
        .await
        .map_err(|x| format!("{PEER}: {x}"))?;
    mesh.join(
        Expected {
            vm_id: PEER,
            tenant: &tenant,
            ip: &fleet_mesh::guest_ip(1),
        },
        &peer_key,
        &peer_release.mesh_cert,
    )
    .await?;
    let console = mesh
        .tenant_console(&tenant, &fleet_mesh::guest_ip(2))
        .await?
        .node
        .clone();
    let vm_dir = mesh.guest_dir(VM);
    let lease_key = guest_agent::keepalive::mesh_key(&vm_dir).map_err(|x| e(&x))?;
    let mut lease_renewals = 0;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = renew(&on_mesh, VM, &boot(), &lease_key)
            .await
            .map_err(|x| format!("{VM}: lease: {x}"))?;
        place_mesh_identity_cert(&vm_dir, &r.mesh_cert, &r.mesh_chain).map_err(|x| e(&x))?;
        lease_renewals += 1;
    }
    // The node reloads its certificate within 250 ms; a connection made now runs on it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let conn = echo_within(&console, vm_ip).await?;
    let op = &brokers[0];
    let allow = |epoch: u64, images: Vec<ByteBuf>| {
        Allowlist {
            v: ORDER_VERSION,
            epoch,
            measurements: images,
        }
        .sign(&op.allowlist_key)
    };
    op.kbs
        .set_allowlist(
            &allow(2, vec![ByteBuf::from(vec![0x0e; 48])]),
            &pk(&op.allowlist_key),
            now(),
        )
        .await
        .map_err(|x| e(&x))?;
    let withdrawn_at = Instant::now();
    let refused = renew(&on_mesh, VM, &boot(), &lease_key).await;
    let not_renewed = matches!(&refused, Err(ClientError::Denied(r)) if r.iter().any(|c| c == "measurement_withdrawn"));
    let closed = tokio::time::timeout(Duration::from_secs(LEASE_SECS + 5), conn.closed()).await;
    let withdrawn_vm_dropped_ms =
        (not_renewed && closed.is_ok()).then(|| withdrawn_at.elapsed().as_secs_f64() * 1000.0);
    op.kbs
        .set_allowlist(
            &allow(3, vec![ByteBuf::from(IMAGE.to_vec())]),
            &pk(&op.allowlist_key),
            now(),
        )
        .await
        .map_err(|x| e(&x))?;
    // Listed again: renewed again (a withdrawal does not revoke), and back on the mesh.
    let r = renew(&on_mesh, VM, &boot(), &lease_key)
        .await
        .map_err(|x| format!("{VM}: lease after listing again: {x}"))?;
    place_mesh_identity_cert(&vm_dir, &r.mesh_cert, &r.mesh_chain).map_err(|x| e(&x))?;
    let vm_cert = mesh::cert::MeshCert::parse(&r.mesh_cert).map_err(|x| e(&x))?;
    lease_renewals += 1;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let conn = echo_within(&console, vm_ip).await?;
    // A keepalive from a clone: the VM's key, a genuine report from another chip.
    let elsewhere = simulator::Chip::new(root.clone(), simulator::ChipConfig::typical(root, 1))
        .map_err(|x| e(&x))?;
    let cloned = elsewhere.launch(GuestLaunch {
        measurement: IMAGE,
        ..Default::default()
    });
    let revoked_at = Instant::now();
    let clone_reasons = match renew(&on_mesh, VM, &cloned, &lease_key).await {
        Err(ClientError::Denied(r)) => r.join(", "),
        Err(x) => x.to_string(),
        Ok(_) => "renewed".into(),
    };
    // Closed by the console once the broker's list reached it: in milliseconds, where the
    // certificate just renewed would have run for seconds more.
    // Counted only if the console closed it while the VM's current certificate was still
    // valid, and holds it revoked by the broker's list.
    let revoked_vm_dropped_ms =
        tokio::time::timeout(Duration::from_secs(LEASE_SECS + 2), conn.closed())
            .await
            .ok()
            .filter(|_| now() < vm_cert.not_after)
            .map(|_| revoked_at.elapsed().as_secs_f64() * 1000.0)
            .filter(|_| console.trust().is_revoked(&vm_cert));
    // The lease is revoked: the genuine VM is not renewed either until it boots again.
    let after = match renew(&on_mesh, VM, &boot(), &lease_key).await {
        Err(ClientError::Denied(r)) => r.join(", "),
        Err(x) => x.to_string(),
        Ok(_) => "renewed".into(),
    };
    attacks.push(LiveAttack {
        name: "keepalive from a cloned VM on another chip",
        denied: clone_reasons.contains("lease_other_chip") && after == "lease_revoked",
        reason: format!("{clone_reasons}; then the VM itself: {after}"),
        expected: "lease_other_chip",
    });
    mesh.shutdown().await;

    // Each broker's operator, alone: what its store and KEK give is its share (released here to
    // a genuine guest), and the disk does not open with it.
    note("tenant: each share alone");
    let mut share_alone_opens_nothing = true;
    for (name, s) in [("operator", &brokers[0]), ("tenant", &brokers[1])] {
        let share = fetch(&s.broker, VM, &boot())
            .await
            .map_err(|x| format!("{VM} at the {name}'s broker: {x}"))?;
        let refused = refusal(&share.volume_key)?;
        share_alone_opens_nothing &= refused.is_some();
        if name == "operator" {
            attacks.push(LiveAttack {
                name: "broker operator opens a split VM's disk alone",
                denied: refused.is_some(),
                reason: refused.unwrap_or_else(|| "the share opened the disk".into()),
                expected: "does not open this disk",
            });
        }
    }

    // The evidence, exported by the operator's broker and checked by the tenant.
    note("tenant: evidence exported and verified");
    std::fs::create_dir_all(evidence).map_err(|x| e(&x))?;
    let audit_pub = kbs::audit::public_key(&audit);
    let bundle = brokers[0]
        .kbs
        .evidence_bundle(VM, &audit_pub, now())
        .await?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(evidence.join(name), bytes)
            .map_err(|x| format!("{}: {x}", evidence.join(name).display()))
    };
    write("bundle", &serde_json::to_vec(&bundle).map_err(|x| e(&x))?)?;
    write("order.signed", &signed[0])?;
    write(
        "broker.pub",
        hex::encode(brokers[0].kbs.response_key.public()).as_bytes(),
    )?;
    write("audit.pub", hex::encode(&audit_pub).as_bytes())?;
    write(
        "sim-chain.pem",
        (snp::certs::pem_encode("CERTIFICATE", &root.ask.cert)
            + &snp::certs::pem_encode("CERTIFICATE", &root.ark.cert))
            .as_bytes(),
    )?;
    let args = |file: &str| -> Vec<String> {
        [
            "bundle",
            file,
            "--order",
            "order.signed",
            "--broker-key",
            "broker.pub",
            "--audit-key",
            "audit.pub",
            "--measurement",
            &hex::encode(IMAGE),
            "--trust-chain",
            "sim-chain.pem",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let script = format!(
        "#!/bin/sh\n# The tenant's check of {VM}'s evidence, exactly as `attesta-sim demo` ran it.\n\
         # The chip is simulated, so the simulator's chain is named with --trust-chain;\n\
         # for a VM on AMD hardware, leave it out: AMD's built-in roots are always trusted.\n\
         cd \"$(dirname \"$0\")\" || exit 2\nexec {} {}\n",
        verify_bin.display(),
        args("bundle").join(" ")
    );
    write("verify.sh", script.as_bytes())?;
    let run_verify = |file: &str| {
        std::process::Command::new(&verify_bin)
            .args(args(file))
            .current_dir(evidence)
            .output()
            .map_err(|x| format!("{}: {x}", verify_bin.display()))
    };
    let out = run_verify("bundle")?;
    let bundle_verified = out.status.code() == Some(0);
    if !bundle_verified {
        eprintln!(
            "attesta-sim demo: attesta-verify did not accept the bundle:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The operator's broker edits its own release entry after the fact (a boot counter).
    let mut forged = bundle.clone();
    for line in forged.log.iter_mut() {
        if let proto::audit::Line::Entry(en) = line
            && en.vm_id == VM
            && en.kind == "release"
        {
            en.detail["boot_counter"] = json!(99);
            break;
        }
    }
    write(
        "bundle.edited",
        &serde_json::to_vec(&forged).map_err(|x| e(&x))?,
    )?;
    let out = run_verify("bundle.edited")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let tampered_bundle_rejected =
        out.status.code() == Some(1) && stdout.contains("audit_entry_changed");
    attacks.push(LiveAttack {
        name: "broker operator edits a release in an exported bundle",
        denied: tampered_bundle_rejected,
        reason: stdout
            .lines()
            .find(|l| l.starts_with("FINDING"))
            .unwrap_or("accepted")
            .to_string(),
        expected: "audit_entry_changed",
    });

    // The tenant withdraws the image at their broker: the next boot stops there.
    note("tenant: the tenant's broker withdraws the image");
    let t = &brokers[1];
    let withdrawn = Allowlist {
        v: ORDER_VERSION,
        epoch: 2,
        measurements: vec![ByteBuf::from(vec![0x0e; 48])],
    };
    t.kbs
        .set_allowlist(
            &withdrawn.sign(&t.allowlist_key),
            &pk(&t.allowlist_key),
            now(),
        )
        .await
        .map_err(|x| e(&x))?;
    let stopped = fetch_shares(&groups, VM, &boot(), Duration::from_secs(30), None).await;
    let tenant_withdrawal_stopped_boot = matches!(
        &stopped,
        Err(guest_agent::unlock::UnlockError::Release(
            guest_agent::client::ClientError::Denied(r)
        )) if r.iter().any(|c| c == "measurement_withdrawn")
    );
    note("");
    Ok(Tenant {
        split: split.label(),
        unlocked,
        share_alone_opens_nothing,
        tenant_withdrawal_stopped_boot,
        bundle_verified,
        tampered_bundle_rejected,
        lease_renewals,
        withdrawn_vm_dropped_ms,
        revoked_vm_dropped_ms,
        evidence: evidence.to_path_buf(),
        attacks,
    })
}
