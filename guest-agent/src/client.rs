//! The guest's side of the release protocol: connect to the broker (pinning its CA), bind this
//! connection (its TLS exporter) and a fresh guest key into a report, send the evidence as the
//! connection's one request, verify the broker's signature, and open the sealed secrets. Any failure is an error: the
//! caller fails closed.

use proto::msg::{
    ALPN, Decision, EXPORTER_LABEL, MAX_RESPONSE, Request, Response, VERSION, frame, frame_len,
    verify_decision,
};
use proto::{GuestKey, SealContext, open, report_data};
use snp::device::GuestDevice;
use std::net::SocketAddr;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Where the broker is and how the guest recognises it (both from the measured configuration).
#[derive(Clone, Debug)]
pub struct Broker {
    pub addr: SocketAddr,
    pub server_name: String,
    /// DER of the CA that issued the broker's TLS certificate.
    pub ca_der: Vec<u8>,
    /// The broker's Ed25519 response key.
    pub response_key: [u8; 32],
}

/// What the broker released.
pub struct Released {
    /// The 64-byte volume key.
    pub volume_key: Zeroizing<Vec<u8>>,
    /// The boot configuration (e.g. SSH keys).
    pub boot_config: Vec<u8>,
    pub generation: u64,
    pub boot_counter: u64,
    /// How long the evidence round trip took (the broker's verify, decide, commit, seal).
    pub evidence_rtt: std::time::Duration,
    /// The guest's mesh certificate (DER), when a mesh key was bound and the broker issued one.
    pub mesh_cert: Vec<u8>,
    /// The certificates above it (DER, issuer first), written after it into `node.crt`.
    pub mesh_chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Released(generation {}, boot {}, <key redacted>)",
            self.generation, self.boot_counter
        )
    }
}

/// Why no key was obtained.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the key broker: {0}")]
    Connect(String),
    #[error("the key broker's answer is malformed: {0}")]
    Protocol(String),
    #[error("the key broker refused: {0:?}")]
    Denied(Vec<String>),
    #[error("the key broker's answer is not signed by the pinned key")]
    Signature,
    #[error("the released secret does not open for this guest")]
    Open,
    #[error("the guest device failed: {0}")]
    Device(String),
    #[error("no guest key could be generated")]
    KeyGen,
}

/// The guest's QUIC client configuration: TLS 1.3, the pinned CA only, ALPN, no early data.
pub fn client_config(b: &Broker) -> Result<quinn::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(b.ca_der.clone()))
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Connect(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    // Before the handshake completes only this side's idle timeout counts: a guest waiting at
    // the door of a broker in a boot storm (it admits connections as slots free) waits this
    // long. Keep-alives hold the connection while a live broker works on the evidence.
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .keep_alive_interval(Some(IDLE_TIMEOUT / 4));
    cc.transport_config(Arc::new(transport));
    Ok(cc)
}

/// How long a connection may go without a packet from the broker before it is given up.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// One request on its own bidirectional stream, and its answer (framed, size-limited).
pub async fn exchange(conn: &quinn::Connection, req: &Request) -> Result<Response, ClientError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    send.write_all(&frame(req))
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let _ = send.finish();
    // A connection lost before the answer (the broker died, or went silent): nothing released
    // on it reached the guest, and a new exchange (new connection, new guest key) cannot open
    // anything of this one. Asking again is no worse than failing the boot; if the lost answer
    // was a committed release, this boot's counter was spent on it either way.
    let lost = |e: quinn::ReadExactError| ClientError::Connect(format!("connection lost: {e}"));
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(lost)?;
    let len = frame_len(header, MAX_RESPONSE).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(lost)?;
    let mut framed = header.to_vec();
    framed.extend_from_slice(&body);
    Response::decode_frame(&framed).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Obtains the VM's secrets from the broker (on a fresh local UDP endpoint).
pub async fn fetch(
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
) -> Result<Released, ClientError> {
    fetch_on(&local_endpoint(broker)?, broker, vm_id, device).await
}

/// [`fetch`] (with the mesh key, if given) that gives up a handshake not done within
/// `handshake`: for a guest with other brokers to try, one that does not answer (down, or
/// unreachable) is left for the next rather than waited for. The answer to the evidence is
/// waited for (up to the idle timeout): a broker may be slow to commit, and leaving it then
/// would spend a release without receiving it.
pub async fn fetch_within(
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
    mesh_key: Option<&[u8; 32]>,
    handshake: std::time::Duration,
) -> Result<Released, ClientError> {
    let endpoint = local_endpoint(broker)?;
    fetch_on_with(&endpoint, broker, vm_id, device, mesh_key, Some(handshake)).await
}

