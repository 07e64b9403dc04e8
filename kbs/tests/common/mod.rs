//! What the tests of the real `attesta-kbs` binary share.
#![allow(dead_code)]

pub mod fleet;
pub mod inproc;
pub mod postgres;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub fn kbs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attesta-kbs"))
}

/// A UDP port free a moment ago on loopback.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP port free a moment ago on loopback.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole HTTP answer to `GET path` on loopback `port` (a few tries while it starts).
pub fn http_get(port: u16, path: &str) -> String {
    let mut last = None;
    for _ in 0..5 {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(o) => return o,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("GET {path} on port {port}: {last:?}")
}

/// How a guest reaches and recognises the broker `init` made in `d`, listening on `listen`:
/// its TLS CA and response key, pinned.
pub fn broker_pins(d: &Path, listen: &str) -> guest_agent::client::Broker {
    guest_agent::client::Broker {
        addr: listen.parse().unwrap(),
        server_name: "kbs.attesta.local".into(),
        ca_der: snp::certs::pem_blocks(&std::fs::read(d.join("tls-ca.crt")).unwrap())
            .unwrap()
            .remove(0),
        response_key: hex::decode(
            std::fs::read_to_string(d.join("response.pub"))
                .unwrap()
                .trim(),
        )
        .unwrap()
        .try_into()
        .unwrap(),
    }
}

/// Starts `serve`, collecting its log lines into `log`; returns once it is serving.
pub fn start(cfg: &Path, log: Arc<Mutex<String>>) -> Child {
    let mut server = kbs()
        .arg("serve")
        .arg("--config")
        .arg(cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if l.contains("serving") {
                let _ = tx.send(());
            }
            log.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the broker starts serving");
    server
}

/// The output's stdout, after asserting the command succeeded (its output in the message).
pub fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest agent's binary, built beside ours (`cargo test --workspace` builds it).
pub fn guest() -> Command {
    let exe = Path::new(env!("CARGO_BIN_EXE_attesta-kbs")).with_file_name("attesta-guest");
    assert!(
        exe.exists(),
        "{} is missing: run `cargo build -p guest-agent` first",
        exe.display()
    );
    Command::new(exe)
}

/// Signs allowlist epoch 1 with `measurement_hex` into `d/allowlist.signed` (the deployment's
/// offline key, as `init` wrote it).
pub fn sign_allowlist(d: &Path, measurement_hex: &str) {
    sign_allowlist_at(d, 1, &[measurement_hex], &d.join("allowlist.signed"));
}

/// Signs allowlist `epoch` with `measurements_hex` into `out` with `d/allowlist.key`.
pub fn sign_allowlist_at(d: &Path, epoch: u64, measurements_hex: &[&str], out: &Path) {
    let mut cmd = kbs();
    cmd.args(["allowlist", "sign", "--key"])
        .arg(d.join("allowlist.key"))
        .args(["--epoch", &epoch.to_string()]);
    for m in measurements_hex {
        cmd.args(["--measurement", m]);
    }
    ok(
        cmd.arg("--out").arg(out).output().unwrap(),
        "allowlist sign",
    );
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A prerequisite is missing: skip with a message, but fail on CI.
pub fn missing(what: &str) {
    assert!(!ci(), "{what} (required when CI=true)");
    eprintln!("SKIP: {what}");
}

/// A binary built beside `attesta-kbs` by `cargo test --workspace`.
pub fn sibling(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_attesta-kbs")).with_file_name(name)
}

/// A child process killed and reaped however the test ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Verifies `entries` as a log closed by a checkpoint signed now with a fresh key; how many
/// entries the verifier counted.
pub fn verified_entries(entries: &[kbs::audit::Entry]) -> u64 {
    use kbs::audit::{Chain, Line};
    let key = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
    let cp = Chain::resume(entries.last().unwrap())
        .checkpoint(&key)
        .unwrap();
    let mut text: String = entries
        .iter()
        .map(|e| serde_json::to_string(&Line::Entry(e.clone())).unwrap() + "\n")
        .collect();
    text += &(serde_json::to_string(&Line::Checkpoint { checkpoint: cp }).unwrap() + "\n");
    kbs::audit::verify(&text, &kbs::audit::public_key(&key))
        .unwrap()
        .entries
}
