//! AMD Key Distribution Service client with a persistent cache and one fetch per concurrent miss.

use crate::store::OfflineStore;
use snp::kds::{cert_chain_path, crl_path, vcek_path};
use snp::{AmdCert, Crl, Product, Tcb};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Why a certificate or CRL could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KdsError {
    #[error("key server {url} answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("key server {url} still rate-limits (HTTP 429) after {attempts} attempts")]
    RateLimited { url: String, attempts: u32 },
    #[error("cannot reach key server {url}: {why}")]
    Network { url: String, why: String },
    #[error("key server {url} sent {len} bytes, more than {max}")]
    TooLarge { url: String, len: usize, max: usize },
    #[error("cache: {0}")]
    Cache(String),
    #[error("key server sent an unusable CRL: {0}")]
    BadCrl(String),
    #[error("key server sent a certificate that is not the VCEK asked for: {0}")]
    BadCertificate(String),
}

/// Retry schedule for HTTP 429 and transient failures. AMD's server allows about one VCEK per
/// 10 s per address, so the defaults wait long enough to get through.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_secs(2),
            max: Duration::from_secs(60),
            attempts: 6,
        }
    }
}

const MAX_BODY: usize = 4 << 20;

type Flight = Arc<OnceCell<Result<Vec<u8>, KdsError>>>;

/// A client for AMD's key server (or a mirror), caching everything it fetches on disk.
pub struct KdsClient {
    base: String,
    http: reqwest::Client,
    cache: OfflineStore,
    backoff: Backoff,
    inflight: Mutex<HashMap<String, Flight>>,
    /// Recent "no such certificate" answers (HTTP 404), so hostile requests for chips AMD does
    /// not know cannot spend the key server's rate limit again and again.
    negative: Mutex<HashMap<String, (std::time::Instant, KdsError)>>,
    negative_ttl: Duration,
}

/// How long a 404 from the key server is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(600);
/// Most 404 answers remembered at once.
const NEGATIVE_MAX: usize = 10_000;

impl KdsClient {
    /// `base`: e.g. [`snp::kds::AMD_KDS_URL`] or a local mirror; `cache_dir`: persistent cache.
    pub fn new(
        base: &str,
        cache_dir: impl Into<std::path::PathBuf>,
        backoff: Backoff,
    ) -> Result<KdsClient, KdsError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("attesta/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| KdsError::Network {
                url: base.to_string(),
                why: e.to_string(),
            })?;
        Ok(KdsClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            cache: OfflineStore::new(cache_dir),
            backoff,
            inflight: Mutex::new(HashMap::new()),
            negative: Mutex::new(HashMap::new()),
            negative_ttl: NEGATIVE_TTL,
        })
    }

    /// Changes how long a 404 is remembered (default [`NEGATIVE_TTL`]; zero disables).
    pub fn with_negative_ttl(mut self, ttl: Duration) -> KdsClient {
        self.negative_ttl = ttl;
        self
    }

    pub fn cache(&self) -> &OfflineStore {
        &self.cache
    }

    /// The VCEK for a chip at a TCB: from the cache, else fetched once and cached.
    pub async fn vcek(
        &self,
        product: Product,
        chip_id: &[u8; 64],
        tcb: &Tcb,
    ) -> Result<Vec<u8>, KdsError> {
        if let Some((_, der)) = self
            .cache
            .lookup_exact(product, chip_id, tcb)
            .map_err(|e| KdsError::Cache(e.to_string()))?
        {
            return Ok(der);
        }
        let url = format!("{}{}", self.base, vcek_path(product, chip_id, tcb));
        self.fetch_once(&url, |der| {
            check_vcek(der, product, chip_id, tcb)?;
            self.cache
                .put(product, chip_id, tcb, der)
                .map(|_| ())
                .map_err(|e| KdsError::Cache(e.to_string()))
        })
        .await
    }

    /// The product's CRL: the cached one while it is current at `now` (Unix seconds), else a
    /// fresh fetch (cached until its nextUpdate). The verifier checks its signature.
    pub async fn crl(&self, product: Product, now: u64) -> Result<Vec<u8>, KdsError> {
        if let Some(bytes) = self
            .cache
            .crl(product)
            .map_err(|e| KdsError::Cache(e.to_string()))?
            && Crl::from_der_or_pem(&bytes).is_ok_and(|c| c.fresh_at(now))
        {
            return Ok(bytes);
        }
        let url = format!("{}{}", self.base, crl_path(product));
        self.fetch_once(&url, |der| {
            Crl::from_der_or_pem(der).map_err(|e| KdsError::BadCrl(e.to_string()))?;
            self.cache
                .put_crl(product, der)
                .map_err(|e| KdsError::Cache(e.to_string()))
        })
        .await
    }

    /// The product's ASK (or ASVK) + ARK chain, PEM: cached, else fetched once and cached. Only
    /// its shape is checked here (two certificates); whether the verifier trusts its ARK is
    /// the verifier's business (AMD's are built in, so only non-AMD roots need this).
    pub async fn cert_chain(&self, product: Product) -> Result<Vec<u8>, KdsError> {
        if let Some(pem) = self
            .cache
            .cert_chain(product)
            .map_err(|e| KdsError::Cache(e.to_string()))?
        {
            return Ok(pem);
        }
        let url = format!("{}{}", self.base, cert_chain_path(product));
        self.fetch_once(&url, |pem| {
            check_chain(pem)?;
            self.cache
                .put_cert_chain(product, pem)
                .map_err(|e| KdsError::Cache(e.to_string()))
        })
        .await
    }

    /// Concurrent requests for the same URL share one fetch; `keep` (caching) runs once, by the
    /// caller that fetched.
    async fn fetch_once(
        &self,
        url: &str,
        keep: impl FnOnce(&[u8]) -> Result<(), KdsError>,
    ) -> Result<Vec<u8>, KdsError> {
        {
            let mut neg = self.negative.lock().unwrap_or_else(|e| e.into_inner());
            match neg.get(url) {
                Some((at, err)) if at.elapsed() < self.negative_ttl => return Err(err.clone()),
                Some(_) => {
                    neg.remove(url);
                }
                None => {}
            }
        }
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(url.to_string()).or_default().clone()
        };
        let out = cell
            .get_or_init(|| async {
                let der = self.fetch_with_backoff(url).await?;
                keep(&der)?;
                Ok(der)
            })
            .await
            .clone();
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(url).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(url);
        }
        drop(map);
        if let Err(e @ KdsError::Http { status: 404, .. }) = &out
            && !self.negative_ttl.is_zero()
        {
            let mut neg = self.negative.lock().unwrap_or_else(|e| e.into_inner());
            if neg.len() >= NEGATIVE_MAX {
                neg.clear();
            }
            neg.insert(url.to_string(), (std::time::Instant::now(), e.clone()));
        }
        out
    }

    async fn fetch_with_backoff(&self, url: &str) -> Result<Vec<u8>, KdsError> {
        let mut delay = self.backoff.first;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let retry_after = match self.http.get(url).send().await {
                Err(e) => {
                    if attempt >= self.backoff.attempts {
                        return Err(KdsError::Network {
                            url: url.to_string(),
                            why: e.to_string(),
                        });
                    }
                    None
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200 => return read_limited(url, resp).await,
                        429 | 500..=599 => {
                            if attempt >= self.backoff.attempts {
                                return Err(if status == 429 {
                                    KdsError::RateLimited {
                                        url: url.to_string(),
                                        attempts: attempt,
                                    }
                                } else {
                                    KdsError::Http {
                                        url: url.to_string(),
                                        status,
                                    }
                                });
                            }
                            resp.headers()
                                .get(reqwest::header::RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|s| s.trim().parse::<u64>().ok())
                                .map(Duration::from_secs)
                        }
                        _ => {
                            return Err(KdsError::Http {
                                url: url.to_string(),
                                status,
                            });
                        }
                    }
                }
            };
            let wait = retry_after.unwrap_or(delay).min(self.backoff.max);
            tracing::warn!(
                url,
                attempt,
                wait_ms = wait.as_millis() as u64,
                "key server busy or unreachable; backing off"
            );
            tokio::time::sleep(wait).await;
            delay = delay.saturating_mul(2).min(self.backoff.max);
        }
    }
}

