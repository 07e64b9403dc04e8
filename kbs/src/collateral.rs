//! Where the broker finds what a guest's evidence does not carry: the VCEK (on real hardware hosts
//! often supply no certificate table), the ASK/ARK chain of a non-AMD root, and CRLs. Sources, in
//! order: an operator-filled offline store (`offline_dir`, trustee's layout), then AMD's key
//! server (`kds_url`) through [`snp_kds::KdsClient`], whose on-disk cache (`cache_dir`), single
//! flight and backoff mean one fetch per chip and TCB, ever: later releases read the cache.
//! CRLs are handed to the verifier and not looked for again until their nextUpdate.
//!
//! Only chips the VM's order names are ever looked up, so a report with an invented chip id
//! cannot make the broker spend the key server's rate limit. The report is not yet verified
//! when its VCEK is looked for, so its TCB may be made up: a TCB below the policy is never
//! looked up (it would be denied anyway), and each VM has a budget of distinct chip-and-TCB
//! key-server fetches per day (`vm_fetches_per_day`), so that evidence with ever new TCBs can
//! neither keep the key server busy nor fill the cache. The budget is the VM's, not the chip's:
//! challenges are free, so anyone who can name one VM could otherwise spend a shared chip's
//! budget and lock every other tenant's VM on it out after a firmware update. A retry of the
//! same chip and TCB is free, and only a fetch actually started is counted. A lookup that fails denies the
//! release (`vcek_unavailable`); nothing here can make a report pass that would not pass with
//! the same certificates in its table: the verifier checks every byte fetched.

use proto::order::Order;
use serde::{Deserialize, Serialize};
use snp::reason::CertRole;
use snp::report::SigningKey;
use snp::{AttestationReport, Crl, Evidence, Policy, Product, Reason, Tcb, Verdict, Verifier};
use snp_kds::{Backoff, KdsClient, KdsError, OfflineStore};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `[collateral]` in kbs.toml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollateralConfig {
    /// An offline store (`vcek/{hwid}/…_vcek.der`, `crl/{Product}.crl`,
    /// `cert_chain/{Product}.pem`), looked in first.
    #[serde(default)]
    pub offline_dir: Option<PathBuf>,
    /// The key server (default AMD's); `"none"`: the offline store only.
    #[serde(default = "default_kds_url")]
    pub kds_url: String,
    /// Where fetched certificates and CRLs are kept (default `kds-cache` beside kbs.toml).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Fetch each product's CRL from the key server, again only after its nextUpdate
    /// (default true).
    #[serde(default = "yes")]
    pub fetch_crls: bool,
    /// How long a release waits for the key server (default 10 s; the fetch itself goes on,
    /// with backoff, and fills the cache for the guest's next attempt).
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_secs: u64,
    /// Distinct VCEKs (chip and TCB) fetched from the key server for one VM in any 24 hours
    /// (default 8, at least 1; a chip's TCB changes with a firmware update, a few times a
    /// year). Cache hits and retries of the same VCEK do not count.
    #[serde(default = "default_vm_fetches")]
    pub vm_fetches_per_day: u32,
}

fn default_vm_fetches() -> u32 {
    8
}

fn default_kds_url() -> String {
    snp::kds::AMD_KDS_URL.to_string()
}

fn yes() -> bool {
    true
}

fn default_fetch_timeout() -> u64 {
    10
}

impl Default for CollateralConfig {
    fn default() -> Self {
        CollateralConfig {
            offline_dir: None,
            kds_url: default_kds_url(),
            cache_dir: None,
            fetch_crls: true,
            fetch_timeout_secs: default_fetch_timeout(),
            vm_fetches_per_day: default_vm_fetches(),
        }
    }
}

impl CollateralConfig {
    /// Relative paths are relative to `base` (kbs.toml's directory); the cache defaults there.
    pub fn resolve(&mut self, base: &Path) {
        if let Some(p) = &mut self.offline_dir
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
        let cache = self
            .cache_dir
            .take()
            .unwrap_or_else(|| PathBuf::from("kds-cache"));
        self.cache_dir = Some(if cache.is_relative() {
            base.join(cache)
        } else {
            cache
        });
    }

    /// Whether a key server is configured.
    pub fn kds(&self) -> Option<&str> {
        let u = self.kds_url.trim();
        (!u.is_empty() && !u.eq_ignore_ascii_case("none")).then_some(u)
    }
}

