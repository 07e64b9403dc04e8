//! The key broker service: registration from signed orders, challenges, and release decisions
//! (served over QUIC by [`crate::quic`], with the TLS of [`crate::tls`]). Every decision is
//! committed (nonce, VM state, audit entry) before the first byte of the answer is written.

use crate::keys::{Kek, VolumeKey};
use crate::metrics::Metrics;
use crate::nonces::NonceBook;
use crate::release::{self, Denial};
use crate::store::{Commit, SqliteStore, Store, StoreError, VmRecord};
use proto::msg::{DenialBody, ReleaseBody, Request, Response, VERSION};
use proto::order::{Allowlist, DocumentError, Order, OrderKind};
use proto::{ResponseKey, SealContext, seal};
use snp::{Policy, Verifier};
use std::sync::atomic::Ordering;
use zeroize::Zeroizing;

// Moved to their own modules; named here too so that `kbs::service::…` paths keep working.
pub use crate::quic::{
    CLOSE_TIME_LIMIT, DEFAULT_MAX_SESSIONS, HANDSHAKE_LIMIT, MAX_CHALLENGES_PER_SESSION,
    UDP_BUFFER, serve, serve_with, server_endpoint, udp_socket,
};
pub use crate::tls::{
    MeshGate, Role, TlsIdentity, issue_client_cert, mesh_server_config, role_of, role_uri,
    server_config,
};

impl RegisterError {
    /// Stable code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            RegisterError::Order(DocumentError::BadSignature) => "order_signature",
            RegisterError::Order(DocumentError::Expired { .. }) => "order_expired",
            RegisterError::Order(_) => "order_invalid",
            RegisterError::NotRegister | RegisterError::NotTerminate => "order_kind",
            RegisterError::NotAllowlisted(_) => "not_allowlisted",
            RegisterError::Policy(_) => "order_policy",
            RegisterError::BelowFloor(_) => "policy_below_floor",
            RegisterError::Store(StoreError::Exists(_)) => "vm_exists",
            RegisterError::Store(StoreError::NoSuchVm(_)) => "no_such_vm",
            RegisterError::Store(StoreError::KekRotated) => "kek_rotated",
            RegisterError::Store(_) => "unavailable",
            RegisterError::Key(_) => "key_unavailable",
        }
    }
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("order: {0}")]
    Order(#[from] DocumentError),
    #[error("the order is not a register order")]
    NotRegister,
    #[error("the order is not a terminate order")]
    NotTerminate,
    #[error("measurements not in the allowlist: {0:?}")]
    NotAllowlisted(Vec<String>),
    #[error("the order's policy: {0}")]
    Policy(String),
    #[error("the order's policy asks for less than the broker's floor: {}", .0.join("; "))]
    BelowFloor(Vec<String>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] crate::keys::KeyError),
}

/// What [`Kbs::follow_allowlist`] found in the store.
#[derive(Debug)]
pub enum AllowlistChange {
    Unchanged,
    /// A newer epoch was verified and is now in force.
    Adopted {
        from: Option<u64>,
        to: u64,
    },
    /// The stored epoch did not verify; no allowlist is in force until one does.
    Refused {
        epoch: u64,
        error: RegisterError,
    },
}

/// A stored allowlist document, verified again (the database is not trusted to sign) and
/// checked to be of the epoch it is stored under.
fn verify_stored(doc: &[u8], epoch: u64, key: &[u8; 32]) -> Result<Allowlist, RegisterError> {
    let a = Allowlist::verify(doc, key, epoch)?;
    if a.epoch != epoch {
        return Err(RegisterError::Order(DocumentError::Invalid(
            "the stored allowlist is not of the epoch it is stored under",
        )));
    }
    Ok(a)
}

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
    /// guest's nonce is dead by then anyway, and an order is one request. Bounds what an idle
    /// client can hold of `max_sessions`.
    pub session_limit: std::time::Duration,
    /// The broker's policy floor (`floor` in kbs.toml, followed while serving): orders below
    /// it are refused, and every release is appraised by floor ∧ order. [`Kbs::new`] sets the
    /// strict built-in one. See [`crate::floor`].
    pub floor: std::sync::RwLock<snp::Floor>,
    /// Where VCEKs, chains and CRLs a guest's evidence lacks come from (`[collateral]`); unset:
    /// only the certificate table.
    pub collateral: std::sync::OnceLock<crate::collateral::Collateral>,
}

