//! The broker's own client, for hosts and operators: connect with a client certificate (role
//! host or operator) and send an order; and for tenants, anonymous: ask a running VM to attest
//! with a nonce of their own. Guests use `guest_agent::client` instead.

use proto::brokers::HANDSHAKE_PER_TRY;
use proto::msg::{ALPN, MAX_RESPONSE, Request, Response, VERSION, frame, frame_len};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;

/// Where the broker is, how to recognise it, and who we are.
pub struct Remote {
    pub addr: SocketAddr,
    pub server_name: String,
    pub ca: CertificateDer<'static>,
    pub client_chain: Vec<CertificateDer<'static>>,
    pub client_key: PrivateKeyDer<'static>,
}

impl Remote {
    /// Loads the broker's CA and our client chain and key from PEM files, naming a file that
    /// cannot be read or parsed.
    pub fn from_pem_files(
        addr: SocketAddr,
        server_name: String,
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Remote, String> {
        use rustls::pki_types::pem::PemObject;
        fn at(p: &std::path::Path) -> impl Fn(rustls::pki_types::pem::Error) -> String + '_ {
            move |e| format!("{}: {e}", p.display())
        }
        Ok(Remote {
            addr,
            server_name,
            ca: CertificateDer::from_pem_file(ca).map_err(at(ca))?,
            client_chain: CertificateDer::pem_file_iter(cert)
                .map_err(at(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(at(cert))?,
            client_key: PrivateKeyDer::from_pem_file(key).map_err(at(key))?,
        })
    }
}

/// Why an order did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// The broker answered and refused; `code` is its closed-vocabulary error code
    /// (e.g. `vm_exists`, `order_signature`, `no_such_vm`).
    #[error("refused ({code}): {detail}")]
    Refused { code: String, detail: String },
    /// No answer (unreachable, TLS failure, broken stream).
    #[error("{0}")]
    Transport(String),
}

/// Sends a register or terminate order; returns the VM id on success, or the broker's error.
pub async fn send_order(
    remote: Remote,
    terminate: bool,
    order: Vec<u8>,
) -> Result<String, OrderError> {
    let first = remote.addr;
    send_order_any(&[first], remote, terminate, order).await
}

/// [`send_order`] to the first of `addrs` (replicas on one database) that can be reached
/// (`remote.addr` is not used): one that cannot be connected to is passed over. Once the order
/// is sent, its answer — or its loss — is final: it may have been applied, so it is not sent
/// again elsewhere (asking twice would turn a success into `vm_exists`).
pub async fn send_order_any(
    addrs: &[SocketAddr],
    remote: Remote,
    terminate: bool,
    order: Vec<u8>,
) -> Result<String, OrderError> {
    use OrderError::Transport as T;
    let config = client_config(remote.ca, Some((remote.client_chain, remote.client_key)))?;
    let mut unreachable = Vec::new();
    for addr in addrs {
        let local: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let ep = quinn::Endpoint::client(local).map_err(|e| T(e.to_string()))?;
        let connecting = ep
            .connect_with(config.clone(), *addr, &remote.server_name)
            .map_err(|e| T(e.to_string()))?;
        let conn = if addrs.len() > 1 {
            match tokio::time::timeout(HANDSHAKE_PER_TRY, connecting).await {
                Ok(c) => c.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no handshake within {HANDSHAKE_PER_TRY:?}")),
            }
        } else {
            connecting.await.map_err(|e| e.to_string())
        };
        match conn {
            Ok(conn) => return exchange(&conn, terminate, order).await,
            Err(e) => unreachable.push(format!("{addr}: {e}")),
        }
    }
    Err(T(format!(
        "cannot reach the broker at {}",
        unreachable.join("; ")
    )))
}

/// TLS 1.3 with the pinned CA and (hosts, operators) our client certificate, ALPN, no early
/// data.
fn client_config(
    ca: CertificateDer<'static>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<quinn::ClientConfig, OrderError> {
    use OrderError::Transport as T;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| T(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| T(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| T(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| T(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Asks the broker at `addr` (its TLS CA `ca`, its name `server_name`) one request without a
/// client certificate, as a tenant: the answer, whatever it is.
pub async fn ask(
    addr: SocketAddr,
    server_name: &str,
    ca: CertificateDer<'static>,
    req: &Request,
) -> Result<Response, OrderError> {
    use OrderError::Transport as T;
    let config = client_config(ca, None)?;
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let ep = quinn::Endpoint::client(local).map_err(|e| T(e.to_string()))?;
    let conn = ep
        .connect_with(config, addr, server_name)
        .map_err(|e| T(e.to_string()))?
        .await
        .map_err(|e| T(format!("cannot reach the broker at {addr}: {e}")))?;
    one_request(&conn, req).await
}

/// The order on one stream, and the broker's answer.
async fn exchange(
    conn: &quinn::Connection,
    terminate: bool,
    order: Vec<u8>,
) -> Result<String, OrderError> {
    use OrderError::Transport as T;
    let req = if terminate {
        Request::Terminate { v: VERSION, order }
    } else {
        Request::Register { v: VERSION, order }
    };
    match one_request(conn, &req).await? {
        Response::Done { vm_id, .. } => Ok(vm_id),
        Response::Error { code, detail, .. } => Err(OrderError::Refused {
            code: code.to_string(),
            detail: detail.to_string(),
        }),
        _ => Err(T("unexpected answer".into())),
    }
}

/// One request on one stream, its answer, and the connection closed.
async fn one_request(conn: &quinn::Connection, req: &Request) -> Result<Response, OrderError> {
    use OrderError::Transport as T;
    // A refused connection (the mesh firewall, a revoked certificate) says why in its close.
    let lost = |e: String| {
        T(match conn.close_reason() {
            Some(r) => format!("the broker closed the connection: {r}"),
            None => e,
        })
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    send.write_all(&frame(req))
        .await
        .map_err(|e| lost(e.to_string()))?;
    let _ = send.finish();
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let len = frame_len(header, MAX_RESPONSE).map_err(|e| T(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let mut framed = header.to_vec();
    framed.extend_from_slice(&body);
    conn.close(0u32.into(), b"done");
    Response::decode_frame(&framed).map_err(|e| T(e.to_string()))
}