/// Why no VCEK could be had.
#[derive(Debug, thiserror::Error)]
pub enum CollateralError {
    #[error(
        "no VCEK for this chip at TCB {tcb} in the offline store, and no key server configured"
    )]
    NotFound { tcb: Tcb },
    #[error("offline store: {0}")]
    Store(String),
    #[error("{0}")]
    Kds(#[from] KdsError),
    #[error("the key server did not answer within {0} s (the fetch goes on in the background)")]
    TimedOut(u64),
    #[error("the fetch task failed: {0}")]
    Task(String),
    #[error("{0} key-server fetches already under way; try again later")]
    Busy(usize),
    #[error(
        "this VM's {0} key-server fetches of the last 24 hours are spent (evidence with ever new TCBs?)"
    )]
    VmBudget(u32),
    #[error("the reported TCB {0} is below the policy's minimum: not looked up")]
    BelowPolicy(Tcb),
}

/// The broker's collateral sources.
pub struct Collateral {
    offline: Option<OfflineStore>,
    kds: Option<Arc<KdsClient>>,
    fetch_crls: bool,
    timeout: Duration,
    /// Per product: until when the CRL last given to the verifier is current (its nextUpdate),
    /// or, after a failed refresh, when to try again.
    crl_until: Mutex<HashMap<Product, u64>>,
    /// Key-server fetches under way (each holds a permit until it ends, also after the guest
    /// that caused it has given up): bounds what reports for many TCBs can start.
    fetches: Arc<tokio::sync::Semaphore>,
    max_fetches: usize,
    /// Per VM: the VCEKs (chip, TCB) fetched for it in the last day and when (at most
    /// `vm_budget` of them).
    vm_fetches: Mutex<HashMap<String, Vec<(FetchKey, u64)>>>,
    vm_budget: u32,
}

/// One VCEK a fetch is for: chip id and encoded TCB.
type FetchKey = ([u8; 64], u64);

const DAY_SECS: u64 = 86_400;

/// Key-server fetches under way at once, by default. Cache hits need none.
pub const MAX_FETCHES: usize = 16;

/// After a failed CRL refresh, how long before the next attempt (seconds).
const CRL_RETRY_SECS: u64 = 30;

impl Collateral {
    pub fn new(cfg: &CollateralConfig) -> Result<Collateral, String> {
        Collateral::with_backoff(cfg, Backoff::default())
    }

    /// Like [`new`](Self::new) with another retry schedule for the key server.
    pub fn with_backoff(cfg: &CollateralConfig, backoff: Backoff) -> Result<Collateral, String> {
        Collateral::with_limits(cfg, backoff, MAX_FETCHES)
    }

