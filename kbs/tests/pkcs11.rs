//! The PKCS#11 KEK against a real SoftHSM2 token: wrap and unwrap through the token, bound to VM
//! and generation; the key is found again after reopening; wrong PINs and missing keys fail.

use kbs::keys::{Kek, KeyError, Pkcs11Kek, VolumeKey};
use std::path::Path;
use std::process::Command;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[test]
fn softhsm2_kek() {
    if !Path::new(MODULE).exists() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "SoftHSM2 is required when CI=true (apt-get install softhsm2)"
        );
        eprintln!("SKIP: {MODULE} missing (apt-get install softhsm2)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    // SAFETY: this test binary has a single test, and sets the variable before any thread reads it.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let st = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "attesta-kbs",
            "--so-pin",
            "12345678",
            "--pin",
            "87654321",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let module = Path::new(MODULE);
    assert!(matches!(
        Pkcs11Kek::open(module, "attesta-kbs", "87654321", "kek", false),
        Err(KeyError::KekFile { .. })
    ));
    let wrapped;
    let key = VolumeKey::generate().unwrap();
    {
        let kek = Pkcs11Kek::open(module, "attesta-kbs", "87654321", "kek", true).unwrap();
        wrapped = kek.wrap("vm-1", 1, &key).unwrap();
        assert_eq!(wrapped.len(), 12 + 64 + 16);
        assert_eq!(
            &kek.unwrap_key("vm-1", 1, &wrapped).unwrap().0[..],
            &key.0[..]
        );
        assert!(matches!(
            kek.unwrap_key("vm-2", 1, &wrapped),
            Err(KeyError::Unwrap)
        ));
        assert!(matches!(
            kek.unwrap_key("vm-1", 2, &wrapped),
            Err(KeyError::Unwrap)
        ));
        let mut t = wrapped.clone();
        t[30] ^= 1;
        assert!(matches!(
            kek.unwrap_key("vm-1", 1, &t),
            Err(KeyError::Unwrap)
        ));
    }
    // Reopened: the same key on the token unwraps what was wrapped before.
    let kek = Pkcs11Kek::open(module, "attesta-kbs", "87654321", "kek", false).unwrap();
    assert_eq!(
        &kek.unwrap_key("vm-1", 1, &wrapped).unwrap().0[..],
        &key.0[..]
    );
    drop(kek);
    assert!(
        Pkcs11Kek::open(module, "attesta-kbs", "00000000", "kek", false).is_err(),
        "wrong PIN"
    );
    assert!(Pkcs11Kek::open(module, "no-such-token", "87654321", "kek", false).is_err());
}
