//! The key broker service: what it holds ([`Kbs`]) and how one request is dispatched. Where
//! the rest is: the connection loop and admission in [`crate::quic`] and [`crate::limits`], TLS
//! identities and roles in [`crate::tls`], evidence and release in [`crate::evidence`] (the pure
//! decision in [`crate::release`]), orders and keys in [`crate::orders`], the allowlist in
//! [`crate::allowlist`], the store in [`crate::store`]. Every decision is committed (VM state,
//! audit entry) before the first byte of the answer is written.

use crate::keys::Kek;
use crate::metrics::Metrics;
use crate::nonces::NonceBook;
use crate::store::SqliteStore;
use proto::ResponseKey;
use proto::msg::{Request, Response, VERSION};
use proto::order::Allowlist;
use snp::Verifier;
use std::sync::atomic::Ordering;

// Moved to their own modules; named here too so that `kbs::service::…` paths keep working.
pub use crate::allowlist::AllowlistChange;
pub use crate::collateral::add_crl;
pub use crate::evidence::vm_policy;
pub use crate::guest_issuer::GuestIssuer;
pub use crate::orders::RegisterError;
pub use crate::quic::{
    CLOSE_TIME_LIMIT, DEFAULT_MAX_SESSIONS, HANDSHAKE_LIMIT, MAX_CHALLENGES_PER_SESSION,
    UDP_BUFFER, serve, serve_with, server_endpoint, udp_socket,
};
pub use crate::tls::{
    MeshGate, Role, TlsIdentity, issue_client_cert, mesh_server_config, role_of, role_uri,
    server_config,
};

/// The broker: its store, verifier, keys and trust in operators.
pub struct Kbs {
    pub store: SqliteStore,
    pub verifier: Verifier,
    pub response_key: ResponseKey,
    pub kek: Box<dyn Kek>,
    pub operator_keys: Vec<[u8; 32]>,
    pub allowlist: tokio::sync::RwLock<Option<Allowlist>>,
    pub nonce_ttl: u64,
    /// Nonces issued and not yet forgotten (in memory; only spending one is durable).
    pub nonces: std::sync::Mutex<NonceBook>,
    pub metrics: Metrics,
    /// Certifies attested guests' mesh keys (`[mesh] guest_ca`); unset: no guest identities.
    pub guest_issuer: std::sync::OnceLock<GuestIssuer>,
    /// How many connections are served at once (`max_sessions`); the rest wait, un-handshaken,
    /// in the endpoint's queue. See [`serve_with`].
    pub max_sessions: usize,
    /// How many of those one source address may hold (`max_sessions_per_address`; an IPv6 /64
    /// is one address); its connections beyond are refused at the door. See [`crate::limits`].
    /// [`Kbs::new`] sets no cap; kbs.toml's default is a quarter of `max_sessions`.
    pub max_sessions_per_address: usize,
    /// How long one connection may last (default: the nonce TTL + 10 s, at least 20 s): a
    /// guest's evidence is one request, an issued nonce is dead by then anyway, and an order is
    /// one request. Bounds what an idle client can hold of `max_sessions`, and how long evidence
    /// bound to a connection can be held back by whoever relays it.
    pub session_limit: std::time::Duration,
    /// The broker's policy floor (`floor` in kbs.toml, followed while serving): orders below
    /// it are refused, and every release is appraised by floor ∧ order. [`Kbs::new`] sets the
    /// strict built-in one. See [`crate::floor`].
    pub floor: std::sync::RwLock<snp::Floor>,
    /// Where VCEKs, chains and CRLs a guest's evidence lacks come from (`[collateral]`); unset:
    /// only the certificate table.
    pub collateral: std::sync::OnceLock<crate::collateral::Collateral>,
    /// Seconds a VM's lease must have run before it is renewed again ([`crate::lease`]): a
    /// renewal sooner is refused before it costs a verification or an audit entry. Default 60
    /// (a keepalive renews every 900).
    pub lease_min_interval: u64,
    /// Tenants' challenges to running VMs, in memory ([`crate::challenges`]).
    pub challenges: std::sync::Mutex<crate::challenges::ChallengeBook>,
    /// Woken when a lease is revoked: the broker's revocation list is published again at once
    /// ([`crate::guest_revocation`]).
    pub lease_revoked: tokio::sync::Notify,
}

