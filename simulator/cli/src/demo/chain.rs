//! The demo's chain, when it is at hand: Chopsticks (`tests/chain`, installed by
//! `scripts/chain-deps.sh`) serving Rococo Asset Hub's chain spec on loopback, with //Alice (a
//! validator, who assigns VM tasks) and //Bob (the first miner's billing key) funded. That
//! runtime has no marketplace pallet, so tasks, answers and lifecycle records travel as
//! `System.remark_with_event` (`host_agent::intake`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The validator's account (//Alice).
pub const VALIDATOR: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
/// The first miner's account (//Bob, its billing key).
pub const MINER: &str = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty";

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

/// What the chain saw of the fleet.
#[derive(Clone, Debug, Default)]
pub struct ChainSummary {
    /// Assignments that became VMs.
    pub assignments_taken: usize,
    /// Lifecycle transitions on chain (in batches that were finalized).
    pub lifecycle_records: usize,
    /// Assignments refused, each answered on chain with its code.
    pub refused_with_reason: usize,
    /// Every answer and lifecycle batch is found in a `System.Remarked` event.
    pub all_on_chain: bool,
}

impl ChainSummary {
    pub fn as_expected(&self) -> bool {
        self.assignments_taken >= 1
            && self.refused_with_reason >= 1
            && self.lifecycle_records >= 2
            && self.all_on_chain
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "assignments_taken": self.assignments_taken,
            "lifecycle_records": self.lifecycle_records,
            "refused_with_reason": self.refused_with_reason,
            "all_on_chain": self.all_on_chain,
        })
    }
}

/// A Chopsticks process on a free loopback port, killed on drop.
pub struct DemoChain {
    child: Child,
    port: u16,
    _spec: tempfile::TempDir,
}

impl Drop for DemoChain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where Chopsticks is installed: `ATTESTA_CHAIN_DIR`, else the workspace's `tests/chain`.
fn chain_dir() -> PathBuf {
    std::env::var_os("ATTESTA_CHAIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/chain"))
}

fn ready(port: u16) -> bool {
    let body = r#"{"id":1,"jsonrpc":"2.0","method":"system_chain","params":[]}"#;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"result\"")
}

impl DemoChain {
    /// Starts Chopsticks; `Ok(Err(why))` where it is not installed.
    pub fn start() -> Result<Result<DemoChain, String>, String> {
        let dir = chain_dir();
        let bin = dir.join("node_modules/.bin/chopsticks");
        if !bin.exists() {
            return Ok(Err(format!(
                "Chopsticks is not installed in {} (scripts/chain-deps.sh)",
                dir.display()
            )));
        }
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
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
            .map_err(|e| format!("node: {e}"))?;
        if !st.success() {
            return Err("writing the chain spec failed".into());
        }
        let accounts = tmp.path().join("accounts.yml");
        std::fs::write(&accounts, FUNDED).map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
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
            .map_err(|e| format!("chopsticks: {e}"))?;
        let chain = DemoChain {
            child,
            port,
            _spec: tmp,
        };
        let t = Instant::now();
        while !ready(port) {
            if t.elapsed() > Duration::from_secs(90) {
                return Err("Chopsticks did not start within 90 s".into());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(Ok(chain))
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}

/// `signer` (a secret URI) puts `remark` on chain, finalized.
pub async fn remark(url: &str, signer: &str, remark: &[u8]) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| format!("chain: {x}");
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(url)
        .await
        .map_err(|x| e(&x))?;
    let uri: subxt_signer::SecretUri = signer.parse().map_err(|x| e(&x))?;
    let pair = subxt_signer::sr25519::Keypair::from_uri(&uri).map_err(|x| e(&x))?;
    let call = subxt::dynamic::transaction(
        "System",
        "remark_with_event",
        vec![subxt::dynamic::Value::from_bytes(remark)],
    );
    api.at_current_block()
        .await
        .map_err(|x| e(&x))?
        .transactions()
        .sign_and_submit_then_watch_default(&call, &pair)
        .await
        .map_err(|x| e(&x))?
        .wait_for_finalized_success()
        .await
        .map_err(|x| e(&x))?;
    Ok(())
}

/// Every `System.Remarked` hash on the chain.
pub async fn remarked(url: &str) -> Result<Vec<[u8; 32]>, String> {
    let e = |x: &dyn std::fmt::Display| format!("chain: {x}");
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(url)
        .await
        .map_err(|x| e(&x))?;
    let latest = api
        .at_current_block()
        .await
        .map_err(|x| e(&x))?
        .block_number();
    let mut out = Vec::new();
    for n in 1..=latest {
        let at = api.at_block(n).await.map_err(|x| e(&x))?;
        for ev in at.events().fetch().await.map_err(|x| e(&x))?.iter() {
            let ev = ev.map_err(|x| e(&x))?;
            // Remarked { sender: AccountId32, hash: H256 }
            if ev.pallet_name() == "System"
                && ev.event_name() == "Remarked"
                && let Ok(h) = <[u8; 32]>::try_from(ev.field_bytes().get(32..).unwrap_or(&[]))
            {
                out.push(h);
            }
        }
    }
    Ok(out)
}
