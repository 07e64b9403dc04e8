//! Operations: counters and a latency histogram in Prometheus text format, and a tiny local HTTP
//! endpoint for `/metrics`, `/readyz` and `/healthz`. Labels come from the closed vocabulary of
//! denial codes only — never VM ids, keys or anything a client chose.

use crate::store::{Store, StoreStats};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the decision-latency histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// The broker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub challenges: AtomicU64,
    pub releases: AtomicU64,
    pub registrations: AtomicU64,
    pub terminations: AtomicU64,
    /// Requests refused before any decision (malformed, not allowed, storage unavailable).
    pub errors: AtomicU64,
    /// Connections being served now, and the most ever at once (bounded by `max_sessions`).
    pub sessions: AtomicU64,
    pub sessions_peak: AtomicU64,
    /// Connections refused at the door: their address held `max_sessions_per_address`.
    pub refused_per_address: AtomicU64,
    /// Connections closed (0x12) for sending no request in time after their handshake.
    pub idle_closed: AtomicU64,
    /// Evidence refused before any decision (unknown, spent or expired nonce): no store access,
    /// no audit entry.
    pub evidence_refused: AtomicU64,
    /// The epoch of the allowlist in force (0: none, every release is denied).
    pub allowlist_epoch: AtomicU64,
    /// Leases renewed, not renewed (a decision said no: the reason is counted in the denials),
    /// and revoked (a report from another chip or image under the VM's mesh key).
    pub lease_renewals: AtomicU64,
    pub lease_refusals: AtomicU64,
    pub lease_revocations: AtomicU64,
    denials: Mutex<BTreeMap<&'static str, u64>>,
    latency: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// One connection being served: counted while it lives, its admission permit released with it.
pub struct Session<'a> {
    metrics: &'a Metrics,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.metrics.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a connection admitted with `permit` until the returned guard drops.
    pub fn session(&self, permit: tokio::sync::OwnedSemaphorePermit) -> Session<'_> {
        let now = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        self.sessions_peak.fetch_max(now, Ordering::Relaxed);
        Session {
            metrics: self,
            _permit: permit,
        }
    }

    /// Counts a denial's reasons. `&'static` codes only: the label set is closed by type.
    pub fn denied(&self, reasons: &[&'static str]) {
        let mut d = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        for r in reasons {
            *d.entry(r).or_default() += 1;
        }
    }

    /// Records how long one evidence decision took (verify, decide, commit, seal).
    pub fn observe(&self, seconds: f64) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Prometheus text exposition.
    pub fn render(&self, store: &StoreStats) -> String {
        let mut o = String::new();
        let c = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        c(
            &mut o,
            "attesta_kbs_challenges_total",
            "Nonces issued.",
            g(&self.challenges),
        );
        c(
            &mut o,
            "attesta_kbs_releases_total",
            "Keys released.",
            g(&self.releases),
        );
        c(
            &mut o,
            "attesta_kbs_registrations_total",
            "VMs registered.",
            g(&self.registrations),
        );
        c(
            &mut o,
            "attesta_kbs_terminations_total",
            "VMs crypto-shredded.",
            g(&self.terminations),
        );
        c(
            &mut o,
            "attesta_kbs_request_errors_total",
            "Requests refused before a decision.",
            g(&self.errors),
        );
        c(
            &mut o,
            "attesta_kbs_connections_refused_total",
            "Connections refused: their source address held max_sessions_per_address.",
            g(&self.refused_per_address),
        );
        c(
            &mut o,
            "attesta_kbs_connections_idle_closed_total",
            "Connections closed for sending no request in time after their handshake.",
            g(&self.idle_closed),
        );
        c(
            &mut o,
            "attesta_kbs_evidence_refused_total",
            "Evidence refused before a decision (unknown, spent or expired nonce; not audited).",
            g(&self.evidence_refused),
        );
        c(
            &mut o,
            "attesta_kbs_lease_renewals_total",
            "Running VMs' leases renewed (a fresh report, a new short-lived mesh certificate).",
            g(&self.lease_renewals),
        );
        c(
            &mut o,
            "attesta_kbs_lease_refusals_total",
            "Lease renewals refused (the reasons are in attesta_kbs_denials_total).",
            g(&self.lease_refusals),
        );
        c(
            &mut o,
            "attesta_kbs_lease_revocations_total",
            "Leases revoked: the VM's mesh key attested from another chip or image.",
            g(&self.lease_revocations),
        );
        let _ = writeln!(
            o,
            "# HELP attesta_kbs_sessions Connections being served now.\n# TYPE attesta_kbs_sessions gauge\nattesta_kbs_sessions {}",
            g(&self.sessions)
        );
        let _ = writeln!(
            o,
            "# HELP attesta_kbs_sessions_peak Most connections served at once (max_sessions bounds it).\n# TYPE attesta_kbs_sessions_peak gauge\nattesta_kbs_sessions_peak {}",
            g(&self.sessions_peak)
        );
        let _ = writeln!(
            o,
            "# HELP attesta_kbs_allowlist_epoch Epoch of the signed allowlist in force (0: none, every release denied).\n# TYPE attesta_kbs_allowlist_epoch gauge\nattesta_kbs_allowlist_epoch {}",
            g(&self.allowlist_epoch)
        );
        c(
            &mut o,
            "attesta_kbs_store_transactions_total",
            "Write transactions (group commits).",
            g(&store.transactions),
        );
        c(
            &mut o,
            "attesta_kbs_store_writes_total",
            "Writes carried by those transactions.",
            g(&store.writes),
        );
        c(
            &mut o,
            "attesta_kbs_audit_checkpoints_total",
            "Signed audit checkpoints written.",
            g(&store.checkpoints),
        );
        let _ = writeln!(
            o,
            "# HELP attesta_kbs_denials_total Denial reasons (one denial may carry several).\n# TYPE attesta_kbs_denials_total counter"
        );
        for (k, v) in self
            .denials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(o, "attesta_kbs_denials_total{{reason=\"{k}\"}} {v}");
        }
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            o,
            "# HELP attesta_kbs_decision_seconds Time from evidence received to answer ready.\n# TYPE attesta_kbs_decision_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "attesta_kbs_decision_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            o,
            "attesta_kbs_decision_seconds_bucket{{le=\"+Inf\"}} {}\nattesta_kbs_decision_seconds_sum {}\nattesta_kbs_decision_seconds_count {}",
            h.count, h.sum, h.count
        );
        o
    }
}

/// Serves `/metrics`, `/readyz` (200 once the store answers) and `/healthz` on a local TCP
/// listener until it fails. Requests are read with a size cap and a timeout.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    kbs: std::sync::Arc<crate::service::Kbs>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let kbs = kbs.clone();
        tokio::spawn(async move {
            // The request line may come in several segments: read until the headers end (or
            // the cap, or 5 s), not just what the first read returns.
            let mut buf = [0u8; 1024];
            let mut n = 0;
            let read_head = async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", kbs.metrics.render(&kbs.store.stats)),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" => match kbs.store.ready().await {
                    Ok(()) => ("200 OK", "ready\n".to_string()),
                    Err(e) => ("503 Service Unavailable", format!("not ready: {e}\n")),
                },
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