    /// Like [`with_backoff`](Self::with_backoff), with at most `max_fetches` key-server
    /// fetches under way at once (at least 1).
    pub fn with_limits(
        cfg: &CollateralConfig,
        backoff: Backoff,
        max_fetches: usize,
    ) -> Result<Collateral, String> {
        let max_fetches = max_fetches.max(1);
        let kds = match cfg.kds() {
            None => None,
            Some(url) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(format!(
                        "[collateral] kds_url {url:?}: expected an http(s) URL or \"none\""
                    ));
                }
                let cache = cfg.cache_dir.clone().ok_or(
                    "[collateral] a key server needs cache_dir (where fetched certificates are kept)",
                )?;
                Some(Arc::new(
                    KdsClient::new(url, cache, backoff).map_err(|e| e.to_string())?,
                ))
            }
        };
        if cfg.vm_fetches_per_day == 0 {
            return Err("[collateral] vm_fetches_per_day must be at least 1".into());
        }
        if kds.is_none() && cfg.offline_dir.is_none() {
            return Err("[collateral] names neither offline_dir nor a kds_url".into());
        }
        Ok(Collateral {
            offline: cfg.offline_dir.clone().map(OfflineStore::new),
            kds,
            fetch_crls: cfg.fetch_crls,
            timeout: Duration::from_secs(cfg.fetch_timeout_secs.max(1)),
            crl_until: Mutex::new(HashMap::new()),
            fetches: Arc::new(tokio::sync::Semaphore::new(max_fetches)),
            max_fetches,
            vm_fetches: Mutex::new(HashMap::new()),
            vm_budget: cfg.vm_fetches_per_day,
        })
    }

    /// Runs a key-server fetch as its own task, so that a guest giving up (or the timeout) does
    /// not cancel it: what it fetches is cached for the next attempt. `limited` (VCEKs, one
    /// URL per chip and TCB a report may claim): at most `max_fetches` at once, beyond refused
    /// at once, and `started` is called once one is under way. CRLs and chains (one URL per
    /// product) are never refused for that, so a burst of VCEK fetches cannot keep the CRL
    /// from being renewed.
    async fn bounded<T: Send + 'static>(
        &self,
        limited: bool,
        started: impl FnOnce(),
        fut: impl std::future::Future<Output = Result<T, KdsError>> + Send + 'static,
    ) -> Result<T, CollateralError> {
        let permit = match self.fetches.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if limited => return Err(CollateralError::Busy(self.max_fetches)),
            Err(_) => None,
        };
        started();
        let task = tokio::spawn(async move {
            let out = fut.await;
            drop(permit);
            out
        });
        match tokio::time::timeout(self.timeout, task).await {
            Err(_) => Err(CollateralError::TimedOut(self.timeout.as_secs())),
            Ok(Err(e)) => Err(CollateralError::Task(e.to_string())),
            Ok(Ok(r)) => r.map_err(CollateralError::from),
        }
    }

    /// Whether `vm` may have `key` fetched at `now`: already fetched for it in the last day
    /// (a retry: free), or one of its `vm_budget` fetches for the day is left. VMs with no
    /// fetch in the last day are forgotten, so the book holds at most the VMs fetched for in
    /// the last day (each a registered VM).
    fn may_fetch(&self, vm: &str, key: FetchKey, now: u64) -> Result<(), CollateralError> {
        let mut book = self.vm_fetches.lock().unwrap_or_else(|e| e.into_inner());
        book.retain(|_, done| {
            done.retain(|(_, t)| now.saturating_sub(*t) < DAY_SECS);
            !done.is_empty()
        });
        match book.get(vm) {
            Some(done) if done.iter().any(|(k, _)| *k == key) => Ok(()),
            Some(done) if done.len() >= self.vm_budget as usize => {
                Err(CollateralError::VmBudget(self.vm_budget))
            }
            _ => Ok(()),
        }
    }

    /// Counts a fetch of `key` for `vm` that was started at `now` (once per key).
    fn count_fetch(&self, vm: &str, key: FetchKey, now: u64) {
        let mut book = self.vm_fetches.lock().unwrap_or_else(|e| e.into_inner());
        let done = book.entry(vm.to_string()).or_default();
        if !done.iter().any(|(k, _)| *k == key) {
            done.push((key, now));
        }
    }

    /// The VCEK for `chip_id` at `tcb`, for VM `vm`'s evidence: the offline store, else the key
    /// server (its cache, else one fetch, within `vm`'s daily budget at `now`).
    pub async fn vcek(
        &self,
        vm: &str,
        product: Product,
        chip_id: &[u8; 64],
        tcb: &Tcb,
        now: u64,
    ) -> Result<Vec<u8>, CollateralError> {
        let store_err = |e: std::io::Error| CollateralError::Store(e.to_string());
        // With a key server, TCB-specific names first: a generic `vcek.der` left from older
        // firmware must not stand in the way of the VCEK for the TCB reported now.
        let Some(kds) = &self.kds else {
            return match &self.offline {
                Some(store) => match store.lookup(product, chip_id, tcb).map_err(store_err)? {
                    Some((_, der)) => Ok(der),
                    None => Err(CollateralError::NotFound { tcb: *tcb }),
                },
                None => Err(CollateralError::NotFound { tcb: *tcb }),
            };
        };
        for store in self.offline.iter().chain([kds.cache()]) {
            if let Some((_, der)) = store
                .lookup_exact(product, chip_id, tcb)
                .map_err(store_err)?
            {
                return Ok(der);
            }
        }
        let (kds, chip, t) = (kds.clone(), *chip_id, *tcb);
        let key = (*chip_id, tcb.encode(product));
        let fetched = match self.may_fetch(vm, key, now) {
            Ok(()) => {
                self.bounded(true, || self.count_fetch(vm, key, now), async move {
                    kds.vcek(product, &chip, &t).await
                })
                .await
            }
            Err(e) => Err(e),
        };
        // The key server has none (or is out of reach): the offline store's generic name last.
        match (fetched, &self.offline) {
            (Err(e), Some(store)) => {
                match store.lookup(product, chip_id, tcb).map_err(store_err)? {
                    Some((_, der)) => Ok(der),
                    None => Err(e),
                }
            }
            (r, _) => r,
        }
    }

    /// The ASK+ARK chain (PEM) of a product, for non-AMD roots (AMD's are built in).
    async fn cert_chain(&self, product: Product) -> Option<Vec<u8>> {
        if let Some(store) = &self.offline
            && let Ok(Some(pem)) = store.cert_chain(product)
        {
            return Some(pem);
        }
        let kds = self.kds.clone()?;
        if let Ok(Some(pem)) = kds.cache().cert_chain(product) {
            return Some(pem);
        }
        match self
            .bounded(false, || {}, async move { kds.cert_chain(product).await })
            .await
        {
            Ok(pem) => Some(pem),
            Err(e) => {
                tracing::warn!(%product, error = %e, "no ASK/ARK chain from the key server");
                None
            }
        }
    }

    /// Makes sure `verifier` holds a CRL of `product` current at `now`, if one can be had: not
    /// looked for again until the nextUpdate of the one it got.
    pub async fn refresh_crl(&self, verifier: &Verifier, product: Product, now: u64) {
        {
            let held = self.crl_until.lock().unwrap_or_else(|e| e.into_inner());
            if held.get(&product).is_some_and(|&until| now < until) {
                return;
            }
        }
        let mut got = None;
        let caches = self
            .offline
            .iter()
            .chain(self.kds.as_deref().map(KdsClient::cache));
        for store in caches {
            if let Ok(Some(b)) = store.crl(product)
                && Crl::from_der_or_pem(&b).is_ok_and(|c| c.fresh_at(now))
            {
                got = Some(b);
                break;
            }
        }
        if got.is_none()
            && self.fetch_crls
            && let Some(kds) = self.kds.clone()
        {
            match self
                .bounded(false, || {}, async move { kds.crl(product, now).await })
                .await
            {
                Ok(b) => got = Some(b),
                Err(e) => tracing::warn!(%product, error = %e, "no CRL from the key server"),
            }
        }
        let until = match got.as_deref().map(|b| (Crl::from_der_or_pem(b), b)) {
            Some((Ok(crl), bytes)) if crl.fresh_at(now) => match add_crl(verifier, bytes) {
                Ok(p) => {
                    tracing::info!(product = %p, next_update = ?crl.next_update, "CRL from the collateral sources");
                    crl.next_update.unwrap_or(now)
                }
                Err(e) => {
                    tracing::warn!(%product, error = %e, "CRL refused");
                    now + CRL_RETRY_SECS
                }
            },
            Some(_) => {
                tracing::warn!(%product, "CRL unusable or not current");
                now + CRL_RETRY_SECS
            }
            None => now + CRL_RETRY_SECS,
        };
        let mut held = self.crl_until.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(product, until);
    }
}