/// Issues an attested guest its mesh certificate: name = VM id, the order's `mesh_ip`, group
/// `tenant:<tenant>`, role guest, short-lived; for the key bound in the guest's report only.
pub struct GuestIssuer {
    ca: mesh::cert::MeshCert,
    /// `ca` and the certificates above it as `guest_ca/ca.crt` lists them (DER), sent with each
    /// certificate so that an intermediate works without the broker holding the root's key.
    chain: Vec<serde_bytes::ByteBuf>,
    key: Zeroizing<String>,
    /// Validity of a guest certificate, seconds (each boot gets a new one).
    ttl: u64,
}

impl GuestIssuer {
    /// An issuer certifying with `ca` (whose key is `key`); `above` are the certificates over
    /// it up to the mesh's root, issuer first (empty when `ca` is the root).
    pub fn new(
        ca: mesh::cert::MeshCert,
        above: Vec<mesh::cert::MeshCert>,
        key: Zeroizing<String>,
        ttl: u64,
    ) -> GuestIssuer {
        let chain = std::iter::once(&ca)
            .chain(&above)
            .map(|c| serde_bytes::ByteBuf::from(c.der.clone()))
            .collect();
        GuestIssuer {
            ca,
            chain,
            key,
            ttl,
        }
    }

    /// What goes with each certificate: the issuing CA and those above it (DER).
    pub fn chain(&self) -> &[serde_bytes::ByteBuf] {
        &self.chain
    }

