//! Mesh nodes over real QUIC on loopback, each with its own files as an operator writes them:
//! lighthouses that replicate (two nodes that share no lighthouse still find each other, and a
//! lighthouse that dies and comes back recovers its directory from the other), the firewall on
//! each connection with hot-reloaded rules (a file whose tests fail is refused, the old rules
//! stay), a revocation list dropped on a lighthouse closing a live connection to the revoked
//! node within 5 s, a broker's delegated list cutting off the guest it certified and nobody else,
//! failing closed on a stale list, and rotation of the CA bundle, certificate
//! and key without a restart. The whole directory goes to lighthouses only: a guest that asks
//! for it is refused and may still look up one address.

use mesh::cert::{LocalCa, MeshCert, Role};

type Ca = LocalCa;
use mesh::node::{ECHO_ALPN, Node, NodeConfig, close};
use mesh::revocation::{Body, SerialEntry};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ca(name: &str) -> LocalCa {
    LocalCa::root(name, &["10.42.0.0/16"], now() - 86_400, now() + 86_400).unwrap()
}

/// A free UDP port on loopback (bound and released; the node binds it right after).
fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

const RULES: &str = r#"version = 1
[[inbound]]
from = { groups = ["tenant:a"] }
service = "attesta-echo/1"
[[tests]]
from = { name = "x", groups = ["tenant:b"] }
service = "attesta-echo/1"
expect = "deny"
"#;

struct Spec<'a> {
    name: &'a str,
    ip: &'a str,
    group: &'a str,
    role: Role,
    lighthouses: &'a [(&'a str, SocketAddr)],
    extra: &'a str,
}

impl<'a> Spec<'a> {
    fn new(
        name: &'a str,
        ip: &'a str,
        group: &'a str,
        role: Role,
        lighthouses: &'a [(&'a str, SocketAddr)],
        extra: &'a str,
    ) -> Spec<'a> {
        Spec {
            name,
            ip,
            group,
            role,
            lighthouses,
            extra,
        }
    }
}

/// Writes a node's folder (certificate, key, CA bundle, rules, node.toml) and returns it.
fn write_node(dir: &Path, ca: &Ca, s: &Spec<'_>, listen: SocketAddr) -> PathBuf {
    let d = dir.join(s.name);
    std::fs::create_dir_all(&d).unwrap();
    issue(&d, ca, s.name, s.ip, s.group, s.role);
    std::fs::write(d.join("ca.crt"), &ca.pem).unwrap();
    std::fs::write(d.join("rules.toml"), RULES).unwrap();
    let mut toml = format!(
        "cert = \"node.crt\"\nkey = \"node.key\"\nca = \"ca.crt\"\nrules = \"rules.toml\"\n\
         listen = \"{listen}\"\nreload_ms = 200\nannounce_secs = 1\nrevocation = \"revocation.json\"\n\
         lighthouse = {}\necho = true\n{}\n",
        s.role == Role::Lighthouse,
        s.extra
    );
    let ips: Vec<String> = s
        .lighthouses
        .iter()
        .map(|(ip, _)| format!("\"{ip}\""))
        .collect();
    toml += &format!("lighthouses = [{}]\n[static_hosts]\n", ips.join(", "));
    for (ip, addr) in s.lighthouses {
        toml += &format!("\"{ip}\" = [\"{addr}\"]\n");
    }
    std::fs::write(d.join("node.toml"), toml).unwrap();
    d
}

fn issue(d: &Path, ca: &Ca, name: &str, ip: &str, group: &str, role: Role) {
    let n = ca
        .issue(
            name,
            &format!("{ip}/16"),
            &[group],
            role,
            now() - 60,
            now() + 3600,
        )
        .unwrap();
    std::fs::write(d.join("node.crt"), &n.issued.cert_pem).unwrap();
    std::fs::write(d.join("node.key"), n.issued.key_pem.as_bytes()).unwrap();
}

