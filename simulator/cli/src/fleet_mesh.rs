//! The demo's mesh: the overlay every part of the system talks over. A mesh CA; two lighthouses
//! that replicate; the broker's identity (role kbs, certifying attested guests with the mesh
//! CA); each miner's identity (role host); and every attested guest as a mesh node with the
//! certificate the broker issued for the key born in that guest. Guests reach their own tenant's
//! guests and nobody else's; a revoked guest is cut off through the lighthouses.

use guest_agent::client::Broker;
use guest_agent::unlock::MeshKey;
use kbs::service::{GuestIssuer, Kbs, MeshGate, mesh_server_config, serve_with, server_endpoint};
use mesh::cert::{LocalCa, MeshCert, Role};
use mesh::firewall::Firewall;
use mesh::node::{ECHO_ALPN, Node, NodeConfig, close};
use mesh::revocation::{Body, SerialEntry};
use mesh::transport::{Identity, Trust};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The name guests and hosts dial the broker by (a DNS SAN of its mesh certificate).
pub const KBS_NAME: &str = "kbs.attesta.local";
const NETWORK: &str = "10.42.0.0/16";
const LIGHTHOUSES: [&str; 2] = ["10.42.0.1", "10.42.0.2"];
const KBS_IP: &str = "10.42.0.10";

/// Who may use the broker's service on the mesh: hosts (orders) and guests (attestation;
/// guests without a certificate yet are admitted for attestation only, by the broker itself).
const KBS_RULES: &str = r#"version = 1
[[inbound]]
from = { role = "host" }
service = "attesta-kbs/1"
[[inbound]]
from = { role = "guest" }
service = "attesta-kbs/1"
[[tests]]
from = { name = "lh", role = "lighthouse" }
service = "attesta-kbs/1"
expect = "deny"
"#;

/// Lighthouses serve only the control service (any certified node): nothing else comes in.
const LIGHTHOUSE_RULES: &str = r#"version = 1
[[tests]]
from = { name = "g", groups = ["tenant:tenant-0"], role = "guest" }
service = "attesta-echo/1"
expect = "deny"
"#;

