//! `attesta-host serve`: the IO shell around [`crate::agent`]. It owns the libvirt connection,
//! the agent's database and the billing outbox; answers the control socket; polls libvirt for
//! lifecycle changes; closes each hour into usage documents, runs the credit check for the next
//! hour, and drains the outbox to the chain with backoff.
//!
//! Every launch passes the launch gate ([`crate::gate`]) — at create and at every later start,
//! since the files on disk may have changed. A create relays the order to the broker (which
//! refuses what the operator did not sign); a terminate relays the operator's terminate order
//! first, and the VM is destroyed and its disk wiped only once the broker has shredded the key.
//! Time comes from the [`Clock`] the caller passes, so tests can close hours without waiting.

mod backups;
mod lifecycle_chain;
mod tasks;
pub use lifecycle_chain::lifecycle_through;
pub use tasks::IntakeRound;

use crate::agent::{self, Credit, Ev};
use crate::billing::{CallKind, Outbox, State as RecordState, Submitter};
use crate::config::{CreditConfig, HostConfig, OnError, SnpMode};
use crate::control::{ControlRequest, ControlResponse};
use crate::domain::SevParams;
use crate::gate;
use crate::host::{Host, HostError};
use crate::lifecycle::{Action, State};
use crate::platform::{self, Platform};
use crate::refusal::CreateError;
use crate::spec::VmSpec;
use crate::state::{StateDb, VmRecord};
use crate::usage::{HOUR, Terms};
use base64::Engine as _;
use proto::order::Order;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// The simulated PSP of `[snp] mode = "simulated"` (on `[platform]`'s chip).
#[cfg(feature = "simulator")]
fn simulated_psp(cfg: &HostConfig) -> Result<Box<dyn crate::host::SimulatedPsp>, String> {
    Ok(Box::new(crate::sim_psp::SimPsp::new(&cfg.platform)?))
}

/// A production build has no simulated PSP ([`crate::config::check_simulated`] refused first).
#[cfg(not(feature = "simulator"))]
fn simulated_psp(_: &HostConfig) -> Result<Box<dyn crate::host::SimulatedPsp>, String> {
    Err("[snp] mode = \"simulated\": built without the simulator feature".into())
}

/// What a VM holds of this host's capacity.
fn shape(spec: &crate::spec::VmSpec, tenant: &str) -> crate::capacity::Shape {
    crate::capacity::Shape {
        vcpus: u64::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk.size_gib,
        tenant: tenant.into(),
    }
}

/// What the VMs on record hold (every one not terminated, running or not). A record that no
/// longer reads fails the check rather than counting as nothing.
fn holding(vms: &[VmRecord]) -> Result<Vec<crate::capacity::Shape>, CreateError> {
    vms.iter()
        .filter(|v| v.terminated_at.is_none())
        .map(|v| {
            let bad = |why: String| {
                CreateError::Store(format!("VM {} on record cannot be read: {why}", v.vm_id))
            };
            let spec = VmSpec::parse(&v.spec).map_err(|e| bad(e.to_string()))?;
            let tenant = Order::decode_stored(&v.order)
                .map_err(|e| bad(e.to_string()))?
                .tenant;
            Ok(shape(&spec.spec, &tenant))
        })
        .collect()
}

/// Unix seconds, as the daemon sees them.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// What one poll did (for logs and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Lifecycle changes seen in libvirt that the agent had not recorded.
    pub recorded: Vec<Ev>,
    /// Hours closed into usage documents.
    pub closed: Vec<u64>,
    /// VMs stopped by the credit check, with the reason.
    pub stopped: Vec<(String, String)>,
}

struct Retry {
    failures: u32,
    next_at: u64,
}

/// The running agent.
pub struct Daemon {
    cfg: HostConfig,
    keys: Vec<[u8; 32]>,
    /// How the launch gate measures: as built, or as this host's simulated PSP does.
    firmware: measure::Firmware,
    host: Arc<Mutex<Host>>,
    db: StateDb,
    outbox: Outbox,
    platform: Option<Platform>,
    clock: Clock,
    /// One operation at a time: libvirt calls, events and hour closes never interleave.
    ops: tokio::sync::Mutex<()>,
    retry: tokio::sync::Mutex<Retry>,
    kick: tokio::sync::Notify,
    /// Tries of chain tasks that failed for a reason that could pass (see `tasks`).
    task_tries: std::sync::Mutex<std::collections::HashMap<[u8; 32], u32>>,
    /// `[backup]` storage, and the backups running now (see `backups`).
    backups: Option<crate::backup::Backups>,
    backing_up: backups::Running,
}