/// Whether `tcb` (a report's reported TCB, read as `product`'s) is below what `policy` asks
/// of it: such a report is denied whatever its VCEK, so none is looked for.
fn below_policy(tcb: &Tcb, product: Product, policy: &Policy) -> bool {
    !tcb.below(&policy.tcb.minimum_reported).is_empty()
        || policy
            .tcb
            .minimum_by_product
            .get(&product)
            .is_some_and(|m| !tcb.below(m).is_empty())
}

/// Verifies a guest's evidence with `policy`: the certificate table's certificates, and what it
/// lacks from `collateral` — the VCEK only for a chip `order` names. Without `collateral`, the
/// table alone (as before collateral sources existed).
pub async fn verify(
    verifier: &Verifier,
    collateral: Option<&Collateral>,
    report: &[u8],
    cert_table: &[u8],
    order: Option<&Order>,
    policy: &Policy,
    now: u64,
) -> Verdict {
    // A malformed table counts as none: the VCEK, from anywhere, is verified all the same.
    let table = snp::CertTable::parse(cert_table).unwrap_or_default();
    let mut vcek = table.signing_cert().map(<[u8]>::to_vec);
    let mut ask = table.get(&snp::certtable::GUID_ASK).map(<[u8]>::to_vec);
    let mut ark = table.get(&snp::certtable::GUID_ARK).map(<[u8]>::to_vec);
    let mut failure = None;
    if let (Some(c), Ok(r)) = (collateral, AttestationReport::from_bytes(report)) {
        let configured = verifier.config().product;
        let mut product = configured.or(r.product_hint());
        if vcek.is_none()
            && r.key_info.signing_key() == SigningKey::Vcek
            && r.chip_id != [0u8; 64]
            && let Some(o) = order
            && o.chip_ids.iter().any(|c| c.as_slice() == r.chip_id)
        {
            // Milan and Genoa share the hwID length and TCB layout; a report that does not say
            // which (version 2) is looked up as either.
            let candidates = match product {
                Some(p) => vec![p],
                None => vec![Product::Milan, Product::Genoa],
            };
            for p in candidates {
                let tcb = Tcb::decode(r.reported_tcb, p);
                if below_policy(&tcb, p, policy) {
                    failure = Some(CollateralError::BelowPolicy(tcb));
                    continue;
                }
                match c.vcek(&o.vm_id, p, &r.chip_id, &tcb, now).await {
                    Ok(der) => {
                        vcek = Some(der);
                        product = Some(p);
                        failure = None;
                        break;
                    }
                    Err(e) => failure = Some(e),
                }
            }
        }
        if product.is_none() {
            product = vcek
                .as_deref()
                .and_then(|v| snp::AmdCert::from_der_or_pem(v).ok())
                .and_then(|c| c.product());
        }
        if let Some(p) = product {
            // AMD's ASK and ARK are built into the verifier; a configured (test) root's are not.
            if ask.is_none()
                && ark.is_none()
                && vcek.is_some()
                && !verifier.config().trust_roots.is_empty()
                && let Some(pem) = c.cert_chain(p).await
                && let Ok(blocks) = snp::certs::pem_blocks(&pem)
                && let [s, r] = blocks.as_slice()
            {
                ask = Some(s.clone());
                ark = Some(r.clone());
            }
            c.refresh_crl(verifier, p, now).await;
        }
    }
    // CRLs are the verifier's own (configured `crls`, and those `refresh_crl` gave it).
    let ev = Evidence {
        report,
        vcek: vcek.as_deref(),
        ask: ask.as_deref(),
        ark: ark.as_deref(),
        crls: &[],
    };
    let mut verdict = verifier.verify_with_policy(&ev, policy, now);
    if let Some(e) = failure {
        tracing::warn!(error = %e, "no VCEK for a report without one");
        for r in verdict.reasons.iter_mut() {
            if *r == Reason::MissingCertificate(CertRole::Vcek) {
                *r = Reason::VcekUnavailable(e.to_string());
            }
        }
        // Fail closed whatever the verifier said.
        if !verdict
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::VcekUnavailable(_)))
        {
            verdict
                .reasons
                .insert(0, Reason::VcekUnavailable(e.to_string()));
        }
    }
    verdict
}

