//! The mesh node: the thin IO shell (tokio, quinn) around the sans-IO cores — certificates,
//! firewall, revocation lists, announcements. One QUIC endpoint per node serves the control
//! protocol (lighthouse duties, revocation distribution) and the services registered by ALPN,
//! and dials other nodes by overlay address.
//!
//! What it does on its own, without restarts:
//! - every `reload_ms` it re-reads changed files: certificate and key (rotation, even to a new
//!   overlay address: the tun device moves and every connection is made again), the CA bundle
//!   (two roots during a rollover), the firewall rules (a file whose tests fail is refused and
//!   the old rules stay) and the revocation list;
//! - after any change of trust or rules, and every second for expiry, it re-checks every live
//!   connection and closes those whose peer is now revoked, expired or no longer allowed, and
//!   everything but the control service when its revocation list is older than the maximum age;
//! - it keeps a connection to each lighthouse, announces its underlay addresses there, fetches
//!   revocation lists, and takes pushed ones; a lighthouse replicates announcements and lists to
//!   the other lighthouses and pushes lists to every node connected to it.

use crate::Locked;
use crate::cert::{MeshCert, parse_bundle, sign_with};
use crate::firewall::{Firewall, Peer, Service as FwService, Verdict};
use crate::lighthouse::{self, CONTROL_ALPN, Directory, Msg};
use crate::transport::{Identity, Trust, client_tls, server_tls};
use crate::unix_now as now;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use zeroize::Zeroizing;

/// QUIC close codes a peer sees.
pub mod close {
    pub const DENIED: u32 = 0x10;
    pub const REVOKED: u32 = 0x11;
    pub const STALE: u32 = 0x12;
    pub const SHUTDOWN: u32 = 0x13;
    pub const ANONYMOUS: u32 = 0x14;
    /// This node's overlay address changed (a rotated certificate): reconnect to reach it.
    pub const READDRESSED: u32 = 0x15;
}

/// The node's configuration file (TOML). Relative paths are relative to the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's certificate chain (leaf first) and key, as `cert sign` writes them.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Trusted CA roots; two during a rollover.
    pub ca: PathBuf,
    /// Firewall rules (default deny; see `firewall`).
    pub rules: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Underlay addresses to announce (default: the bound listen address).
    #[serde(default)]
    pub advertise: Vec<SocketAddr>,
    /// Serve as a lighthouse (the certificate's role must be lighthouse).
    #[serde(default)]
    pub lighthouse: bool,
    /// Overlay addresses of the lighthouses; their underlay addresses come from `static_hosts`.
    #[serde(default)]
    pub lighthouses: Vec<IpAddr>,
    /// Overlay address → underlay addresses: the lighthouses', and a fallback for any node.
    #[serde(default)]
    pub static_hosts: BTreeMap<IpAddr, Vec<SocketAddr>>,
    /// Where the newest revocation list is kept: read at start and when it changes (an
    /// operator drops a new list on a lighthouse here), written when one arrives from the mesh.
    pub revocation: Option<PathBuf>,
    /// Fail closed when the newest revocation list is older than this ("2h", "1d").
    pub revocation_max_age: Option<String>,
    /// Seconds between announcements.
    #[serde(default = "default_announce")]
    pub announce_secs: u64,
    /// Milliseconds between checks of the files and of live connections.
    #[serde(default = "default_reload")]
    pub reload_ms: u64,
    /// Announce this node's underlay addresses to the lighthouses (off for one-shot clients
    /// such as `attesta-mesh ping`, which must not displace the node's own entry).
    #[serde(default = "yes")]
    pub announce: bool,
    /// Carry IP packets: a tun device with this node's overlay address, packets in QUIC
    /// datagrams to the peer holding the destination, judged packet by packet by the rules.
    pub tun: Option<TunConfig>,
    /// Serve the echo service (`attesta-echo/1`) to peers the rules allow: `attesta-mesh ping`.
    #[serde(default)]
    pub echo: bool,
}

/// The overlay's tun device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunConfig {
    #[serde(default = "default_tun_name")]
    pub name: String,
    /// Must fit in one QUIC datagram (the transport starts at 1400-byte UDP payloads).
    #[serde(default = "default_tun_mtu")]
    pub mtu: u16,
}

fn default_tun_name() -> String {
    "mesh0".into()
}
fn default_tun_mtu() -> u16 {
    1300
}

fn default_announce() -> u64 {
    30
}
fn default_reload() -> u64 {
    1000
}
fn yes() -> bool {
    true
}

/// Why a node could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("identity: {0}")]
    Identity(String),
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("no underlay address is known for {0} (no lighthouse knows it, no static host)")]
    Unresolved(IpAddr),
    #[error("connect to {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    #[error("control: {0}")]
    Control(String),
}

impl NodeConfig {
    /// Reads a configuration file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::File {
            path: path.into(),
            why: e.to_string(),
        })?;
        let mut c: NodeConfig = toml::from_str(&text).map_err(|e| NodeError::File {
            path: path.into(),
            why: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.cert, &mut c.key, &mut c.ca, &mut c.rules] {
            *p = base.join(&*p);
        }
        if let Some(r) = &mut c.revocation {
            *r = base.join(&*r);
        }
        Ok(c)
    }
}

/// Who is on the other end of a connection, from the verified handshake.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// None: an anonymous client (only services that allow it).
    pub cert: Option<MeshCert>,
    pub chain: Vec<CertificateDer<'static>>,
    pub remote: SocketAddr,
    pub service: Vec<u8>,
    pub inbound: bool,
}

impl PeerInfo {
    fn firewall_peer(&self) -> Option<Peer> {
        self.cert.as_ref().map(Peer::from_cert)
    }

