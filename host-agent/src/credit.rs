//! The credit check before each hour (the seed's credit model): can each account with running
//! VMs pay for their next hour? Asked of the billing chain (`System.Account` free balance) or of
//! a command the miner configures. The decision what to stop is [`crate::agent::to_stop`].

use crate::agent::Credit;
use crate::config::CreditConfig;
use std::collections::BTreeMap;
use std::time::Duration;

/// Asks about every account in `cost` (account → the next hour's amount).
pub async fn check(
    c: &CreditConfig,
    chain: Option<&str>,
    cost: &BTreeMap<String, u128>,
) -> BTreeMap<String, Credit> {
    let mut out = BTreeMap::new();
    match c {
        CreditConfig::Command {
            argv, timeout_secs, ..
        } => {
            for (account, amount) in cost {
                let v = command(argv, account, *amount, Duration::from_secs(*timeout_secs)).await;
                out.insert(account.clone(), v);
            }
        }
        CreditConfig::ChainBalance { .. } => {
            let Some(url) = chain else {
                for a in cost.keys() {
                    out.insert(
                        a.clone(),
                        Credit::Unknown("no billing chain configured".into()),
                    );
                }
                return out;
            };
            let client = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(url).await;
            for (account, amount) in cost {
                let v = match &client {
                    Ok(c) => balance(c, account, *amount).await,
                    Err(e) => Credit::Unknown(format!("chain {url}: {e}")),
                };
                out.insert(account.clone(), v);
            }
        }
    }
    out
}

async fn command(argv: &[String], account: &str, amount: u128, timeout: Duration) -> Credit {
    let Some((prog, args)) = argv.split_first() else {
        return Credit::Unknown("no command configured".into());
    };
    let run = tokio::process::Command::new(prog)
        .args(args)
        .arg(account)
        .arg(amount.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Credit::Unknown(format!(
            "{prog} did not answer within {}s",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Credit::Unknown(format!("cannot run {prog}: {e}")),
        Ok(Ok(o)) if o.status.success() => Credit::CanPay,
        Ok(Ok(o)) => {
            let first = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(|l| l.chars().take(200).collect::<String>())
            };
            Credit::CannotPay(
                first(&o.stdout)
                    .or_else(|| first(&o.stderr))
                    .unwrap_or_else(|| format!("{prog} exited with {}", o.status)),
            )
        }
    }
}

async fn balance(
    c: &subxt::OnlineClient<subxt::PolkadotConfig>,
    account: &str,
    amount: u128,
) -> Credit {
    use subxt::dynamic::{At, Value};
    let id = match crate::billing::account_id(account) {
        Ok(id) => id,
        Err(why) => return Credit::CannotPay(why),
    };
    let at = match c.at_current_block().await {
        Ok(at) => at,
        Err(e) => return Credit::Unknown(e.to_string()),
    };
    let addr = subxt::dynamic::storage::<([u8; 32],), Value>("System", "Account");
    let v = match at.storage().fetch(addr, (id,)).await {
        Ok(v) => v,
        Err(e) => return Credit::Unknown(format!("System.Account: {e}")),
    };
    let free = v
        .decode()
        .ok()
        .and_then(|v| v.at("data").at("free").and_then(|f| f.as_u128()));
    match free {
        None => Credit::Unknown("System.Account has no data.free on this chain".into()),
        Some(f) if f >= amount => Credit::CanPay,
        Some(f) => Credit::CannotPay(format!(
            "free balance {f} is less than {amount}, the next hour's cost"
        )),
    }
}
