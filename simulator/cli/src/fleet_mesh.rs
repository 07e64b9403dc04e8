//! The demo's mesh: the overlay every part of the system talks over. A mesh CA; two lighthouses
//! that replicate; the broker's identity (role kbs, certifying attested guests with an
//! intermediate of the mesh CA, and on the mesh through a node of its own, where it publishes
//! that intermediate's revocation list the moment a lease is revoked); each miner's identity
//! (role host); and every attested guest as a mesh node with the certificate the broker issued
//! for the key born in that guest. Guests reach their own tenant's guests and nobody else's; a
//! revoked guest is cut off through the lighthouses.

use crate::demo::now;
use guest_agent::client::Broker;
use guest_agent::unlock::{MeshKey, place_mesh_identity};
use kbs::service::{GuestIssuer, Kbs, MeshGate, mesh_server_config, serve_with, server_endpoint};
use mesh::cert::{LocalCa, MeshCert, Role};
use mesh::firewall::Firewall;
use mesh::node::{ECHO_ALPN, Node, NodeConfig, close};
use mesh::revocation::Body;
use mesh::transport::{Identity, Trust};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name guests and hosts dial the broker by (a DNS SAN of its mesh certificate).
pub const KBS_NAME: &str = "kbs.attesta.local";
const NETWORK: &str = "10.42.0.0/16";
const LIGHTHOUSES: [&str; 2] = ["10.42.0.1", "10.42.0.2"];
const KBS_IP: &str = "10.42.0.10";

/// Who may use the broker's service on the mesh: the documented example rules.
const KBS_RULES: &str = include_str!("../../../examples/kbs-mesh-rules.toml");

/// Lighthouses serve only the control service (any certified node): nothing else comes in.
const LIGHTHOUSE_RULES: &str = r#"version = 1
[[tests]]
from = { name = "g", groups = ["tenant:tenant-0"], role = "guest" }
service = "attesta-echo/1"
expect = "deny"
"#;

/// A guest's rules: its own tenant's guests may reach it, nobody else. The tenant comes from
/// the operator's order; anything but letters, digits, `-` and `_` is refused rather than quoted.
fn guest_rules(tenant: &str) -> Result<String, String> {
    if !mesh::cert::is_plain_name(tenant) {
        return Err(format!("tenant {tenant:?}: not a plain name"));
    }
    Ok(format!(
        "version = 1\n[[inbound]]\nfrom = {{ groups = [\"tenant:{tenant}\"], role = \"guest\" }}\n\
         service = \"attesta-echo/1\"\n\
         [[tests]]\nfrom = {{ name = \"same\", groups = [\"tenant:{tenant}\"], role = \"guest\" }}\n\
         service = \"attesta-echo/1\"\nexpect = \"allow\"\n\
         [[tests]]\nfrom = {{ name = \"other\", groups = [\"tenant:not-{tenant}\"], role = \"guest\" }}\n\
         service = \"attesta-echo/1\"\nexpect = \"deny\"\n\
         [[tests]]\nfrom = {{ name = \"host\", groups = [\"tenant:{tenant}\"], role = \"host\" }}\n\
         service = \"attesta-echo/1\"\nexpect = \"deny\"\n"
    ))
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// The overlay address of miner `m`'s host agent.
pub fn host_ip(m: usize) -> String {
    format!("10.42.1.{}/16", m % 250 + 1)
}

/// The overlay address the operator's order gives guest VM number `i` (room for
/// [`MAX_GUESTS`]).
pub fn guest_ip(i: usize) -> String {
    format!("10.42.{}.{}/16", 2 + i / 250, i % 250 + 1)
}

/// Guests the demo's overlay network has addresses for.
pub const MAX_GUESTS: usize = 250 * 250;

/// What the operator's order says a guest's certificate must hold.
pub struct Expected<'a> {
    pub vm_id: &'a str,
    pub tenant: &'a str,
    /// With prefix, as in the order.
    pub ip: &'a str,
}

/// What a node needs on disk besides its own certificate and key.
struct NodeFiles<'a> {
    dir: &'a Path,
    rules: &'a str,
    lighthouse: bool,
}

/// One attested guest on the mesh.
pub struct Guest {
    pub vm_id: String,
    pub tenant: String,
    pub ip: IpAddr,
    pub node: Node,
}

