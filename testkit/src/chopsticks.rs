//! A real Substrate runtime on loopback: Chopsticks (`tests/chain`, installed by
//! `scripts/chain-deps.sh`) serving Rococo Asset Hub's chain spec offline (see
//! ../shared/CHAIN-TESTING.md), building a block per transaction, with //Alice and //Bob funded;
//! killed when dropped. And the two things tests and the demo do with it: put a remark on
//! chain, and read every `System.Remarked` hash.

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

/// A Chopsticks process on a free loopback port.
pub struct Chopsticks {
    child: Child,
    port: u16,
    _dir: crate::garage::Dir,
}

impl Drop for Chopsticks {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where Chopsticks is installed: `ATTESTA_CHAIN_DIR`, else the workspace's `tests/chain`.
pub fn chain_dir() -> PathBuf {
    std::env::var_os("ATTESTA_CHAIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/chain"))
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

impl Chopsticks {
    /// Starts Chopsticks (a few seconds); `Ok(Err(why))` where it is not installed.
    pub fn start() -> Result<Result<Chopsticks, String>, String> {
        let dir = chain_dir();
        let bin = dir.join("node_modules/.bin/chopsticks");
        if !bin.exists() {
            return Ok(Err(format!(
                "Chopsticks is not installed in {} (scripts/chain-deps.sh)",
                dir.display()
            )));
        }
        let tmp = std::env::temp_dir().join(format!(
            "attesta-chopsticks-{}-{}",
            std::process::id(),
            crate::garage::free_port()?
        ));
        // A new folder, the process's own (one already there is refused, not reused).
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let guard = crate::garage::Dir(tmp.clone());
        let spec = tmp.join("rah.json");
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
        let accounts = tmp.join("accounts.yml");
        std::fs::write(&accounts, FUNDED).map_err(|e| e.to_string())?;
        let port = crate::garage::free_port()?;
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
        let chain = Chopsticks {
            child,
            port,
            _dir: guard,
        };
        let t = Instant::now();
        while !rpc(port, "system_chain", "[]", Duration::from_secs(5))
            .is_some_and(|o| o.contains("\"result\""))
        {
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

    /// Builds `n` empty blocks (Chopsticks' `dev_newBlock`).
    pub fn advance(&self, n: u64) -> Result<(), String> {
        let out = rpc(
            self.port,
            "dev_newBlock",
            &format!(r#"[{{"count":{n}}}]"#),
            Duration::from_secs(300),
        )
        .unwrap_or_default();
        if out.contains("\"result\"") {
            Ok(())
        } else {
            Err(format!("dev_newBlock: {out}"))
        }
    }
}

fn chain(x: impl std::fmt::Display) -> String {
    format!("chain: {x}")
}

/// `signer` (a secret URI) puts `remark` on chain with `System.remark_with_event`, finalized.
pub async fn remark(url: &str, signer: &str, remark: &[u8]) -> Result<(), String> {
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(url)
        .await
        .map_err(chain)?;
    let uri: subxt_signer::SecretUri = signer.parse().map_err(chain)?;
    let pair = subxt_signer::sr25519::Keypair::from_uri(&uri).map_err(chain)?;
    let call = subxt::dynamic::transaction(
        "System",
        "remark_with_event",
        vec![subxt::dynamic::Value::from_bytes(remark)],
    );
    api.at_current_block()
        .await
        .map_err(chain)?
        .transactions()
        .sign_and_submit_then_watch_default(&call, &pair)
        .await
        .map_err(chain)?
        .wait_for_finalized_success()
        .await
        .map_err(chain)?;
    Ok(())
}

/// Every `System.Remarked` hash on the chain, in order.
pub async fn remarked(url: &str) -> Result<Vec<[u8; 32]>, String> {
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(url)
        .await
        .map_err(chain)?;
    let latest = api.at_current_block().await.map_err(chain)?.block_number();
    let mut out = Vec::new();
    for n in 1..=latest {
        let at = api.at_block(n).await.map_err(chain)?;
        for ev in at.events().fetch().await.map_err(chain)?.iter() {
            let ev = ev.map_err(chain)?;
            // Remarked { sender: AccountId32, hash: H256 }
            if ev.pallet_name() == "System" && ev.event_name() == "Remarked" {
                let h = <[u8; 32]>::try_from(ev.field_bytes().get(32..).unwrap_or(&[]))
                    .map_err(|_| "a Remarked event without a 32-byte hash".to_string())?;
                out.push(h);
            }
        }
    }
    Ok(out)
}