    pub fn name(&self) -> &str {
        self.cert
            .as_ref()
            .map_or("(anonymous)", |c| c.name.as_str())
    }
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// Serves one admitted bidirectional stream.
pub type Handler = Arc<dyn Fn(Arc<PeerInfo>, SendStream, RecvStream) -> BoxFuture + Send + Sync>;

/// A service offered on the mesh, selected by ALPN and admitted by the firewall.
#[derive(Clone)]
pub struct Service {
    pub alpn: Vec<u8>,
    pub handler: Handler,
    /// Admit clients without a mesh certificate (the KBS's attestation service only).
    pub anonymous: bool,
}

pub const ECHO_ALPN: &[u8] = b"attesta-echo/1";
/// Overlay IP packets, in QUIC datagrams.
pub const OVERLAY_ALPN: &[u8] = b"attesta-overlay/1";

/// The client side of [`echo_service`]: one round trip of `probe` on a new stream of `conn`,
/// answered within `within`. Errors say why (a refusal carries the peer's close reason).
pub async fn echo_once(
    conn: &quinn::Connection,
    probe: &[u8],
    within: std::time::Duration,
) -> Result<(), String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| format!("refused: {e}"))?;
    s.write_all(probe)
        .await
        .map_err(|e| format!("refused: {e}"))?;
    let _ = s.finish();
    let back = tokio::time::timeout(within, r.read_to_end(probe.len().max(64)))
        .await
        .map_err(|_| format!("no echo within {within:?}"))?
        .map_err(|e| format!("refused: {e}"))?;
    if back == probe {
        Ok(())
    } else {
        Err("the echo did not match".into())
    }
}

/// Copies each stream back to its sender: connectivity checks and benchmarks.
pub fn echo_service() -> Service {
    Service {
        alpn: ECHO_ALPN.to_vec(),
        anonymous: false,
        handler: Arc::new(|_peer, mut send, mut recv| {
            Box::pin(async move {
                let _ = tokio::io::copy(&mut recv, &mut send).await;
                let _ = send.finish();
            })
        }),
    }
}

struct Me {
    chain: Vec<CertificateDer<'static>>,
    key_pem: Zeroizing<String>,
    leaf: MeshCert,
}

impl Me {
    fn identity(&self) -> Result<Identity, NodeError> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| NodeError::Identity(e.to_string()))?;
        Ok(Identity {
            chain: self.chain.clone(),
            key,
        })
    }
}

struct Live {
    conn: Connection,
    peer: Arc<PeerInfo>,
}

struct Inner {
    cfg: NodeConfig,
    endpoint: Endpoint,
    trust: Arc<Trust>,
    firewall: RwLock<Arc<Firewall>>,
    me: RwLock<Arc<Me>>,
    services: HashMap<Vec<u8>, Service>,
    live: Mutex<HashMap<usize, Live>>,
    directory: Mutex<Directory>,
    /// Our connections to lighthouses, by overlay address.
    lighthouse_conns: Mutex<HashMap<IpAddr, Connection>>,
    stamps: Mutex<crate::watch::FileStamps>,
    /// Set when trust or rules change: re-check every live connection.
    changed: tokio::sync::Notify,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    tun: Option<Arc<tokio_tun::Tun>>,
    /// Overlay connections by the peer's overlay address.
    overlay: Mutex<HashMap<IpAddr, Connection>>,
    dialing: Mutex<std::collections::HashSet<IpAddr>>,
    flows: Mutex<crate::packet::Flows>,
    advertise: Vec<SocketAddr>,
    max_age: Option<u64>,
    /// The newest time this node put in an announcement, and the earliest the next may carry:
    /// a lighthouse keeps only a strictly newer announcement per name (seconds), so one made
    /// after a rotation in the same second as the last must still count as newer.
    announced_at: std::sync::atomic::AtomicU64,
    announce_floor: std::sync::atomic::AtomicU64,
}

/// A running node. Dropping it does not stop it: call [`Node::shutdown`].
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|e| NodeError::File {
        path: path.into(),
        why: e.to_string(),
    })
}

/// Reads and checks the CA bundle, certificate and key as one unit: the certificate must
/// verify under the bundle and the key must be the certificate's.
fn load_identity(cfg: &NodeConfig) -> Result<(Vec<MeshCert>, Me), NodeError> {
    let ca_bytes = read_file(&cfg.ca)?;
    let roots = parse_bundle(&ca_bytes).map_err(|e| NodeError::File {
        path: cfg.ca.clone(),
        why: e.to_string(),
    })?;
    if let Some(r) = roots.iter().find(|r| !r.is_ca) {
        return Err(NodeError::File {
            path: cfg.ca.clone(),
            why: format!("{} is not a CA certificate", r.name),
        });
    }
    let cert_pem = read_file(&cfg.cert)?;
    let key_pem =
        Zeroizing::new(
            String::from_utf8(read_file(&cfg.key)?).map_err(|_| NodeError::File {
                path: cfg.key.clone(),
                why: "not PEM".into(),
            })?,
        );
    let id = Identity::from_pem(&cert_pem, key_pem.as_bytes()).map_err(NodeError::Identity)?;
    let chain = parse_bundle(&cert_pem).map_err(|e| NodeError::Identity(e.to_string()))?;
    let leaf = crate::cert::verify(&chain, &roots, now())
        .map_err(|e| NodeError::Identity(format!("this node's certificate: {e}")))?;
    sign_with(&leaf, &key_pem, b"attesta-mesh key check")
        .map_err(|e| NodeError::Identity(e.to_string()))?;
    if cfg.lighthouse && leaf.claims.role != Some(crate::cert::Role::Lighthouse) {
        return Err(NodeError::Identity(format!(
            "lighthouse = true needs a certificate with role lighthouse; {} has {:?}",
            leaf.name, leaf.claims.role
        )));
    }
    Ok((
        roots,
        Me {
            chain: id.chain,
            key_pem,
            leaf,
        },
    ))
}

fn load_rules(path: &Path) -> Result<Firewall, NodeError> {
    let text = String::from_utf8(read_file(path)?).map_err(|_| NodeError::File {
        path: path.into(),
        why: "not UTF-8".into(),
    })?;
    Firewall::load(&text).map_err(|e| NodeError::File {
        path: path.into(),
        why: e.to_string(),
    })
}

/// The overlay address (with prefix) the tun device carries: the certificate's first IPv4 one.
fn tun_net(leaf: &MeshCert) -> Result<ipnet::IpNet, NodeError> {
    leaf.ips
        .iter()
        .find(|n| n.addr().is_ipv4())
        .copied()
        .ok_or_else(|| NodeError::Config("the tun overlay needs an IPv4 overlay address".into()))
}

