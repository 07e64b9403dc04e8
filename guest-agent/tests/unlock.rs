//! `attesta-guest unlock` fails closed: a configuration it cannot trust, a boot-configuration
//! path that is not tmpfs, an unreachable broker, a blank disk it may not format and a disk of
//! another VM each stop the boot with a reason, and nothing is written.

use guest_agent::client::Released;
use guest_agent::config::GuestConfig;
use guest_agent::luks::{self, DiskLabel, VolumeKey};
use guest_agent::unlock::{UnlockError, check_tmpfs, open_disk, run_with};
use std::path::Path;
use std::process::Command;
use zeroize::Zeroizing;

fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, kbs_free_ca()).unwrap();
    let p = dir.join("guest.toml");
    std::fs::write(
        &p,
        format!(
            "vm_id = \"vm-1\"\nrequire_mlock = false\n\
             [broker]\naddress = \"127.0.0.1:9\"\nserver_name = \"kbs.attesta.local\"\nca = \"ca.crt\"\n\
             response_key = \"{}\"\ntimeout_secs = 1\n\
             [disk]\npath = \"disk.img\"\n{extra}",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    p
}

/// A throwaway self-signed CA in PEM (its key is discarded: nothing will verify against it).
fn kbs_free_ca() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

fn disk(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    img
}

fn released(key: &[u8]) -> Released {
    Released {
        volume_key: Zeroizing::new(key.to_vec()),
        boot_config: b"ssh-ed25519 AAAA".to_vec(),
        generation: 1,
        boot_counter: 1,
        evidence_rtt: std::time::Duration::ZERO,
        mesh_cert: vec![],
        mesh_chain: vec![],
    }
}

#[test]
fn configuration_errors_are_reported_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = config(dir.path(), "");
    let c = GuestConfig::load(&p).unwrap();
    assert_eq!(
        c.disk.path,
        dir.path().join("disk.img"),
        "relative to the file"
    );
    std::fs::write(
        &p,
        std::fs::read_to_string(&p).unwrap().replace("abab", "zz"),
    )
    .unwrap();
    assert!(
        GuestConfig::load(&p)
            .unwrap_err()
            .to_string()
            .contains("response_key")
    );
    std::fs::write(dir.path().join("typo.toml"), "vm_id = \"x\"\nbrokr = 1\n").unwrap();
    assert!(GuestConfig::load(&dir.path().join("typo.toml")).is_err());
    let out = Command::new(env!("CARGO_BIN_EXE_attesta-guest"))
        .args(["unlock", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn the_boot_configuration_goes_to_tmpfs_only() {
    assert!(check_tmpfs(Path::new("/dev/shm/attesta/boot-config")).is_ok());
    let on_disk = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-config");
    assert!(matches!(
        check_tmpfs(&on_disk),
        Err(UnlockError::NotTmpfs(_))
    ));
}

#[test]
fn an_unreachable_broker_fails_closed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    disk(dir.path());
    let bc = Path::new("/dev/shm").join(format!("attesta-unlock-test-{}", std::process::id()));
    let p = config(
        dir.path(),
        &format!(
            "[boot_config]\npath = {:?}\n",
            bc.join("boot-config").display().to_string()
        ),
    );
    let cfg = GuestConfig::load(&p).unwrap();
    let pki = std::sync::Arc::new(
        simulator::Pki::from_seed(snp::Product::Milan, simulator::Seed::from_text("unlock"))
            .unwrap(),
    );
    let chip = simulator::Chip::new(pki.clone(), simulator::ChipConfig::typical(&pki, 0)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(run_with(&cfg, &chip.launch(Default::default())));
    assert!(matches!(r, Err(UnlockError::Timeout(1))), "{r:?}");
    assert!(!bc.exists(), "nothing written");
    assert_eq!(luks::probe(&cfg.disk.path).unwrap(), luks::DiskState::Blank);
}

#[test]
fn a_blank_disk_it_may_not_format_and_a_foreign_disk_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let key = [7u8; 64];
    let cfg = GuestConfig::load(&config(dir.path(), "format_if_blank = false\n")).unwrap();
    assert!(matches!(
        open_disk(&cfg, &released(&key)),
        Err(UnlockError::BlankRefused)
    ));
    luks::format(
        &img,
        &VolumeKey::from_bytes(&key).unwrap(),
        &DiskLabel {
            vm_id: "vm-other".into(),
            generation: 1,
        },
    )
    .unwrap();
    match open_disk(&cfg, &released(&key)) {
        Err(UnlockError::ForeignDisk { found, expected }) => {
            assert_eq!((found.as_str(), expected.as_str()), ("vm-other", "vm-1"));
        }
        other => panic!("expected a foreign-disk refusal, got {other:?}"),
    }
    // This VM's disk with the wrong key: refused, whether or not device-mapper exists.
    let img2 = dir.path().join("disk.img");
    std::fs::remove_file(&img2).unwrap();
    disk(dir.path());
    luks::format(
        &img2,
        &VolumeKey::from_bytes(&key).unwrap(),
        &DiskLabel {
            vm_id: "vm-1".into(),
            generation: 1,
        },
    )
    .unwrap();
    assert!(matches!(
        open_disk(&cfg, &released(&[8u8; 64])),
        Err(UnlockError::Disk(luks::LuksError::WrongKey))
    ));
}

/// A production build (default features) cannot be pointed at a simulated chip: the simulator's
/// device is a feature that only the tests and `attesta-sim` turn on.
#[test]
fn the_simulated_device_is_not_in_the_default_build() {
    let manifest: toml::Value = toml::from_str(include_str!("../Cargo.toml")).unwrap();
    let default = manifest["features"]["default"].as_array().unwrap();
    assert!(
        !default.iter().any(|f| f.as_str() == Some("simulator")),
        "default features: {default:?}"
    );
    #[cfg(not(feature = "simulator"))]
    {
        let dir = tempfile::tempdir().unwrap();
        let p = config(
            dir.path(),
            "[device]\nkind = \"simulator\"\nseed = \"s\"\nproduct = \"milan\"\nchip = 0\nmeasurement = \"00\"\n",
        );
        let c = GuestConfig::load(&p).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let e = rt.block_on(guest_agent::unlock::run(&c)).unwrap_err();
        assert!(e.to_string().contains("no simulator"), "{e}");
    }
}

/// The largest split a configuration may ask for (2-of-8: 28 wraps) fits the LUKS2 header the
/// agent writes, and the header judge accepts it only with the key the wraps hold; 3-of-8 is
/// refused before any broker is asked.
#[test]
fn the_largest_split_fits_the_header() {
    use guest_agent::split;
    let dir = tempfile::tempdir().unwrap();
    let img = disk(dir.path());
    let shares: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 64]).collect();
    let refs: Vec<&[u8]> = shares.iter().map(Vec::as_slice).collect();
    let (key, wraps) = split::deal(2, &refs, "vm-1", 1).unwrap();
    assert_eq!(wraps["wraps"].as_array().map(Vec::len), Some(28));
    let label = DiskLabel {
        vm_id: "vm-1".into(),
        generation: 1,
    };
    let vk = VolumeKey::from_bytes(&key).unwrap();
    luks::format_with(&img, &vk, &label, Some(&wraps)).unwrap();
    let on_disk = luks::split_wraps(&img).unwrap().unwrap();
    let opened = split::open(&on_disk, 2, 8, &[(3, refs[3]), (6, refs[6])], "vm-1", 1).unwrap();
    assert_eq!(opened, key);
    match luks::unlock(&img, "attesta-split-fit", &vk, &label) {
        Ok(()) | Err(luks::LuksError::DeviceMapperUnavailable) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(!split::fits(3, 8) && split::fits(2, 8) && split::fits(6, 8));
}
