//! The key broker service: registration from signed orders, challenges, and release decisions,
//! over QUIC (TLS 1.3 with aws-lc-rs, ALPN `attesta-kbs/1`, no 0-RTT, one request per
//! bidirectional stream). Every decision is committed (nonce, VM state, audit entry) before the
//! first byte of the answer is written.

use crate::keys::{Kek, VolumeKey};
use crate::release::{self, Denial};
use crate::store::{Commit, SqliteStore, Store, StoreError, VmRecord};
use proto::msg::{
    ALPN, DenialBody, EXPORTER_LABEL, MAX_REQUEST, ReleaseBody, Request, Response, VERSION, frame,
    frame_len,
};
use proto::order::{Allowlist, DocumentError, Order, OrderKind};
use proto::{ResponseKey, SealContext, report_data, seal};
use snp::{Evidence, Policy, Verifier};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("order: {0}")]
    Order(#[from] DocumentError),
    #[error("the order is not a register order")]
    NotRegister,
    #[error("measurements not in the allowlist: {0:?}")]
    NotAllowlisted(Vec<String>),
    #[error("the order's policy: {0}")]
    Policy(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] crate::keys::KeyError),
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
}

impl Kbs {
    /// Installs a newer signed allowlist (older epochs are refused, here and in the store).
    pub async fn set_allowlist(
        &self,
        doc: &[u8],
        allowlist_key: &[u8; 32],
    ) -> Result<u64, RegisterError> {
        let epoch = self.store.allowlist_epoch().await?;
        let a = Allowlist::verify(doc, allowlist_key, epoch)?;
        self.store.set_allowlist_epoch(a.epoch).await?;
        let e = a.epoch;
        *self.allowlist.write().await = Some(a);
        Ok(e)
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
        if !order.policy.is_empty() {
            Policy::from_toml(&order.policy).map_err(|e| RegisterError::Policy(e.to_string()))?;
        }
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
        Ok(order.vm_id)
    }

    /// Answers one request. `exporter` is this connection's TLS exporter value.
    pub async fn handle(&self, req: Request, exporter: [u8; 32], now: u64) -> Response {
        match req {
            Request::Challenge { vm_id, .. } => self.challenge(&vm_id, now).await,
            Request::Evidence {
                vm_id,
                nonce,
                report,
                cert_table,
                guest_public_key,
                ..
            } => {
                self.evidence(
                    &vm_id,
                    &nonce,
                    &report,
                    &cert_table,
                    &guest_public_key,
                    exporter,
                    now,
                )
                .await
            }
        }
    }

    async fn challenge(&self, vm_id: &str, now: u64) -> Response {
        let mut nonce = [0u8; 32];
        if aws_lc_rs::rand::fill(&mut nonce).is_err()
            || self
                .store
                .issue_nonce(&nonce, vm_id, now + self.nonce_ttl)
                .await
                .is_err()
        {
            return Response::Error {
                v: VERSION,
                code: "unavailable".into(),
            };
        }
        Response::Challenge {
            v: VERSION,
            nonce: nonce.to_vec(),
            expires_in_ms: self.nonce_ttl * 1000,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn evidence(
        &self,
        vm_id: &str,
        nonce: &[u8],
        report: &[u8],
        cert_table: &[u8],
        guest_pk: &[u8],
        exporter: [u8; 32],
        now: u64,
    ) -> Response {
        let (Ok(nonce), Ok(guest_pk)) =
            (<[u8; 32]>::try_from(nonce), <[u8; 32]>::try_from(guest_pk))
        else {
            return Response::Error {
                v: VERSION,
                code: "bad_request".into(),
            };
        };
        let (nonce_state, record) =
            match (self.store.nonce(&nonce).await, self.store.vm(vm_id).await) {
                (Ok(n), Ok(v)) => (n, v),
                _ => {
                    return Response::Error {
                        v: VERSION,
                        code: "unavailable".into(),
                    };
                }
            };
        // The evidence, appraised with this VM's order: its policy, images and chips.
        let order = record
            .as_ref()
            .and_then(|r| Order::decode_stored(&r.order).ok());
        let table = snp::CertTable::parse(cert_table).unwrap_or_default();
        let ev = Evidence {
            report,
            vcek: table.signing_cert(),
            ask: table.get(&snp::certtable::GUID_ASK),
            ark: table.get(&snp::certtable::GUID_ARK),
            crls: &[],
        };
        let policy = vm_policy(order.as_ref());
        let verdict = self.verifier.verify_with_policy(&ev, &policy, now);
        let parsed = verdict.report.as_ref();
        let decision = release::decide(&release::Request {
            now,
            vm_id,
            nonce: nonce_state.as_ref(),
            vm: record.as_ref().map(|r| &r.state),
            report_data: parsed.map(|r| r.report_data).unwrap_or([0; 64]),
            expected_report_data: report_data(&nonce, &guest_pk, &exporter),
            evidence: &verdict.reasons,
        });
        let (kind, detail) = match &decision.outcome {
            Ok(v) => (
                "release",
                serde_json::json!({"nonce": hex::encode(nonce), "boot_counter": v.boot_counter}),
            ),
            Err(d) => (
                "denial",
                serde_json::json!({"nonce": hex::encode(nonce), "reasons": d.iter().map(Denial::code).collect::<Vec<_>>()}),
            ),
        };
        let commit = Commit {
            nonce,
            spend_nonce: decision.spend_nonce,
            vm_update: decision.outcome.as_ref().ok().cloned(),
            audit: (now, kind.into(), vm_id.into(), detail),
        };
        // Commit before emit: nothing is answered that is not durably recorded.
        if self.store.commit(&commit).await.is_err() {
            return self.deny(vm_id, &nonce, vec!["storage_unavailable".into()]);
        }
        match (decision.outcome, record, parsed) {
            (Ok(state), Some(rec), Some(r)) => {
                match self.seal_release(&rec, &state, &order, &nonce, &guest_pk, &r.measurement) {
                    Some(body) => Response::release(&self.response_key, &body),
                    None => self.deny(vm_id, &nonce, vec!["key_unavailable".into()]),
                }
            }
            (Err(d), _, _) => self.deny(
                vm_id,
                &nonce,
                d.iter().map(|x| x.code().to_string()).collect(),
            ),
            _ => self.deny(vm_id, &nonce, vec!["unknown_vm".into()]),
        }
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
        let mut payload = Zeroizing::new(key.0.to_vec());
        payload.extend_from_slice(
            order
                .as_ref()
                .map(|o| o.boot_config.as_slice())
                .unwrap_or(&[]),
        );
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
        })
    }

