//! A simulated PSP for real VMs: the host side of a byte channel (a virtio-serial port in the
//! guest, a Unix socket on the host) over which a guest asks for what `/dev/sev-guest` would
//! give it. The host measured what it launched; the guest cannot choose its measurement, only
//! the report data, as on hardware. For testing without SNP hardware only: never part of a
//! production build (the guest agent's client is behind its `simulator` feature).
//!
//! Frames, both ways: a 4-byte big-endian length, then the body (at most [`MAX_FRAME`]).
//! Request body: `APSP`, version 1, an op (1 report, 2 extended report), the VMPL (u32 LE), the
//! 64 bytes of report data. Answer body: status 0, then the report and the certificate table,
//! each with a u32 LE length; or status 1 and a UTF-8 reason. Decoding never panics.

use snp::device::{DeviceError, GuestDevice};
use std::io::{Read, Write};

/// The virtio-serial port name guests look for (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "org.attesta.psp.0";
/// Largest frame either way (a report, a certificate table, a little more).
pub const MAX_FRAME: usize = 64 * 1024;
const MAGIC: &[u8; 4] = b"APSP";
const VERSION: u8 = 1;

/// What a guest asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub extended: bool,
    pub vmpl: u32,
    pub report_data: [u8; 64],
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("the PSP refused: {0}")]
    Refused(String),
    #[error("channel: {0}")]
    Io(String),
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(74);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.push(if self.extended { 2 } else { 1 });
        b.extend_from_slice(&self.vmpl.to_le_bytes());
        b.extend_from_slice(&self.report_data);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Request, WireError> {
        if b.len() != 74 {
            return Err(WireError::Malformed("a request is 74 bytes"));
        }
        if &b[..4] != MAGIC || b[4] != VERSION {
            return Err(WireError::Malformed("not an APSP version 1 request"));
        }
        let extended = match b[5] {
            1 => false,
            2 => true,
            _ => return Err(WireError::Malformed("unknown op")),
        };
        let mut vmpl = [0u8; 4];
        vmpl.copy_from_slice(&b[6..10]);
        let mut report_data = [0u8; 64];
        report_data.copy_from_slice(&b[10..74]);
        Ok(Request {
            extended,
            vmpl: u32::from_le_bytes(vmpl),
            report_data,
        })
    }
}

/// An answer: the report and the certificate table, or why not.
pub fn encode_answer(r: &Result<(Vec<u8>, Vec<u8>), String>) -> Vec<u8> {
    let mut b = Vec::new();
    match r {
        Ok((report, table)) => {
            b.push(0);
            for part in [report, table] {
                b.extend_from_slice(&(part.len() as u32).to_le_bytes());
                b.extend_from_slice(part);
            }
        }
        Err(why) => {
            b.push(1);
            b.extend_from_slice(why.as_bytes());
        }
    }
    b
}

