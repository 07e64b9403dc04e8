//! A real Substrate runtime for tests: Chopsticks serving Rococo Asset Hub's chain spec on
//! loopback (see ../shared/CHAIN-TESTING.md and tests/chain/), with //Alice and //Bob funded.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// //Alice's account.
pub const ALICE: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
/// //Bob's account.
pub const BOB: &str = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty";

/// The accounts the chain starts with funds for (it has none at genesis).
const FUNDED: &str = "System:
  Account:
    - - - 5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY
      - providers: 1
        data:
          free: '1000000000000000000'
    - - - 5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty
      - providers: 1
        data:
          free: '1000000000000000000'
";

/// A Chopsticks process on a free loopback port, killed on drop.
pub struct Chain {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chain_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/chain")
}

/// One JSON-RPC call over HTTP; the raw response, or `None` if the node cannot be reached.
pub fn rpc(port: u16, method: &str, params: &str, timeout: Duration) -> Option<String> {
    let body = format!(r#"{{"id":1,"jsonrpc":"2.0","method":"{method}","params":{params}}}"#);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(timeout));
    let req = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

fn rpc_ready(port: u16) -> bool {
    rpc(port, "system_chain", "[]", Duration::from_secs(5))
        .is_some_and(|o| o.contains("\"result\""))
}

impl Chain {
    /// Starts Chopsticks, or `None` (skip) where it is not installed and CI is not set.
    pub fn start() -> Option<Chain> {
        let dir = chain_dir();
        let bin = dir.join("node_modules/.bin/chopsticks");
        if !bin.exists() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "Chopsticks is required when CI=true (cd tests/chain && npm ci --ignore-scripts)"
            );
            eprintln!("SKIP: Chopsticks not installed (cd tests/chain && npm ci --ignore-scripts)");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let spec = tmp.path().join("rah.json");
        let st = Command::new("node")
            .current_dir(&dir)
            .args([
                "-e",
                "const {chainSpec}=require('@substrate/connect-known-chains/rococo_v2_2_asset_hub');\
                 require('fs').writeFileSync(process.argv[1], chainSpec)",
            ])
            .arg(&spec)
            .status()
            .unwrap();
        assert!(st.success(), "writing the chain spec");
        let accounts = tmp.path().join("accounts.yml");
        std::fs::write(&accounts, FUNDED).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .current_dir(&dir)
            .arg("--genesis")
            .arg(&spec)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--build-block-mode", "Instant", "--import-storage"])
            .arg(&accounts)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let chain = Chain {
            child,
            port,
            _dir: tmp,
        };
        let t = Instant::now();
        while !rpc_ready(port) {
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "Chopsticks did not start"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Some(chain)
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Builds `n` empty blocks (Chopsticks' `dev_newBlock`).
    pub fn advance(&self, n: u64) {
        let out = rpc(
            self.port,
            "dev_newBlock",
            &format!(r#"[{{"count":{n}}}]"#),
            Duration::from_secs(300),
        )
        .unwrap_or_default();
        assert!(out.contains("\"result\""), "dev_newBlock: {out}");
    }
}

/// Every `System.Remarked` hash on the chain, in order.
pub async fn remarked_hashes(url: &str) -> Vec<[u8; 32]> {
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(url)
        .await
        .unwrap();
    let latest = api.at_current_block().await.unwrap().block_number();
    let mut out = Vec::new();
    for n in 1..=latest {
        let at = api.at_block(n).await.unwrap();
        let events = at.events().fetch().await.unwrap();
        for ev in events.iter() {
            let ev = ev.unwrap();
            if ev.pallet_name() == "System" && ev.event_name() == "Remarked" {
                // Remarked { sender: AccountId32, hash: H256 }
                let f = ev.field_bytes();
                assert_eq!(f.len(), 64);
                out.push(f[32..].try_into().unwrap());
            }
        }
    }
    out
}
