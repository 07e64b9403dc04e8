//! What the demo observed, scene by scene, and how each scene's part reads: in the `--json`
//! summary and in the text one. The real VMs' part is `super::real_vms::RealVms`.

use crate::fleet_mesh::Reach;
use serde_json::{Value, json};

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
    /// The fleet broker's store (`sqlite` or `postgres`) and its replicas.
    pub store: &'static str,
    pub replicas: usize,
    /// With several replicas: what stopping one halfway through the second boots showed.
    pub replica: Option<ReplicaRun>,
    /// Where Chopsticks was at hand: what the chain saw of the fleet.
    pub chain: Option<super::chain::ChainSummary>,
}

/// What stopping one of the fleet broker's replicas mid-boot showed.
pub struct ReplicaRun {
    /// The stopped replica, once a guest's handshake to it was seen to fail.
    pub stopped: Option<std::net::SocketAddr>,
    /// Guests that started at it after the stop and were released by another.
    pub failed_over: usize,
    /// What it released after the stop (must be nothing).
    pub released_after_stop: u64,
    /// Releases per replica, the first first.
    pub releases: Vec<u64>,
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

/// How a mesh connection attempt ended, in words.
pub fn reach_text(r: &Reach) -> String {
    match r {
        Reach::Reached => "reached".into(),
        Reach::Denied => "denied by its firewall".into(),
        Reach::Refused(why) => format!("refused: {why}"),
    }
}

impl Summary {
    /// The fleet's boots and the broker's attacks all as they must be, and the mesh too.
    pub fn as_expected(&self) -> bool {
        self.unlocked == self.vms
            && self.domains == self.vms
            && self.denied == 1
            && self.attacks.iter().all(LiveAttack::as_expected)
            && self.mesh.as_expected(self.vms)
            && self.chain.as_ref().is_none_or(|c| c.as_expected())
            && self.replica.as_ref().map_or(self.replicas == 1, |r| {
                r.stopped.is_some()
                    && r.failed_over >= 1
                    && r.released_after_stop == 0
                    && r.releases.len() == self.replicas
            })
    }

    /// The fleet's, the mesh's and the attacks' parts of the JSON summary.
    pub fn json(&self) -> Vec<(&'static str, Value)> {
        let attacks: Vec<Value> = self
            .attacks
            .iter()
            .map(|x| {
                json!({
                    "name": x.name,
                    "denied": x.denied,
                    "reason": x.reason,
                    "expected": x.expected,
                })
            })
            .collect();
        vec![
            ("vms", json!(self.vms)),
            ("store", json!(self.store)),
            ("replicas", json!(self.replicas)),
            (
                "replica_stopped_mid_boot",
                json!(self.replica.as_ref().is_some_and(|r| r.stopped.is_some())),
            ),
            (
                "failed_over",
                json!(self.replica.as_ref().map_or(0, |r| r.failed_over)),
            ),
            (
                "released_by_stopped_after_stop",
                json!(self.replica.as_ref().map_or(0, |r| r.released_after_stop)),
            ),
            (
                "replica_releases",
                json!(self.replica.as_ref().map(|r| r.releases.clone())),
            ),
            ("hosts", json!(self.hosts)),
            ("domains", json!(self.domains)),
            ("unlocked", json!(self.unlocked)),
            ("activated", json!(self.activated)),
            ("denied", json!(self.denied)),
            ("attacks", json!(attacks)),
            (
                "release_latency_ms",
                json!({"p50": self.percentile(50.0), "p99": self.percentile(99.0)}),
            ),
            ("mesh", self.mesh.json(self.vms)),
            (
                "chain",
                self.chain.as_ref().map(|c| c.json()).unwrap_or_default(),
            ),
        ]
    }

