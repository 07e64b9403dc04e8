//! A TCP relay on loopback that can cut a client off mid-transfer: after a set number of
//! bytes from client to server it drops every connection and refuses new ones until healed.
//! What a network failure in the middle of an upload looks like, at a byte the test chooses.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The relay; it runs until the process ends.
pub struct Cut {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    sent: AtomicU64,
    limit: AtomicU64,
    down: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

impl State {
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        if let Ok(mut open) = self.open.lock() {
            for s in open.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Cut {
    /// Relays a new loopback port to `upstream`; nothing is cut until [`Cut::after`].
    pub fn start(upstream: SocketAddr) -> std::io::Result<Cut> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = l.local_addr()?;
        let state = Arc::new(State {
            sent: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            down: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                if st.down.load(Ordering::SeqCst) {
                    let _ = c.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(u) = TcpStream::connect(upstream) else {
                    continue;
                };
                if let (Ok(a), Ok(b), Ok(mut open)) = (c.try_clone(), u.try_clone(), st.open.lock())
                {
                    open.push(a);
                    open.push(b);
                }
                pump(c.try_clone(), u.try_clone(), st.clone(), true);
                pump(u.try_clone(), c.try_clone(), st.clone(), false);
            }
        });
        Ok(Cut { addr, state })
    }

    /// Cuts everything once `n` more bytes have gone from clients to the server.
    pub fn after(&self, n: u64) {
        let now = self.state.sent.load(Ordering::SeqCst);
        self.state
            .limit
            .store(now.saturating_add(n), Ordering::SeqCst);
    }

    /// Whether the cut has happened.
    pub fn is_down(&self) -> bool {
        self.state.down.load(Ordering::SeqCst)
    }

    /// Lets connections through again, with no limit.
    pub fn heal(&self) {
        self.state.limit.store(u64::MAX, Ordering::SeqCst);
        self.state.down.store(false, Ordering::SeqCst);
    }
}

fn pump(
    from: std::io::Result<TcpStream>,
    to: std::io::Result<TcpStream>,
    st: Arc<State>,
    counted: bool,
) {
    let (Ok(mut from), Ok(mut to)) = (from, to) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if counted {
                let sent = st.sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if sent >= st.limit.load(Ordering::SeqCst) {
                    st.cut();
                    break;
                }
            }
            if st.down.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