/// Moves the tun device to a rotated certificate's overlay address (Nebula refuses an address
/// change on reload; here it is a reload like any other).
fn readdress_tun(name: &str, old: ipnet::IpNet, new: ipnet::IpNet) -> Result<(), NodeError> {
    let ip = |args: &[&str]| -> Result<(), NodeError> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| NodeError::Config(format!("cannot run `ip` to re-address {name}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NodeError::Config(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    if old == new {
        return Ok(());
    }
    // The old one goes first: removing an interface's primary address also removes the
    // secondaries in its subnet, which the new one would be. If the new one cannot be added,
    // the old one is put back and the reload refused.
    ip(&["addr", "del", &old.to_string(), "dev", name])?;
    if let Err(e) = ip(&["addr", "add", &new.to_string(), "dev", name]) {
        let _ = ip(&["addr", "add", &old.to_string(), "dev", name]);
        return Err(e);
    }
    Ok(())
}

fn open_tun(t: &TunConfig, leaf: &MeshCert) -> Result<tokio_tun::Tun, NodeError> {
    let net = tun_net(leaf)?;
    let (IpAddr::V4(addr), IpAddr::V4(mask)) = (net.addr(), net.netmask()) else {
        return Err(NodeError::Config(
            "the tun overlay needs an IPv4 overlay address".into(),
        ));
    };
    let mut tuns = tokio_tun::Tun::builder()
        .name(&t.name)
        .mtu(i32::from(t.mtu))
        .address(addr)
        .netmask(mask)
        .up()
        .build()
        .map_err(|e| NodeError::Config(format!("cannot create tun device {:?}: {e}", t.name)))?;
    tuns.pop()
        .ok_or_else(|| NodeError::Config("no tun device was created".into()))
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Room for a 1300-byte overlay packet in one datagram from the first flight.
    t.initial_mtu(1400);
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

impl Node {
    /// Loads the identity, rules and revocation list, binds the endpoint and starts the
    /// node's tasks. Must be called inside a tokio runtime.
    pub async fn start(cfg: NodeConfig, services: Vec<Service>) -> Result<Node, NodeError> {
        let (roots, me) = load_identity(&cfg)?;
        let firewall = load_rules(&cfg.rules)?;
        let trust = Trust::new(roots);
        let max_age = match &cfg.revocation_max_age {
            Some(s) => Some(crate::parse_duration(s).map_err(NodeError::Config)?),
            None => None,
        };
        trust.set_max_age(max_age);
        if let Some(p) = &cfg.revocation
            && p.exists()
        {
            let bytes = read_file(p)?;
            match trust.install(&bytes, now()) {
                Ok(_) => {}
                // A delegated list kept by an older build: it comes back from the lighthouses.
                Err(e) if crate::revocation::peek(&bytes).is_some_and(|(_, _, root)| !root) => {
                    tracing::warn!(path = %p.display(), error = %e, "a delegated revocation list in the file is not used");
                }
                Err(e) => {
                    return Err(NodeError::File {
                        path: p.clone(),
                        why: e.to_string(),
                    });
                }
            }
        }
        let mut services: HashMap<Vec<u8>, Service> =
            services.into_iter().map(|s| (s.alpn.clone(), s)).collect();
        if cfg.echo {
            services.insert(ECHO_ALPN.to_vec(), echo_service());
        }
        let tun = match &cfg.tun {
            Some(t) => Some(Arc::new(open_tun(t, &me.leaf)?)),
            None => None,
        };
        let server = Self::server_config(&me, &trust, &services, tun.is_some())?;
        let endpoint = Endpoint::server(server, cfg.listen)?;
        let bound = endpoint.local_addr()?;
        let advertise = if cfg.advertise.is_empty() {
            vec![bound]
        } else {
            cfg.advertise.clone()
        };
        let stamps = crate::watch::FileStamps::new(
            [&cfg.cert, &cfg.key, &cfg.ca, &cfg.rules]
                .into_iter()
                .chain(cfg.revocation.as_ref())
                .map(|p| p.as_path()),
        );
        let inner = Arc::new(Inner {
            cfg,
            endpoint,
            trust,
            firewall: RwLock::new(Arc::new(firewall)),
            me: RwLock::new(Arc::new(me)),
            services,
            live: Mutex::new(HashMap::new()),
            directory: Mutex::new(Directory::new(600)),
            lighthouse_conns: Mutex::new(HashMap::new()),
            stamps: Mutex::new(stamps),
            changed: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
            tun,
            overlay: Mutex::new(HashMap::new()),
            dialing: Mutex::new(Default::default()),
            flows: Mutex::new(crate::packet::Flows::new(120, 65_536)),
            advertise,
            max_age,
            announced_at: Default::default(),
            announce_floor: Default::default(),
        });
        let node = Node { inner };
        let mut tasks = vec![
            tokio::spawn(node.clone().accept_loop()),
            tokio::spawn(node.clone().watch_loop()),
        ];
        let own = node.me().leaf.addrs();
        for lh in node.inner.cfg.lighthouses.clone() {
            // A lighthouse does not dial itself (a one-shot client with its files does).
            if !(node.inner.cfg.lighthouse && own.contains(&lh)) {
                tasks.push(tokio::spawn(node.clone().lighthouse_loop(lh)));
            }
        }
        if let Some(t) = node.inner.tun.clone() {
            tasks.push(tokio::spawn(node.clone().overlay_out(t)));
        }
        *node.inner.tasks.locked() = tasks;
        tracing::info!(
            name = %node.me().leaf.name,
            addr = %bound,
            lighthouse = node.inner.cfg.lighthouse,
            "mesh node up"
        );
        Ok(node)
    }

    fn server_config(
        me: &Me,
        trust: &Arc<Trust>,
        services: &HashMap<Vec<u8>, Service>,
        overlay: bool,
    ) -> Result<quinn::ServerConfig, NodeError> {
        let mut alpn: Vec<&[u8]> = vec![CONTROL_ALPN];
        if overlay {
            alpn.push(OVERLAY_ALPN);
        }
        alpn.extend(services.keys().map(|k| k.as_slice()));
        let anonymous = services.values().any(|s| s.anonymous);
        let tls = server_tls(me.identity()?, trust.clone(), !anonymous, &alpn)
            .map_err(NodeError::Identity)?;
        let q = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| NodeError::Identity(e.to_string()))?;
        let mut c = quinn::ServerConfig::with_crypto(Arc::new(q));
        c.transport_config(Arc::new(transport()));
        Ok(c)
    }

    fn me(&self) -> Arc<Me> {
        self.inner
            .me
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn rules(&self) -> Arc<Firewall> {
        self.inner
            .firewall
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, NodeError> {
        Ok(self.inner.endpoint.local_addr()?)
    }

    /// This node's current certificate.
    pub fn cert(&self) -> MeshCert {
        self.me().leaf.clone()
    }

    pub fn trust(&self) -> Arc<Trust> {
        self.inner.trust.clone()
    }

    /// Live connections: (peer name, service, inbound).
    pub fn peers(&self) -> Vec<(String, String, bool)> {
        let live = self.inner.live.locked();
        let mut v: Vec<_> = live
            .values()
            .map(|l| {
                (
                    l.peer.name().to_string(),
                    String::from_utf8_lossy(&l.peer.service).into_owned(),
                    l.peer.inbound,
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Names in this lighthouse's directory.
    pub fn directory_len(&self) -> usize {
        self.inner.directory.locked().len()
    }

    /// Closes every connection and the endpoint.
    pub async fn shutdown(&self) {
        for t in self.inner.tasks.locked().drain(..) {
            t.abort();
        }
        self.inner
            .endpoint
            .close(close::SHUTDOWN.into(), b"shutting down");
        self.inner.endpoint.wait_idle().await;
    }

    /// Admission of a connection or stream: control needs a certificate and nothing else
    /// (so a node whose list is stale can still fetch a new one); an anonymous client only
    /// reaches services that allow it; everything else needs a fresh revocation list and a
    /// firewall rule.
    fn admit(&self, peer: &PeerInfo) -> Result<(), (u32, String)> {
        if peer.service == CONTROL_ALPN {
            return if peer.cert.is_some() {
                Ok(())
            } else {
                Err((
                    close::ANONYMOUS,
                    "the control service needs a certificate".into(),
                ))
            };
        }
        // Overlay connections are judged packet by packet.
        if !peer.inbound || peer.service == OVERLAY_ALPN {
            if peer.cert.is_none() {
                return Err((close::ANONYMOUS, "the overlay needs a certificate".into()));
            }
            return self
                .inner
                .trust
                .fresh(now())
                .map_err(|why| (close::STALE, why));
        }
        let Some(fw_peer) = peer.firewall_peer() else {
            return match self.inner.services.get(&peer.service) {
                Some(s) if s.anonymous => Ok(()),
                _ => Err((close::ANONYMOUS, "this service needs a certificate".into())),
            };
        };
        self.inner
            .trust
            .fresh(now())
            .map_err(|why| (close::STALE, why))?;
        let service = FwService::Named(String::from_utf8_lossy(&peer.service).into_owned());
        match self.rules().decide(&fw_peer, &service) {
            Verdict::Allow { .. } => Ok(()),
            Verdict::Deny => Err((
                close::DENIED,
                format!(
                    "the firewall denies {} access to {}",
                    fw_peer.name,
                    String::from_utf8_lossy(&peer.service)
                ),
            )),
        }
    }

    fn register(&self, conn: &Connection, peer: Arc<PeerInfo>) {
        self.inner.live.locked().insert(
            conn.stable_id(),
            Live {
                conn: conn.clone(),
                peer,
            },
        );
    }

    fn unregister(&self, conn: &Connection) {
        self.inner.live.locked().remove(&conn.stable_id());
    }

    fn peer_info(conn: &Connection, inbound: bool) -> PeerInfo {
        let service = conn
            .handshake_data()
            .and_then(|h| {
                h.downcast::<quinn::crypto::rustls::HandshakeData>()
                    .ok()
                    .and_then(|h| h.protocol)
            })
            .unwrap_or_default();
        let chain: Vec<CertificateDer<'static>> = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|b| *b)
            .unwrap_or_default();
        PeerInfo {
            cert: crate::transport::peer(Some(&chain)),
            chain,
            remote: conn.remote_address(),
            service,
            inbound,
        }
    }

    async fn accept_loop(self) {
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let node = self.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                node.serve(conn).await;
            });
        }
    }

    async fn serve(self, conn: Connection) {
        let peer = Arc::new(Self::peer_info(&conn, true));
        if let Err((code, why)) = self.admit(&peer) {
            tracing::info!(peer = peer.name(), %why, "connection refused");
            conn.close(code.into(), why.as_bytes());
            return;
        }
        self.register(&conn, peer.clone());
        if peer.service == OVERLAY_ALPN {
            self.clone().overlay_in(conn.clone(), peer).await;
            self.unregister(&conn);
            return;
        }
        if peer.service == CONTROL_ALPN {
            tokio::spawn(self.clone().take_pushes(conn.clone()));
            // Everything a lighthouse holds, one list per stream: a reply to a pull carries
            // only what fits one message.
            if self.inner.cfg.lighthouse {
                self.push_to(&conn, self.inner.trust.lists());
            }
        }
        loop {
            let Ok((send, recv)) = conn.accept_bi().await else {
                break;
            };
            if peer.service == CONTROL_ALPN {
                tokio::spawn(self.clone().control(peer.clone(), send, recv));
                continue;
            }
            // The rules may have changed since the connection was admitted.
            if let Err((code, why)) = self.admit(&peer) {
                tracing::info!(peer = peer.name(), %why, "stream refused");
                let mut send = send;
                let mut recv = recv;
                let _ = send.reset(code.into());
                let _ = recv.stop(code.into());
                continue;
            }
            if let Some(s) = self.inner.services.get(&peer.service) {
                tokio::spawn((s.handler)(peer.clone(), send, recv));
            }
        }
        self.unregister(&conn);
    }

    /// Packets from the tun device: to the peer holding the destination, dialling it first
    /// (the packet that caused the dial is sent once the connection is up).
    async fn overlay_out(self, tun: Arc<tokio_tun::Tun>) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let pkt = bytes::Bytes::copy_from_slice(&buf[..n]);
            let Ok(info) = crate::packet::parse(&pkt) else {
                continue;
            };
            self.inner.flows.locked().outbound(&info, now());
            let conn = self.inner.overlay.locked().get(&info.dst).cloned();
            if let Some(c) = conn {
                if let Err(e) = c.send_datagram(pkt) {
                    tracing::debug!(dst = %info.dst, error = %e, "overlay packet dropped");
                }
                continue;
            }
            let first = self.inner.dialing.locked().insert(info.dst);
            if first {
                let node = self.clone();
                tokio::spawn(async move {
                    tracing::debug!(dst = %info.dst, "dialling an overlay peer");
                    match node.connect(info.dst, OVERLAY_ALPN).await {
                        Ok(c) => {
                            tracing::debug!(dst = %info.dst, max = ?c.max_datagram_size(), "overlay peer connected");
                            let _ = c.send_datagram(pkt);
                            let peer = Arc::new(Self::peer_info(&c, false));
                            tokio::spawn(node.clone().overlay_in(c, peer));
                        }
                        Err(e) => {
                            tracing::info!(dst = %info.dst, error = %e, "overlay peer unreachable")
                        }
                    }
                    node.inner.dialing.locked().remove(&info.dst);
                });
            }
        }
    }

    /// Packets from a peer: its source must be one of the peer's own overlay addresses and the
    /// destination ours; the rules judge each one before it reaches the tun device.
    async fn overlay_in(self, conn: Connection, peer: Arc<PeerInfo>) {
        let (Some(tun), Some(cert), Some(fw_peer)) = (
            self.inner.tun.clone(),
            peer.cert.clone(),
            peer.firewall_peer(),
        ) else {
            return;
        };
        let theirs = cert.addrs();
        {
            let mut o = self.inner.overlay.locked();
            for ip in &theirs {
                o.insert(*ip, conn.clone());
            }
        }
        while let Ok(d) = conn.read_datagram().await {
            let Ok(info) = crate::packet::parse(&d) else {
                continue;
            };
            if !theirs.contains(&info.src) || !self.me().leaf.addrs().contains(&info.dst) {
                tracing::debug!(peer = peer.name(), src = %info.src, "spoofed overlay packet dropped");
                continue;
            }
            let reply = self.inner.flows.locked().is_reply(&info, now());
            if !reply && self.rules().decide(&fw_peer, &info.service()) == Verdict::Deny {
                tracing::debug!(peer = peer.name(), ?info, "overlay packet denied");
                continue;
            }
            if let Err(e) = tun.send(&d).await {
                tracing::debug!(error = %e, "tun write failed");
            }
        }
        let mut o = self.inner.overlay.locked();
        o.retain(|_, c| c.stable_id() != conn.stable_id());
    }

    /// Dials the node holding overlay address `ip` for `alpn`, verifying that its certificate
    /// holds that address. Underlay addresses come from the lighthouses (each answer checked
    /// here: its announcement is signed by the node itself), then the static host map.
    pub async fn connect(&self, ip: IpAddr, alpn: &[u8]) -> Result<Connection, NodeError> {
        self.inner
            .trust
            .fresh(now())
            .map_err(|why| NodeError::Control(format!("failing closed: {why}")))?;
        let mut addrs = self.resolve(ip).await;
        if addrs.is_empty() {
            addrs = self
                .inner
                .cfg
                .static_hosts
                .get(&ip)
                .cloned()
                .unwrap_or_default();
        }
        if addrs.is_empty() {
            return Err(NodeError::Unresolved(ip));
        }
        let mut last = NodeError::Unresolved(ip);
        for addr in addrs {
            match self.dial(addr, ip, alpn).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        ip: IpAddr,
        alpn: &[u8],
    ) -> Result<Connection, NodeError> {
        let me = self.me();
        let tls = client_tls(me.identity()?, self.inner.trust.clone(), alpn)
            .map_err(NodeError::Identity)?;
        let q = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| NodeError::Identity(e.to_string()))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(q));
        cc.transport_config(Arc::new(transport()));
        let err = |why: String| NodeError::Connect { addr, why };
        let conn = self
            .inner
            .endpoint
            .connect_with(cc, addr, &ip.to_string())
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        let peer = Arc::new(Self::peer_info(&conn, false));
        self.register(&conn, peer);
        let node = self.clone();
        let c2 = conn.clone();
        tokio::spawn(async move {
            c2.closed().await;
            node.unregister(&c2);
        });
        Ok(conn)
    }

    async fn resolve(&self, ip: IpAddr) -> Vec<SocketAddr> {
        if self.inner.cfg.lighthouse {
            let dir = self.inner.directory.locked();
            if let Some(a) = dir.by_ip(ip, now()) {
                return a.addrs.clone();
            }
        }
        let conns: Vec<Connection> = self
            .inner
            .lighthouse_conns
            .locked()
            .values()
            .cloned()
            .collect();
        for c in conns {
            let Ok(Msg::Found { doc }) = request(&c, &Msg::Query { ip }).await else {
                continue;
            };
            match lighthouse::verify(&doc, &self.inner.trust, now()) {
                Ok(a) if a.overlay.contains(&ip) => return a.addrs,
                Ok(_) => tracing::warn!(%ip, "a lighthouse answered with another node"),
                Err(e) => tracing::warn!(%ip, error = %e, "a lighthouse's answer is refused"),
            }
        }
        Vec::new()
    }

    /// Serves one control request.
    async fn control(self, peer: Arc<PeerInfo>, mut send: SendStream, mut recv: RecvStream) {
        let reply = match read_msg(&mut recv).await {
            Ok(m) => self.handle(&peer, m).await,
            Err(e) => Msg::Error { why: e },
        };
        if let Ok(b) = reply.encode() {
            let _ = send.write_all(&b).await;
        }
        let _ = send.finish();
    }

    async fn handle(&self, peer: &PeerInfo, m: Msg) -> Msg {
        let lighthouse = self.inner.cfg.lighthouse;
        match m {
            Msg::Announce { doc } if lighthouse => {
                match lighthouse::verify(&doc, &self.inner.trust, now()) {
                    Ok(a) => {
                        let name = a.name.clone();
                        let changed = self.inner.directory.locked().insert(a);
                        if changed {
                            tracing::debug!(node = %name, via = peer.name(), "announcement");
                            self.relay_to_lighthouses(Msg::Announce { doc });
                        }
                        Msg::Ok
                    }
                    Err(e) => Msg::Error { why: e.to_string() },
                }
            }
            Msg::Query { ip } if lighthouse => {
                let dir = self.inner.directory.locked();
                match dir.by_ip(ip, now()) {
                    Some(a) => Msg::Found { doc: a.doc.clone() },
                    None => Msg::NotFound,
                }
            }
            Msg::Dump if lighthouse => {
                match lighthouse::may_dump(peer.cert.as_ref().and_then(|c| c.claims.role)) {
                    Ok(()) => Msg::Entries {
                        docs: self.inner.directory.locked().docs(now()),
                    },
                    Err(e) => {
                        tracing::info!(peer = peer.name(), why = %e, "directory dump refused");
                        Msg::Error { why: e.to_string() }
                    }
                }
            }
            Msg::GetRevocations => {
                let (docs, left_out) = within_message(self.inner.trust.lists());
                if left_out > 0 {
                    // Pushed one by one when they change; a pull carries what fits.
                    tracing::warn!(
                        left_out,
                        "revocation lists left out of a reply: more than one message holds"
                    );
                }
                Msg::Revocations { docs }
            }
            Msg::Revocations { docs } => {
                self.take_lists(&docs);
                Msg::Ok
            }
            _ => Msg::Error {
                why: "not served here".into(),
            },
        }
    }

    /// Publishes a signed revocation list made here (a broker's delegated list for the guests
    /// it certified): sends it to every lighthouse this node is connected to, which push it on
    /// to every node, and installs it here (re-checking live connections; a root's list is also
    /// kept in the `revocation` file). Ok(false):
    /// that number was held already (sent again all the same: sending is idempotent).
    pub fn publish(&self, list: &[u8]) -> Result<bool, crate::revocation::RevocationError> {
        // Sent on whatever this node makes of it (a node full of other CAs' lists may refuse
        // to hold it; the lighthouses judge for themselves).
        self.relay_to_lighthouses(Msg::Revocations {
            docs: vec![String::from_utf8_lossy(list).into_owned()],
        });
        let newer = self.inner.trust.install(list, now())?;
        if newer {
            self.keep(list);
            self.inner.changed.notify_one();
            if self.inner.cfg.lighthouse {
                self.push_lists(vec![list.to_vec()]);
            }
        }
        Ok(newer)
    }

    /// Installs lists that verify and are newer; keeps them on disk, re-checks live
    /// connections, and (a lighthouse) pushes them on.
    fn take_lists(&self, docs: &[String]) {
        let mut newer = Vec::new();
        for d in docs {
            match self.inner.trust.install(d.as_bytes(), now()) {
                Ok(true) => {
                    newer.push(d.as_bytes().to_vec());
                    self.keep(d.as_bytes());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "revocation list refused"),
            }
        }
        if !newer.is_empty() {
            tracing::info!(lists = ?self.inner.trust.list_summary(), "revocation list installed");
            self.inner.changed.notify_one();
            if self.inner.cfg.lighthouse {
                self.push_lists(newer);
            }
        }
    }

    /// Keeps a root's list in the `revocation` file (what a restart starts from). Delegated
    /// lists are not kept there: the file holds one list, the root's, and they come back from
    /// the lighthouses.
    fn keep(&self, list: &[u8]) {
        if let (Some(p), Some((_, _, true))) =
            (&self.inner.cfg.revocation, crate::revocation::peek(list))
        {
            persist(p, list);
        }
    }

    /// A lighthouse pushes lists it has just installed to every node connected for control
    /// (both directions).
    fn push_lists(&self, lists: Vec<Vec<u8>>) {
        for conn in self.control_conns(|_| true) {
            self.push_to(&conn, lists.clone());
        }
    }

    /// Pushes `lists` to one peer, one list per stream, so that no number of lists outgrows a
    /// message.
    fn push_to(&self, conn: &Connection, lists: Vec<Vec<u8>>) {
        let frames: Vec<Vec<u8>> = lists
            .into_iter()
            .filter_map(|b| {
                Msg::Revocations {
                    docs: vec![String::from_utf8_lossy(&b).into_owned()],
                }
                .encode()
                .ok()
            })
            .collect();
        if frames.is_empty() {
            return;
        }
        let conn = conn.clone();
        tokio::spawn(async move {
            for frame in frames {
                if let Ok(mut s) = conn.open_uni().await {
                    let _ = s.write_all(&frame).await;
                    let _ = s.finish();
                }
            }
        });
    }

    /// One exchange of lists with a lighthouse: take what it holds, then send what it lacks or
    /// holds older (a list published here while it was out of reach, or a send that was
    /// lost), one list per request.
    async fn sync_lists(&self, conn: &Connection) {
        if let Ok(Msg::Revocations { docs }) = request(conn, &Msg::GetRevocations).await {
            self.take_lists(&docs);
            for doc in missing_from(&docs, self.inner.trust.lists()) {
                let _ = request(conn, &Msg::Revocations { docs: vec![doc] }).await;
            }
        }
    }

    fn control_conns(&self, f: impl Fn(&PeerInfo) -> bool) -> Vec<Connection> {
        self.inner
            .live
            .locked()
            .values()
            .filter(|l| l.peer.service == CONTROL_ALPN && f(&l.peer))
            .map(|l| l.conn.clone())
            .collect()
    }

    fn relay_to_lighthouses(&self, m: Msg) {
        let conns = self.control_conns(|p| {
            p.cert
                .as_ref()
                .is_some_and(|c| c.claims.role == Some(crate::cert::Role::Lighthouse))
        });
        for c in conns {
            let m = m.clone();
            tokio::spawn(async move {
                let _ = request(&c, &m).await;
            });
        }
    }

    /// Pushed messages (revocation lists) on a control connection.
    async fn take_pushes(self, conn: Connection) {
        while let Ok(mut recv) = conn.accept_uni().await {
            let node = self.clone();
            tokio::spawn(async move {
                if let Ok(Msg::Revocations { docs }) = read_msg(&mut recv).await {
                    node.take_lists(&docs);
                }
            });
        }
    }

    /// Keeps a control connection to one lighthouse: announce, fetch lists, take pushes;
    /// reconnects with backoff when it drops.
    async fn lighthouse_loop(self, lh: IpAddr) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let addrs = self
                .inner
                .cfg
                .static_hosts
                .get(&lh)
                .cloned()
                .unwrap_or_default();
            let mut conn = None;
            for a in addrs {
                match self.dial(a, lh, CONTROL_ALPN).await {
                    Ok(c) => {
                        conn = Some(c);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(lighthouse = %lh, error = %e, "lighthouse unreachable")
                    }
                }
            }
            let Some(conn) = conn else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            backoff = Duration::from_millis(500);
            self.inner
                .lighthouse_conns
                .locked()
                .insert(lh, conn.clone());
            tokio::spawn(self.clone().take_pushes(conn.clone()));
            self.sync_lists(&conn).await;
            if self.inner.cfg.lighthouse
                && let Ok(Msg::Entries { docs }) = request(&conn, &Msg::Dump).await
            {
                let mut dir = self.inner.directory.locked();
                for d in docs {
                    if let Ok(a) = lighthouse::verify(&d, &self.inner.trust, now()) {
                        dir.insert(a);
                    }
                }
            }
            loop {
                if self.inner.cfg.announce {
                    self.announce_to(&conn, lh).await;
                }
                tokio::select! {
                    _ = conn.closed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(self.inner.cfg.announce_secs.max(1))) => {}
                }
                // Pull as well as push (a list pushed while this connection was down arrives
                // here), and make good what the lighthouse lacks.
                self.sync_lists(&conn).await;
            }
            self.inner.lighthouse_conns.locked().remove(&lh);
            tracing::info!(lighthouse = %lh, "lighthouse connection lost; reconnecting");
        }
    }

    async fn announce_to(&self, conn: &Connection, lh: IpAddr) {
        use std::sync::atomic::Ordering::SeqCst;
        let me = self.me();
        let at = now().max(self.inner.announce_floor.load(SeqCst));
        self.inner.announced_at.fetch_max(at, SeqCst);
        match lighthouse::announce(&me.chain, &me.key_pem, &self.inner.advertise, at) {
            Ok(doc) => {
                if let Ok(Msg::Error { why }) = request(conn, &Msg::Announce { doc }).await {
                    tracing::warn!(lighthouse = %lh, %why, "announcement refused");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot sign an announcement"),
        }
    }

    /// Reloads changed files and re-checks live connections, every `reload_ms` and whenever
    /// trust changes.
    async fn watch_loop(self) {
        let every = Duration::from_millis(self.inner.cfg.reload_ms.max(50));
        let mut seen = self.inner.trust.generation();
        let mut last_full = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.inner.changed.notified() => {}
            }
            let rules_changed = self.reload();
            let g = self.inner.trust.generation();
            let t = now();
            // Everything on change; expiry and staleness at least once a second.
            if g != seen || rules_changed || t != last_full {
                self.sweep();
                seen = g;
                last_full = t;
            }
        }
    }

    fn changed_files(&self, paths: &[&PathBuf]) -> bool {
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        self.inner.stamps.locked().changed(&paths)
    }

    /// Returns whether the rules changed.
    fn reload(&self) -> bool {
        let cfg = &self.inner.cfg;
        if self.changed_files(&[&cfg.cert, &cfg.key, &cfg.ca]) {
            match load_identity(cfg).and_then(|(roots, me)| {
                let server = Self::server_config(
                    &me,
                    &self.inner.trust,
                    &self.inner.services,
                    self.inner.tun.is_some(),
                )?;
                Ok((roots, me, server))
            }) {
                Ok((roots, me, server)) => {
                    let old = self.me().leaf.clone();
                    let moved = old.addrs() != me.leaf.addrs();
                    if moved && let Err(e) = self.move_tun(&old, &me.leaf) {
                        tracing::error!(error = %e, "reload refused; keeping the current identity");
                        return false;
                    }
                    tracing::info!(
                        name = %me.leaf.name,
                        roots = roots.len(),
                        addrs = ?me.leaf.addrs(),
                        "identity and CA bundle reloaded"
                    );
                    self.inner.trust.set_roots(roots);
                    self.inner.endpoint.set_server_config(Some(server));
                    *self.inner.me.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(me);
                    // The next announcement (with the new certificate) supersedes every earlier one.
                    let last = self
                        .inner
                        .announced_at
                        .load(std::sync::atomic::Ordering::SeqCst);
                    self.inner
                        .announce_floor
                        .store(last.saturating_add(1), std::sync::atomic::Ordering::SeqCst);
                    if moved {
                        self.readdressed();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; keeping the current identity")
                }
            }
        }
        if let Some(p) = cfg.revocation.as_ref()
            && self.changed_files(&[p])
            && let Ok(b) = std::fs::read(p)
        {
            self.take_lists(&[String::from_utf8_lossy(&b).into_owned()]);
        }
        if self.changed_files(&[&cfg.rules]) {
            match load_rules(&cfg.rules) {
                Ok(fw) => {
                    tracing::info!(rules = fw.rules(), "firewall rules reloaded");
                    *self
                        .inner
                        .firewall
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = Arc::new(fw);
                    return true;
                }
                Err(e) => tracing::error!(error = %e, "rules refused; keeping the current rules"),
            }
        }
        false
    }

    /// The tun device follows a rotated certificate's overlay address.
    fn move_tun(&self, old: &MeshCert, new: &MeshCert) -> Result<(), NodeError> {
        let Some(tun) = &self.inner.tun else {
            return Ok(());
        };
        readdress_tun(tun.name(), tun_net(old)?, tun_net(new)?)
    }

    /// After an address change every peer (and lighthouse) holds our old certificate and
    /// address: close every connection so each is made again with the new identity, and the
    /// lighthouses hear the new address at once.
    fn readdressed(&self) {
        let why = b"the peer's overlay address changed";
        let mut conns: Vec<Connection> = self
            .inner
            .live
            .locked()
            .drain()
            .map(|(_, l)| l.conn)
            .collect();
        conns.extend(self.inner.overlay.locked().drain().map(|(_, c)| c));
        conns.extend(self.inner.lighthouse_conns.locked().drain().map(|(_, c)| c));
        tracing::info!(
            connections = conns.len(),
            "overlay address changed: reconnecting"
        );
        for c in conns {
            c.close(close::READDRESSED.into(), why);
        }
    }

    /// Closes live connections that would not be admitted now.
    fn sweep(&self) {
        let t = now();
        self.inner.trust.prune(t);
        let live: Vec<(Connection, Arc<PeerInfo>)> = self
            .inner
            .live
            .locked()
            .values()
            .map(|l| (l.conn.clone(), l.peer.clone()))
            .collect();
        for (conn, peer) in live {
            let verdict = match peer.chain.split_first() {
                Some((leaf, rest)) => self
                    .inner
                    .trust
                    .check(leaf, rest, t)
                    .map(|_| ())
                    .map_err(|why| (close::REVOKED, why))
                    .and_then(|_| self.admit(&peer)),
                None => self.admit(&peer),
            };
            if let Err((code, why)) = verdict {
                tracing::info!(peer = peer.name(), %why, "closing a live connection");
                conn.close(code.into(), why.as_bytes());
                self.unregister(&conn);
            }
        }
    }

    /// The configured maximum age of revocation lists, in seconds.
    pub fn max_age(&self) -> Option<u64> {
        self.inner.max_age
    }
}

