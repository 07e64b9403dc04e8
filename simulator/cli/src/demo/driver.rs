//! The demo's driver: its command line, the scenes in order (the fleet with its mesh and the
//! attacks in [`super::run`], the tenant's split key and evidence in [`super::tenant`], then the
//! real VMs in [`super::real_vms`]), and the summary each scene adds its part to
//! ([`super::summary`], [`super::tenant::Tenant`], [`super::real_vms::RealVms`]).

use super::{real_vms, tenant};
use crate::fleet_mesh;
use clap::Args;
use simulator::Seed;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct DemoArgs {
    /// Number of VMs (at least 2: one is terminated, another attacked).
    #[arg(long, default_value_t = 8)]
    pub vms: usize,
    /// Print one JSON summary object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seed of the simulated hierarchies.
    #[arg(long, default_value = "attesta-sim")]
    pub seed: String,
    /// Where generated key hierarchies are kept between runs (see `report --help`).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Keep the broker's SQLite database, its KEK and the disk images here (default: a
    /// temporary directory, removed at the end); the tenant's evidence, and the exact
    /// `attesta-verify` command that checked it, are left in DIR/evidence/.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Also boot this many real VMs (Debian's cloud kernel and OVMF under QEMU, created by a
    /// host agent on qemu:///system with a simulated PSP, an attesta-image initramfs, dm-crypt
    /// in the guest). Default: 1 where QEMU, OVMF, a reachable qemu:///system
    /// (scripts/libvirt-up.sh), the guest kernel (scripts/guest-kernel.sh) and attesta-guest
    /// with the simulator feature are at hand, else 0; 0 skips them.
    #[arg(long, value_name = "N")]
    pub real_vms: Option<usize>,
    /// The fleet's broker's store: `sqlite` (a file in the demo's folder, the embedded default)
    /// or a `postgres://` URL of an empty database the broker may use (its tables are created).
    #[arg(long, value_name = "sqlite|postgres://…", default_value = "sqlite")]
    pub store: String,
    /// Broker replicas on that store (1 to 8; more than one needs PostgreSQL). Every guest lists
    /// them all; one is stopped halfway through the second boots, where a guest booting next
    /// starts, so that guest passes over it.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub replicas: usize,
    /// In the real VMs, also time an argon2id passphrase unlock of the same disk (cryptsetup's
    /// defaults) right after the agent's unlock: `real_vms.bench` in the JSON.
    #[arg(long)]
    pub bench_unlock: bool,
}

/// Runs `attesta-sim demo`: the scenes in order, then the summary; true if all was as expected.
pub fn run(a: &DemoArgs) -> Result<bool, String> {
    // One VM is terminated and the live attacks aim at another: two at least.
    if a.vms < 2 || a.vms > fleet_mesh::MAX_GUESTS {
        return Err(format!(
            "--vms must be between 2 (one is terminated, another attacked) and {} (the overlay's addresses)",
            fleet_mesh::MAX_GUESTS
        ));
    }
    let store = super::StoreChoice::new(&a.store, a.replicas)?;
    let seed = Seed::from_text(&a.seed);
    let state = crate::state_dir(&a.state);
    let [m, g, t, r] = super::seeds(&seed);
    let pkis = [
        crate::pki_for(m.0, &m.1, &state)?,
        crate::pki_for(g.0, &g.1, &state)?,
        crate::pki_for(t.0, &t.1, &state)?,
        crate::pki_for(r.0, &r.1, &state)?,
    ];
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("attesta-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            tmp.clone()
        }
    };
    // The real VMs: asked for (their parts must be here), or 1 where they are.
    let real_parts = match a.real_vms {
        Some(0) => None,
        Some(n) => Some((n, real_vms::Parts::find()?)),
        None => match real_vms::Parts::find() {
            Ok(p) => Some((1, p)),
            Err(why) => {
                eprintln!("attesta-sim demo: no real VMs: {why}");
                None
            }
        },
    };
    if a.bench_unlock && real_parts.is_none() {
        return Err(
            "--bench-unlock times the real VMs' unlocks: there are none (--real-vms 0, or their parts are missing)".into(),
        );
    }
    let milan = Arc::new(crate::pki_for(m.0, &m.1, &state)?);
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    // Ctrl-C stops the run and drops everything it holds (the guests' keys on tmpfs included).
    let quiet = a.json;
    let chip0 = simulator::Chip::new(milan.clone(), simulator::ChipConfig::typical(&milan, 0))
        .map_err(|e| e.to_string())?;
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let s = super::run(&dir, a.vms, pkis, &store, a.json).await?;
                let note = |m: &str| {
                    if !quiet {
                        eprint!("\r\x1b[2K{m}");
                    }
                };
                let t = tenant::run(
                    &dir.join("tenant"),
                    &milan,
                    &chip0,
                    &dir.join("evidence"),
                    &note,
                )
                .await?;
                let r = match &real_parts {
                    Some((n, parts)) => {
                        Some(
                            real_vms::run(
                                &dir.join("real-vms"),
                                *n,
                                &real_vms::Hierarchy {
                                    root: &milan,
                                    seed: &a.seed,
                                    state: &state,
                                },
                                parts,
                                a.bench_unlock,
                                &note,
                            )
                            .await?,
                        )
                    }
                    None => None,
                };
                Ok::<_, String>((s, t, r))
            } => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
        }
    });
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (mut s, mut t, real) = result?;
    let real_ok = match (&real, &real_parts) {
        (Some(r), Some((n, _))) => r.as_expected(*n, a.bench_unlock),
        _ => true,
    };
    let ok = s.as_expected() && t.as_expected() && real_ok;
    // The tenant scene's attacks join the catalogue's.
    s.attacks.append(&mut t.attacks);
    if a.json {
        let mut j = serde_json::Map::new();
        for (k, v) in s.json() {
            j.insert(k.into(), v);
        }
        j.insert("tenant".into(), t.json());
        j.insert(
            "real_vms".into(),
            real.as_ref().map(|r| r.json(real_ok)).unwrap_or_default(),
        );
        // The first real VM's backup to S3 and restore on the other host (issue: `backup`).
        j.insert(
            "backup".into(),
            real.as_ref()
                .and_then(|r| r.backup.as_ref())
                .map(|b| b.json())
                .unwrap_or_default(),
        );
        j.insert("ok".into(), ok.into());
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(j)).unwrap_or_default()
        );
    } else {
        s.print_fleet();
        s.mesh.print();
        s.print_attacks();
        t.print();
        match &real {
            Some(r) => r.print(),
            None => {
                println!("  real VMs: none (--real-vms 0, or QEMU / the guest kernel not at hand)")
            }
        }
        println!(
            "{}",
            if ok {
                "RESULT: all as expected"
            } else {
                "RESULT: UNEXPECTED OUTCOMES (see above)"
            }
        );
    }
    Ok(ok)
}