    /// The certificate (DER), or why none.
    pub fn issue(&self, order: &Order, mesh_key: &[u8; 32], now: u64) -> Result<Vec<u8>, String> {
        // The name is also the certificate's DNS name: a single label, so that a guest can never
        // hold a service's name (such as the broker's) under the mesh CA clients pin.
        if !mesh::cert::is_plain_name(&order.vm_id) {
            return Err(format!(
                "the VM id {:?} is not a single DNS label: no mesh certificate",
                order.vm_id
            ));
        }
        let ip = order
            .mesh_ip
            .as_deref()
            .ok_or("the order names no mesh_ip")?;
        let req = mesh::cert::Request {
            name: &order.vm_id,
            claims: mesh::cert::Claims {
                v: 1,
                ips: vec![ip.to_string()],
                groups: vec![format!("tenant:{}", order.tenant)],
                role: Some(mesh::cert::Role::Guest),
                // A leaf: no CA constraints (whatever fields the mesh adds for those).
                ..Default::default()
            },
            is_ca: false,
            not_before: now.saturating_sub(60).max(self.ca.not_before),
            not_after: now.saturating_add(self.ttl).min(self.ca.not_after),
            curve: mesh::cert::Curve::Ed25519,
        };
        mesh::cert::sign_for_key(&self.ca, &self.key, &req, mesh_key).map_err(|e| e.to_string())
    }
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
        }
    }

    /// Installs a newer signed allowlist: verified, stored as the current document (every
    /// broker process on this store follows it, see [`Kbs::follow_allowlist`]) and adopted here.
    /// Older epochs are refused, here and in the store.
    pub async fn set_allowlist(
        &self,
        doc: &[u8],
        allowlist_key: &[u8; 32],
        now: u64,
    ) -> Result<u64, RegisterError> {
        let epoch = self.store.allowlist_epoch().await?;
        let a = Allowlist::verify(doc, allowlist_key, epoch)?;
        self.store.set_allowlist(a.epoch, doc, now).await?;
        let e = a.epoch;
        self.adopt(a).await;
        Ok(e)
    }

    /// At start: the current allowlist is the newer of the stored document and `configured`
    /// (kbs.toml's `allowlist`), each verified with `allowlist_key`; a configured one newer than
    /// the stored one is installed. A configured file older than what was installed since is
    /// not an error (the installed one governs). `None`: there is no allowlist at all.
    pub async fn load_allowlist(
        &self,
        configured: Option<&[u8]>,
        allowlist_key: &[u8; 32],
        now: u64,
    ) -> Result<Option<u64>, RegisterError> {
        let stored = self.store.allowlist_epoch().await?;
        if let Some(doc) = configured {
            let a = Allowlist::verify(doc, allowlist_key, 0)?;
            if a.epoch >= stored {
                return self.set_allowlist(doc, allowlist_key, now).await.map(Some);
            }
            tracing::warn!(
                configured = a.epoch,
                installed = stored,
                "the configured allowlist is older than the installed one, which governs"
            );
        }
        let Some((epoch, doc)) = self.store.allowlist().await? else {
            return Ok(None);
        };
        let a = verify_stored(&doc, epoch, allowlist_key)?;
        self.adopt(a).await;
        Ok(Some(epoch))
    }

    /// Follows the store: when its allowlist epoch has grown past `seen` (another process ran
    /// `allowlist install`), the stored document is verified and adopted. A stored document
    /// that does not verify with `allowlist_key` leaves this broker with no allowlist (every
    /// release denied `no_allowlist`): the store says that epoch governs, and what it withdrew
    /// cannot be known here. Cheap when nothing changed: one read of the epoch.
    pub async fn follow_allowlist(
        &self,
        allowlist_key: &[u8; 32],
        seen: &mut u64,
    ) -> Result<AllowlistChange, StoreError> {
        let stored = self.store.allowlist_epoch().await?;
        if stored <= *seen {
            return Ok(AllowlistChange::Unchanged);
        }
        // `seen` advances only once the document has been read: a failed read is retried at
        // the next poll instead of leaving the older allowlist in force.
        let stored_doc = self.store.allowlist().await?;
        *seen = stored;
        let from = self.allowlist_epoch().await;
        // The epoch says a newer allowlist governs; a document missing or older than it (written
        // by an older `allowlist install`) cannot say what was withdrawn: deny everything.
        let checked = match stored_doc {
            Some((epoch, doc)) if epoch >= stored => verify_stored(&doc, epoch, allowlist_key),
            other => Err(RegisterError::Store(StoreError::StaleEpoch {
                have: other.map(|(e, _)| e).unwrap_or(0),
                stored,
            })),
        };
        match checked {
            Ok(a) if from.is_some_and(|f| f >= a.epoch) => Ok(AllowlistChange::Unchanged),
            Ok(a) => {
                let to = a.epoch;
                self.adopt(a).await;
                Ok(AllowlistChange::Adopted { from, to })
            }
            Err(e) => {
                *self.allowlist.write().await = None;
                self.metrics.allowlist_epoch.store(0, Ordering::Relaxed);
                Ok(AllowlistChange::Refused {
                    epoch: stored,
                    error: e,
                })
            }
        }
    }

    /// The epoch of the allowlist in force here (`None`: none, every release is denied).
    pub async fn allowlist_epoch(&self) -> Option<u64> {
        self.allowlist.read().await.as_ref().map(|a| a.epoch)
    }

    /// Makes `a` current here unless a newer one already is (installs and reloads may race).
    async fn adopt(&self, a: Allowlist) {
        let mut current = self.allowlist.write().await;
        if current.as_ref().is_none_or(|c| c.epoch <= a.epoch) {
            self.metrics
                .allowlist_epoch
                .store(a.epoch, Ordering::Relaxed);
            *current = Some(a);
        }
    }

    /// Checks that this broker's KEK is the one the store's keys are wrapped under (recording
    /// it in a new store), and from then on registers only while it still is: a broker left
    /// running across `kek rotate` cannot wrap a new key under the retired KEK.
    pub async fn bind_kek(&self) -> Result<(), RegisterError> {
        let stored = self
            .store
            .init_kek_check(&crate::keys::kek_check(&*self.kek)?)
            .await?;
        if !crate::keys::opens_check(&*self.kek, &stored) {
            return Err(crate::keys::KeyError::WrongKek.into());
        }
        self.store.bind_kek(Some(stored));
        Ok(())
    }

    /// Re-wraps every live volume key under `new` in one transaction (the volume keys stay
    /// the same) and makes `new` the store's KEK; returns how many. The old KEK then wraps
    /// nothing live: once destroyed, every key it wrapped — in old backups too, terminated
    /// VMs' among them — is gone. Needs [`Kbs::bind_kek`] first.
    pub async fn rotate_kek(&self, new: &dyn Kek, now: u64) -> Result<usize, RegisterError> {
        let expect = self
            .store
            .bound_kek()
            .ok_or(crate::keys::KeyError::WrongKek)?;
        let check = crate::keys::kek_check(new)?;
        if crate::keys::opens_check(&*self.kek, &check) {
            return Err(crate::keys::KeyError::SameKek.into());
        }
        let mut keys = Vec::new();
        for (vm_id, generation, old) in self.store.live_keys().await? {
            let key = self.kek.unwrap_key(&vm_id, generation, &old)?;
            let wrapped = new.wrap(&vm_id, generation, &key)?;
            // Never store what the new KEK would not give back.
            if new.unwrap_key(&vm_id, generation, &wrapped)?.0[..] != key.0[..] {
                return Err(crate::keys::KeyError::Wrap.into());
            }
            keys.push((vm_id, generation, old, wrapped));
        }
        let n = self.store.rekey(&expect, &check, keys, now).await?;
        self.store.bind_kek(Some(check));
        tracing::info!(keys = n, "KEK rotated: every live key re-wrapped");
        Ok(n)
    }

    /// Registers a VM from a signed order: checks signature, expiry, allowlist and policy, then
    /// generates the VM's volume key and stores it wrapped.
    pub async fn register(&self, order_doc: &[u8], now: u64) -> Result<String, RegisterError> {
        let order = Order::verify(order_doc, &self.operator_keys, now)?;
        if order.kind != OrderKind::Register {
            return Err(RegisterError::NotRegister);
        }
        {
            let guard = self.allowlist.read().await;
            let outside = match guard.as_ref() {
                Some(a) => order.outside(a),
                None => order.measurements.iter().map(|m| m.to_vec()).collect(),
            };
            if !outside.is_empty() {
                return Err(RegisterError::NotAllowlisted(
                    outside.iter().map(hex::encode).collect(),
                ));
            }
        }
        crate::floor::check_order(&self.floor(), &order)?;
        let key = VolumeKey::generate()?;
        let wrapped = self.kek.wrap(&order.vm_id, 1, &key)?;
        let rec = VmRecord {
            state: release::VmState {
                vm_id: order.vm_id.clone(),
                generation: 1,
                boot_counter: 0,
                terminated: false,
            },
            tenant: order.tenant.clone(),
            order: order_doc.to_vec(),
            wrapped_key: Some(wrapped),
        };
        self.store
            .register(&rec, now, serde_json::json!({"tenant": order.tenant}))
            .await?;
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm_id = %order.vm_id, tenant = %order.tenant, "VM registered");
        Ok(order.vm_id)
    }

    /// Crypto-shreds a VM on an operator-signed terminate order: the wrapped key is destroyed,
    /// the tombstone stays, and every later release is denied.
    pub async fn terminate(&self, order_doc: &[u8], now: u64) -> Result<String, RegisterError> {
        let order = Order::verify(order_doc, &self.operator_keys, now)?;
        if order.kind != OrderKind::Terminate {
            return Err(RegisterError::NotTerminate);
        }
        self.store
            .terminate(
                &order.vm_id,
                now,
                serde_json::json!({"order": "terminate", "tenant": order.tenant}),
            )
            .await?;
        self.metrics.terminations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm_id = %order.vm_id, "VM terminated: key crypto-shredded");
        Ok(order.vm_id)
    }

    /// Answers one request from a peer in `role`. `exporter` is this connection's TLS exporter
    /// value.
    pub async fn handle(&self, req: Request, role: Role, exporter: [u8; 32], now: u64) -> Response {
        // Only ids an order could carry, on every request that names one.
        if let Request::Challenge { vm_id, .. } | Request::Evidence { vm_id, .. } = &req
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
        }
    }

    async fn challenge(&self, vm_id: &str, now: u64) -> Response {
        // Only ids an order could carry: the book keeps a copy of each.
        if !proto::order::is_valid_vm_id(vm_id) {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("bad_request", "vm_id must be 1-128 of [A-Za-z0-9._-]");
        }
        let mut nonce = [0u8; 32];
        let issued = aws_lc_rs::rand::fill(&mut nonce).is_ok()
            && self
                .book()
                .issue(nonce, vm_id, now.saturating_add(self.nonce_ttl), now);
        if !issued {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("unavailable", "no nonce can be issued now");
        }
        self.metrics.challenges.fetch_add(1, Ordering::Relaxed);
        Response::Challenge {
            v: VERSION,
            nonce: nonce.to_vec(),
            expires_in_ms: self.nonce_ttl.saturating_mul(1000),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn evidence(
        &self,
        vm_id: &str,
        nonce: &[u8],
        report: &[u8],
        cert_table: &[u8],
        (guest_pk, mesh_key): (&[u8], &[u8]),
        exporter: [u8; 32],
        now: u64,
    ) -> Response {
        let (Ok(nonce), Ok(guest_pk)) =
            (<[u8; 32]>::try_from(nonce), <[u8; 32]>::try_from(guest_pk))
        else {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("bad_request", "nonce and guest key must be 32 bytes");
        };
        // What REPORT_DATA must say: with a mesh key, that key is bound too.
        let Some(expected_report_data) =
            proto::expected_report_data(&nonce, &guest_pk, &exporter, mesh_key)
        else {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::error("bad_request", "a mesh key must be 32 bytes");
        };
        // Spent from here on, whatever follows.
        let nonce_state = self.book().take(&nonce, now);
        // A nonce that is unknown (never issued here, or forgotten), spent or expired cannot
        // release anything, whatever the evidence: refused before the store is read or written
        // and without an audit entry (a decision on it was audited when it was first used, or
        // it never was issued), so a flood of bogus evidence costs neither the store nor the
        // log. Counted: `attesta_kbs_evidence_refused_total` and the denial reasons.
        let stale = match &nonce_state {
            None => Some(Denial::UnknownNonce),
            Some(release::NonceState::Spent) => Some(Denial::SpentNonce),
            Some(release::NonceState::Issued { expires_at, .. }) if now > *expires_at => {
                Some(Denial::ExpiredNonce)
            }
            Some(release::NonceState::Issued { .. }) => None,
        };
        if let Some(d) = stale {
            self.metrics
                .evidence_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                vm_id,
                reason = d.code(),
                "evidence refused before a decision"
            );
            return self.deny(vm_id, &nonce, &[d.code()]);
        }
        // Signed, so the guest knows it was this broker that could not decide (and asks again,
        // or asks another replica); nothing is recorded, as nothing can be.
        let record = match self.store.vm(vm_id).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "the store cannot be read; denying");
                return self.deny(vm_id, &nonce, &["storage_unavailable"]);
            }
        };
        // Evidence for a VM this broker does not hold, or on a nonce issued for another VM,
        // cannot release anything either (challenges are free to ask for): refused before the
        // evidence is verified (so no key-server fetch) and without a store write or an audit
        // entry, so that a flood of such evidence grows neither the log nor the store.
        let unowned = match (&nonce_state, &record) {
            (_, None) => Some(Denial::UnknownVm),
            (
                Some(release::NonceState::Issued {
                    vm_id: issued_for, ..
                }),
                _,
            ) if issued_for != vm_id => Some(Denial::NonceForAnotherVm),
            _ => None,
        };
        if let Some(d) = unowned {
            self.metrics
                .evidence_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                vm_id,
                reason = d.code(),
                "evidence refused before a decision"
            );
            return self.deny(vm_id, &nonce, &[d.code()]);
        }
        // The evidence, appraised with this VM's order: its policy, images and chips.
        let order = record
            .as_ref()
            .and_then(|r| Order::decode_stored(&r.order).ok());
        let policy = self.floor().effective(&vm_policy(order.as_ref()));
        // What the certificate table lacks comes from `[collateral]` (see crate::collateral).
        let verdict = crate::collateral::verify(
            &self.verifier,
            self.collateral.get(),
            report,
            cert_table,
            order.as_ref(),
            &policy,
            now,
        )
        .await;
        let parsed = verdict.report.as_ref();
        let decision = {
            // Held for the decision only (no await inside): the allowlist in force now.
            let allowlist = self.allowlist.read().await;
            release::decide(&release::Request {
                now,
                vm_id,
                nonce: nonce_state.as_ref(),
                vm: record.as_ref().map(|r| &r.state),
                report_data: parsed.map(|r| r.report_data).unwrap_or([0; 64]),
                expected_report_data,
                evidence: &verdict.reasons,
                measurement: parsed.map(|r| &r.measurement),
                allowlist: allowlist.as_ref(),
            })
        };
        // Sealed before the commit: a key that cannot be unwrapped or sealed makes the decision a
        // `key_unavailable` denial, committed and answered as such — the audit log never records
        // a release whose answer was a denial.
        let mut codes: Vec<&'static str> = match &decision.outcome {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(Denial::code).collect(),
        };
        let sealed = match (&decision.outcome, record.as_ref(), parsed) {
            (Ok(state), Some(rec), Some(r)) => {
                let body = self.seal_release(rec, state, &order, &nonce, &guest_pk, &r.measurement);
                if body.is_none() {
                    codes.push("key_unavailable");
                }
                body
            }
            // `decide` releases only with a VM record and a parsed report.
            (Ok(_), _, _) => {
                codes.push("unknown_vm");
                None
            }
            (Err(_), _, _) => None,
        };
        let release = sealed.as_ref().and(decision.outcome.as_ref().ok());
        let (kind, detail) = match release {
            Some(v) => (
                "release",
                serde_json::json!({"nonce": hex::encode(nonce), "boot_counter": v.boot_counter}),
            ),
            None => (
                "denial",
                serde_json::json!({"nonce": hex::encode(nonce), "reasons": codes}),
            ),
        };
        let commit = Commit {
            nonce,
            spend_nonce: decision.spend_nonce,
            nonce_expires_at: match &nonce_state {
                Some(release::NonceState::Issued { expires_at, .. }) => *expires_at,
                _ => now,
            },
            vm_update: release.cloned(),
            audit: (now, kind.into(), vm_id.into(), detail),
        };
        // Commit before emit: nothing is answered that is not durably recorded. A release that
        // lost a race inside the transaction was recorded as a denial and is answered as one.
        let committed = match self.store.commit(&commit).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "decision could not be committed; denying");
                return self.deny(vm_id, &nonce, &["storage_unavailable"]);
            }
        };
        match (release, sealed) {
            (Some(state), Some(mut body)) if committed.released => {
                // The report bound this mesh key: certify it for this VM.
                if let (Ok(mk), Some(o), Some(issuer)) = (
                    <[u8; 32]>::try_from(mesh_key),
                    order.as_ref(),
                    self.guest_issuer.get(),
                ) {
                    match issuer.issue(o, &mk, now) {
                        Ok(der) => {
                            body.mesh_cert = der;
                            body.mesh_chain = issuer.chain().to_vec();
                        }
                        Err(e) => {
                            tracing::warn!(vm_id, error = %e, "no mesh certificate issued")
                        }
                    }
                }
                self.metrics.releases.fetch_add(1, Ordering::Relaxed);
                tracing::info!(vm_id, boot = state.boot_counter, "key released");
                Response::release(&self.response_key, &body)
            }
            (None, _) => {
                tracing::info!(vm_id, reasons = ?codes, "release denied");
                self.deny(vm_id, &nonce, &codes)
            }
            _ => self.deny(
                vm_id,
                &nonce,
                &[committed.lost_race.unwrap_or("unknown_vm")],
            ),
        }
    }

    /// The nonce book (a poisoned lock is still a consistent book: every method leaves it so).
    fn book(&self) -> std::sync::MutexGuard<'_, NonceBook> {
        self.nonces.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seal_release(
        &self,
        rec: &VmRecord,
        state: &release::VmState,
        order: &Option<Order>,
        nonce: &[u8; 32],
        guest_pk: &[u8; 32],
        measurement: &[u8; 48],
    ) -> Option<ReleaseBody> {
        let key = self
            .kek
            .unwrap_key(&state.vm_id, state.generation, rec.wrapped_key.as_deref()?)
            .ok()?;
        let boot_config = order
            .as_ref()
            .map(|o| o.boot_config.as_slice())
            .unwrap_or(&[]);
        // One buffer at its full size from the start: growing it would leave a copy of the key
        // in freed memory that nothing wipes.
        let mut payload = Zeroizing::new(Vec::with_capacity(key.0.len() + boot_config.len()));
        payload.extend_from_slice(&key.0[..]);
        payload.extend_from_slice(boot_config);
        let ctx = SealContext {
            vm_id: &state.vm_id,
            generation: state.generation,
            nonce: *nonce,
            measurement: *measurement,
        };
        let sealed = seal(guest_pk, &ctx, &payload).ok()?;
        Some(ReleaseBody {
            vm_id: state.vm_id.clone(),
            generation: state.generation,
            boot_counter: state.boot_counter,
            nonce: nonce.to_vec(),
            measurement: measurement.to_vec(),
            enc: sealed.enc.to_vec(),
            sealed: sealed.ciphertext,
            mesh_cert: Vec::new(),
            mesh_chain: Vec::new(),
        })
    }

    fn deny(&self, vm_id: &str, nonce: &[u8; 32], reasons: &[&'static str]) -> Response {
        self.metrics.denied(reasons);
        Response::denial(
            &self.response_key,
            &DenialBody {
                vm_id: vm_id.into(),
                nonce: nonce.to_vec(),
                reasons: reasons.iter().map(|r| r.to_string()).collect(),
            },
        )
    }
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

/// The appraisal policy for a VM: its order's policy, restricted to the order's measurements and
/// chips. A VM whose order (or its policy) cannot be read allows nothing: fail closed.
pub fn vm_policy(order: Option<&Order>) -> Policy {
    let allow_nothing = || Policy {
        measurements: Some(Vec::new()),
        chip_ids: Some(Vec::new()),
        ..Policy::default()
    };
    let Some(o) = order else {
        return allow_nothing();
    };
    let parsed = if o.policy.is_empty() {
        Ok(Policy::default())
    } else {
        Policy::from_toml(&o.policy)
    };
    let Ok(mut p) = parsed else {
        return allow_nothing();
    };
    p.measurements = Some(
        o.measurements
            .iter()
            .filter_map(|m| <[u8; 48]>::try_from(m.as_slice()).ok())
            .map(snp::hexbytes::HexBytes)
            .collect(),
    );
    p.chip_ids = Some(
        o.chip_ids
            .iter()
            .filter_map(|c| <[u8; 64]>::try_from(c.as_slice()).ok())
            .map(snp::hexbytes::HexBytes)
            .collect(),
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::order::ORDER_VERSION;
    use serde_bytes::ByteBuf;

    fn order(policy: &str) -> Order {
        Order {
            v: ORDER_VERSION,
            kind: OrderKind::Register,
            vm_id: "vm".into(),
            tenant: "t".into(),
            measurements: vec![ByteBuf::from(vec![1; 48])],
            policy: policy.into(),
            chip_ids: vec![ByteBuf::from(vec![2; 64])],
            not_after: 0,
            boot_config: ByteBuf::new(),
            billing: None,
            mesh_ip: None,
        }
    }

    #[test]
    fn a_guest_mesh_name_is_one_dns_label() {
        let ca = mesh::cert::LocalCa::root("ca", &[], 1_000, 1_000_000).unwrap();
        let issuer = GuestIssuer::new(ca.cert.clone(), vec![], ca.key.clone(), 3600);
        let with = |vm: &str| Order {
            vm_id: vm.into(),
            mesh_ip: Some("10.42.2.1/16".into()),
            ..order("")
        };
        let der = issuer.issue(&with("vm-1"), &[7; 32], 5_000).unwrap();
        let cert = mesh::cert::MeshCert::parse(&der).unwrap();
        assert_eq!(cert.name, "vm-1");
        assert_eq!(cert.claims.groups, ["tenant:t"]);
        for bad in ["kbs.attesta.local", "", "vm 1", "vm/1"] {
            let e = issuer.issue(&with(bad), &[7; 32], 5_000).unwrap_err();
            assert!(e.contains("single DNS label"), "{bad}: {e}");
        }
        // No address in the order: no certificate.
        let e = issuer.issue(&order(""), &[7; 32], 5_000).unwrap_err();
        assert!(e.contains("mesh_ip"), "{e}");
    }

    #[test]
    fn the_vm_policy_follows_the_order_and_fails_closed() {
        let p = vm_policy(Some(&order("version = 1\nminimum_guest_svn = 3\n")));
        assert_eq!(p.minimum_guest_svn, 3);
        assert_eq!(p.measurements.as_ref().map(Vec::len), Some(1));
        assert_eq!(p.chip_ids.as_ref().map(Vec::len), Some(1));
        for nothing in [vm_policy(None), vm_policy(Some(&order("not toml ==")))] {
            assert_eq!(nothing.measurements, Some(vec![]));
            assert_eq!(nothing.chip_ids, Some(vec![]));
        }
    }
}