pub fn decode_answer(b: &[u8]) -> Result<(Vec<u8>, Vec<u8>), WireError> {
    let (&status, rest) = b
        .split_first()
        .ok_or(WireError::Malformed("empty answer"))?;
    if status == 1 {
        return Err(WireError::Refused(
            String::from_utf8_lossy(rest).into_owned(),
        ));
    }
    if status != 0 {
        return Err(WireError::Malformed("unknown status"));
    }
    let mut rest = rest;
    let mut part = || -> Result<Vec<u8>, WireError> {
        let len = rest
            .get(..4)
            .and_then(|l| <[u8; 4]>::try_from(l).ok())
            .map(u32::from_le_bytes)
            .ok_or(WireError::Malformed("truncated length"))? as usize;
        let body = rest
            .get(4..4usize.saturating_add(len))
            .ok_or(WireError::Malformed("truncated part"))?;
        let out = body.to_vec();
        rest = &rest[4 + len..];
        Ok(out)
    };
    let report = part()?;
    let table = part()?;
    if !rest.is_empty() {
        return Err(WireError::Malformed("bytes after the answer"));
    }
    Ok((report, table))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> Result<(), WireError> {
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    let io = |e: std::io::Error| WireError::Io(e.to_string());
    w.write_all(&(body.len() as u32).to_be_bytes())
        .map_err(io)?;
    w.write_all(body).map_err(io)?;
    w.flush().map_err(io)
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, WireError> {
    let io = |e: std::io::Error| WireError::Io(e.to_string());
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Malformed("the stream ended inside a length")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(io)?;
    Ok(Some(body))
}

/// The answer `device` (the launched guest's simulated firmware) gives to `request`.
pub fn answer(device: &impl GuestDevice, request: &[u8]) -> Vec<u8> {
    let r = Request::decode(request)
        .map_err(|e| e.to_string())
        .and_then(|req| {
            if req.extended {
                device.get_ext_report(&req.report_data, req.vmpl)
            } else {
                device
                    .get_report(&req.report_data, req.vmpl)
                    .map(|r| (r, Vec::new()))
            }
            .map_err(|e: DeviceError| e.to_string())
        });
    encode_answer(&r)
}

/// Serves one channel until it ends: each request frame gets its answer frame.
pub fn serve(
    device: &impl GuestDevice,
    channel: &mut (impl Read + Write),
) -> Result<u64, WireError> {
    let mut served = 0;
    while let Some(req) = read_frame(channel)? {
        write_frame(channel, &answer(device, &req))?;
        served += 1;
    }
    Ok(served)
}

/// One launched guest's simulated PSP, listening on a Unix socket until QEMU's chardev
/// connects. It serves exactly that one connection (the launch's QEMU process, across guest
/// reboots inside it) and unlinks the socket once it is taken, so no later client reaches this
/// launch's PSP; a VM stopped and started again gets a new launch and a new server. Dropping
/// the server ends it, the connection included.
pub struct Server {
    socket: std::path::PathBuf,
    /// The bound socket's inode: only that file is ever unlinked (a later server's socket at the
    /// same path is not this one's to remove).
    ino: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conn: std::sync::Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>,
}

/// Unlinks `path` if it is still the socket with inode `ino`.
fn unlink_if_ours(path: &std::path::Path, ino: u64) {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
        let _ = std::fs::remove_file(path);
    }
}

impl Server {
    /// Binds `socket` and serves `launch` on `chip` from a thread. A socket already there is
    /// replaced only if nothing listens on it (a stale one); anything else is refused.
    pub fn start(
        chip: crate::Chip,
        launch: crate::GuestLaunch,
        socket: &std::path::Path,
    ) -> Result<Server, String> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        use std::sync::atomic::Ordering::SeqCst;
        match std::fs::symlink_metadata(socket) {
            Ok(m) if m.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(socket) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(socket)
                            .map_err(|e| format!("stale PSP socket {}: {e}", socket.display()))?
                    }
                    _ => {
                        return Err(format!(
                            "{}: something is listening there already: not replaced",
                            socket.display()
                        ));
                    }
                }
            }
            Ok(_) => {
                return Err(format!(
                    "{} exists and is not a socket: not replaced",
                    socket.display()
                ));
            }
            Err(_) => {}
        }
        let listener = std::os::unix::net::UnixListener::bind(socket)
            .map_err(|e| format!("simulated PSP socket {}: {e}", socket.display()))?;
        let ino = std::fs::symlink_metadata(socket)
            .map_err(|e| format!("simulated PSP socket {}: {e}", socket.display()))?
            .ino();
        // Polled, so that a drop ends the wait even if the socket was removed meanwhile.
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("simulated PSP socket {}: {e}", socket.display()))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conn = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (stopped, held, path) = (stop.clone(), conn.clone(), socket.to_path_buf());
        std::thread::spawn(move || {
            let guest = chip.launch(launch);
            let mut c = loop {
                if stopped.load(SeqCst) {
                    return;
                }
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(_) => return,
                }
            };
            drop(listener);
            unlink_if_ours(&path, ino);
            // The drop must be able to end the session: no handle for it, no session.
            let (Ok(()), Ok(clone)) = (c.set_nonblocking(false), c.try_clone()) else {
                return;
            };
            *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
            // Stopped between the check and the hand-over: the drop may have missed it.
            if stopped.load(SeqCst) {
                return;
            }
            // A channel that breaks mid-frame ends the launch's PSP.
            let _ = serve(&guest, &mut c);
        });
        Ok(Server {
            socket: socket.to_path_buf(),
            ino,
            stop,
            conn,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Serving: end the connection, which ends the thread.
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        unlink_if_ours(&self.socket, self.ino);
    }
}