/// A client endpoint on any local address of the broker's family (the route decides).
fn local_endpoint(broker: &Broker) -> Result<quinn::Endpoint, ClientError> {
    let local: SocketAddr = if broker.addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(local).map_err(|e| ClientError::Connect(e.to_string()))
}

/// [`fetch`] over an existing endpoint (many simulated guests can share one UDP socket).
pub async fn fetch_on(
    endpoint: &quinn::Endpoint,
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
) -> Result<Released, ClientError> {
    fetch_on_with(endpoint, broker, vm_id, device, None, None).await
}

/// [`fetch`], also binding the guest's Ed25519 mesh public key in the report so the broker can
/// certify it (the certificate comes back in [`Released::mesh_cert`]).
pub async fn fetch_with_mesh_key(
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
    mesh_key: &[u8; 32],
) -> Result<Released, ClientError> {
    fetch_on_with(
        &local_endpoint(broker)?,
        broker,
        vm_id,
        device,
        Some(mesh_key),
        None,
    )
    .await
}

/// A connection to the broker (its CA pinned) and its exporter value. The connection is the
/// challenge: the exporter, which the broker's half of the handshake made fresh and which the
/// host relaying the packets cannot know, is bound in the report and gives the request its
/// nonce. One round trip after the handshake.
async fn connect(
    endpoint: &quinn::Endpoint,
    broker: &Broker,
    handshake: Option<std::time::Duration>,
) -> Result<(quinn::Connection, [u8; 32]), ClientError> {
    let connecting = endpoint
        .connect_with(client_config(broker)?, broker.addr, &broker.server_name)
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let conn = match handshake {
        None => connecting.await,
        Some(t) => tokio::time::timeout(t, connecting)
            .await
            .map_err(|_| ClientError::Connect(format!("no handshake within {t:?}")))?,
    }
    .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| ClientError::Protocol("no exporter".into()))?;
    Ok((conn, exporter))
}

/// What a lease renewal gave: the new mesh certificate and when it (and the lease) ends.
#[derive(Clone, Debug)]
pub struct Renewed {
    pub mesh_cert: Vec<u8>,
    pub mesh_chain: Vec<Vec<u8>>,
    pub not_after: u64,
    /// Tenants' nonces the VM is asked to attest to ([`attest`]).
    pub challenges: Vec<[u8; 32]>,
}

/// Renews a running VM's lease: a fresh report bound to a new connection and to the mesh key,
/// the key's signature over the connection's exporter (proof of possession), and the broker's
/// signed answer, checked to be for this request.
pub async fn renew(
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
    mesh_key: &aws_lc_rs::signature::Ed25519KeyPair,
) -> Result<Renewed, ClientError> {
    let public = public_of(mesh_key)?;
    let (conn, exporter) = connect(&local_endpoint(broker)?, broker, None).await?;
    let nonce = proto::connection_nonce(&exporter);
    let (report, table) = device
        .get_ext_report(&proto::renew_report_data(&exporter, &public), 0)
        .map_err(|e| ClientError::Device(e.to_string()))?;
    let req = Request::Renew {
        v: VERSION,
        vm_id: vm_id.into(),
        report,
        cert_table: table,
        mesh_key: public.to_vec(),
        proof: mesh_key
            .sign(&proto::renew_proof_message(&exporter))
            .as_ref()
            .to_vec(),
    };
    match decided(&conn, &req, broker, vm_id, &nonce).await? {
        Decision::Renewed(b) if b.vm_id == vm_id && b.nonce == nonce => Ok(Renewed {
            mesh_cert: b.mesh_cert,
            mesh_chain: b.mesh_chain.into_iter().map(|c| c.into_vec()).collect(),
            not_after: b.not_after,
            // As many as a broker keeps for one VM: no more reports than that per renewal.
            challenges: b
                .challenges
                .iter()
                .filter_map(|c| <[u8; 32]>::try_from(c.as_slice()).ok())
                .take(4)
                .collect(),
        }),
        _ => Err(ClientError::Protocol(
            "the answer is for another request".into(),
        )),
    }
}

/// The public half of a mesh key, as requests carry it.
fn public_of(key: &aws_lc_rs::signature::Ed25519KeyPair) -> Result<[u8; 32], ClientError> {
    use aws_lc_rs::signature::KeyPair;
    key.public_key()
        .as_ref()
        .try_into()
        .map_err(|_| ClientError::KeyGen)
}