const CLOSED_THROUGH: &str = "closed_through";
const HEARTBEAT: &str = "heartbeat";

impl Daemon {
    /// Opens libvirt, the database and the outbox, and re-adopts the agent's domains: changes
    /// that happened while it was down are recorded (a stop it did not see is dated at its
    /// last heartbeat, so nobody is billed for time no one observed).
    pub async fn open(cfg: HostConfig, clock: Clock) -> Result<Arc<Daemon>, String> {
        let platform = platform::read(&cfg.platform);
        Daemon::open_with(cfg, clock, platform).await
    }

    /// As [`Daemon::open`], with the platform given (a simulated fleet's chip, read elsewhere).
    pub async fn open_with(
        cfg: HostConfig,
        clock: Clock,
        platform: Result<Platform, String>,
    ) -> Result<Arc<Daemon>, String> {
        make_private_dir(&cfg.state_dir)?;
        let keys = cfg.operator_keys()?;
        let uri = cfg.libvirt_uri.clone();
        let over = cfg.sev.map(|s| SevParams {
            cbitpos: s.cbitpos,
            reduced_phys_bits: s.reduced_phys_bits,
        });
        let grace = Duration::from_secs(cfg.stop_grace_secs);
        crate::config::check_simulated(
            cfg.snp.mode,
            Path::new("/dev/sev").exists(),
            cfg!(feature = "simulator"),
            &cfg.platform,
        )?;
        if cfg!(feature = "simulator") {
            // A workspace-wide build unifies features: say so where a miner will look.
            tracing::warn!(
                "this attesta-host is built with the test-only `simulator` feature; build production agents with `cargo build --release -p host-agent`"
            );
        }
        let simulated = match cfg.snp.mode {
            SnpMode::Hardware => None,
            SnpMode::Simulated if over.is_some() => {
                return Err(
                    "[sev] sets SEV-SNP parameters, which [snp] mode = \"simulated\" does not use: remove one".into(),
                );
            }
            SnpMode::Simulated => {
                let kvm = cfg.snp.accel.kvm(
                    Path::new("/dev/kvm").exists(),
                    Path::new("/sys/module/kvm_pvm").exists(),
                );
                tracing::warn!(
                    accel = if kvm { "kvm" } else { "tcg" },
                    "SIMULATED SEV-SNP: guests here are not isolated from this host; for tests and demos only"
                );
                Some((kvm, cfg.snp.run_dir.clone(), simulated_psp(&cfg)?))
            }
        };
        let host = tokio::task::spawn_blocking(move || {
            match simulated {
                None => Host::open(&uri, over),
                Some((kvm, run_dir, psp)) => Host::open_simulated(&uri, kvm, &run_dir, psp),
            }
            .map(|mut h| {
                h.stop_grace = grace;
                h
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", cfg.libvirt_uri))?;
        let firmware = host.firmware();
        let platform = match platform {
            Ok(p) => {
                tracing::info!(chip_id = %hex::encode(&p.chip_id), reported_tcb = %p.reported_tcb, product = %p.product, source = p.source, "platform");
                Some(p)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this host's chip id and TCB: orders are not checked against the chip here, and `platform` has nothing to report");
                None
            }
        };
        let db = StateDb::open(&cfg.state_db()).await?;
        let outbox = Outbox::open(&cfg.outbox())
            .await
            .map_err(|e| e.to_string())?;
        let backups = match &cfg.backup {
            Some(b) => Some(crate::backup::Backups::open(b).map_err(|e| e.to_string())?),
            None => None,
        };
        let d = Daemon {
            backups,
            backing_up: Default::default(),
            keys,
            firmware,
            host: Arc::new(Mutex::new(host)),
            db,
            outbox,
            platform,
            clock,
            ops: tokio::sync::Mutex::new(()),
            retry: tokio::sync::Mutex::new(Retry {
                failures: 0,
                next_at: 0,
            }),
            kick: tokio::sync::Notify::new(),
            task_tries: Default::default(),
            cfg,
        };
        d.adopt().await?;
        Ok(Arc::new(d))
    }

    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    async fn libvirt<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Host) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, String> {
        let h = self.host.clone();
        tokio::task::spawn_blocking(move || {
            let g = h
                .lock()
                .map_err(|_| "libvirt connection lost".to_string())?;
            f(&g).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn observe(&self) -> Result<BTreeMap<String, bool>, String> {
        Ok(self
            .libvirt(|h| h.list())
            .await?
            .into_iter()
            .map(|v| (v.vm_id, v.state == State::Running))
            .collect())
    }

    async fn adopt(&self) -> Result<(), String> {
        let now = self.now();
        let observed = self.observe().await?;
        let recorded = agent::last_states(&self.db.events().await?);
        let hb = self.db.meta(HEARTBEAT).await?;
        let evs = agent::reconcile(&recorded, &observed, hb, true, now);
        self.db.record(&evs).await?;
        self.journal_observed(&evs, "changed while the agent was down")
            .await?;
        for e in &evs {
            tracing::warn!(vm_id = %e.vm_id, running = e.running, at = e.at, "changed while the agent was down");
        }
        let managed: Vec<String> = self
            .db
            .vms()
            .await?
            .into_iter()
            .filter(|v| v.terminated_at.is_none())
            .map(|v| v.vm_id)
            .collect();
        for (vm, running) in &observed {
            if managed.contains(vm) {
                tracing::info!(vm_id = %vm, running, "adopted");
            } else {
                tracing::warn!(vm_id = %vm, "a domain carries this agent's metadata but no admitted order is on record: not billed, not started by this agent");
            }
        }
        if self.db.meta(CLOSED_THROUGH).await?.is_none() {
            // Nothing before the agent's first start is billed.
            self.db
                .set_meta(CLOSED_THROUGH, (now / HOUR).saturating_sub(1))
                .await?;
        }
        self.db.set_meta(HEARTBEAT, now).await
    }

    /// Billing terms of every VM the agent has admitted (terminated ones too: their last hour
    /// is still billed).
    async fn terms(&self) -> Result<BTreeMap<String, Terms>, String> {
        let mut out = BTreeMap::new();
        for v in self.db.vms().await? {
            if let Ok(Order {
                billing: Some(b), ..
            }) = Order::decode_stored(&v.order)
            {
                out.insert(v.vm_id, agent::terms_of(&b));
            }
        }
        Ok(out)
    }

    /// One poll: record changes libvirt shows, close ended hours, and before the new hour run
    /// the credit check.
    pub async fn tick(&self) -> Result<Tick, String> {
        let _g = self.ops.lock().await;
        let now = self.now();
        let observed = self.observe().await?;
        let recorded = agent::last_states(&self.db.events().await?);
        let evs = agent::reconcile(&recorded, &observed, None, false, now);
        self.db.record(&evs).await?;
        self.journal_observed(&evs, "changed outside the agent")
            .await?;
        for e in &evs {
            tracing::info!(vm_id = %e.vm_id, running = e.running, "state changed outside the agent");
        }
        self.db.set_meta(HEARTBEAT, now).await?;
        let closed = self.close_hours(now).await?;
        if let Err(e) = self.lifecycle_if_due(now).await {
            tracing::warn!(error = %e, "lifecycle records not batched");
        }
        let stopped = if closed.is_empty() {
            Vec::new()
        } else {
            self.kick.notify_one();
            self.credit_round().await?
        };
        Ok(Tick {
            recorded: evs,
            closed,
            stopped,
        })
    }

    async fn close_hours(&self, now: u64) -> Result<Vec<u64>, String> {
        let through = self.db.meta(CLOSED_THROUGH).await?.unwrap_or(0);
        let range = agent::hours_to_close(through, now);
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let events = self.db.events().await?;
        let terms = self.terms().await?;
        let mut closed = Vec::new();
        for p in range {
            let docs = agent::usage_for(p, &events, &terms);
            for doc in &docs {
                match self.outbox.enqueue(doc).await {
                    Ok(_) => {
                        tracing::info!(period = p, account = %doc.account, total = %doc.total, usage_hash = %hex::encode(doc.hash), "usage recorded")
                    }
                    Err(e) => {
                        tracing::error!(period = p, account = %doc.account, error = %e, "usage NOT recorded")
                    }
                }
            }
            self.db.set_meta(CLOSED_THROUGH, p).await?;
            closed.push(p);
        }
        Ok(closed)
    }

    /// The credit check for the hour ahead; stops the VMs of accounts that cannot pay.
    async fn credit_round(&self) -> Result<Vec<(String, String)>, String> {
        let Some(credit) = &self.cfg.credit else {
            return Ok(Vec::new());
        };
        let running = self.observe().await?;
        let terms = self.terms().await?;
        let cost = agent::next_hour_cost(&running, &terms);
        if cost.is_empty() {
            return Ok(Vec::new());
        }
        let chain = self.cfg.billing.as_ref().map(|b| b.chain.as_str());
        let verdicts = crate::credit::check(credit, chain, &cost).await;
        for (a, v) in &verdicts {
            if let Credit::Unknown(why) = v {
                tracing::warn!(account = %a, error = %why, "credit check failed");
            }
        }
        let stop_on_error = on_error(credit) == OnError::Stop;
        let stops = agent::to_stop(&running, &terms, &verdicts, stop_on_error);
        let mut done = Vec::new();
        for (vm, why) in stops {
            tracing::warn!(vm_id = %vm, reason = %why, "stopping for credit");
            let id = vm.clone();
            match self.libvirt(move |h| h.act(&id, Action::Stop)).await {
                Ok(_) => {
                    self.db
                        .record(&[Ev {
                            vm_id: vm.clone(),
                            running: false,
                            at: self.now(),
                        }])
                        .await?;
                    self.db.set_stop_reason(&vm, Some(&why)).await?;
                    self.db
                        .journal(&vm, "credit_stopped", self.now(), Some(&why))
                        .await?;
                    done.push((vm, why));
                }
                Err(e) => tracing::error!(vm_id = %vm, error = %e, "could not stop"),
            }
        }
        Ok(done)
    }

    /// Drains the outbox if it has unfinished records and the backoff allows; returns whether
    /// a drain ran and reached the chain.
    pub async fn drain_if_due(&self) -> Result<Option<crate::billing::Drained>, String> {
        let Some(b) = &self.cfg.billing else {
            return Ok(None);
        };
        let records = self.outbox.records().await.map_err(|e| e.to_string())?;
        if !records
            .iter()
            .any(|r| matches!(r.state, RecordState::Pending | RecordState::Signed { .. }))
        {
            return Ok(None);
        }
        let mut retry = self.retry.lock().await;
        let now = self.now();
        if now < retry.next_at {
            return Ok(None);
        }
        let secret = Zeroizing::new(
            std::fs::read_to_string(&b.signer_file)
                .map_err(|e| format!("billing.signer_file {}: {e}", b.signer_file.display()))?,
        );
        let kind = CallKind::parse(&b.call)?;
        let r = match Submitter::connect(&b.chain, secret.trim(), kind).await {
            Ok(s) => s.drain(&self.outbox).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(d) if d.deferred == 0 => {
                retry.failures = 0;
                retry.next_at = 0;
                tracing::info!(
                    submitted = d.submitted,
                    confirmed = d.confirmed,
                    failed = d.failed,
                    resigned = d.resigned,
                    "billing drained"
                );
                Ok(Some(d))
            }
            other => {
                retry.failures = retry.failures.saturating_add(1);
                let wait = agent::backoff(retry.failures, b.max_backoff_secs);
                retry.next_at = now + wait;
                let why = match &other {
                    Ok(d) => format!("{} record(s) deferred", d.deferred),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(error = %why, retry_in_secs = wait, "billing: chain not reached");
                other.map(Some).map_err(|e| e.to_string())
            }
        }
    }

    /// Answers one control request.
    pub async fn handle(&self, req: ControlRequest) -> ControlResponse {
        let r = match req {
            ControlRequest::Create { spec, order, start } => self
                .create(&spec, &order, start)
                .await
                .map_err(String::from),
            ControlRequest::Start { vm_id } => self.start(&vm_id).await,
            ControlRequest::Stop { vm_id } => self.simple(&vm_id, Action::Stop).await,
            ControlRequest::Reboot { vm_id } => self.simple(&vm_id, Action::Reboot).await,
            ControlRequest::Terminate { vm_id, order } => self.terminate(&vm_id, &order).await,
            ControlRequest::List => self.list().await,
            ControlRequest::Backup { vm_id } => self.backup(&vm_id).await,
            ControlRequest::Backups { vm_id } => self.backups_of(&vm_id).await,
            ControlRequest::Restore {
                spec,
                order,
                backup,
                start,
            } => self.restore(&spec, &order, backup, start).await,
            ControlRequest::Platform => match &self.platform {
                Some(p) => Ok(p.to_json()),
                None => platform::read(&self.cfg.platform).map(|p| p.to_json()),
            },
        };
        match r {
            Ok(v) => ControlResponse::ok(v),
            Err(e) => ControlResponse::err(e),
        }
    }

    async fn record(&self, vm_id: &str) -> Result<VmRecord, String> {
        self.db
            .vms()
            .await?
            .into_iter()
            .find(|v| v.vm_id == vm_id && v.terminated_at.is_none())
            .ok_or_else(|| format!("no VM {vm_id} is managed by this agent"))
    }

    /// Creates a VM from a spec and an operator's register order (base64): the launch gate,
    /// this host's chip, the VM id never used here, capacity; then the broker registers the
    /// order and libvirt defines the domain. The same path for the control socket and the chain.
    pub(crate) async fn create(
        &self,
        spec: &str,
        order_b64: &str,
        start: bool,
    ) -> Result<serde_json::Value, CreateError> {
        self.create_on(spec, order_b64, start, None).await
    }

    /// `create`, on a prepared disk (`restore`) instead of a blank one.
    async fn create_on(
        &self,
        spec: &str,
        order_b64: &str,
        start: bool,
        prepared: Option<&Path>,
    ) -> Result<serde_json::Value, CreateError> {
        let order = base64::engine::general_purpose::STANDARD
            .decode(order_b64.trim())
            .map_err(|_| CreateError::OrderEncoding)?;
        let c = VmSpec::parse(spec).map_err(|e| CreateError::Spec(e.to_string()))?;
        let now = self.now();
        let registered = {
            let _g = self.ops.lock().await;
            // A VM id used before is refused before anything is read from disk.
            let vms = self.db.vms().await.map_err(CreateError::Store)?;
            if vms.iter().any(|v| v.vm_id == c.spec.vm_id) {
                return Err(CreateError::Duplicate(c.spec.vm_id.clone()));
            }
            let ok = gate::admit_with(&c, &order, &self.keys, now, self.firmware)
                .map_err(|e| CreateError::Gate(e.to_string()))?;
            if let Some(b) = &ok.order.billing
                && b.account.starts_with('#')
            {
                return Err(CreateError::BillingAccount(b.account.clone()));
            }
            self.chip_allowed(&ok.order)?;
            self.cfg
                .capacity
                .admit(&holding(&vms)?, &shape(&c.spec, &ok.order.tenant))?;
            let registered = match self.relay(false, order.clone()).await? {
                Relayed::Done => "registered with the broker",
                Relayed::Already => "already registered with the broker",
                Relayed::NoBroker => "not registered: no [kbs] configured",
            };
            self.db
                .add_vm(&VmRecord {
                    vm_id: c.spec.vm_id.clone(),
                    spec: spec.to_string(),
                    order,
                    admitted_at: now,
                    stop_reason: None,
                    terminated_at: None,
                })
                .await
                .map_err(CreateError::Store)?;
            let c2 = c.clone();
            let disk = prepared.map(Path::to_path_buf);
            let defined = self
                .libvirt(move |h| match &disk {
                    None => h.create(&c2),
                    Some(p) => h.create_on(&c2, p),
                })
                .await;
            if let Err(e) = defined {
                let _ = self.db.mark_terminated(&c.spec.vm_id, now).await;
                return Err(CreateError::Libvirt(e));
            }
            self.db
                .journal(&c.spec.vm_id, "created", now, None)
                .await
                .map_err(CreateError::Store)?;
            tracing::info!(vm_id = %c.spec.vm_id, digest = %hex::encode(ok.digest), broker = registered, "VM created");
            if !start {
                return Ok(serde_json::json!({
                    "vm_id": c.spec.vm_id, "state": "stopped", "measurement": hex::encode(ok.digest),
                    "broker": registered,
                }));
            }
            registered
        };
        // Created: a start that fails leaves the VM defined and stopped (the error says why).
        let mut v = self
            .start(&c.spec.vm_id)
            .await
            .map_err(CreateError::NotStarted)?;
        v["broker"] = serde_json::json!(registered);
        Ok(v)
    }

    /// This host's chip must be among the order's (where the platform is known).
    fn chip_allowed(&self, order: &Order) -> Result<(), CreateError> {
        match &self.platform {
            Some(p)
                if !order
                    .chip_ids
                    .iter()
                    .any(|id| id.as_slice() == p.chip_id.as_slice()) =>
            {
                Err(CreateError::Chip {
                    chip: hex::encode(&p.chip_id),
                    count: order.chip_ids.len(),
                })
            }
            _ => Ok(()),
        }
    }

    async fn start(&self, vm_id: &str) -> Result<serde_json::Value, String> {
        let _g = self.ops.lock().await;
        let rec = self.record(vm_id).await?;
        self.backing_up.refuse_start(vm_id)?;
        let c = VmSpec::parse(&rec.spec).map_err(|e| format!("spec on record: {e}"))?;
        // The order's expiry is judged when it was admitted; its signature and measurements
        // bind every launch.
        let ok = gate::admit_with(&c, &rec.order, &self.keys, rec.admitted_at, self.firmware)
            .map_err(|e| format!("launch gate: {e}"))?;
        if let (Some(credit), Some(b)) = (&self.cfg.credit, &ok.order.billing) {
            let mut running = self.observe().await?;
            running.insert(vm_id.to_string(), true);
            let cost = agent::next_hour_cost(&running, &self.terms().await?);
            let need = cost.get(&b.account).copied().unwrap_or(0);
            let chain = self.cfg.billing.as_ref().map(|b| b.chain.as_str());
            let one: BTreeMap<String, u128> = [(b.account.clone(), need)].into();
            match crate::credit::check(credit, chain, &one)
                .await
                .remove(&b.account)
            {
                Some(Credit::CannotPay(why)) => {
                    return Err(format!(
                        "not started: account {} cannot pay: {why}",
                        b.account
                    ));
                }
                Some(Credit::Unknown(why)) if on_error(credit) == OnError::Stop => {
                    return Err(format!("not started: credit check failed: {why}"));
                }
                _ => {}
            }
        }
        let id = vm_id.to_string();
        let state = self.libvirt(move |h| h.act(&id, Action::Start)).await?;
        self.db
            .record(&[Ev {
                vm_id: vm_id.into(),
                running: true,
                at: self.now(),
            }])
            .await?;
        self.db.set_stop_reason(vm_id, None).await?;
        self.db.journal(vm_id, "running", self.now(), None).await?;
        tracing::info!(vm_id, "VM started");
        Ok(serde_json::json!({
            "vm_id": vm_id, "state": state_name(state), "measurement": hex::encode(ok.digest),
        }))
    }

    async fn simple(&self, vm_id: &str, action: Action) -> Result<serde_json::Value, String> {
        let _g = self.ops.lock().await;
        self.record(vm_id).await?;
        let id = vm_id.to_string();
        let state = self.libvirt(move |h| h.act(&id, action)).await?;
        if action == Action::Stop {
            self.db
                .record(&[Ev {
                    vm_id: vm_id.into(),
                    running: false,
                    at: self.now(),
                }])
                .await?;
        }
        let event = match action {
            Action::Stop => "stopped",
            Action::Reboot => "rebooted",
            _ => "changed",
        };
        self.db.journal(vm_id, event, self.now(), None).await?;
        tracing::info!(vm_id, ?action, "done");
        Ok(serde_json::json!({"vm_id": vm_id, "state": state_name(state)}))
    }

    async fn terminate(&self, vm_id: &str, order_b64: &str) -> Result<serde_json::Value, String> {
        let ops = self.ops.lock().await;
        let order = base64::engine::general_purpose::STANDARD
            .decode(order_b64.trim())
            .map_err(|_| "the order is not base64".to_string())?;
        gate::terminate_order(vm_id, &order, &self.keys, self.now())
            .map_err(|e| format!("terminate refused: {e}"))?;
        self.record(vm_id).await?;
        // The key first: a wiped disk whose key survives is not terminated.
        let broker = match self.relay(true, order).await {
            Ok(Relayed::Done) => "key crypto-shredded by the broker",
            Ok(Relayed::Already) => "the broker has no key for this VM",
            Ok(Relayed::NoBroker) => "no [kbs] configured: the key was not shredded",
            Err(e) => {
                return Err(format!(
                    "the broker did not shred the key ({e}); the VM is untouched — retry"
                ));
            }
        };
        // The key is gone: a backup of it stops at its next chunk, before the wipe (its
        // deletion waits for it below).
        self.backing_up.cancel(vm_id);
        let id = vm_id.to_string();
        let was = self.libvirt(move |h| h.state(&id)).await?;
        let id = vm_id.to_string();
        self.libvirt(move |h| h.act(&id, Action::Terminate)).await?;
        let now = self.now();
        if was == State::Running {
            self.db
                .record(&[Ev {
                    vm_id: vm_id.into(),
                    running: false,
                    at: now,
                }])
                .await?;
        }
        // Its backups are to be deleted, committed with the termination itself.
        self.db
            .mark_terminated_deleting_backups(vm_id, now, self.backups.is_some())
            .await?;
        drop(ops);
        let backups = self.delete_backups(vm_id).await;
        tracing::info!(
            vm_id,
            broker,
            backups,
            "VM terminated: domain destroyed and undefined, disk wiped"
        );
        Ok(serde_json::json!({
            "vm_id": vm_id, "state": "terminated", "broker": broker, "backups": backups,
        }))
    }

    async fn list(&self) -> Result<serde_json::Value, String> {
        let vms = self.libvirt(|h| h.list()).await?;
        let mut out = Vec::new();
        let records = self.db.vms().await?;
        for r in records.iter().filter(|r| r.terminated_at.is_none()) {
            let o = Order::decode_stored(&r.order).ok();
            let state = vms
                .iter()
                .find(|v| v.vm_id == r.vm_id)
                .map(|v| state_name(v.state))
                .unwrap_or("missing");
            out.push(serde_json::json!({
                "vm_id": r.vm_id, "state": state, "managed": true,
                "tenant": o.as_ref().map(|o| o.tenant.clone()),
                "account": o.as_ref().and_then(|o| o.billing.as_ref().map(|b| b.account.clone())),
                "rate_per_hour": o.as_ref().and_then(|o| o.billing.as_ref().map(|b| b.rate_per_hour)),
                "stop_reason": r.stop_reason,
            }));
        }
        for v in vms.iter().filter(|v| {
            !records
                .iter()
                .any(|r| r.vm_id == v.vm_id && r.terminated_at.is_none())
        }) {
            out.push(serde_json::json!({
                "vm_id": v.vm_id, "state": state_name(v.state), "managed": false,
            }));
        }
        Ok(serde_json::Value::Array(out))
    }

    async fn relay(&self, terminate: bool, doc: Vec<u8>) -> Result<Relayed, CreateError> {
        let Some(k) = &self.cfg.kbs else {
            return Ok(Relayed::NoBroker);
        };
        let unreachable = CreateError::BrokerUnreachable;
        // Every listed broker, resolved now (a replica that does not resolve is passed over).
        let mut addrs = Vec::new();
        let mut unresolved = Vec::new();
        for name in k.addresses().map_err(unreachable)? {
            match tokio::net::lookup_host(&name).await {
                Ok(mut found) => addrs.extend(found.next()),
                Err(e) => unresolved.push(format!("{name}: {e}")),
            }
        }
        let Some(&first) = addrs.first() else {
            return Err(unreachable(format!(
                "kbs.address: {}",
                unresolved.join("; ")
            )));
        };
        for why in &unresolved {
            tracing::warn!(%why, "a listed broker does not resolve; trying the others");
        }
        let remote = kbs::client::Remote::from_pem_files(
            first,
            k.server_name.clone(),
            &k.ca,
            &k.client_cert,
            &k.client_key,
        )
        .map_err(unreachable)?;
        match kbs::client::send_order_any(&addrs, remote, terminate, doc).await {
            Ok(_) => Ok(Relayed::Done),
            Err(kbs::client::OrderError::Refused { code, .. })
                if (!terminate && code == "vm_exists") || (terminate && code == "no_such_vm") =>
            {
                Ok(Relayed::Already)
            }
            Err(kbs::client::OrderError::Refused { code, detail }) => {
                Err(CreateError::BrokerRefused { code, detail })
            }
            Err(kbs::client::OrderError::Transport(e)) => Err(unreachable(e)),
        }
    }

    /// Serves the control socket and runs the poll and billing loops until SIGINT/SIGTERM.
    pub async fn serve(self: Arc<Self>) -> Result<(), String> {
        let path = self.cfg.control_socket.clone();
        let listener = bind_socket(&path, self.cfg.control_group)?;
        tracing::info!(socket = %path.display(), libvirt = %self.cfg.libvirt_uri, "host agent ready");
        let poll = Duration::from_secs(self.cfg.poll_secs.max(1));
        let d = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                if let Err(e) = d.tick().await {
                    tracing::error!(error = %e, "poll failed");
                }
            }
        });
        // Deletions of terminated VMs' backups that could not be done then: a loop of their
        // own, outside the operation lock, since the store may be slow or down.
        if self.backups.is_some() {
            let d = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(poll).await;
                    d.retry_backup_deletions().await;
                }
            });
        }
        if self.cfg.chain.is_some() {
            tokio::spawn(self.clone().follow_chain());
        }
        let d = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = d.drain_if_due().await {
                    tracing::debug!(error = %e, "drain");
                }
                let _ = tokio::time::timeout(poll, d.kick.notified()).await;
            }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        loop {
            tokio::select! {
                a = listener.accept() => {
                    let Ok((s, _)) = a else { continue };
                    let d = self.clone();
                    tokio::spawn(async move { d.connection(s).await });
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
        tracing::info!("host agent stopped (its VMs keep running)");
        Ok(())
    }

    async fn connection(&self, s: tokio::net::UnixStream) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let (r, mut w) = s.into_split();
        let mut line = Vec::new();
        let mut r = tokio::io::BufReader::new(r.take(crate::control::MAX_REQUEST as u64 + 1));
        let resp = match r.read_until(b'\n', &mut line).await {
            Err(e) => ControlResponse::err(e),
            Ok(_) => match crate::control::parse_request(&line) {
                Ok(req) => self.handle(req).await,
                Err(e) => ControlResponse::err(e),
            },
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }
}

enum Relayed {
    Done,
    Already,
    NoBroker,
}

fn on_error(c: &CreditConfig) -> OnError {
    match c {
        CreditConfig::ChainBalance { on_error } | CreditConfig::Command { on_error, .. } => {
            *on_error
        }
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Running => "running",
        State::Stopped => "stopped",
        State::Terminated => "terminated",
    }
}

fn make_private_dir(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p).map_err(|e| format!("state_dir {}: {e}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("state_dir {}: {e}", p.display()))
}

fn bind_socket(path: &Path, group: Option<u32>) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |e: std::io::Error| format!("control_socket {}: {e}", path.display());
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        // A directory of our own: nobody else can reach the socket even before its mode is set.
        std::fs::create_dir_all(dir).map_err(err)?;
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(dir, None, Some(gid)).map_err(err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "control_socket {}: another agent is listening there",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(format!(
                "control_socket {}: exists and is not a socket",
                path.display()
            ));
        }
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    let mode = if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(l)
}
