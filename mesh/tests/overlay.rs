//! The IP overlay for real: three network namespaces joined by veth pairs to a bridge (the
//! underlay), one `attesta-mesh node` process in each with a tun device (the overlay), PKI made
//! with the `attesta-mesh` CLI. Ping and a TCP transfer go between the two tenant:a nodes
//! through the overlay; the tenant:b node cannot reach them; a node rotated to a certificate with
//! another overlay address moves there without a restart; a revocation list dropped on the
//! lighthouse cuts the revoked node off. Needs root, /dev/net/tun and `ip netns`: skipped with
//! a message where they are missing, a failure when CI=true.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_attesta-mesh");

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn mesh(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "attesta-mesh {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The namespaces and links; removed on drop.
struct Net {
    ns: Vec<String>,
    hub: String,
}

impl Net {
    fn new(tag: &str, n: usize) -> Option<Net> {
        let hub = format!("am{tag}h");
        if !sh(&["ip", "netns", "add", &hub]).status.success() {
            return None;
        }
        let mut net = Net {
            ns: Vec::new(),
            hub: hub.clone(),
        };
        ok(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ok(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        for i in 1..=n {
            let ns = format!("am{tag}n{i}");
            ok(&["ip", "netns", "add", &ns]);
            net.ns.push(ns.clone());
            let (v, p) = (format!("am{tag}v{i}"), format!("am{tag}p{i}"));
            ok(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &p]);
            ok(&["ip", "link", "set", &v, "netns", &ns]);
            ok(&["ip", "link", "set", &p, "netns", &hub]);
            ok(&["ip", "-n", &hub, "link", "set", &p, "master", "br0", "up"]);
            let addr = format!("192.168.77.{i}/24");
            ok(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &v]);
            ok(&["ip", "-n", &ns, "link", "set", &v, "up"]);
            ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(net)
    }

    fn exec(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i - 1]]).args(args);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.ns.iter().chain([&self.hub]) {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const RULES: &str = r#"version = 1
[[inbound]]
from = { groups = ["tenant:a"] }
service = "icmp"
[[inbound]]
from = { groups = ["tenant:a"] }
service = "tcp/5001"
[[inbound]]
from = { groups = ["tenant:a"] }
service = "attesta-echo/1"
[[tests]]
from = { name = "x", groups = ["tenant:b"] }
service = "icmp"
expect = "deny"
"#;

/// `attesta-mesh cert sign` into `out` (node.crt, node.key).
fn sign_cert(ca: &Path, name: &str, ip: &str, group: &str, role: &str, out: &Path) {
    mesh(&[
        "cert",
        "sign",
        "--ca",
        ca.to_str().unwrap(),
        "--name",
        name,
        "--ip",
        ip,
        "--groups",
        group,
        "--role",
        role,
        "--out",
        out.to_str().unwrap(),
    ]);
}

fn node_dir(tmp: &Path, ca: &Path, i: usize, name: &str, group: &str, role: &str) -> PathBuf {
    let d = tmp.join(name);
    let ip = if i == 1 {
        "10.42.0.1/16".to_string()
    } else {
        format!("10.42.1.{i}/16")
    };
    sign_cert(ca, name, &ip, group, role, &d);
    std::fs::copy(ca.join("ca.crt"), d.join("ca.crt")).unwrap();
    std::fs::write(d.join("rules.toml"), RULES).unwrap();
    std::fs::write(
        d.join("node.toml"),
        format!(
            "cert = \"node.crt\"\nkey = \"node.key\"\nca = \"ca.crt\"\nrules = \"rules.toml\"\n\
             listen = \"192.168.77.{i}:4242\"\nlighthouse = {}\nlighthouses = [\"10.42.0.1\"]\n\
             revocation = \"revocation.json\"\nreload_ms = 200\nannounce_secs = 2\necho = true\n\
             [tun]\nname = \"mesh0\"\n[static_hosts]\n\"10.42.0.1\" = [\"192.168.77.1:4242\"]\n",
            i == 1
        ),
    )
    .unwrap();
    d
}

fn ping(net: &Net, from: usize, to: &str) -> bool {
    net.exec(from, &["ping", "-c", "1", "-W", "1", to])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pings until one is answered or `within` has passed (a node found through the lighthouse
/// needs a few tries): whether one was answered.
fn ping_within(net: &Net, from: usize, to: &str, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() <= end {
        if ping(net, from, to) {
            return true;
        }
    }
    false
}

fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `bytes` over TCP from namespace `from` to `to:5001` in namespace `at`; returns the
/// seconds it took (python3 on both ends: no test tool of ours in the path).
fn tcp_transfer(net: &Net, from: usize, at: usize, to: &str, bytes: usize) -> f64 {
    let server = net
        .exec(at, &[
            "python3", "-c",
            "import socket,hashlib\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('0.0.0.0',5001));s.listen(1);c,_=s.accept();h=hashlib.sha256();n=0\n\
             while True:\n d=c.recv(65536)\n if not d: break\n h.update(d);n+=len(d)\n\
             c.sendall(('%d %s'%(n,h.hexdigest())).encode());c.close()",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _server = Proc(server);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let out = net
        .exec(from, &[
            "python3", "-c",
            &format!(
                "import socket,hashlib,os\nd=bytes(range(256))*({bytes}//256)\ns=socket.create_connection(('{to}',5001),timeout=20)\n\
                 s.sendall(d);s.shutdown(socket.SHUT_WR);r=s.recv(200).decode()\n\
                 assert r=='%d %s'%(len(d),hashlib.sha256(d).hexdigest()), r\nprint('ok')"
            ),
        ])
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "TCP transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

#[test]
fn ping_and_tcp_through_the_overlay_other_tenants_denied_readdressed_node_moves_revoked_node_cut_off()
 {
    let root = nix_is_root();
    let tun = Path::new("/dev/net/tun").exists();
    let tag = format!("{}", std::process::id() % 10_000);
    let net = if root && tun { Net::new(&tag, 3) } else { None };
    let Some(net) = net else {
        let why = "needs root, /dev/net/tun and `ip netns`";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "overlay test: {why}"
        );
        eprintln!("skipping the overlay test: {why}");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    mesh(&[
        "ca",
        "new",
        "--name",
        "mesh-ca",
        "--networks",
        "10.42.0.0/16",
        "--out",
        ca.to_str().unwrap(),
    ]);
    let dirs = [
        node_dir(tmp.path(), &ca, 1, "lh1", "tenant:a", "lighthouse"),
        node_dir(tmp.path(), &ca, 2, "a2", "tenant:a", "guest"),
        node_dir(tmp.path(), &ca, 3, "b3", "tenant:b", "guest"),
    ];
    let mut procs = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let log = std::fs::File::create(d.join("node.log")).unwrap();
        let child = net
            .exec(
                i + 1,
                &[
                    BIN,
                    "node",
                    "--config",
                    d.join("node.toml").to_str().unwrap(),
                ],
            )
            .env("ATTESTA_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap();
        procs.push(Proc(child));
    }
    let logs = || {
        std::thread::sleep(Duration::from_millis(500));
        dirs.iter()
            .map(|d| std::fs::read_to_string(d.join("node.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // tenant:a ↔ tenant:a through the overlay (a2 found through the lighthouse).
    let reached = ping_within(&net, 1, "10.42.1.2", Duration::from_secs(15));
    if !reached {
        let o = net
            .exec(
                1,
                &["sh", "-c", "ip addr; ip route; ping -c1 -W1 10.42.1.2"],
            )
            .output()
            .unwrap();
        panic!(
            "ping lh1 → a2\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            logs()
        );
    }
    assert!(ping(&net, 2, "10.42.0.1"), "ping a2 → lh1");
    let secs = tcp_transfer(&net, 1, 2, "10.42.1.2", 32 << 20);
    eprintln!(
        "overlay TCP: 32 MiB in {secs:.2}s = {:.1} Mbit/s",
        32.0 * 8.0 * 1.048_576 / secs
    );
    let base = tcp_transfer(&net, 1, 2, "192.168.77.2", 32 << 20);
    eprintln!(
        "underlay TCP: 32 MiB in {base:.2}s = {:.1} Mbit/s; overlay/underlay = {:.3}",
        32.0 * 8.0 * 1.048_576 / base,
        base / secs
    );
    // The echo service through the mesh, with the CLI.
    let out = net
        .exec(
            1,
            &[
                BIN,
                "ping",
                "--config",
                dirs[0].join("node.toml").to_str().unwrap(),
                "10.42.1.2",
                "--count",
                "2",
            ],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "attesta-mesh ping: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reply from 10.42.1.2: seq=1"));

    // tenant:b is denied, packet by packet, both ways.
    for _ in 0..2 {
        assert!(!ping(&net, 3, "10.42.1.2"), "tenant:b must not reach a2");
        assert!(!ping(&net, 3, "10.42.0.1"), "tenant:b must not reach lh1");
    }
    let out = net
        .exec(
            3,
            &[
                BIN,
                "ping",
                "--config",
                dirs[2].join("node.toml").to_str().unwrap(),
                "10.42.1.2",
                "--count",
                "1",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the echo service refuses tenant:b"
    );
    // …and it is a2's firewall that refused b3 (b3 is on the mesh and reached a2).
    let a2_log = std::fs::read_to_string(dirs[1].join("node.log")).unwrap();
    assert!(
        a2_log.contains("the firewall denies b3 access to attesta-echo/1"),
        "{}",
        logs()
    );

    // Rotate a2 to a new certificate and key with another overlay address, without a restart:
    // its tun device moves, its peers reconnect, the old address is gone.
    let rotated = tmp.path().join("a2-rotated");
    sign_cert(&ca, "a2", "10.42.1.22/16", "tenant:a", "guest", &rotated);
    for f in ["node.key", "node.crt"] {
        // Beside, then renamed: the node never reads half a file.
        let tmp_f = dirs[1].join(format!("{f}.new"));
        std::fs::copy(rotated.join(f), &tmp_f).unwrap();
        std::fs::rename(&tmp_f, dirs[1].join(f)).unwrap();
    }
    let t = Instant::now();
    let moved = ping_within(&net, 1, "10.42.1.22", Duration::from_secs(15));
    assert!(moved, "a2 at its new address\n{}", logs());
    eprintln!(
        "rotated to a new overlay address, reachable after {:?}",
        t.elapsed()
    );
    assert!(ping(&net, 2, "10.42.0.1"), "a2 → lh1 from its new address");
    assert!(!ping(&net, 1, "10.42.1.2"), "a2's old address is gone");
    let addrs = net
        .exec(2, &["ip", "-4", "addr", "show", "mesh0"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        addrs.contains("10.42.1.22/16") && !addrs.contains("10.42.1.2/16"),
        "{addrs}"
    );
    assert!(
        procs[1].0.try_wait().unwrap().is_none(),
        "a2 kept running through the rotation"
    );

    // Revoke a2 (its rotated certificate) on the lighthouse: within 5 s nobody carries its packets.
    mesh(&[
        "revoke",
        "--ca",
        ca.to_str().unwrap(),
        "--number",
        "1",
        "--cert",
        dirs[1].join("node.crt").to_str().unwrap(),
        "--out",
        dirs[0].join("revocation.json").to_str().unwrap(),
    ]);
    let t = Instant::now();
    eventually("a2 cut off", Duration::from_secs(5), || {
        !ping(&net, 1, "10.42.1.22")
    });
    eprintln!("revoked node cut off after {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    assert!(!ping(&net, 1, "10.42.1.22") && !ping(&net, 2, "10.42.0.1"));
    drop(procs);
}

fn nix_is_root() -> bool {
    sh(&["id", "-u"]).stdout.starts_with(b"0")
}
