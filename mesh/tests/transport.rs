//! Mesh mutual TLS over real QUIC on loopback: only certificates from the mesh CA get through,
//! the peer's identity comes from the connection, a wrong name, a foreign CA, an expired
//! certificate and a revoked key (revoked while running, no restart) are all refused, and a
//! certificate-less client is admitted only where the server allows it.

use mesh::cert::{LocalCa, MeshCert, Role};
use mesh::transport::{Identity, Trust, client_tls, client_tls_anonymous, peer, server_tls};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPN: &[u8] = b"attesta-test/1";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

type Ca = LocalCa;

fn ca(name: &str) -> Ca {
    LocalCa::root(name, &["10.42.0.0/16"], now() - 86_400, now() + 86_400).unwrap()
}

fn node(ca: &Ca, name: &str, ip: &str, role: Role, from: u64, to: u64) -> (Identity, MeshCert) {
    let n = ca.issue(name, ip, &["tenant:a"], role, from, to).unwrap();
    (
        Identity::from_pem(n.issued.cert_pem.as_bytes(), n.issued.key_pem.as_bytes()).unwrap(),
        n.cert,
    )
}

fn server(id: Identity, trust: Arc<Trust>, required: bool) -> quinn::Endpoint {
    let tls = server_tls(id, trust, required, &[ALPN]).unwrap();
    let cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn dial(
    server: &quinn::Endpoint,
    tls: rustls::ClientConfig,
    name: &str,
) -> Result<quinn::Connection, String> {
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let addr = server.local_addr().unwrap();
    let srv = server.clone();
    // The server must finish (or fail) its side too.
    let accept = tokio::spawn(async move {
        let inc = srv.accept().await?;
        inc.await.ok()
    });
    let conn = client
        .connect_with(cfg, addr, name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string());
    let server_side = accept.await.ok().flatten();
    match (conn, server_side) {
        (Ok(c), Some(_)) => Ok(c),
        (Err(e), _) => Err(e),
        (Ok(_), None) => Err("the server refused".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_by_the_mesh_ca_only() {
    let root = ca("mesh-root");
    let trust = Trust::new(vec![root.cert.clone()]);
    let t = now();
    let (kbs, _) = node(&root, "kbs-1", "10.42.0.1/16", Role::Kbs, t - 60, t + 3600);
    let srv = server(kbs, trust.clone(), true);

    // A guest of this CA connects; each side sees the other's mesh identity.
    let (guest, guest_cert) = node(
        &root,
        "guest-1",
        "10.42.7.9/16",
        Role::Guest,
        t - 60,
        t + 3600,
    );
    let accept = {
        let srv = srv.clone();
        tokio::spawn(async move { srv.accept().await.unwrap().await.unwrap() })
    };
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(
            client_tls(guest, trust.clone(), ALPN).unwrap(),
        )
        .unwrap(),
    ));
    let c = client
        .connect_with(cfg, srv.local_addr().unwrap(), "kbs-1")
        .unwrap()
        .await
        .unwrap();
    let s = accept.await.unwrap();
    let seen = |conn: &quinn::Connection| {
        let certs = conn.peer_identity().and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        });
        peer(certs.as_deref().map(|v| v.as_slice()))
    };
    let at_server = seen(&s).unwrap();
    assert_eq!(at_server.name, "guest-1");
    assert_eq!(at_server.claims.role, Some(Role::Guest));
    assert_eq!(at_server.claims.groups, vec!["tenant:a".to_string()]);
    assert_eq!(seen(&c).unwrap().name, "kbs-1");
    assert_eq!(
        s.handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol),
        Some(ALPN.to_vec())
    );

    // Dialling another name than the server's certificate holds: refused.
    let (g2, _) = node(
        &root,
        "guest-2",
        "10.42.7.10/16",
        Role::Guest,
        t - 60,
        t + 3600,
    );
    assert!(
        dial(&srv, client_tls(g2, trust.clone(), ALPN).unwrap(), "kbs-2")
            .await
            .is_err()
    );

    // A certificate from another CA: refused by the server.
    let other = ca("other-root");
    let other_trust = Trust::new(vec![other.cert.clone(), root.cert.clone()]);
    let (stranger, _) = node(
        &other,
        "guest-1",
        "10.42.7.9/16",
        Role::Guest,
        t - 60,
        t + 3600,
    );
    assert!(
        dial(
            &srv,
            client_tls(stranger, other_trust, ALPN).unwrap(),
            "kbs-1"
        )
        .await
        .is_err()
    );

    // Expired: refused.
    let (old, _) = node(
        &root,
        "guest-3",
        "10.42.7.11/16",
        Role::Guest,
        t - 7200,
        t - 3600,
    );
    assert!(
        dial(&srv, client_tls(old, trust.clone(), ALPN).unwrap(), "kbs-1")
            .await
            .is_err()
    );

    // Revoked while the server runs: the next handshake is refused.
    let (again, _) = node(
        &root,
        "guest-1b",
        "10.42.7.12/16",
        Role::Guest,
        t - 60,
        t + 3600,
    );
    let (fresh, fresh_cert) = node(
        &root,
        "guest-1c",
        "10.42.7.13/16",
        Role::Guest,
        t - 60,
        t + 3600,
    );
    assert!(
        dial(
            &srv,
            client_tls(again, trust.clone(), ALPN).unwrap(),
            "kbs-1"
        )
        .await
        .is_ok()
    );
    trust
        .revoked
        .write()
        .unwrap()
        .keys
        .insert(fresh_cert.key_hash);
    trust
        .revoked
        .write()
        .unwrap()
        .serials
        .insert((guest_cert.issuer.clone(), guest_cert.serial.clone()));
    assert!(
        dial(
            &srv,
            client_tls(fresh, trust.clone(), ALPN).unwrap(),
            "kbs-1"
        )
        .await
        .is_err()
    );

    // No certificate: refused where required, admitted (with no identity) where optional.
    assert!(
        dial(
            &srv,
            client_tls_anonymous(trust.clone(), ALPN).unwrap(),
            "kbs-1"
        )
        .await
        .is_err()
    );
    let (kbs_b, _) = node(&root, "kbs-1", "10.42.0.1/16", Role::Kbs, t - 60, t + 3600);
    let open = server(kbs_b, trust.clone(), false);
    let c = dial(
        &open,
        client_tls_anonymous(trust.clone(), ALPN).unwrap(),
        "kbs-1",
    )
    .await
    .unwrap();
    assert!(seen(&c).is_some(), "the client still verified the server");
}