    fn deny(&self, vm_id: &str, nonce: &[u8; 32], reasons: Vec<String>) -> Response {
        Response::denial(
            &self.response_key,
            &DenialBody {
                vm_id: vm_id.into(),
                nonce: nonce.to_vec(),
                reasons,
            },
        )
    }
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

/// A broker TLS identity: a CA (which guests pin) and a server certificate it issued.
pub struct TlsIdentity {
    pub ca_der: Vec<u8>,
    pub ca_pem: String,
    pub cert_der: Vec<u8>,
    pub cert_pem: String,
    /// PKCS#8 of the server key (secret).
    pub key_der: Zeroizing<Vec<u8>>,
    pub key_pem: Zeroizing<String>,
}

impl TlsIdentity {
    /// A new CA (path length 0) and a certificate for `server_name` from it.
    pub fn generate(server_name: &str) -> Result<TlsIdentity, String> {
        let err = |e: rcgen::Error| e.to_string();
        let ca_key = rcgen::KeyPair::generate().map_err(err)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Attesta KBS CA");
        let ca = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = rcgen::CertificateParams::new(vec![server_name.to_string()])
            .map_err(err)?
            .signed_by(&key, &issuer)
            .map_err(err)?;
        Ok(TlsIdentity {
            ca_der: ca.der().to_vec(),
            ca_pem: ca.pem(),
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_der: Zeroizing::new(key.serialize_der()),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The QUIC server configuration for this identity.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, String> {
        server_config(
            vec![rustls::pki_types::CertificateDer::from(
                self.cert_der.clone(),
            )],
            rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.to_vec().into()),
        )
    }
}

/// QUIC server configuration: TLS 1.3 only, ALPN `attesta-kbs/1`, no early data.
pub fn server_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0; // no 0-RTT on key release
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// Serves until the endpoint closes. `clock` gives Unix seconds.
pub async fn serve(endpoint: quinn::Endpoint, kbs: Arc<Kbs>, clock: fn() -> u64) {
    while let Some(incoming) = endpoint.accept().await {
        let kbs = kbs.clone();
        tokio::spawn(async move {
            // The whole handshake completes before anything is read: no 0-RTT, no 0.5-RTT answers.
            let Ok(conn) = incoming.await else { return };
            let mut exporter = [0u8; 32];
            if conn
                .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
                .is_err()
            {
                return;
            }
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let kbs = kbs.clone();
                tokio::spawn(async move {
                    let resp = match read_request(&mut recv).await {
                        Ok(req) => kbs.handle(req, exporter, clock()).await,
                        Err(code) => Response::Error {
                            v: VERSION,
                            code: code.into(),
                        },
                    };
                    let _ = send.write_all(&frame(&resp)).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, &'static str> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|_| "bad_request")?;
    let len = frame_len(header, MAX_REQUEST).map_err(|_| "too_large")?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|_| "bad_request")?;
    let mut framed = header.to_vec();
    framed.extend_from_slice(&body);
    Request::decode_frame(&framed).map_err(|_| "bad_request")
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
        }
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