/// The mesh under the demo.
pub struct FleetMesh {
    pub ca: LocalCa,
    dir: PathBuf,
    /// Guests' mesh keys: a private (0700, random name) folder on tmpfs, removed on drop, so
    /// they never touch the host's disk.
    shm: tempfile::TempDir,
    lighthouses: Vec<(IpAddr, SocketAddr)>,
    lighthouse_nodes: Vec<Node>,
    pub guests: Vec<Guest>,
    /// The broker's view of the mesh CA and its revocation lists.
    broker_trust: Option<Arc<Trust>>,
    /// Everything the operator has revoked so far, and the newest list's number.
    revoked: Body,
    /// How long the certificates a broker served here gives guests last: their lease.
    pub guest_cert_secs: u64,
    /// The guests' CA the broker holds: an intermediate under `ca` for role guest only, as a
    /// real deployment has it (its revocation lists reach only the guests it certified).
    guest_ca: LocalCa,
    /// The broker's own node, through which it publishes those lists.
    broker_node: Option<Node>,
}

impl FleetMesh {
    /// The mesh CA and two lighthouses on loopback, each listing the other (they replicate).
    pub async fn start(dir: &Path) -> Result<FleetMesh, String> {
        let dir = dir.join("mesh");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let t = now();
        let ca = LocalCa::root(
            "attesta-demo-mesh",
            &[NETWORK],
            t.saturating_sub(60),
            t + 7 * 86_400,
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("ca.crt"), &ca.pem).map_err(io(&dir))?;
        let guest_ca = ca
            .intermediate(
                "attesta-demo-guests",
                &[NETWORK],
                &[Role::Guest],
                &["*"],
                ca.cert.not_before,
                ca.cert.not_after,
            )
            .map_err(|e| e.to_string())?;
        let shm = tempfile::Builder::new()
            .prefix("attesta-demo-")
            .tempdir_in("/dev/shm")
            .map_err(|e| format!("the demo keeps guests' mesh keys on tmpfs, in /dev/shm: {e}"))?;
        let mut m = FleetMesh {
            revoked: Body {
                v: 1,
                ca: ca.cert.name.clone(),
                number: 0,
                issued_at: t,
                serials: vec![],
                keys: vec![],
            },
            ca,
            dir,
            shm,
            lighthouses: Vec::new(),
            lighthouse_nodes: Vec::new(),
            guests: Vec::new(),
            broker_trust: None,
            guest_cert_secs: 86_400,
            guest_ca,
            broker_node: None,
        };
        // The lighthouses must know each other's ports before either starts: pick free ones,
        // and pick again in the rare case another process took one meanwhile.
        let mut last = String::new();
        for _ in 0..5 {
            m.lighthouses = LIGHTHOUSES
                .iter()
                .map(|ip| Ok((ip.parse().map_err(|_| "lighthouse ip")?, free_port()?)))
                .collect::<Result<_, String>>()?;
            match m.start_lighthouses().await {
                Ok(()) => return Ok(m),
                Err(e) => {
                    last = e;
                    for n in m.lighthouse_nodes.drain(..) {
                        n.shutdown().await;
                    }
                }
            }
        }
        Err(format!("the lighthouses did not start: {last}"))
    }

    async fn start_lighthouses(&mut self) -> Result<(), String> {
        for (i, (ip, addr)) in self.lighthouses.clone().into_iter().enumerate() {
            let name = format!("lighthouse-{}", i + 1);
            let d = self.dir.join(&name);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
            self.issue_files(&d, &name, &format!("{ip}/16"), &["infra"], Role::Lighthouse)?;
            let cfg = self.node_config(
                NodeFiles {
                    dir: &d,
                    rules: LIGHTHOUSE_RULES,
                    lighthouse: true,
                },
                addr,
            )?;
            let n = Node::start(cfg, vec![])
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            self.lighthouse_nodes.push(n);
        }
        Ok(())
    }

    /// Writes `node.crt` and `node.key` (0600) for an infrastructure node into `d`.
    pub fn issue_files(
        &self,
        d: &Path,
        name: &str,
        ip: &str,
        groups: &[&str],
        role: Role,
    ) -> Result<MeshCert, String> {
        let t = now();
        let n = self
            .ca
            .issue(name, ip, groups, role, t.saturating_sub(60), t + 86_400)
            .map_err(|e| format!("{name}: {e}"))?;
        std::fs::write(d.join("node.crt"), &n.issued.cert_pem).map_err(io(d))?;
        simulator::pki::write_file(&d.join("node.key"), n.issued.key_pem.as_bytes(), true)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(n.cert)
    }