/// Room for lists in one control message, with margin for the framing and JSON escaping.
const LISTS_PER_MESSAGE: usize = crate::lighthouse::MAX_MESSAGE - (256 << 10);

/// The lists (as [`Trust::lists`] orders them: roots first) that fit in one message, escaped
/// size counted, and how many were left out.
fn within_message(lists: Vec<Vec<u8>>) -> (Vec<String>, usize) {
    let mut used: usize = 0;
    let mut docs = Vec::new();
    let mut left_out = 0;
    for b in lists {
        let doc = String::from_utf8_lossy(&b).into_owned();
        // Each list is a JSON string inside the message: quotes and backslashes double.
        let size = serde_json::to_string(&doc).map_or(usize::MAX, |e| e.len());
        if used.saturating_add(size) <= LISTS_PER_MESSAGE {
            used += size;
            docs.push(doc);
        } else {
            left_out += 1;
        }
    }
    (docs, left_out)
}

/// Of `ours`, the lists a peer holding `theirs` lacks or holds an older number of.
fn missing_from(theirs: &[String], ours: Vec<Vec<u8>>) -> Vec<String> {
    let held: HashMap<String, u64> = theirs
        .iter()
        .filter_map(|d| crate::revocation::peek(d.as_bytes()))
        .map(|(id, number, _)| (id, number))
        .collect();
    ours.into_iter()
        .filter(|b| {
            crate::revocation::peek(b)
                .is_some_and(|(id, number, _)| held.get(&id).is_none_or(|&n| n < number))
        })
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

fn persist(path: &Path, bytes: &[u8]) {
    if let Err(e) = crate::watch::write_atomic(path, bytes) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the revocation list");
    }
}

