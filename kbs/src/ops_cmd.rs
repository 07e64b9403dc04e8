//! Operator tooling: sign orders and allowlists (with keys kept off the broker), issue host and
//! operator client certificates, and export the audit log with a fresh signed checkpoint.

use crate::clock::now;
use aws_lc_rs::signature::Ed25519KeyPair;
use clap::{Args, Subcommand, ValueEnum};
use kbs::service::{Role, issue_client_cert};
use proto::order::{Allowlist, ORDER_VERSION, Order, OrderKind};
use serde_bytes::ByteBuf;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum OrderCmd {
    /// Sign an order that registers a VM.
    Register(RegisterOrder),
    /// Sign an order that terminates a VM (crypto-shreds its key).
    Terminate(TerminateOrder),
}

#[derive(Args)]
pub struct RegisterOrder {
    /// The operator's order key (Ed25519 PKCS#8, e.g. operator.key from `init`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[arg(long)]
    pub vm_id: String,
    #[arg(long)]
    pub tenant: String,
    /// An allowed launch measurement (96 hex digits); repeat for several.
    #[arg(long = "measurement", value_name = "HEX", required = true)]
    pub measurements: Vec<String>,
    /// Chip id of a host the VM may run on (128 hex digits); repeat for several.
    #[arg(long = "chip-id", value_name = "HEX", required = true)]
    pub chip_ids: Vec<String>,
    /// Appraisal policy (TOML, see examples/policy.toml); default: the built-in policy.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Boot configuration released with the key (e.g. SSH public keys).
    #[arg(long, value_name = "FILE")]
    pub boot_config: Option<PathBuf>,
    /// The VM's mesh overlay address with prefix (e.g. 10.42.7.9/16): the broker certifies it
    /// for the key the attested guest binds in its report (needs `guest_ca` in `[mesh]`).
    #[arg(long, value_name = "CIDR")]
    pub mesh_ip: Option<String>,
    /// The VM's key is split across independent brokers: name each broker holding a share,
    /// this one included (e.g. --split-broker operator --split-broker tenant), each registering
    /// its own order; with --split-threshold. Each broker generates only its own share.
    #[arg(
        long = "split-broker",
        value_name = "NAME",
        requires = "split_threshold"
    )]
    pub split_brokers: Vec<String>,
    /// How many shares open the disk: 2 (no broker alone) to the number of brokers.
    #[arg(long, value_name = "K", requires = "split_brokers")]
    pub split_threshold: Option<u32>,
    /// The account (SS58) that pays for the VM's running time; with --rate-per-hour.
    /// Without them the host agent does not bill the VM.
    #[arg(long, value_name = "SS58", requires = "rate_per_hour")]
    pub account: Option<String>,
    /// Price per running hour in the chain's smallest unit; with --account.
    #[arg(long, value_name = "N", requires = "account")]
    pub rate_per_hour: Option<u64>,
    /// How long the order may be used, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub valid_for: u64,
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct TerminateOrder {
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[arg(long)]
    pub vm_id: String,
    #[arg(long)]
    pub tenant: String,
    #[arg(long, default_value_t = 3600)]
    pub valid_for: u64,
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct AllowlistSign {
    /// The offline allowlist key (Ed25519 PKCS#8).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Must not be lower than the broker's current epoch.
    #[arg(long)]
    pub epoch: u64,
    /// An approved launch measurement (96 hex digits); repeat for several.
    #[arg(long = "measurement", value_name = "HEX", required = true)]
    pub measurements: Vec<String>,
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Host,
    Operator,
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Issue a client certificate for a host agent or an operator from the broker's TLS CA.
    Issue {
        /// The CA key (tls-ca.key from `init`).
        #[arg(long, value_name = "FILE")]
        ca_key: PathBuf,
        /// The client's name (certificate CN), e.g. the miner's host name.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Writes NAME.crt and NAME.key (0600) here.
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

fn key(p: &Path) -> Result<Ed25519KeyPair, String> {
    let der = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ed25519KeyPair::from_pkcs8(&der)
        .map_err(|_| format!("{}: not an Ed25519 PKCS#8 key", p.display()))
}

fn hexn(s: &str, n: usize, what: &str) -> Result<ByteBuf, String> {
    match hex::decode(s.trim()) {
        Ok(v) if v.len() == n => Ok(ByteBuf::from(v)),
        _ => Err(format!("{what} {s:?}: expected {} hex digits", n * 2)),
    }
}

fn read_opt(p: &Option<PathBuf>) -> Result<Vec<u8>, String> {
    match p {
        Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())),
        None => Ok(Vec::new()),
    }
}

fn out(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    crate::init_cmd::write_file(path, bytes, secret, true)
}

fn finish(cmd: &str, r: Result<String, String>) -> ExitCode {
    match r {
        Ok(m) => {
            println!("{m}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attesta-kbs {cmd}: {e}");
            ExitCode::from(2)
        }
    }
}

pub fn order_cmd(c: &OrderCmd) -> ExitCode {
    let r = (|| -> Result<String, String> {
        let (k, order, path) = match c {
            OrderCmd::Register(a) => {
                let policy = String::from_utf8(read_opt(&a.policy)?)
                    .map_err(|_| "the policy is not UTF-8".to_string())?;
                if !policy.is_empty() {
                    snp::Policy::from_toml(&policy).map_err(|e| format!("policy: {e}"))?;
                }
                let order = Order {
                    v: ORDER_VERSION,
                    kind: OrderKind::Register,
                    vm_id: a.vm_id.clone(),
                    tenant: a.tenant.clone(),
                    measurements: a
                        .measurements
                        .iter()
                        .map(|m| hexn(m, 48, "measurement"))
                        .collect::<Result<_, _>>()?,
                    policy,
                    chip_ids: a
                        .chip_ids
                        .iter()
                        .map(|m| hexn(m, 64, "chip id"))
                        .collect::<Result<_, _>>()?,
                    not_after: now() + a.valid_for,
                    boot_config: ByteBuf::from(read_opt(&a.boot_config)?),
                    billing: match (&a.account, a.rate_per_hour) {
                        (Some(account), Some(rate_per_hour)) => Some(proto::order::Billing {
                            account: account.clone(),
                            rate_per_hour,
                        }),
                        _ => None,
                    },
                    mesh_ip: match &a.mesh_ip {
                        Some(ip) => Some(mesh_ip(ip)?),
                        None => None,
                    },
                    split: match a.split_threshold {
                        Some(threshold) => {
                            let s = proto::order::Split {
                                threshold,
                                brokers: a.split_brokers.clone(),
                            };
                            s.check()
                                .map_err(|e| format!("--split-broker/--split-threshold: {e}"))?;
                            Some(s)
                        }
                        None => None,
                    },
                };
                (key(&a.key)?, order, &a.out)
            }
            OrderCmd::Terminate(a) => (
                key(&a.key)?,
                Order {
                    v: ORDER_VERSION,
                    kind: OrderKind::Terminate,
                    vm_id: a.vm_id.clone(),
                    tenant: a.tenant.clone(),
                    measurements: vec![],
                    policy: String::new(),
                    chip_ids: vec![],
                    not_after: now() + a.valid_for,
                    boot_config: ByteBuf::new(),
                    billing: None,
                    mesh_ip: None,
                    split: None,
                },
                &a.out,
            ),
        };
        let doc = order.sign(&k);
        // Check what we signed the way the broker will.
        let pk: [u8; 32] = aws_lc_rs::signature::KeyPair::public_key(&k)
            .as_ref()
            .try_into()
            .map_err(|_| "bad key".to_string())?;
        Order::verify(&doc, &[pk], now()).map_err(|e| format!("the order is not valid: {e}"))?;
        out(path, &doc, false)?;
        Ok(format!(
            "wrote {} ({:?} order for {}, valid until {})",
            path.display(),
            order.kind,
            order.vm_id,
            order.not_after
        ))
    })();
    finish("order", r)
}

pub fn allowlist_sign(a: &AllowlistSign) -> ExitCode {
    let r = (|| -> Result<String, String> {
        let k = key(&a.key)?;
        let list = Allowlist {
            v: ORDER_VERSION,
            epoch: a.epoch,
            measurements: a
                .measurements
                .iter()
                .map(|m| hexn(m, 48, "measurement"))
                .collect::<Result<_, _>>()?,
        };
        out(&a.out, &list.sign(&k), false)?;
        Ok(format!(
            "wrote {} (epoch {}, {} measurements)",
            a.out.display(),
            a.epoch,
            list.measurements.len()
        ))
    })();
    finish("allowlist sign", r)
}

pub fn cert_cmd(c: &CertCmd) -> ExitCode {
    let CertCmd::Issue {
        ca_key,
        name,
        role,
        out_dir,
    } = c;
    let r = (|| -> Result<String, String> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err("--name must be 1 or more of [A-Za-z0-9._-]".into());
        }
        let pem =
            std::fs::read_to_string(ca_key).map_err(|e| format!("{}: {e}", ca_key.display()))?;
        let role = match role {
            RoleArg::Host => Role::Host,
            RoleArg::Operator => Role::Operator,
        };
        let (cert, key) = issue_client_cert(&pem, name, role)?;
        std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        out(&out_dir.join(format!("{name}.crt")), cert.as_bytes(), false)?;
        out(&out_dir.join(format!("{name}.key")), key.as_bytes(), true)?;
        Ok(format!(
            "wrote {0}/{name}.crt and {0}/{name}.key (role {role:?})",
            out_dir.display()
        ))
    })();
    finish("cert issue", r)
}

/// An overlay address with prefix, as the mesh's certificates carry them.
fn mesh_ip(s: &str) -> Result<String, String> {
    let bad = || format!("--mesh-ip {s:?}: expected an address with prefix, e.g. 10.42.7.9/16");
    let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > if ip.is_ipv4() { 32 } else { 128 } {
        return Err(bad());
    }
    Ok(format!("{ip}/{prefix}"))
}