    fn node_config(&self, f: NodeFiles<'_>, listen: SocketAddr) -> Result<NodeConfig, String> {
        std::fs::write(f.dir.join("ca.crt"), &self.ca.pem).map_err(io(f.dir))?;
        std::fs::write(f.dir.join("rules.toml"), f.rules).map_err(io(f.dir))?;
        let mut static_hosts = BTreeMap::new();
        for (ip, addr) in &self.lighthouses {
            static_hosts.insert(*ip, vec![*addr]);
        }
        Ok(NodeConfig {
            cert: f.dir.join("node.crt"),
            key: f.dir.join("node.key"),
            ca: f.dir.join("ca.crt"),
            rules: f.dir.join("rules.toml"),
            listen,
            advertise: vec![],
            lighthouse: f.lighthouse,
            lighthouses: self.lighthouses.iter().map(|(ip, _)| *ip).collect(),
            static_hosts,
            revocation: Some(f.dir.join("revocation.json")),
            revocation_max_age: None,
            // Often, so that a lost push or relay is made up within seconds.
            announce_secs: 2,
            reload_ms: 250,
            announce: true,
            tun: None,
            echo: !f.lighthouse,
        })
    }

    /// Serves `kbs` on a loopback port with its mesh identity (role kbs): clients verified by
    /// the mesh CA and its revocation lists, admitted by the mesh firewall; attested guests
    /// certified by the mesh CA. Returns what guests pin (the mesh CA, the response key).
    pub async fn serve_broker(&mut self, kbs: Arc<Kbs>) -> Result<Broker, String> {
        self.serve_replica(kbs).await.map(|(b, _)| b)
    }

    /// [`FleetMesh::serve_broker`] for one of several replicas (brokers on one store, with the
    /// same keys): each on its own port, all with the broker's one mesh identity and one view
    /// of the revocation lists. Closing the endpoint returned stops that replica.
    pub async fn serve_replica(
        &mut self,
        kbs: Arc<Kbs>,
    ) -> Result<(Broker, quinn::Endpoint), String> {
        let d = self.dir.join("kbs");
        if self.broker_trust.is_none() {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
            self.issue_files(&d, KBS_NAME, &format!("{KBS_IP}/16"), &["infra"], Role::Kbs)?;
        }
        let id = Identity::from_pem(
            &std::fs::read(d.join("node.crt")).map_err(io(&d))?,
            &std::fs::read(d.join("node.key")).map_err(io(&d))?,
        )?;
        let trust = self
            .broker_trust
            .clone()
            .unwrap_or_else(|| Trust::new(vec![self.ca.cert.clone()]));
        let rules = Firewall::load(KBS_RULES).map_err(|e| format!("broker rules: {e}"))?;
        let gate = Arc::new(MeshGate::new(trust.clone(), rules));
        kbs.guest_issuer
            .set(GuestIssuer::new(
                self.guest_ca.cert.clone(),
                vec![],
                self.guest_ca.key.clone(),
                self.guest_cert_secs,
            ))
            .map_err(|_| "the broker already certifies guests with another CA".to_string())?;
        // The first replica publishes the revocation list for all of them (one store).
        if self.broker_node.is_none() {
            let mut cfg = self.node_config(
                NodeFiles {
                    dir: &d,
                    rules: KBS_RULES,
                    lighthouse: false,
                },
                (Ipv4Addr::LOCALHOST, 0).into(),
            )?;
            cfg.announce = false;
            cfg.echo = false;
            let node = Node::start(cfg, vec![])
                .await
                .map_err(|e| format!("the broker's mesh node: {e}"))?;
            tokio::spawn(kbs::guest_revocation::follow(
                kbs.clone(),
                kbs::guest_revocation::Outlets {
                    gate: Some(trust.clone()),
                    node: Some(node.clone()),
                },
                Duration::from_secs(60),
                now,
            ));
            self.broker_node = Some(node);
        }
        let endpoint = server_endpoint(
            mesh_server_config(id.chain, id.key, trust.clone())?,
            (Ipv4Addr::LOCALHOST, 0).into(),
        )
        .map_err(|e| e.to_string())?;
        let addr = endpoint.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(serve_with(endpoint.clone(), kbs.clone(), now, Some(gate)));
        self.broker_trust = Some(trust);
        let broker = Broker {
            addr,
            server_name: KBS_NAME.into(),
            ca_der: self.ca.cert.der.clone(),
            response_key: kbs.response_key.public(),
        };
        Ok((broker, endpoint))
    }