impl Kbs {
    /// A broker over `store`, with no allowlist loaded yet.
    pub fn new(
        store: SqliteStore,
        verifier: Verifier,
        response_key: ResponseKey,
        kek: Box<dyn Kek>,
        operator_keys: Vec<[u8; 32]>,
        nonce_ttl: u64,
    ) -> Kbs {
        Kbs {
            store,
            verifier,
            response_key,
            kek,
            operator_keys,
            allowlist: Default::default(),
            nonce_ttl,
            nonces: std::sync::Mutex::new(NonceBook::new(crate::nonces::DEFAULT_CAPACITY)),
            metrics: Metrics::default(),
            guest_issuer: std::sync::OnceLock::new(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_address: usize::MAX,
            session_limit: std::time::Duration::from_secs(nonce_ttl.clamp(10, 86_400) + 10),
            floor: std::sync::RwLock::new(snp::Floor::default()),
            collateral: std::sync::OnceLock::new(),
            lease_min_interval: 60,
            challenges: std::sync::Mutex::new(Default::default()),
            lease_revoked: tokio::sync::Notify::new(),
        }
    }

    /// Answers one request from a peer in `role`. `exporter` is this connection's TLS exporter
    /// value. Evidence with no nonce is bound to that connection alone, so the caller must pass
    /// at most one such evidence per connection ([`crate::quic`] does, by
    /// [`crate::limits::SessionBudget`]): each would be judged afresh.
    pub async fn handle(&self, req: Request, role: Role, exporter: [u8; 32], now: u64) -> Response {
        // Only ids an order could carry, on every request that names one.
        if let Request::Challenge { vm_id, .. }
        | Request::Evidence { vm_id, .. }
        | Request::Renew { vm_id, .. }
        | Request::TenantChallenge { vm_id, .. }
        | Request::Attest { vm_id, .. } = &req
            && !proto::order::is_valid_vm_id(vm_id)
        {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("bad_request", "vm_id must be 1-128 of [A-Za-z0-9._-]");
        }
        match req {
            Request::Challenge { vm_id, .. } => self.challenge(&vm_id, now).await,
            Request::Register { order, .. } | Request::Terminate { order, .. }
                if role == Role::Guest =>
            {
                let _ = order;
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                Response::error(
                    "forbidden",
                    "orders are accepted only from hosts and operators (mTLS client certificate)",
                )
            }
            Request::Register { order, .. } => match self.register(&order, now).await {
                Ok(vm_id) => Response::Done { v: VERSION, vm_id },
                Err(e) => {
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "registration refused");
                    Response::error(e.code(), e.to_string())
                }
            },
            Request::Terminate { order, .. } => match self.terminate(&order, now).await {
                Ok(vm_id) => Response::Done { v: VERSION, vm_id },
                Err(e) => {
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "terminate refused");
                    Response::error(e.code(), e.to_string())
                }
            },
            Request::Evidence {
                vm_id,
                nonce,
                report,
                cert_table,
                guest_public_key,
                mesh_key,
                ..
            } => {
                let t0 = std::time::Instant::now();
                let r = self
                    .evidence(
                        &vm_id,
                        &nonce,
                        &report,
                        &cert_table,
                        (&guest_public_key, &mesh_key),
                        exporter,
                        now,
                    )
                    .await;
                self.metrics.observe(t0.elapsed().as_secs_f64());
                r
            }
            Request::TenantChallenge { vm_id, nonce, .. } => {
                self.tenant_challenge(&vm_id, &nonce, now).await
            }
            Request::Attest {
                vm_id,
                nonce,
                report,
                cert_table,
                mesh_key,
                proof,
                ..
            } => {
                let answer = (report, cert_table);
                self.attest(&vm_id, &nonce, answer, (&mesh_key, &proof), exporter, now)
                    .await
            }
            Request::Renew {
                vm_id,
                report,
                cert_table,
                mesh_key,
                proof,
                ..
            } => {
                self.renew(
                    &vm_id,
                    &report,
                    &cert_table,
                    &mesh_key,
                    &proof,
                    exporter,
                    now,
                )
                .await
            }
        }
    }
}
