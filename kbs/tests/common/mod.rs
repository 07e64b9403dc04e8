//! What the tests of the real `attesta-kbs` binary share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
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