/// Asks over `channel` (the guest's side).
pub fn ask(
    channel: &mut (impl Read + Write),
    req: &Request,
) -> Result<(Vec<u8>, Vec<u8>), WireError> {
    write_frame(channel, &req.encode())?;
    let body = read_frame(channel)?.ok_or(WireError::Io("the PSP closed the channel".into()))?;
    decode_answer(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_malformed_ones_are_errors() {
        let req = Request {
            extended: true,
            vmpl: 0,
            report_data: [7; 64],
        };
        assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        let mut bad = req.encode();
        bad[5] = 9;
        assert!(Request::decode(&bad).is_err());
        assert!(Request::decode(&bad[..10]).is_err());
        let ok = encode_answer(&Ok((vec![1; 1184], vec![2; 10])));
        assert_eq!(decode_answer(&ok).unwrap(), (vec![1; 1184], vec![2; 10]));
        assert!(matches!(
            decode_answer(&encode_answer(&Err("no".into()))),
            Err(WireError::Refused(w)) if w == "no"
        ));
        for cut in 0..ok.len() {
            assert!(decode_answer(&ok[..cut]).is_err(), "{cut}");
        }
        let mut long = std::io::Cursor::new((MAX_FRAME as u32 + 1).to_be_bytes().to_vec());
        assert!(matches!(read_frame(&mut long), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn a_server_serves_its_first_client_only_and_ends_when_dropped() {
        let pki = std::sync::Arc::new(crate::Pki::generate(snp::Product::Milan).unwrap());
        let chip = || crate::Chip::new(pki.clone(), crate::ChipConfig::typical(&pki, 0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.psp");
        // A path that is not a socket is not replaced.
        std::fs::write(&sock, b"keep").unwrap();
        let launch = crate::GuestLaunch {
            measurement: [3; 48],
            ..Default::default()
        };
        assert!(Server::start(chip(), launch.clone(), &sock).is_err());
        assert_eq!(std::fs::read(&sock).unwrap(), b"keep");
        std::fs::remove_file(&sock).unwrap();
        let server = Server::start(chip(), launch.clone(), &sock).unwrap();
        let mut qemu = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let req = Request {
            extended: false,
            vmpl: 0,
            report_data: [9; 64],
        };
        let (report, _) = ask(&mut qemu, &req).unwrap();
        let r = snp::report::AttestationReport::from_bytes(&report).unwrap();
        assert_eq!(
            (r.body().measurement, r.body().report_data),
            ([3; 48], [9; 64])
        );
        // Taken: the socket is gone, a second client cannot reach this launch's PSP.
        assert!(!sock.exists());
        assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
        drop(server);
        assert!(
            ask(&mut qemu, &req).is_err(),
            "the connection ends with the server"
        );
        // A live socket is not replaced; a stale one (nothing listening) is. Dropped
        // unconnected, the server removes its socket.
        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(Server::start(chip(), launch.clone(), &sock).is_err());
        drop(live);
        assert!(sock.exists(), "a listener's socket file outlives it: stale");
        let second = Server::start(chip(), launch.clone(), &sock).unwrap();
        drop(second);
        assert!(!sock.exists());
        // A server never unlinks a later server's socket at the same path.
        let third = Server::start(chip(), launch.clone(), &sock).unwrap();
        std::fs::remove_file(&sock).unwrap();
        let fourth = Server::start(chip(), launch, &sock).unwrap();
        drop(third);
        assert!(sock.exists(), "the fourth server's socket stays");
        drop(fourth);
        assert!(!sock.exists());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Request::decode(&b);
            let _ = decode_answer(&b);
            let _ = read_frame(&mut std::io::Cursor::new(b));
        }
    }
}
