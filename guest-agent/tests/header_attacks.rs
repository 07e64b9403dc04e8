//! The host's edits of the LUKS2 header, made as an attacker would: on a header the agent
//! really wrote, the JSON edited and both copies' checksums fixed, so that libcryptsetup (the
//! `cryptsetup` CLI here) still reads it as valid LUKS2. The agent must refuse every one before
//! activation, each for its reason, and refuse a disk blanked after the first boot.

use guest_agent::client::Released;
use guest_agent::config::GuestConfig;
use guest_agent::header::{self, HeaderError};
use guest_agent::luks::{self, DiskLabel, LuksError, VolumeKey};
use guest_agent::unlock::{UnlockError, open_disk};
use serde_json::{Value, json};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use zeroize::Zeroizing;

const VM: &str = "vm-1";

fn key() -> VolumeKey {
    VolumeKey::from_bytes(&[0x5a; 64]).unwrap()
}

fn label() -> DiskLabel {
    DiskLabel {
        vm_id: VM.into(),
        generation: 1,
    }
}

/// A disk the agent formatted for vm-1, generation 1.
fn formatted(dir: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    luks::format(&img, &key(), &label()).unwrap();
    img
}

/// A formatted disk in its own folder (removed when the guard drops).
fn fresh() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let img = formatted(t.path());
    (t, img)
}

/// Replaces both copies' JSON areas with `text` and fixes their checksums.
fn write_json_text(img: &Path, text: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut hdr = vec![0u8; 2 * header::HDR_SIZE];
    f.read_exact(&mut hdr).unwrap();
    for copy in hdr.chunks_mut(header::HDR_SIZE) {
        let area = &mut copy[4096..];
        area.fill(0);
        area[..text.len()].copy_from_slice(text);
    }
    fix_checksums(&mut hdr);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&hdr).unwrap();
}

/// Recomputes each header copy's checksum (unkeyed: anyone with the disk can).
fn fix_checksums(hdr: &mut [u8]) {
    for copy in hdr.chunks_mut(header::HDR_SIZE) {
        copy[448..512].fill(0);
        let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, copy);
        copy[448..480].copy_from_slice(sum.as_ref());
    }
}

/// Edits the JSON metadata as an attacker with the disk would.
fn tamper(img: &Path, edit: impl FnOnce(&mut Value)) {
    let meta = luks::read_metadata(img).unwrap();
    let mut j = header::json_of(&meta).unwrap();
    edit(&mut j);
    write_json_text(img, serde_json::to_string(&j).unwrap().as_bytes());
}

/// libcryptsetup itself takes the edited header as valid LUKS2 (so only the agent's own checks
/// stand between it and activation).
fn cryptsetup_reads(img: &Path) -> String {
    let out = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(img)
        .output()
        .expect("cryptsetup CLI (package cryptsetup-bin)");
    assert!(
        out.status.success(),
        "the crafted header must still be valid LUKS2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unlock(img: &Path) -> Result<(), LuksError> {
    luks::unlock(img, "attesta-header-test", &key(), &label())
}

fn refused(img: &Path) -> HeaderError {
    match unlock(img) {
        Err(LuksError::Header(h)) => h,
        other => panic!("expected a refused header, got {other:?}"),
    }
}

#[test]
fn the_agents_own_header_passes() {
    let dir = tempfile::tempdir().unwrap();
    let img = formatted(dir.path());
    cryptsetup_reads(&img);
    match unlock(&img) {
        Ok(()) => {
            let _ = Command::new("cryptsetup")
                .args(["close", "attesta-header-test"])
                .status();
        }
        Err(LuksError::DeviceMapperUnavailable) => {}
        Err(e) => panic!("{e}"),
    }
    // Rewritten with the same meaning (another key order, other whitespace): still passes, the
    // MAC covers the meaning.
    tamper(&img, |_| {});
    assert!(matches!(
        unlock(&img),
        Ok(()) | Err(LuksError::DeviceMapperUnavailable)
    ));
}

#[test]
fn cipher_null_and_other_ciphers_are_refused() {
    for (cipher, also_keyslot) in [
        ("cipher_null-ecb", false),
        ("cipher_null-ecb", true),
        ("serpent-xts-plain64", false),
        ("aes-cbc-essiv:sha256", false),
        ("aes-xts-plain", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = formatted(dir.path());
        tamper(&img, |j| {
            j["segments"]["0"]["encryption"] = json!(cipher);
            if also_keyslot {
                j["keyslots"]["0"]["area"]["encryption"] = json!(cipher);
            }
        });
        assert!(cryptsetup_reads(&img).contains(cipher), "{cipher}");
        assert_eq!(
            refused(&img),
            HeaderError::Cipher(cipher.into()),
            "{cipher}"
        );
    }
}

#[test]
fn a_shifted_data_offset_or_sector_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = formatted(dir.path());
    tamper(&img, |j| j["segments"]["0"]["offset"] = json!("16781312"));
    cryptsetup_reads(&img);
    assert_eq!(refused(&img), HeaderError::DataOffset("16781312".into()));

    let (_t, img) = fresh();
    tamper(&img, |j| j["segments"]["0"]["sector_size"] = json!(512));
    cryptsetup_reads(&img);
    assert_eq!(refused(&img), HeaderError::SectorSize("512".into()));
}

#[test]
fn a_second_segment_or_keyslot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = formatted(dir.path());
    tamper(&img, |j| {
        let mut s = j["segments"]["0"].clone();
        j["segments"]["0"]["size"] = json!("4194304");
        s["offset"] = json!("20971520");
        s["encryption"] = json!("cipher_null-ecb");
        j["segments"]["1"] = s;
        j["digests"]["0"]["segments"] = json!(["0", "1"]);
    });
    cryptsetup_reads(&img);
    assert!(matches!(
        refused(&img),
        HeaderError::Count {
            what: "segments",
            ..
        }
    ));

    let (_t, img) = fresh();
    tamper(&img, |j| {
        let mut k = j["keyslots"]["0"].clone();
        k["area"]["offset"] = json!("290816");
        j["keyslots"]["1"] = k;
        j["digests"]["0"]["keyslots"] = json!(["0", "1"]);
    });
    cryptsetup_reads(&img);
    assert!(matches!(
        refused(&img),
        HeaderError::Count {
            what: "keyslots",
            ..
        }
    ));
}