    /// Where a guest's mesh key and certificate are (tmpfs): what its node reads and reloads.
    pub fn guest_dir(&self, vm_id: &str) -> PathBuf {
        self.shm.path().join(vm_id)
    }

    /// An attested guest joins: the certificate the broker issued must be exactly what the
    /// operator's order says (name = VM id, its overlay address, group `tenant:<tenant>`, role
    /// guest); key and certificate go to tmpfs, and a mesh node starts with its tenant's rules.
    pub async fn join(
        &mut self,
        want: Expected<'_>,
        key: &MeshKey,
        cert_der: &[u8],
    ) -> Result<&Guest, String> {
        let vm_id = want.vm_id;
        let cert = MeshCert::parse(cert_der).map_err(|e| format!("{vm_id}: {e}"))?;
        let bad = |what: String| format!("{vm_id}: the broker's certificate {what}");
        let ip: ipnet::IpNet = want
            .ip
            .parse()
            .map_err(|_| format!("{vm_id}: bad address {}", want.ip))?;
        if cert.name != vm_id {
            return Err(bad(format!("is for {:?}", cert.name)));
        }
        if cert.ips != [ip] {
            return Err(bad(format!("holds {:?}, not {ip}", cert.ips)));
        }
        if cert.claims.groups != [format!("tenant:{}", want.tenant)] {
            return Err(bad(format!("holds the groups {:?}", cert.claims.groups)));
        }
        if cert.claims.role != Some(Role::Guest) || cert.is_ca {
            return Err(bad("is not a guest's".into()));
        }
        // An odd tenant name is refused before anything is placed.
        guest_rules(want.tenant)?;
        let d = self.guest_dir(vm_id);
        // Presented with the broker's intermediate, as the guest agent places it.
        place_mesh_identity(
            &d,
            key,
            cert_der,
            std::slice::from_ref(&self.guest_ca.cert.der),
        )
        .map_err(|e| format!("{vm_id}: {e}"))?;
        self.start_guest(vm_id, want.tenant, ip.addr(), &d).await
    }

    /// Starts the tenant-node in `d` (its identity placed there) with its tenant's rules, and
    /// keeps it among the guests.
    async fn start_guest(
        &mut self,
        name: &str,
        tenant: &str,
        ip: IpAddr,
        d: &Path,
    ) -> Result<&Guest, String> {
        let rules = guest_rules(tenant)?;
        let cfg = self.node_config(
            NodeFiles {
                dir: d,
                rules: &rules,
                lighthouse: false,
            },
            (Ipv4Addr::LOCALHOST, 0).into(),
        )?;
        let node = Node::start(cfg, vec![])
            .await
            .map_err(|e| format!("{name} on the mesh: {e}"))?;
        self.guests.push(Guest {
            vm_id: name.into(),
            tenant: tenant.into(),
            ip,
            node,
        });
        self.guests
            .last()
            .ok_or_else(|| format!("{name} did not join"))
    }

    /// The operator revokes `certs` (with everything revoked before): the next numbered list,
    /// signed by the mesh CA, dropped on the first lighthouse (which pushes it to every node)
    /// and handed to the broker (as `attesta-kbs serve` reloads its `[mesh] revocation` file).
    pub fn revoke(&mut self, certs: &[MeshCert]) -> Result<(), String> {
        for c in certs {
            self.revoked.revoke(c);
        }
        self.revoked.number += 1;
        self.revoked.issued_at = now();
        let bytes = mesh::revocation::sign(&self.ca.cert, &self.ca.key, &self.revoked)
            .map_err(|e| e.to_string())?;
        let p = self.dir.join("lighthouse-1").join("revocation.json");
        mesh::watch::write_atomic(&p, &bytes).map_err(io(&p))?;
        if let Some(t) = &self.broker_trust {
            t.install(&bytes, now())
                .map_err(|e| format!("the broker refused the list: {e}"))?;
        }
        Ok(())
    }

    /// (nodes holding `cert` as revoked, nodes asked): the lighthouses, the other guests (the
    /// revoked one is cut off, and need not learn it), the broker.
    pub fn revoked_on(&self, cert: &MeshCert) -> (usize, usize) {
        let trusts: Vec<Arc<Trust>> = self
            .lighthouse_nodes
            .iter()
            .chain(
                self.guests
                    .iter()
                    .filter(|g| g.vm_id != cert.name)
                    .map(|g| &g.node),
            )
            .map(|n| n.trust())
            .chain(self.broker_trust.clone())
            .collect();
        let know = trusts.iter().filter(|t| t.is_revoked(cert)).count();
        (know, trusts.len())
    }