/// Reads a response body, refusing more than [`MAX_BODY`] bytes without buffering them.
async fn read_limited(url: &str, mut resp: reqwest::Response) -> Result<Vec<u8>, KdsError> {
    let too_large = |len: usize| KdsError::TooLarge {
        url: url.to_string(),
        len,
        max: MAX_BODY,
    };
    if let Some(n) = resp.content_length()
        && n > MAX_BODY as u64
    {
        return Err(too_large(usize::try_from(n).unwrap_or(usize::MAX)));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| KdsError::Network {
        url: url.to_string(),
        why: e.to_string(),
    })? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(too_large(body.len() + chunk.len()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A chain must be two certificates (ASK or ASVK, then ARK) before it is cached.
fn check_chain(pem: &[u8]) -> Result<(), KdsError> {
    let blocks =
        snp::certs::pem_blocks(pem).map_err(|e| KdsError::BadCertificate(e.to_string()))?;
    if blocks.len() != 2 {
        return Err(KdsError::BadCertificate(format!(
            "a chain of {} certificates, expected ASK then ARK",
            blocks.len()
        )));
    }
    for b in &blocks {
        AmdCert::from_der_or_pem(b).map_err(|e| KdsError::BadCertificate(e.to_string()))?;
    }
    Ok(())
}

/// A fetched VCEK must be the one asked for (product, hwID, SPLs) before it is cached, so a
/// bad answer from a mirror cannot occupy the cache. Its signature is the verifier's business.
fn check_vcek(der: &[u8], product: Product, chip_id: &[u8; 64], tcb: &Tcb) -> Result<(), KdsError> {
    let bad = |why: String| Err(KdsError::BadCertificate(why));
    let cert = match AmdCert::from_der_or_pem(der) {
        Ok(c) => c,
        Err(e) => return bad(e.to_string()),
    };
    if cert.product() != Some(product) {
        return bad(format!(
            "productName {:?}, expected {product}",
            cert.amd.product_name
        ));
    }
    let n = product.hwid_len();
    if cert.hwid(product).as_deref() != Some(&chip_id[..n]) {
        return bad("hwID is another chip's".into());
    }
    let a = &cert.amd;
    let got = Tcb {
        fmc: a.fmc_spl.filter(|_| product.has_fmc()),
        bootloader: a.bl_spl.unwrap_or(0),
        tee: a.tee_spl.unwrap_or(0),
        snp: a.snp_spl.unwrap_or(0),
        microcode: a.ucode_spl.unwrap_or(0),
    };
    let want = Tcb {
        fmc: tcb.fmc.filter(|_| product.has_fmc()),
        ..*tcb
    };
    if got != want
        || a.bl_spl.is_none()
        || a.tee_spl.is_none()
        || a.snp_spl.is_none()
        || a.ucode_spl.is_none()
    {
        return bad(format!("certifies TCB {got}, expected {want}"));
    }
    Ok(())
}
