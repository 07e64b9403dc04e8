//! The broker on QUIC: admission (at most `max_sessions` connections served at once, each for
//! at most `session_limit`), one request per bidirectional stream, framing and the per-session
//! limits. Decisions are the service's ([`crate::service::Kbs::handle`]).

use crate::limits::{AddressSlots, SessionBudget, Spend};
use crate::service::Kbs;
use crate::tls::{MeshGate, Role, role_of};
use proto::msg::{EXPORTER_LABEL, MAX_REQUEST, Request, Response, frame, frame_len};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Default for `max_sessions`: enough to keep the broker's cores busy between a guest's round
/// trips, few enough that a boot storm queues at the door instead of slowing every session.
pub const DEFAULT_MAX_SESSIONS: usize = 64;

/// Close code for a connection that outlived its session time limit.
pub const CLOSE_TIME_LIMIT: u32 = 0x11;

pub use crate::limits::{MAX_CHALLENGES_PER_SESSION, MAX_EVIDENCE_PER_SESSION};

/// Close code for a connection that sent no complete request within [`FIRST_REQUEST_LIMIT`] of
/// its handshake.
pub const CLOSE_IDLE: u32 = 0x12;

/// How long a connection may take, after its handshake, to send its first complete request: an
/// idle or trickling client frees its slot by then. A guest's first request is its evidence, so
/// this covers asking its PSP for a report (milliseconds; longer for a busy PSP in a boot storm,
/// or a host slow to pass on the guest's request) and sending a few KB.
pub const FIRST_REQUEST_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a handshake may hold a slot: a client that does not finish it by then (gone, or
/// never there) frees the slot for the next.
pub const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Socket buffer we ask for: a boot storm's handshakes arrive in bursts, and a datagram the
/// kernel drops costs a QUIC retransmission timeout (hundreds of ms) on that boot.
pub const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket with large send and receive buffers (capped by the kernel's rmem_max/wmem_max).
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// The broker's QUIC endpoint on `addr`, on a [`udp_socket`].
pub fn server_endpoint(
    config: quinn::ServerConfig,
    addr: std::net::SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The role of a connection's peer: from its verified client certificate, else a guest.
fn peer_role(conn: &quinn::Connection) -> Role {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().map(|c| role_of(c)))
        .unwrap_or(Role::Guest)
}

/// Serves until the endpoint closes. `clock` gives Unix seconds.
pub async fn serve(endpoint: quinn::Endpoint, kbs: Arc<Kbs>, clock: fn() -> u64) {
    serve_with(endpoint, kbs, clock, None).await
}

/// A slot of an address in [`AddressSlots`], given back when the connection ends.
struct AddressSlot {
    slots: Arc<Mutex<AddressSlots>>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        lock(&self.slots).give_back(self.ip);
    }
}

/// The address book (a poisoned lock is still consistent: every method leaves it so).
fn lock(slots: &Mutex<AddressSlots>) -> std::sync::MutexGuard<'_, AddressSlots> {
    slots.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`serve`], with the mesh's admission when the broker is on the mesh.
