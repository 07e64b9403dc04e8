//! Attacks on a guest's disk, driven over the wire: the host lets the guest get its key from the
//! live broker, then hands it a disk it tampered with. The guest agent's own disk code must
//! refuse each before activating anything.

use crate::demo::LiveAttack;
use guest_agent::client::{Broker, fetch};
use guest_agent::header;
use guest_agent::luks::{self, DiskLabel, LuksError, VolumeKey};
use snp::device::GuestDevice;
use std::io::Write;
use std::path::Path;

/// An attack's name, the reason code it must be refused for, and the edit of the header's JSON.
type Try = (&'static str, &'static str, fn(&mut String));

/// The host's edits of a formatted disk `img` of `vm`, each tried after a genuine release; the
/// disk is put back after each.
pub async fn run(
    broker: &Broker,
    vm: &str,
    guest: &impl GuestDevice,
    img: &Path,
) -> Result<Vec<LiveAttack>, String> {
    let genuine = luks::read_metadata(img).map_err(|e| format!("{vm}: {e}"))?;
    let tries: [Try; 3] = [
        ("live-luks-header-cipher-null", "header_cipher", |t| {
            *t = t.replacen("\"aes-xts-plain64\"", "\"cipher_null-ecb\"", 2)
        }),
        (
            "live-luks-header-shifted-data-offset",
            "header_data_offset",
            |t| *t = t.replacen("\"offset\":\"16777216\"", "\"offset\":\"16781312\"", 1),
        ),
        (
            "live-luks-header-another-vms-token",
            "header_foreign_vm",
            |t| *t = t.replacen("\"vm_id\":\"", "\"vm_id\":\"x", 1),
        ),
    ];
    let mut out = Vec::new();
    for (name, expected, edit) in tries {
        let got = fetch(broker, vm, guest)
            .await
            .map_err(|e| format!("{name}: the genuine release failed: {e}"))?;
        let key = VolumeKey::from_bytes(&got.volume_key).map_err(|e| e.to_string())?;
        let label = DiskLabel {
            vm_id: vm.to_string(),
            generation: got.generation,
        };
        put(img, &header::forge_json_edit(&genuine, edit)?)?;
        let r = luks::unlock(img, "attesta-demo-attack", &key, &label);
        put(img, &genuine[..2 * header::HDR_SIZE])?;
        let (denied, reason) = match r {
            Err(LuksError::Header(h)) => (true, format!("{}: {h}", h.code())),
            Err(e) => (true, e.to_string()),
            Ok(()) => {
                let _ = std::process::Command::new("cryptsetup")
                    .args(["close", "attesta-demo-attack"])
                    .stdout(std::process::Stdio::null())
                    .status();
                (false, "activated".into())
            }
        };
        out.push(LiveAttack {
            name,
            denied,
            reason,
            expected,
        });
    }
    Ok(out)
}

fn put(img: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("{}: {e}", img.display()))
}