/// A guest's rules: its own tenant's guests may reach it, nobody else.
fn guest_rules(tenant: &str) -> String {
    format!(
        "version = 1\n[[inbound]]\nfrom = {{ groups = [\"tenant:{tenant}\"] }}\n\
         service = \"attesta-echo/1\"\n[[tests]]\nfrom = {{ name = \"same\", groups = [\"tenant:{tenant}\"], role = \"guest\" }}\n\
         service = \"attesta-echo/1\"\nexpect = \"allow\"\n[[tests]]\n\
         from = {{ name = \"other\", groups = [\"tenant:not-{tenant}\"], role = \"guest\" }}\n\
         service = \"attesta-echo/1\"\nexpect = \"deny\"\n"
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// The overlay address of miner `m`'s host agent.
pub fn host_ip(m: usize) -> String {
    format!("10.42.1.{}/16", m % 250 + 1)
}

/// The overlay address the operator's order gives guest VM number `i`.
pub fn guest_ip(i: usize) -> String {
    format!("10.42.{}.{}/16", 2 + i / 250, i % 250 + 1)
}

/// A folder on tmpfs, removed when dropped: guests' mesh keys never touch the host's disk.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
    pub cert: MeshCert,
    pub node: Node,
}

/// The mesh under the demo.
pub struct FleetMesh {
    pub ca: LocalCa,
    dir: PathBuf,
    shm: Tmpfs,
    lighthouses: Vec<(IpAddr, SocketAddr)>,
    lighthouse_nodes: Vec<Node>,
    pub guests: Vec<Guest>,
}

impl FleetMesh {
    /// The mesh CA and two lighthouses on loopback, each listing the other (they replicate).
    pub async fn start(dir: &Path) -> Result<FleetMesh, String> {
        let dir = dir.join("mesh");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let ca = LocalCa::root(
            "attesta-demo-mesh",
            &[NETWORK],
            now() - 60,
            now() + 7 * 86_400,
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("ca.crt"), &ca.pem).map_err(io(&dir))?;
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return Err(
                "the demo keeps guests' mesh keys on tmpfs, and /dev/shm is missing".into(),
            );
        }
        let shm = Tmpfs(shm.join(format!("attesta-demo-{}", std::process::id())));
        std::fs::create_dir_all(&shm.0).map_err(io(&shm.0))?;
        let mut m = FleetMesh {
            ca,
            dir,
            shm,
            lighthouses: Vec::new(),
            lighthouse_nodes: Vec::new(),
            guests: Vec::new(),
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
        let n = self
            .ca
            .issue(name, ip, groups, role, now() - 60, now() + 86_400)
            .map_err(|e| format!("{name}: {e}"))?;
        std::fs::write(d.join("node.crt"), &n.issued.cert_pem).map_err(io(d))?;
        write_secret(&d.join("node.key"), n.issued.key_pem.as_bytes())?;
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
            announce_secs: 30,
            reload_ms: 250,
            announce: true,
            tun: None,
            echo: !f.lighthouse,
        })
    }

    /// Serves `kbs` on a loopback port with its mesh identity (role kbs): clients verified by
    /// the mesh CA and its revocation lists, admitted by the mesh firewall; attested guests
    /// certified by the mesh CA. Returns what guests pin (the mesh CA, the response key).
    pub async fn serve_broker(&self, kbs: Arc<Kbs>) -> Result<Broker, String> {
        let d = self.dir.join("kbs");
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        self.issue_files(&d, KBS_NAME, &format!("{KBS_IP}/16"), &["infra"], Role::Kbs)?;
        let id = Identity::from_pem(
            &std::fs::read(d.join("node.crt")).map_err(io(&d))?,
            &std::fs::read(d.join("node.key")).map_err(io(&d))?,
        )?;
        let trust = Trust::new(vec![self.ca.cert.clone()]);
        let rules = Firewall::load(KBS_RULES).map_err(|e| format!("broker rules: {e}"))?;
        let gate = Arc::new(MeshGate::new(trust.clone(), rules));
        // A real deployment gives the broker an intermediate CA limited to the guests' network.
        let _ = kbs.guest_issuer.set(GuestIssuer::new(
            self.ca.cert.clone(),
            self.ca.key.clone(),
            86_400,
        ));
        let endpoint = server_endpoint(
            mesh_server_config(id.chain, id.key, trust)?,
            (Ipv4Addr::LOCALHOST, 0).into(),
        )
        .map_err(|e| e.to_string())?;
        let addr = endpoint.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(serve_with(endpoint, kbs.clone(), now, Some(gate)));
        Ok(Broker {
            addr,
            server_name: KBS_NAME.into(),
            ca_der: self.ca.cert.der.clone(),
            response_key: kbs.response_key.public(),
        })
    }

    /// An attested guest joins: its key (born in the guest) and the certificate the broker
    /// issued for it go to tmpfs, and a mesh node starts with its tenant's rules.
    pub async fn join(
        &mut self,
        vm_id: &str,
        key: &MeshKey,
        cert_der: &[u8],
    ) -> Result<&Guest, String> {
        let cert = MeshCert::parse(cert_der).map_err(|e| format!("{vm_id}: {e}"))?;
        let tenant = cert
            .claims
            .groups
            .iter()
            .find_map(|g| g.strip_prefix("tenant:"))
            .ok_or_else(|| format!("{vm_id}: the broker's certificate names no tenant"))?
            .to_string();
        let ip = *cert
            .addrs()
            .first()
            .ok_or_else(|| format!("{vm_id}: the broker's certificate names no address"))?;
        let d = self.shm.0.join(vm_id);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        write_secret(&d.join("node.key"), key.pem().as_bytes())?;
        std::fs::write(
            d.join("node.crt"),
            snp::certs::pem_encode("CERTIFICATE", cert_der),
        )
        .map_err(io(&d))?;
        let cfg = self.node_config(
            NodeFiles {
                dir: &d,
                rules: &guest_rules(&tenant),
                lighthouse: false,
            },
            (Ipv4Addr::LOCALHOST, 0).into(),
        )?;
        let node = Node::start(cfg, vec![])
            .await
            .map_err(|e| format!("{vm_id} on the mesh: {e}"))?;
        self.guests.push(Guest {
            vm_id: vm_id.into(),
            tenant,
            ip,
            cert,
            node,
        });
        self.guests
            .last()
            .ok_or_else(|| "no guest joined".to_string())
    }

    /// The operator revokes `cert` (list number `number`, signed by the mesh CA) by dropping
    /// the list on the first lighthouse, which pushes it to every node.
    pub fn revoke(&self, cert: &MeshCert, number: u64) -> Result<(), String> {
        let body = Body {
            v: 1,
            ca: self.ca.cert.name.clone(),
            number,
            issued_at: now(),
            serials: vec![SerialEntry {
                issuer: cert.issuer.clone(),
                serial: hex::encode(&cert.serial),
            }],
            keys: vec![hex::encode(cert.key_hash)],
        };
        let bytes = mesh::revocation::sign(&self.ca.cert, &self.ca.key, &body)
            .map_err(|e| e.to_string())?;
        let p = self.dir.join("lighthouse-1").join("revocation.json");
        // Written beside, then renamed: the lighthouse never reads half a list.
        let tmp = p.with_extension("new");
        std::fs::write(&tmp, &bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))
    }

    pub fn lighthouses(&self) -> usize {
        self.lighthouse_nodes.len()
    }

    pub async fn shutdown(self) {
        for g in &self.guests {
            g.node.shutdown().await;
        }
        for n in &self.lighthouse_nodes {
            n.shutdown().await;
        }
    }
}

fn write_secret(p: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io(p))
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
        Ok(()) => Reach::Reached,
        Err(e) => match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code.into_inner() == u64::from(close::DENIED) =>
            {
                Reach::Denied
            }
            Ok(other) => Reach::Refused(other.to_string()),
            Err(_) => Reach::Refused(e),
        },
    }
}

/// [`reach`], retried for up to `within` while the peer is not yet known (a guest that has just
/// announced itself); a firewall denial is final.
pub async fn reach_within(from: &Node, to: IpAddr, within: Duration) -> Reach {
    let end = Instant::now() + within;
    loop {
        let r = reach(from, to).await;
        if matches!(r, Reach::Reached | Reach::Denied) || Instant::now() >= end {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn echo(conn: &quinn::Connection) -> Result<(), String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    s.write_all(b"attesta").await.map_err(|e| e.to_string())?;
    let _ = s.finish();
    let back = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(64))
        .await
        .map_err(|_| "no echo within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    if back == b"attesta" {
        Ok(())
    } else {
        Err("the echo differs".into())
    }
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

/// How long until `conn` is closed with `code`, if within `limit`.
pub async fn closed_with(conn: &quinn::Connection, code: u32, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    match tokio::time::timeout(limit, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code.into_inner() == u64::from(code) =>
        {
            Some(t0.elapsed())
        }
        _ => None,
    }
}