///
/// At most `kbs.max_sessions` connections are served at once, each for at most
/// `kbs.session_limit` (its handshake for at most [`HANDSHAKE_LIMIT`], then its first request
/// within [`FIRST_REQUEST_LIMIT`]); a new handshake starts only when a slot frees. In a boot
/// storm the queue forms at the door (the endpoint holds the waiting handshakes), so a guest
/// that got in is answered promptly while a thousand others share the cores, and the broker's memory stays bounded. While every slot is taken, a client whose
/// address is not yet validated is sent a QUIC Retry first (as SYN cookies do for TCP): spoofed
/// Initials cannot queue for slots, only clients that can receive at their address.
///
/// One source address (an IPv4 address, an IPv6 /64) holds at most
/// `kbs.max_sessions_per_address` of the slots; a connection beyond that is refused at the door
/// (QUIC CONNECTION_REFUSED, no handshake), so one party cannot lock the others out (see
/// [`crate::limits`]). While that cap is in force, an unvalidated client from an address that
/// already holds a connection is sent a Retry first, so spoofed Initials cannot fill another
/// party's share.
pub async fn serve_with(
    endpoint: quinn::Endpoint,
    kbs: Arc<Kbs>,
    clock: fn() -> u64,
    gate: Option<Arc<MeshGate>>,
) {
    let slots = kbs
        .max_sessions
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let permits = Arc::new(tokio::sync::Semaphore::new(slots));
    let per_address = kbs.max_sessions_per_address.max(1);
    let addresses = Arc::new(Mutex::new(AddressSlots::new(per_address)));
    while let Some(incoming) = endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        if !incoming.remote_address_validated()
            && (permits.available_permits() == 0
                || (per_address < slots && lock(&addresses).held(ip) > 0))
        {
            // Its validated retry comes back as a new incoming connection.
            let _ = incoming.retry();
            continue;
        }
        if !lock(&addresses).take(ip) {
            kbs.metrics
                .refused_per_address
                .fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        let address_slot = AddressSlot {
            slots: addresses.clone(),
            ip,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let kbs = kbs.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let _address_slot = address_slot;
            let _session = kbs.metrics.session(permit);
            let start = tokio::time::Instant::now();
            let deadline = start + kbs.session_limit;
            // The whole handshake completes before anything is read: no 0-RTT, no 0.5-RTT answers.
            let handshake = (start + HANDSHAKE_LIMIT).min(deadline);
            let Ok(Ok(conn)) = tokio::time::timeout_at(handshake, incoming).await else {
                return;
            };
            let mut exporter = [0u8; 32];
            if conn
                .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
                .is_err()
            {
                return;
            }
            let role = match &gate {
                None => peer_role(&conn),
                Some(g) => {
                    let chain = conn.peer_identity().and_then(|id| {
                        id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                            .ok()
                    });
                    match g.admit(chain.as_deref().map(|c| c.as_slice()), clock()) {
                        Ok(r) => r,
                        Err(why) => {
                            tracing::info!(%why, "connection refused");
                            conn.close(0x10u32.into(), why.as_bytes());
                            return;
                        }
                    }
                }
            };
            // Told once the first complete request has been read.
            let first = Arc::new(tokio::sync::Notify::new());
            let streams = async {
                let mut requests = tokio::task::JoinSet::new();
                let budget = Arc::new(Mutex::new(SessionBudget::default()));
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let kbs = kbs.clone();
                    let budget = budget.clone();
                    let first = first.clone();
                    requests.spawn(async move {
                        let req = read_request(&mut recv).await;
                        if req.is_ok() {
                            first.notify_one();
                        }
                        let resp = match req {
                            Ok(req) => {
                                let spend = match &req {
                                    Request::Challenge { .. } => Spend::Challenge,
                                    Request::Evidence { nonce, .. } if nonce.is_empty() => {
                                        Spend::BoundEvidence
                                    }
                                    // Bound to the connection too: its one and last.
                                    Request::Renew { .. } | Request::Attest { .. } => {
                                        Spend::BoundEvidence
                                    }
                                    // Bounded per connection like a nonce.
                                    Request::TenantChallenge { .. } => Spend::Challenge,
                                    Request::Evidence { .. } => Spend::Evidence,
                                    _ => Spend::Other,
                                };
                                let over = budget
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .spend(spend);
                                match over {
                                    Ok(()) => kbs.handle(req, role, exporter, clock()).await,
                                    Err(code) => {
                                        kbs.metrics.errors.fetch_add(1, Ordering::Relaxed);
                                        Response::error(
                                            code,
                                            "this connection has sent all the requests of this kind it may",
                                        )
                                    }
                                }
                            }
                            Err(code) => {
                                kbs.metrics.errors.fetch_add(1, Ordering::Relaxed);
                                Response::error(code, "the request frame is unusable")
                            }
                        };
                        let _ = send.write_all(&frame(&resp)).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
                // The peer has gone: its requests still in progress finish before the slot is
                // freed. (If a limit fires instead, they are aborted; a decision already handed
                // to the store is committed by the store's writer regardless, and nothing
                // uncommitted was ever answered.)
                while requests.join_next().await.is_some() {}
            };
            let idle = async {
                let asked = tokio::time::Instant::now() + FIRST_REQUEST_LIMIT;
                if tokio::time::timeout_at(asked, first.notified())
                    .await
                    .is_ok()
                {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => {
                    conn.close(CLOSE_TIME_LIMIT.into(), b"session time limit");
                }
                () = idle => {
                    kbs.metrics.idle_closed.fetch_add(1, Ordering::Relaxed);
                    conn.close(CLOSE_IDLE.into(), b"no request in time");
                }
                () = streams => {}
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