async fn start(dir: &Path) -> Node {
    // A restarted node may find its old socket not yet released: retry briefly.
    let mut tries = 0;
    loop {
        match Node::start(NodeConfig::load(&dir.join("node.toml")).unwrap(), vec![]).await {
            Ok(n) => return n,
            Err(mesh::node::NodeError::Io(e)) if tries < 20 => {
                eprintln!("retrying start: {e}");
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Waits for `cond`, polling.
async fn eventually(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One echo round trip on a new stream.
async fn echo(conn: &quinn::Connection) -> Result<(), String> {
    mesh::node::echo_once(conn, b"hello", Duration::from_secs(5)).await
}

/// Connect to `target`'s echo service and round-trip once, retrying until `deadline`.
async fn reach(node: &Node, target: &str, within: Duration) -> Result<quinn::Connection, String> {
    let end = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < end {
        match node.connect(ip(target), ECHO_ALPN).await {
            Ok(c) => match echo(&c).await {
                Ok(()) => return Ok(c),
                Err(e) => last = e,
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// The application close code a connection ended with.
async fn closed_with(conn: &quinn::Connection, within: Duration) -> Option<u32> {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            u32::try_from(c.error_code.into_inner()).ok()
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lighthouses_replicate_so_peers_need_not_share_one_and_a_dead_one_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = ca("mesh-ca");
    let (l1, l2) = (free_port(), free_port());
    let lhs = [("10.42.0.1", l1), ("10.42.0.2", l2)];
    let lh1_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("lh1", "10.42.0.1", "infra", Role::Lighthouse, &lhs, ""),
        l1,
    );
    let lh2_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("lh2", "10.42.0.2", "infra", Role::Lighthouse, &lhs, ""),
        l2,
    );
    let a_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("a", "10.42.1.1", "tenant:a", Role::Guest, &lhs[..1], ""),
        free_port(),
    );
    let b_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("b", "10.42.1.2", "tenant:a", Role::Guest, &lhs[1..], ""),
        free_port(),
    );
    let lh1 = start(&lh1_dir).await;
    let lh2 = start(&lh2_dir).await;
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;

    // a announces only to lh1, b asks only lh2: replication carries a's entry across.
    let conn = reach(&b, "10.42.1.1", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(conn.remote_address(), a.local_addr().unwrap());
    eventually("lh2 to know a, lh1 and b", Duration::from_secs(5), || {
        lh2.directory_len() >= 3
    })
    .await;

    // lh1 dies: its directory is gone. A new lh1 on the same address recovers every entry
    // from lh2 (Dump), so c — who knows only lh1 — finds b, who never spoke to lh1.
    lh1.shutdown().await;
    drop(lh1);
    let t = Instant::now();
    let lh1 = start(&lh1_dir).await;
    let c_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("c", "10.42.1.3", "tenant:a", Role::Guest, &lhs[..1], ""),
        free_port(),
    );
    let c = start(&c_dir).await;
    reach(&c, "10.42.1.2", Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("lighthouse recovered and answered in {:?}", t.elapsed());
    eventually("lh1 to hold the mesh again", Duration::from_secs(5), || {
        lh1.directory_len() >= 3
    })
    .await;

    // An address nobody announced is not resolved (and there is no static entry for it).
    assert!(matches!(
        c.connect(ip("10.42.9.9"), ECHO_ALPN).await,
        Err(mesh::node::NodeError::Unresolved(_))
    ));
    for n in [a, b, c, lh1, lh2] {
        n.shutdown().await;
    }
}

/// The names in a directory dump, each announcement verified.
fn dumped_names(docs: &[String], trust: &mesh::transport::Trust) -> Vec<String> {
    let mut names: Vec<String> = docs
        .iter()
        .map(|d| mesh::lighthouse::verify(d, trust, now()).unwrap().name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_dump_is_served_to_lighthouses_only() {
    use mesh::lighthouse::{CONTROL_ALPN, Msg, Refusal};
    use mesh::node::request;
    let tmp = tempfile::tempdir().unwrap();
    let root = ca("mesh-ca");
    let l1 = free_port();
    let lhs = [("10.42.0.1", l1)];
    let lh1_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("lh1", "10.42.0.1", "infra", Role::Lighthouse, &lhs, ""),
        l1,
    );
    let lh2_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("lh2", "10.42.0.2", "infra", Role::Lighthouse, &lhs, ""),
        free_port(),
    );
    let a_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("a", "10.42.1.1", "tenant:a", Role::Guest, &lhs, ""),
        free_port(),
    );
    // A guest of another tenant, which must not learn where tenant:a's nodes are.
    let b_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("b", "10.42.2.1", "tenant:b", Role::Guest, &lhs, ""),
        free_port(),
    );
    let lh1 = start(&lh1_dir).await;
    let lh2 = start(&lh2_dir).await;
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;
    eventually("lh1 to know lh2, a and b", Duration::from_secs(10), || {
        lh1.directory_len() >= 3
    })
    .await;

    // The guest is authenticated and admitted to the control service, but gets no dump.
    let conn = b.connect(ip("10.42.0.1"), CONTROL_ALPN).await.unwrap();
    assert_eq!(
        request(&conn, &Msg::Dump).await.unwrap(),
        Msg::Error {
            why: Refusal::DumpNotLighthouse {
                role: Some(Role::Guest)
            }
            .to_string()
        }
    );
    // Its legitimate use, a lookup of one address, still works on the same connection.
    let Msg::Found { doc } = request(
        &conn,
        &Msg::Query {
            ip: ip("10.42.1.1"),
        },
    )
    .await
    .unwrap() else {
        panic!("a guest's lookup of one address is answered");
    };
    assert_eq!(
        mesh::lighthouse::verify(&doc, &b.trust(), now())
            .unwrap()
            .name,
        "a"
    );

    // Another lighthouse gets every entry (a replica's sync).
    let conn = lh2.connect(ip("10.42.0.1"), CONTROL_ALPN).await.unwrap();
    let Msg::Entries { docs } = request(&conn, &Msg::Dump).await.unwrap() else {
        panic!("a lighthouse gets the dump");
    };
    assert_eq!(dumped_names(&docs, &lh2.trust()), ["a", "b", "lh2"]);
    for n in [a, b, lh1, lh2] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firewall_admits_by_rule_and_reloads_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = ca("mesh-ca");
    let a_addr = free_port();
    let statics = [("10.42.1.1", a_addr)];
    let extra = "";
    let mk = |name: &str, ipa: &str, group: &str, listen| {
        write_node(
            tmp.path(),
            &root,
            &Spec {
                name,
                ip: ipa,
                group,
                role: Role::Guest,
                lighthouses: &[],
                extra,
            },
            listen,
        )
    };
    let a_dir = mk("a", "10.42.1.1", "tenant:a", a_addr);
    let b_dir = mk("b", "10.42.1.2", "tenant:a", free_port());
    let c_dir = mk("c", "10.42.1.3", "tenant:b", free_port());
    for d in [&b_dir, &c_dir] {
        let t = std::fs::read_to_string(d.join("node.toml")).unwrap();
        let (k, v) = statics[0];
        std::fs::write(d.join("node.toml"), format!("{t}\"{k}\" = [\"{v}\"]\n")).unwrap();
    }
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;
    let c = start(&c_dir).await;

    let kept = reach(&b, "10.42.1.1", Duration::from_secs(5))
        .await
        .unwrap();
    // c (tenant:b) completes the handshake but the firewall closes the connection.
    let refused = c.connect(ip("10.42.1.1"), ECHO_ALPN).await.unwrap();
    assert_eq!(
        closed_with(&refused, Duration::from_secs(5)).await,
        Some(close::DENIED)
    );

    // A rules file whose own tests fail is refused: the old rules stay, b still gets through.
    let failing = RULES.replace("expect = \"deny\"", "expect = \"allow\"");
    std::fs::write(a_dir.join("rules.toml"), failing).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    echo(&kept).await.unwrap();

    // Rules that admit tenant:b instead: b's live connection is closed, c gets in.
    let swapped = RULES
        .replace("groups = [\"tenant:a\"]", "groups = [\"tenant:b\"]")
        .replace("expect = \"deny\"", "expect = \"allow\"");
    std::fs::write(a_dir.join("rules.toml"), swapped).unwrap();
    assert_eq!(
        closed_with(&kept, Duration::from_secs(5)).await,
        Some(close::DENIED)
    );
    reach(&c, "10.42.1.1", Duration::from_secs(5))
        .await
        .unwrap();
    let again = b.connect(ip("10.42.1.1"), ECHO_ALPN).await.unwrap();
    assert_eq!(
        closed_with(&again, Duration::from_secs(5)).await,
        Some(close::DENIED)
    );
    assert!(a.peers().iter().all(|(n, _, _)| n != "b"));
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

fn revocation_list(root: &Ca, number: u64, issued_at: u64, revoked: &[&MeshCert]) -> Vec<u8> {
    let body = Body {
        v: 1,
        ca: root.cert.name.clone(),
        number,
        issued_at,
        serials: revoked.iter().map(|c| SerialEntry::of(c)).collect(),
        keys: vec![],
    };
    mesh::revocation::sign(&root.cert, &root.key, &body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_dropped_on_a_lighthouse_cuts_the_revoked_off_within_five_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = ca("mesh-ca");
    let l1 = free_port();
    let lhs = [("10.42.0.1", l1)];
    let lh_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("lh1", "10.42.0.1", "infra", Role::Lighthouse, &lhs, ""),
        l1,
    );
    let a_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("a", "10.42.1.1", "tenant:a", Role::Guest, &lhs, ""),
        free_port(),
    );
    let b_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("b", "10.42.1.2", "tenant:a", Role::Guest, &lhs, ""),
        free_port(),
    );
    mesh::watch::write_atomic(
        &lh_dir.join("revocation.json"),
        &revocation_list(&root, 1, now(), &[]),
    )
    .unwrap();
    let lh = start(&lh_dir).await;
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;
    let live = reach(&b, "10.42.1.1", Duration::from_secs(10))
        .await
        .unwrap();

    let b_cert = b.cert();
    let t = Instant::now();
    mesh::watch::write_atomic(
        &lh_dir.join("revocation.json"),
        &revocation_list(&root, 2, now(), &[&b_cert]),
    )
    .unwrap();
    let code = closed_with(&live, Duration::from_secs(5)).await;
    let took = t.elapsed();
    assert_eq!(code, Some(close::REVOKED), "closed by a, as revoked");
    eprintln!("revocation propagated and closed the connection in {took:?}");
    // a kept the list (it survives a restart) and refuses b from now on.
    let kept = std::fs::read(a_dir.join("revocation.json")).unwrap();
    assert!(String::from_utf8_lossy(&kept).contains("\\\"number\\\":2"));
    assert!(a.trust().is_revoked(&b_cert));
    // b cannot get through: no address (its lighthouse connection is cut too), or a
    // connection that carries nothing.
    if let Ok(c) = b.connect(ip("10.42.1.1"), ECHO_ALPN).await {
        assert!(echo(&c).await.is_err(), "a revoked node got through");
    }
    // An older list dropped on the lighthouse does not roll anyone back.
    mesh::watch::write_atomic(
        &lh_dir.join("revocation.json"),
        &revocation_list(&root, 1, now(), &[]),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(lh.trust().is_revoked(&b_cert) && a.trust().is_revoked(&b_cert));
    for n in [a, b, lh] {
        n.shutdown().await;
    }
}

/// A broker holding the guests' intermediate CA publishes a list of its own through its node:
/// the lighthouse takes it and pushes it on, the guest it names is cut off at once, and a node
/// the root certified stays, though the list names its key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brokers_delegated_list_cuts_its_guest_off_and_nobody_else() {
    let tmp = tempfile::tempdir().unwrap();
    let root = ca("mesh-ca");
    let guests = root
        .intermediate(
            "guest-ca",
            &["10.42.0.0/16"],
            &[Role::Guest],
            &[],
            now() - 60,
            now() + 3600,
        )
        .unwrap();
    let l1 = free_port();
    let lhs = [("10.42.0.1", l1)];
    let node = |name, ip, group, role, extra| {
        write_node(
            tmp.path(),
            &root,
            &Spec::new(name, ip, group, role, &lhs, extra),
            if role == Role::Lighthouse {
                l1
            } else {
                free_port()
            },
        )
    };
    let lh_dir = node("lh1", "10.42.0.1", "infra", Role::Lighthouse, "");
    let a_dir = node("a", "10.42.1.1", "tenant:a", Role::Guest, "");
    // The attested guest: its certificate from the guests' CA, presented with that CA.
    let vm_dir = node("vm", "10.42.1.2", "tenant:a", Role::Guest, "");
    let n = guests
        .issue(
            "vm",
            "10.42.1.2/16",
            &["tenant:a"],
            Role::Guest,
            now() - 60,
            now() + 3600,
        )
        .unwrap();
    std::fs::write(
        vm_dir.join("node.crt"),
        format!("{}{}", n.issued.cert_pem, guests.pem),
    )
    .unwrap();
    std::fs::write(vm_dir.join("node.key"), n.issued.key_pem.as_bytes()).unwrap();
    let kbs_dir = node("kbs", "10.42.0.5", "infra", Role::Kbs, "announce = false");
    // The root's own list, which every node keeps in its `revocation` file.
    let root_list = revocation_list(&root, 1, now(), &[]);
    mesh::watch::write_atomic(&lh_dir.join("revocation.json"), &root_list).unwrap();
    let lh = start(&lh_dir).await;
    let a = start(&a_dir).await;
    let vm = start(&vm_dir).await;
    let kbs = start(&kbs_dir).await;
    eventually("a holds the root's list", Duration::from_secs(10), || {
        std::fs::read(a_dir.join("revocation.json")).is_ok_and(|b| b == root_list)
    })
    .await;
    let live = reach(&vm, "10.42.1.1", Duration::from_secs(10))
        .await
        .unwrap();
    let (vm_cert, a_cert) = (vm.cert(), a.cert());
    assert_eq!(vm_cert.issuer, "guest-ca");

    let mut body = Body {
        v: 1,
        ca: "guest-ca".into(),
        number: 1,
        issued_at: now(),
        serials: vec![],
        keys: vec![],
    };
    // By key (what a broker knows of a VM), a's as well: beyond this CA, so ignored.
    body.keys = [&vm_cert, &a_cert]
        .iter()
        .map(|c| hex::encode(c.key_hash))
        .collect();
    body.normalize();
    let list = mesh::revocation::sign_delegated(&guests.cert, &[], &guests.key, &body).unwrap();
    let t = Instant::now();
    assert_eq!(kbs.publish(&list), Ok(true));
    let code = closed_with(&live, Duration::from_secs(5)).await;
    eprintln!(
        "a delegated list closed the connection in {:?}",
        t.elapsed()
    );
    assert_eq!(code, Some(close::REVOKED), "closed by a, as revoked");
    for n in [&lh, &a, &kbs] {
        assert!(n.trust().is_revoked(&vm_cert) && !n.trust().is_revoked(&a_cert));
    }
    // The `revocation` file keeps the root's list: a delegated one comes back from the
    // lighthouses, and never stands in the root's place after a restart.
    for d in [&lh_dir, &a_dir, &kbs_dir] {
        assert_eq!(
            std::fs::read(d.join("revocation.json")).unwrap(),
            root_list,
            "{}",
            d.display()
        );
    }
    // a still serves its tenant: a node joining now reaches it.
    let c = start(&node("c", "10.42.1.3", "tenant:a", Role::Guest, "")).await;
    reach(&c, "10.42.1.1", Duration::from_secs(10))
        .await
        .expect("a is not revoked");
    for n in [a, c, vm, kbs, lh] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_list_fails_closed_until_a_fresh_one_arrives() {
    let tmp = tempfile::tempdir().unwrap();
    let root = ca("mesh-ca");
    let a_addr = free_port();
    let statics = [("10.42.1.1", a_addr)];
    let extra = "revocation_max_age = \"10m\"";
    let a_dir = write_node(
        tmp.path(),
        &root,
        &Spec {
            name: "a",
            ip: "10.42.1.1",
            group: "tenant:a",
            role: Role::Guest,
            lighthouses: &[],
            extra,
        },
        a_addr,
    );
    let b_dir = write_node(
        tmp.path(),
        &root,
        &Spec::new("b", "10.42.1.2", "tenant:a", Role::Guest, &statics, ""),
        free_port(),
    );
    // b lists a as a "lighthouse" only to get its static address; a is not one, which is fine.
    mesh::watch::write_atomic(
        &a_dir.join("revocation.json"),
        &revocation_list(&root, 1, now() - 3600, &[]),
    )
    .unwrap();
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;
    let c = b.connect(ip("10.42.1.1"), ECHO_ALPN).await.unwrap();
    assert_eq!(
        closed_with(&c, Duration::from_secs(5)).await,
        Some(close::STALE)
    );
    // a's own outbound connections fail closed too.
    assert!(a.connect(ip("10.42.1.2"), ECHO_ALPN).await.is_err());
    mesh::watch::write_atomic(
        &a_dir.join("revocation.json"),
        &revocation_list(&root, 2, now(), &[]),
    )
    .unwrap();
    reach(&b, "10.42.1.1", Duration::from_secs(5))
        .await
        .unwrap();
    for n in [a, b] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rollover_and_certificate_rotation_need_no_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let old = ca("mesh-ca-2026");
    let new = ca("mesh-ca-2027");
    let a_addr = free_port();
    let statics = [("10.42.1.1", a_addr)];
    let a_dir = write_node(
        tmp.path(),
        &old,
        &Spec::new("a", "10.42.1.1", "tenant:a", Role::Guest, &[], ""),
        a_addr,
    );
    let b_dir = write_node(
        tmp.path(),
        &new,
        &Spec::new("b", "10.42.1.2", "tenant:a", Role::Guest, &statics, ""),
        free_port(),
    );
    // b already trusts both roots; a only the old one.
    std::fs::write(b_dir.join("ca.crt"), format!("{}{}", old.pem, new.pem)).unwrap();
    let a = start(&a_dir).await;
    let b = start(&b_dir).await;
    let c = b.connect(ip("10.42.1.1"), ECHO_ALPN).await;
    assert!(
        c.is_err() || echo(&c.unwrap()).await.is_err(),
        "a does not trust the new root yet"
    );

    // Step 1: a's bundle gets the new root (two roots) — b is admitted, nothing restarted.
    std::fs::write(a_dir.join("ca.crt"), format!("{}{}", old.pem, new.pem)).unwrap();
    reach(&b, "10.42.1.1", Duration::from_secs(5))
        .await
        .unwrap();

    // Step 2: a rotates to a certificate and key from the new root; new handshakes show it.
    let before = a.cert();
    issue(&a_dir, &new, "a", "10.42.1.1", "tenant:a", Role::Guest);
    let end = Instant::now() + Duration::from_secs(5);
    while a.cert().serial == before.serial && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.cert().issuer, "mesh-ca-2027");
    let c = reach(&b, "10.42.1.1", Duration::from_secs(5))
        .await
        .unwrap();
    let presented = c
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(
        MeshCert::parse(&presented[0]).unwrap().issuer,
        "mesh-ca-2027"
    );

    // Step 3: a bundle that no longer covers a's own certificate is refused; a keeps working.
    std::fs::write(a_dir.join("ca.crt"), &old.pem).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    reach(&b, "10.42.1.1", Duration::from_secs(5))
        .await
        .unwrap();
    for n in [a, b] {
        n.shutdown().await;
    }
}