#[test]
fn requirements_and_flags_are_refused() {
    let (_t, img) = fresh();
    tamper(&img, |j| {
        j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]})
    });
    assert!(matches!(refused(&img), HeaderError::Requirements(_)));
    let (_t, img) = fresh();
    tamper(&img, |j| j["config"]["flags"] = json!(["allow-discards"]));
    cryptsetup_reads(&img);
    assert!(matches!(refused(&img), HeaderError::Requirements(_)));
}

#[test]
fn a_token_for_another_vm_or_generation_is_refused() {
    let (_t, img) = fresh();
    tamper(&img, |j| j["tokens"]["0"]["vm_id"] = json!("vm-2"));
    cryptsetup_reads(&img);
    assert_eq!(
        refused(&img),
        HeaderError::ForeignVm {
            found: "vm-2".into(),
            expected: VM.into()
        }
    );
    let (_t, img) = fresh();
    tamper(&img, |j| j["tokens"]["0"]["generation"] = json!(2));
    assert_eq!(
        refused(&img),
        HeaderError::Generation {
            found: 2,
            expected: 1
        }
    );
    let (_t, img) = fresh();
    tamper(&img, |j| j["tokens"] = json!({}));
    assert_eq!(refused(&img), HeaderError::NoToken);
}

#[test]
fn an_edit_the_layout_checks_allow_fails_the_mac() {
    // Nothing the structural checks or the key's digest look at: only the key-bound MAC
    // catches these. (An edit of the digest itself shows as a wrong key.)
    for edit in [
        (|j: &mut Value| j["keyslots"]["0"]["kdf"]["iterations"] = json!(2000)) as fn(&mut Value),
        |j| {
            j["keyslots"]["0"]["kdf"]["salt"] =
                json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        },
        |j| j["keyslots"]["0"]["af"]["stripes"] = json!(2),
        |j| j["tokens"]["0"]["mac"] = json!("00".repeat(32)),
    ] {
        let (_t, img) = fresh();
        tamper(&img, edit);
        cryptsetup_reads(&img);
        assert_eq!(refused(&img), HeaderError::Mac);
    }
    // The same header with another UUID in the binary header (copied from another disk).
    let (_t, img) = fresh();
    let meta = luks::read_metadata(&img).unwrap();
    let mut hdr = meta[..2 * header::HDR_SIZE].to_vec();
    for copy in hdr.chunks_mut(header::HDR_SIZE) {
        copy[168] ^= 1;
    }
    fix_checksums(&mut hdr);
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all(&hdr).unwrap();
    drop(f);
    assert_eq!(refused(&img), HeaderError::Mac);
}

