//! The local control protocol between `attesta-host vm …` and the daemon: one JSON request
//! line, one JSON answer line, over a Unix socket only root (or `control_group`) can open.
//! Files are read by the client and sent as contents, so the daemon never opens a path a
//! caller names.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

/// Largest request line accepted (a spec and an order are a few KiB).
pub const MAX_REQUEST: usize = 1 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Admit (launch gate), register with the broker, define; then start if asked.
    Create {
        spec: String,
        /// The signed register order, base64.
        order: String,
        #[serde(default)]
        start: bool,
    },
    Start {
        vm_id: String,
    },
    Stop {
        vm_id: String,
    },
    Reboot {
        vm_id: String,
    },
    /// Relay the operator-signed terminate order to the broker, then destroy, undefine, wipe.
    Terminate {
        vm_id: String,
        order: String,
    },
    List,
    Platform,
    /// Back the VM's disk up to `[backup]` storage (the VM must not be running).
    Backup {
        vm_id: String,
    },
    /// The VM's backups in `[backup]` storage.
    Backups {
        vm_id: String,
    },
    /// Create a VM, as `Create`, on a disk restored from backup `backup` (default: the newest)
    /// of the spec's VM.
    Restore {
        spec: String,
        order: String,
        #[serde(default)]
        backup: Option<u64>,
        #[serde(default)]
        start: bool,
    },
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ControlResponse {
    pub fn ok(result: serde_json::Value) -> ControlResponse {
        ControlResponse {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> ControlResponse {
        ControlResponse {
            ok: false,
            result: None,
            error: Some(e.to_string()),
        }
    }
}

/// Sends one request to the daemon at `socket`; the result, or the daemon's error.
pub fn call(socket: &Path, req: &ControlRequest) -> Result<serde_json::Value, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the host agent at {}: {e} (is `attesta-host serve` running, and may this user open its socket?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(s.take_limited())
        .read_line(&mut answer)
        .map_err(|e| format!("reading the agent's answer: {e}"))?;
    let r: ControlResponse = serde_json::from_str(&answer)
        .map_err(|e| format!("the agent's answer is not understood: {e}"))?;
    match (r.ok, r.result, r.error) {
        (true, Some(v), _) => Ok(v),
        (true, None, _) => Ok(serde_json::Value::Null),
        (false, _, e) => Err(e.unwrap_or_else(|| "refused".into())),
    }
}

/// Bounds what the client reads back.
trait TakeLimited: std::io::Read + Sized {
    fn take_limited(self) -> std::io::Take<Self> {
        self.take(16 << 20)
    }
}
impl TakeLimited for std::os::unix::net::UnixStream {}

/// Parses one request line (as the daemon receives it); never panics.
pub fn parse_request(line: &[u8]) -> Result<ControlRequest, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}