/// Answers a tenant's challenge: a report bound to the tenant's `nonce` and the VM's mesh key,
/// sent on a new connection with the key's proof of possession.
pub async fn attest(
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
    mesh_key: &aws_lc_rs::signature::Ed25519KeyPair,
    nonce: &[u8; 32],
) -> Result<(), ClientError> {
    let public = public_of(mesh_key)?;
    let (conn, exporter) = connect(&local_endpoint(broker)?, broker, None).await?;
    let (report, table) = device
        .get_ext_report(&proto::tenant_report_data(nonce, &public, vm_id), 0)
        .map_err(|e| ClientError::Device(e.to_string()))?;
    let req = Request::Attest {
        v: VERSION,
        vm_id: vm_id.into(),
        nonce: nonce.to_vec(),
        report,
        cert_table: table,
        mesh_key: public.to_vec(),
        proof: mesh_key
            .sign(&proto::attest_proof_message(&exporter))
            .as_ref()
            .to_vec(),
    };
    let resp = exchange(&conn, &req).await?;
    conn.close(0u32.into(), b"done");
    match resp {
        Response::Done { vm_id: v, .. } if v == vm_id => Ok(()),
        Response::Error { code, .. } => Err(ClientError::Protocol(code)),
        _ => Err(ClientError::Protocol("unexpected answer".into())),
    }
}

/// Sends the connection's one request and closes it; the answer's signature checked against
/// the pinned key, a denial of this request turned into [`ClientError::Denied`].
async fn decided(
    conn: &quinn::Connection,
    req: &Request,
    broker: &Broker,
    vm_id: &str,
    nonce: &[u8; 32],
) -> Result<Decision, ClientError> {
    let resp = exchange(conn, req).await?;
    conn.close(0u32.into(), b"done");
    if let Response::Error { code, .. } = &resp {
        return Err(ClientError::Protocol(code.clone()));
    }
    match verify_decision(&broker.response_key, &resp).map_err(|_| ClientError::Signature)? {
        Decision::Denial(d) if d.vm_id == vm_id && d.nonce == nonce => {
            Err(ClientError::Denied(d.reasons))
        }
        other => Ok(other),
    }
}

async fn fetch_on_with(
    endpoint: &quinn::Endpoint,
    broker: &Broker,
    vm_id: &str,
    device: &impl GuestDevice,
    mesh_key: Option<&[u8; 32]>,
    handshake: Option<std::time::Duration>,
) -> Result<Released, ClientError> {
    let (conn, exporter) = connect(endpoint, broker, handshake).await?;
    let nonce = proto::connection_nonce(&exporter);
    let key = GuestKey::generate().map_err(|_| ClientError::KeyGen)?;
    let rd = match mesh_key {
        Some(m) => proto::report_data_with_mesh_key(&nonce, &key.public(), &exporter, m),
        None => report_data(&nonce, &key.public(), &exporter),
    };
    let (report, table) = device
        .get_ext_report(&rd, 0)
        .map_err(|e| ClientError::Device(e.to_string()))?;
    let measurement = snp::AttestationReport::from_bytes(&report)
        .map_err(|e| ClientError::Device(e.to_string()))?
        .measurement;
    let req = Request::Evidence {
        v: VERSION,
        vm_id: vm_id.into(),
        nonce: Vec::new(),
        report,
        cert_table: table,
        guest_public_key: key.public().to_vec(),
        mesh_key: mesh_key.map(|m| m.to_vec()).unwrap_or_default(),
    };
    let t0 = std::time::Instant::now();
    let decision = decided(&conn, &req, broker, vm_id, &nonce).await?;
    let evidence_rtt = t0.elapsed();
    match decision {
        Decision::Denial(_) | Decision::Renewed(_) => Err(ClientError::Protocol(
            "the answer is for another request".into(),
        )),
        Decision::Release(body) => {
            if body.vm_id != vm_id || body.nonce != nonce || body.measurement != measurement {
                return Err(ClientError::Protocol(
                    "the release is for another request".into(),
                ));
            }
            let ctx = SealContext {
                vm_id,
                generation: body.generation,
                nonce,
                measurement,
            };
            let sealed = body.sealed().ok_or(ClientError::Open)?;
            let mut payload = open(&key, &ctx, &sealed).map_err(|_| ClientError::Open)?;
            if payload.len() < 64 {
                return Err(ClientError::Open);
            }
            let boot_config = payload[64..].to_vec();
            payload.truncate(64);
            Ok(Released {
                volume_key: payload,
                boot_config,
                generation: body.generation,
                boot_counter: body.boot_counter,
                evidence_rtt,
                mesh_cert: body.mesh_cert,
                mesh_chain: body.mesh_chain.into_iter().map(|c| c.into_vec()).collect(),
            })
        }
    }
}