async fn read_msg(recv: &mut RecvStream) -> Result<Msg, String> {
    let mut h = [0u8; 4];
    recv.read_exact(&mut h).await.map_err(|e| e.to_string())?;
    let n = Msg::frame_len(h).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Msg::decode(&body).map_err(|e| e.to_string())
}

/// One control request and its response.
pub async fn request(conn: &Connection, m: &Msg) -> Result<Msg, NodeError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| NodeError::Control(e.to_string()))?;
    let frame = m.encode().map_err(|e| NodeError::Control(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| NodeError::Control(e.to_string()))?;
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(10), read_msg(&mut recv))
        .await
        .map_err(|_| NodeError::Control("no answer within 10 s".into()))?
        .map_err(NodeError::Control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{Curve, Role};
    use crate::revocation::{Body, sign, sign_delegated};
    use crate::test_pki::{NOW, ca, local};

    fn body(ca: &str, number: u64, keys: usize) -> Body {
        Body {
            v: 1,
            ca: ca.into(),
            number,
            issued_at: NOW,
            serials: vec![],
            keys: (0..keys)
                .map(|i| hex::encode([(i % 251) as u8; 32]))
                .collect(),
        }
    }

    #[test]
    fn a_reply_carries_the_roots_list_first_and_what_fits() {
        let root = ca("root", Curve::Ed25519);
        let local = local(&root);
        // A root's list near its limit, then delegated ones near theirs: not all fit.
        let mut lists = vec![sign(&root.cert, &root.key, &body("root", 1, 14_000)).unwrap()];
        for i in 0..3 {
            let c = local
                .intermediate(
                    &format!("ca-{i}"),
                    &[],
                    &[Role::Guest],
                    &[],
                    NOW - 60,
                    NOW + 60,
                )
                .unwrap();
            lists.push(
                sign_delegated(&c.cert, &[], &c.key, &body(&format!("ca-{i}"), 1, 8_500)).unwrap(),
            );
        }
        let (docs, left_out) = within_message(lists.clone());
        assert_eq!(docs[0].as_bytes(), lists[0].as_slice(), "the root's first");
        assert!(left_out >= 1 && docs.len() + left_out == lists.len());
        let frame = Msg::Revocations { docs }.encode();
        assert!(frame.is_ok(), "what is sent fits one message");
        // A list alone always fits its own message (what a push sends).
        for l in &lists {
            let one = Msg::Revocations {
                docs: vec![String::from_utf8_lossy(l).into_owned()],
            };
            assert!(one.encode().is_ok());
        }
    }

    #[test]
    fn a_peer_is_sent_only_what_it_lacks_or_holds_older() {
        let root = ca("root", Curve::Ed25519);
        let l = |n| sign(&root.cert, &root.key, &body("root", n, 1)).unwrap();
        let s = |b: Vec<u8>| String::from_utf8(b).unwrap();
        assert_eq!(missing_from(&[], vec![l(1)]), [s(l(1))]);
        assert!(missing_from(&[s(l(2))], vec![l(2)]).is_empty(), "the same");
        assert!(
            missing_from(&[s(l(3))], vec![l(2)]).is_empty(),
            "newer there"
        );
        assert_eq!(missing_from(&[s(l(1))], vec![l(2)]), [s(l(2))]);
        assert!(missing_from(&[], vec![b"junk".to_vec()]).is_empty());
    }
}