#[test]
fn binary_header_edits_are_refused() {
    // Checksum not fixed.
    let (_t, img) = fresh();
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(4096 + 10)).unwrap();
    f.write_all(b"X").unwrap();
    drop(f);
    assert_eq!(refused(&img), HeaderError::Checksum(header::Copy::Primary));

    // Only one copy edited (libcryptsetup would pick the copy with the higher sequence id).
    let (_t, img) = fresh();
    let meta = luks::read_metadata(&img).unwrap();
    let mut second = meta[header::HDR_SIZE..2 * header::HDR_SIZE].to_vec();
    second[16..24].copy_from_slice(&99u64.to_be_bytes()); // seqid
    fix_checksums(&mut second);
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.seek(SeekFrom::Start(header::HDR_SIZE as u64)).unwrap();
    f.write_all(&second).unwrap();
    drop(f);
    assert_eq!(refused(&img), HeaderError::CopiesDiffer);

    // The digest's cost raised (checked before the MAC, so pinned): refused, not computed.
    let (_t, img) = fresh();
    tamper(&img, |j| {
        j["digests"]["0"]["iterations"] = json!(4_000_000_000u64)
    });
    cryptsetup_reads(&img);
    assert!(matches!(refused(&img), HeaderError::Unexpected(m) if m.contains("iterations")));

    // A label (both copies, checksums fixed): the agent writes none.
    let (_t, img) = fresh();
    let meta = luks::read_metadata(&img).unwrap();
    let mut hdr = meta[..2 * header::HDR_SIZE].to_vec();
    for copy in hdr.chunks_mut(header::HDR_SIZE) {
        copy[24..29].copy_from_slice(b"owned");
    }
    fix_checksums(&mut hdr);
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all(&hdr).unwrap();
    drop(f);
    assert!(cryptsetup_reads(&img).contains("owned"));
    assert!(matches!(refused(&img), HeaderError::Binary { .. }));

    // The primary copy wiped, the secondary left: not blank, refused.
    let (_t, img) = fresh();
    let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all(&[0u8; 4096]).unwrap();
    drop(f);
    assert_eq!(refused(&img), HeaderError::Missing(header::Copy::Primary));
    assert!(!header::is_blank(&luks::read_metadata(&img).unwrap()));
}

#[test]
fn duplicate_keys_cannot_show_the_agent_one_cipher_and_libcryptsetup_another() {
    let (_t, img) = fresh();
    let meta = luks::read_metadata(&img).unwrap();
    let text = serde_json::to_string(&header::json_of(&meta).unwrap()).unwrap();
    let dup = text.replacen(
        "\"encryption\":\"aes-xts-plain64\",\"iv_tweak\"",
        "\"encryption\":\"cipher_null-ecb\",\"encryption\":\"aes-xts-plain64\",\"iv_tweak\"",
        1,
    );
    assert_ne!(dup, text, "the edit applies");
    write_json_text(&img, dup.as_bytes());
    assert!(matches!(refused(&img), HeaderError::Json(m) if m.contains("duplicate key")));
}

fn config(dir: &Path) -> GuestConfig {
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, "not used").unwrap();
    let p = dir.join("guest.toml");
    std::fs::write(
        &p,
        format!(
            "vm_id = \"{VM}\"\nrequire_mlock = false\n\
             [broker]\naddress = \"127.0.0.1:9\"\nserver_name = \"kbs.attesta.local\"\nca = \"ca.crt\"\n\
             response_key = \"{}\"\n\
             [disk]\npath = \"disk.img\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    GuestConfig::load(&p).unwrap()
}

fn released(boot_counter: u64) -> Released {
    Released {
        volume_key: Zeroizing::new(key().as_bytes().to_vec()),
        boot_config: vec![],
        generation: 1,
        boot_counter,
        evidence_rtt: std::time::Duration::ZERO,
        mesh_cert: vec![],
        mesh_chain: vec![],
    }
}

#[test]
fn a_disk_blanked_after_the_first_boot_is_never_formatted_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::File::create(&cfg.disk.path)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    // First release: formats.
    match open_disk(&cfg, &released(1)) {
        Ok(u) => assert!(u.formatted),
        Err(UnlockError::NoDeviceMapper(u)) => assert!(u.formatted),
        Err(e) => panic!("{e}"),
    }
    // Second boot: the host wipes the header.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.disk.path)
        .unwrap();
    f.write_all(&vec![0u8; header::DATA_OFFSET]).unwrap();
    drop(f);
    let e = open_disk(&cfg, &released(2)).unwrap_err();
    assert!(matches!(e, UnlockError::BlankAfterFirstBoot(2)), "{e}");
    assert!(e.to_string().contains("wiped"), "{e}");
    assert!(header::is_blank(
        &luks::read_metadata(&cfg.disk.path).unwrap()
    ));
    // A host-planted header on a first boot (the agent did not write it, so it is not bound to
    // the key) is refused too, never formatted over nor opened.
    let other = VolumeKey::from_bytes(&[0x11; 64]).unwrap();
    luks::format(&cfg.disk.path, &other, &label()).unwrap();
    let e = open_disk(&cfg, &released(1)).unwrap_err();
    assert!(matches!(e, UnlockError::Disk(LuksError::WrongKey)), "{e}");
}