/// Gives `verifier` a CRL after checking it is signed by the ARK of one of the products (or a
/// configured root); says which product's. Freshness is judged at each verification, so a
/// stale CRL is held but cannot satisfy `revocation = "require"`.
pub fn add_crl(verifier: &Verifier, bytes: &[u8]) -> Result<snp::Product, snp::verify::CrlError> {
    let mut last = None;
    for p in [
        snp::Product::Milan,
        snp::Product::Genoa,
        snp::Product::Turin,
    ] {
        match verifier.add_crl(bytes, p) {
            Ok(()) => return Ok(p),
            Err(e @ snp::verify::CrlError::Parse(_)) => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(snp::verify::CrlError::BadSignature(snp::Product::Milan)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CollateralConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_to_amds_key_server_with_a_cache_beside_the_config() {
        let mut c = parse("").unwrap();
        assert_eq!(c.kds(), Some(snp::kds::AMD_KDS_URL));
        assert!(c.fetch_crls);
        assert_eq!(c.fetch_timeout_secs, 10);
        c.resolve(Path::new("/etc/attesta-kbs"));
        assert_eq!(
            c.cache_dir.as_deref(),
            Some(Path::new("/etc/attesta-kbs/kds-cache"))
        );
        assert!(Collateral::new(&c).is_ok());
        let mut c = parse("offline_dir = \"vceks\"\ncache_dir = \"/var/cache/kds\"").unwrap();
        c.resolve(Path::new("/etc/attesta-kbs"));
        assert_eq!(
            c.offline_dir.as_deref(),
            Some(Path::new("/etc/attesta-kbs/vceks"))
        );
        assert_eq!(c.cache_dir.as_deref(), Some(Path::new("/var/cache/kds")));
    }

    #[test]
    fn a_configuration_that_cannot_work_is_refused() {
        // No source at all.
        let c = parse("kds_url = \"none\"").unwrap();
        assert_eq!(c.kds(), None);
        assert!(Collateral::new(&c).is_err());
        // Offline only is fine.
        let c = parse("kds_url = \"none\"\noffline_dir = \"/srv/vceks\"").unwrap();
        assert!(Collateral::new(&c).is_ok());
        // Not a URL; a key server without a cache (only possible when built by hand).
        let mut c = parse("kds_url = \"kdsintf.amd.com\"").unwrap();
        c.resolve(Path::new("/tmp"));
        assert!(Collateral::new(&c).is_err());
        let c = parse("").unwrap();
        assert!(Collateral::new(&c).is_err());
        // Misspelt keys are errors, not silently ignored.
        assert!(parse("kds-url = \"https://kdsintf.amd.com\"").is_err());
    }
}