    /// The fleet's part of the text summary (before the mesh's).
    pub fn print_fleet(&self) {
        println!(
            "attesta demo: {} simulated SEV-SNP VMs, key broker on the mesh (QUIC on loopback), real LUKS2 images",
            self.vms
        );
        let stopped = match &self.replica {
            Some(ReplicaRun {
                stopped: Some(a),
                failed_over,
                ..
            }) => format!(
                "; the replica on {a} stopped mid-boot, {failed_over} guest(s) passed over it"
            ),
            Some(_) => "; a replica was to be stopped mid-boot, but was NOT seen stopped".into(),
            None => String::new(),
        };
        println!(
            "  key broker: {} replica(s) on {}{stopped}",
            self.replicas,
            if self.store == "postgres" {
                "PostgreSQL"
            } else {
                "SQLite (embedded)"
            }
        );
        println!(
            "  mesh: {} lighthouses; the broker, {} host agents (role host) and {} guests on it",
            self.mesh.lighthouses, self.mesh.hosts, self.mesh.guests
        );
        println!(
            "  host agents (one per machine, libvirt test driver): {} created {} SEV-SNP domains via signed orders",
            self.hosts, self.domains
        );
        match &self.chain {
            Some(c) => println!(
                "  chain (Chopsticks): {} assignment(s) taken, {} refused with the reason on chain, {} lifecycle record(s) on chain{}",
                c.assignments_taken,
                c.refused_with_reason,
                c.lifecycle_records,
                if c.all_on_chain {
                    ""
                } else {
                    " — NOT ALL ON CHAIN"
                }
            ),
            None => println!("  chain: none (Chopsticks not installed: scripts/chain-deps.sh)"),
        }
        println!(
            "  first boot (format) and second boot (unlock): {} of {} VMs unlocked",
            self.unlocked, self.vms
        );
        if self.activated < self.unlocked {
            println!(
                "    (the key was verified against each LUKS2 header; device-mapper is unavailable here, so {} disks were activated)",
                self.activated
            );
        }
        println!(
            "  terminated VM's next boot denied:             {}",
            if self.denied == 1 { "yes" } else { "NO" }
        );
    }

    /// The release latency and the attacks' part of the text summary (after the mesh's).
    pub fn print_attacks(&self) {
        println!(
            "  release latency:                              p50 {:.1} ms, p99 {:.1} ms",
            self.percentile(50.0),
            self.percentile(99.0)
        );
        let n = self.attacks.iter().filter(|x| x.as_expected()).count();
        println!(
            "  attacks against live brokers over QUIC: {n} of {} denied for their reason",
            self.attacks.len()
        );
        for x in &self.attacks {
            println!(
                "    {:<46} {:<8} {}{}",
                x.name,
                if x.denied { "denied" } else { "RELEASED" },
                x.reason,
                if x.as_expected() {
                    String::new()
                } else {
                    format!("  (expected {})", x.expected)
                }
            );
        }
    }
}

impl MeshSummary {
    /// The mesh's part of the JSON summary.
    pub fn json(&self, vms: usize) -> Value {
        json!({
            "lighthouses": self.lighthouses,
            "hosts": self.hosts,
            "guests": self.guests,
            "same_tenant": {"reached": self.same_tenant.0, "tried": self.same_tenant.1},
            "cross_tenant": {"denied": self.cross_tenant.0, "tried": self.cross_tenant.1},
            "pairs": self.pairs.iter().map(|(a, b, r)| json!({
                "from": a, "to": b, "outcome": reach_text(r),
            })).collect::<Vec<_>>(),
            "revocation": {
                "nodes": self.revoked_known.1,
                "nodes_revoked": self.revoked_known.0,
                "everywhere_ms": self.revoked_everywhere_ms,
                "cut_off_expected": self.cut_off_expected,
                "cut_off_ms": self.revoked_cut_off_ms,
                "reconnect": self.revoked_reconnect.as_ref().map(reach_text),
            },
            "ok": self.as_expected(vms),
        })
    }

    /// The mesh's part of the text summary.
    pub fn print(&self) {
        println!(
            "  guests' mesh identities (key born in the guest, bound in its report, certified by the broker):"
        );
        println!(
            "    same tenant reached:                        {} of {}",
            self.same_tenant.0, self.same_tenant.1
        );
        println!(
            "    other tenant denied by its firewall:        {} of {}",
            self.cross_tenant.0, self.cross_tenant.1
        );
        const SHOWN: usize = 12;
        for (a, b, r) in self.pairs.iter().take(SHOWN) {
            println!("      {a:>8} -> {b:<8} {}", reach_text(r));
        }
        if self.pairs.len() > SHOWN {
            println!(
                "      … {} more pairs (--json lists them all)",
                self.pairs.len() - SHOWN
            );
        }
        match self.revoked_everywhere_ms {
            Some(t) => println!(
                "    terminated vm-0's certificates revoked on all {} nodes (lighthouses, guests, broker) in {t:.0} ms",
                self.revoked_known.1
            ),
            None => println!(
                "    terminated vm-0's certificates revoked on only {} of {} nodes",
                self.revoked_known.0, self.revoked_known.1
            ),
        }
        if self.cut_off_expected {
            match self.revoked_cut_off_ms {
                Some(t) => println!("    its live connection to its tenant closed in {t:.0} ms"),
                None => println!("    its live connection to its tenant was NOT closed within 5 s"),
            }
        }
        if let Some(r) = &self.revoked_reconnect {
            println!("    its next connection: {}", reach_text(r));
        }
    }
}