    /// Waits until every lighthouse knows at least `n` nodes (announced to it or relayed by the
    /// other lighthouse), or says how far they got.
    pub async fn wait_announced(&self, n: usize, within: Duration) -> Result<(), String> {
        let end = Instant::now() + within;
        loop {
            let lens: Vec<usize> = self
                .lighthouse_nodes
                .iter()
                .map(|l| l.directory_len())
                .collect();
            if lens.iter().all(|&l| l >= n) {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "the lighthouses know {lens:?} nodes after {within:?}, {n} expected"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn lighthouses(&self) -> usize {
        self.lighthouse_nodes.len()
    }

    /// The broker's guests' CA certificate (PEM): what a guest presents after its own.
    pub fn guest_ca_pem(&self) -> String {
        self.guest_ca.pem.clone()
    }

    /// A tenant's own node beside its VMs (a console, say): certified by the mesh CA for a
    /// day, in the tenant's group, at overlay address `ip`. It watches a VM's lease from outside
    /// the lease (its own certificate never runs out during the demo).
    pub async fn tenant_console(&mut self, tenant: &str, ip: &str) -> Result<&Guest, String> {
        let name = format!("{tenant}-console");
        let d = self.shm.path().join(&name);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        let group = format!("tenant:{tenant}");
        self.issue_files(&d, &name, ip, &[&group], Role::Guest)?;
        let net: ipnet::IpNet = ip
            .parse()
            .map_err(|_| format!("{name}: bad address {ip}"))?;
        self.start_guest(&name, tenant, net.addr(), &d).await
    }

    pub async fn shutdown(self) {
        for g in &self.guests {
            g.node.shutdown().await;
        }
        if let Some(n) = &self.broker_node {
            n.shutdown().await;
        }
        for n in &self.lighthouse_nodes {
            n.shutdown().await;
        }
    }
}

/// A free UDP port on loopback (bound and released; the node binds it right after).
fn free_port() -> Result<SocketAddr, String> {
    std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("no free UDP port: {e}"))
}

/// What happened when one guest tried another's echo service.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// A round trip through the peer's echo service.
    Reached,
    /// The peer's firewall closed the connection (close code DENIED).
    Denied,
    /// Refused another way (handshake, revoked, unreachable): the reason.
    Refused(String),
}

/// `from` dials `to`'s echo service through the lighthouses and round-trips once.
pub async fn reach(from: &Node, to: IpAddr) -> Reach {
    let conn = match from.connect(to, ECHO_ALPN).await {
        Ok(c) => c,
        Err(e) => return Reach::Refused(e.to_string()),
    };
    match echo(&conn).await {
        Ok(()) => {
            conn.close(0u32.into(), b"done");
            Reach::Reached
        }
        Err(e) => match closed_with(&conn, close::DENIED, Duration::from_secs(5)).await {
            Ok(_) => Reach::Denied,
            Err(other) => Reach::Refused(other.unwrap_or(e)),
        },
    }
}

/// [`reach`], retried for up to `within` while the peer is not yet known (a guest that has just
/// announced itself); a firewall denial is final.
pub async fn reach_within(from: &Node, to: IpAddr, within: Duration) -> Reach {
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, reach(from, to))
            .await
            .unwrap_or_else(|_| Reach::Refused(format!("no answer within {within:?}")));
        if matches!(r, Reach::Reached | Reach::Denied) || Instant::now() >= end {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One round trip through a peer's echo service.
async fn echo(conn: &quinn::Connection) -> Result<(), String> {
    mesh::node::echo_once(conn, b"attesta", Duration::from_secs(5)).await
}

/// An open echo connection from `from` to `to`, kept to watch it being cut off.
pub async fn open_echo(from: &Node, to: IpAddr) -> Result<quinn::Connection, String> {
    let c = from
        .connect(to, ECHO_ALPN)
        .await
        .map_err(|e| e.to_string())?;
    echo(&c).await?;
    Ok(c)
}

/// Waits up to `limit` for `conn` to close with application code `code`: how long it took, or
/// how it ended otherwise (None: still open).
pub async fn closed_with(
    conn: &quinn::Connection,
    code: u32,
    limit: Duration,
) -> Result<Duration, Option<String>> {
    let t0 = Instant::now();
    match tokio::time::timeout(limit, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code.into_inner() == u64::from(code) =>
        {
            Ok(t0.elapsed())
        }
        Ok(other) => Err(Some(other.to_string())),
        Err(_) => Err(None),
    }
}
