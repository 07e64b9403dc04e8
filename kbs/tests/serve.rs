//! The real binaries end to end: `attesta-kbs init` writes a deployment, the operator tools sign
//! an allowlist and orders and issue a host certificate, `serve` runs, the host registers the VM
//! over QUIC with mTLS, the real `attesta-guest unlock` (simulator device) formats a real LUKS2
//! image on the first boot and unlocks it on the second, `/metrics` and `/readyz` answer, a
//! terminate order crypto-shreds the key and the next boot fails closed, the audit log exported
//! after a clean stop verifies — and no file or log line carries the volume key.

mod common;

use common::{
    KillOnDrop, free_port, free_tcp_port, guest, http_get, kbs, ok, sibling, sign_allowlist, start,
};
use guest_agent::client::fetch;
use serde_json::json;
use simulator::{Chip, ChipConfig, GuestLaunch, Pki, Seed};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};

#[test]
fn deployment_from_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let state = dir.path().join("sim-state");
    let pki = Arc::new(
        Pki::cached(
            snp::Product::Genoa,
            &Seed::from_text("serve-test"),
            &state,
            |_| {},
        )
        .unwrap(),
    );
    let chip = Chip::new(pki.clone(), ChipConfig::typical(&pki, 0)).unwrap();
    let ark = dir.path().join("sim-ark.der");
    std::fs::write(&ark, &pki.ark.cert).unwrap();
    let (port, metrics) = (free_port(), free_tcp_port());
    let listen = format!("127.0.0.1:{port}");
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &listen])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .arg("--trust-root")
            .arg(&ark)
            .output()
            .unwrap(),
        "init",
    );
    assert_eq!(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .status()
            .unwrap()
            .code(),
        Some(2),
        "never overwrites keys"
    );
    for secret in [
        "tls.key",
        "tls-ca.key",
        "response.key",
        "audit.key",
        "kek",
        "operator.key",
        "allowlist.key",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }

    // The operator's tools: an allowlist, an order, a host certificate.
    let image = hex::encode([0x4d; 48]);
    let chip_id = hex::encode(chip.config.chip_id);
    let p = |n: &str| dir.path().join(n);
    sign_allowlist(&d, &image);
    let mut toml = std::fs::read_to_string(d.join("kbs.toml")).unwrap();
    toml.push_str("allowlist = \"allowlist.signed\"\n");
    toml = toml.replace("log_format = \"text\"", "log_format = \"json\"");
    std::fs::write(d.join("kbs.toml"), toml).unwrap();
    std::fs::write(p("ssh.pub"), "ssh-ed25519 AAAA tenant-a").unwrap();
    ok(
        kbs()
            .args(["order", "register", "--key"])
            .arg(d.join("operator.key"))
            .args(["--vm-id", "vm-7", "--tenant", "tenant-a"])
            .args(["--measurement", &image, "--chip-id", &chip_id])
            .arg("--boot-config")
            .arg(p("ssh.pub"))
            .arg("--out")
            .arg(p("order.signed"))
            .output()
            .unwrap(),
        "order register",
    );
    ok(
        kbs()
            .args(["order", "terminate", "--key"])
            .arg(d.join("operator.key"))
            .args(["--vm-id", "vm-7", "--tenant", "tenant-a", "--out"])
            .arg(p("terminate.signed"))
            .output()
            .unwrap(),
        "order terminate",
    );
    let bad = kbs()
        .args(["order", "register", "--key"])
        .arg(d.join("operator.key"))
        .args(["--vm-id", "vm-8", "--tenant", "t", "--measurement", "abcd"])
        .args(["--chip-id", &chip_id, "--out"])
        .arg(p("bad.signed"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a short measurement is refused");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("96 hex digits"));
    ok(
        kbs()
            .args(["cert", "issue", "--ca-key"])
            .arg(d.join("tls-ca.key"))
            .args(["--name", "miner-1", "--role", "host", "--out-dir"])
            .arg(p("certs"))
            .output()
            .unwrap(),
        "cert issue",
    );

    let cfg = d.join("kbs.toml");
    let log = Arc::new(Mutex::new(String::new()));
    // Stopped even when an assertion fails (an orphan would hold the test's output open).
    let mut server = KillOnDrop(start(&cfg, log.clone()));
    let remote = |cmd: &str, order: &str| {
        kbs()
            .args(["vm", cmd])
            .arg(p(order))
            .args(["--kbs", &listen, "--ca"])
            .arg(d.join("tls-ca.crt"))
            .arg("--cert")
            .arg(p("certs/miner-1.crt"))
            .arg("--key")
            .arg(p("certs/miner-1.key"))
            .output()
            .unwrap()
    };
    // The host relays the operator's order over QUIC with its client certificate; once only.
    assert!(ok(remote("register", "order.signed"), "vm register").contains("vm-7"));
    let again = remote("register", "order.signed");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("vm_exists"));

    // The real guest agent, with the simulator's device: first boot formats, second unlocks.
    let disk = p("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    // On tmpfs (secrets never on disk), removed even when an assertion fails.
    let shm_dir = tempfile::Builder::new()
        .prefix("attesta-serve-test-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let shm = shm_dir.path().to_path_buf();
    let boot_config = shm.join("boot-config");
    let response_pub = std::fs::read_to_string(d.join("response.pub")).unwrap();
    std::fs::write(
        p("guest.toml"),
        format!(
            "vm_id = \"vm-7\"\n\
             [broker]\naddress = \"{listen}\"\nserver_name = \"kbs.attesta.local\"\nca = {ca:?}\n\
             response_key = \"{rk}\"\ntimeout_secs = 20\n\
             [disk]\npath = \"disk.img\"\nname = \"attesta-test-{pid}\"\n\
             [boot_config]\npath = {bc:?}\n\
             [device]\nkind = \"simulator\"\nseed = \"serve-test\"\nproduct = \"genoa\"\nchip = 0\n\
             measurement = \"{image}\"\nstate_dir = {state:?}\n",
            ca = d.join("tls-ca.crt").display().to_string(),
            rk = response_pub.trim(),
            pid = std::process::id(),
            bc = boot_config.display().to_string(),
            state = state.display().to_string(),
        ),
    )
    .unwrap();
    let boot = || {
        guest()
            .args(["unlock", "--config"])
            .arg(p("guest.toml"))
            .output()
            .unwrap()
    };
    let mut guest_logs = String::new();
    for (n, word) in [(1, "formatted"), (2, "boot 2")] {
        let out = boot();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        guest_logs += &text;
        guest_logs += &String::from_utf8_lossy(&out.stderr);
        // 0: activated; 3: the key opened the disk but this machine has no device-mapper.
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "boot {n}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(word), "boot {n}: {text}");
        if out.status.code() == Some(0) {
            let _ = Command::new("cryptsetup")
                .args(["close", &format!("attesta-test-{}", std::process::id())])
                .status();
        }
    }
    assert_eq!(
        std::fs::read_to_string(&boot_config).unwrap(),
        "ssh-ed25519 AAAA tenant-a"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&boot_config)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The host edits the disk's LUKS2 header (both copies, checksums fixed, as an attacker
    // would), then wipes it: the real agent refuses both before activating, each for its
    // reason, and places no boot configuration. (Each boot still spends a release.)
    let genuine = {
        let mut h = vec![0u8; 16 << 20]; // the whole metadata area, keyslot included
        std::fs::File::open(&disk)
            .unwrap()
            .read_exact(&mut h)
            .unwrap();
        h
    };
    let put = |bytes: &[u8]| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    };
    let mut null = genuine.clone();
    for copy in null[..32 << 10].chunks_mut(16 << 10) {
        let text = String::from_utf8_lossy(&copy[4096..]).into_owned();
        let edited = text.replacen("\"aes-xts-plain64\"", "\"cipher_null-ecb\"", 2);
        assert_ne!(edited, text);
        copy[4096..].copy_from_slice(&edited.as_bytes()[..12288]);
        copy[448..512].fill(0);
        let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, copy);
        copy[448..480].copy_from_slice(sum.as_ref());
    }
    for (attack, bytes, want) in [
        ("cipher_null header", null, "cipher_null-ecb"),
        ("wiped disk", vec![0u8; 16 << 20], "wiped"),
    ] {
        put(&bytes);
        let _ = std::fs::remove_file(&boot_config);
        let out = boot();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{attack}: {err}");
        assert!(err.contains(want), "{attack}: {err}");
        assert!(!boot_config.exists(), "{attack}: no boot configuration");
        guest_logs += &err;
    }
    put(&genuine);

    // The key the guest formatted with is the broker's: the cryptsetup CLI opens the keyslot
    // with it (read here by a third boot from inside the test, through the library client).
    let broker = common::broker_pins(&d, &listen);
    let sim_guest = chip.launch(GuestLaunch {
        measurement: [0x4d; 48],
        ..Default::default()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let third = rt.block_on(fetch(&broker, "vm-7", &sim_guest)).unwrap();
    assert_eq!(third.boot_counter, 5);
    let key: Vec<u8> = third.volume_key.to_vec();
    let keyfile = shm.join("key");
    std::fs::write(&keyfile, &key).unwrap();
    let st = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&keyfile)
        .arg(&disk)
        .status()
        .unwrap();
    std::fs::remove_file(&keyfile).unwrap();
    assert!(
        st.success(),
        "cryptsetup opens the disk with the released key"
    );

    // Operations: readiness and metrics.
    assert!(http_get(metrics, "/readyz").starts_with("HTTP/1.1 200"));
    let m = http_get(metrics, "/metrics");
    assert!(m.contains("attesta_kbs_releases_total 5"), "{m}");
    assert!(m.contains("attesta_kbs_registrations_total 1"), "{m}");
    assert!(http_get(metrics, "/nope").starts_with("HTTP/1.1 404"));
    // A request that arrives in pieces is read whole (a scraper's segments, a slow client).
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap();
        s.set_nodelay(true).unwrap();
        for piece in ["GET ", "/readyz", " HTTP/1.1\r\nHost: x\r\n", "\r\n"] {
            s.write_all(piece.as_bytes()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    // Terminate: the key is crypto-shredded and the next boot fails closed.
    assert!(ok(remote("terminate", "terminate.signed"), "vm terminate").contains("vm-7"));
    let _ = std::fs::remove_file(&boot_config);
    let denied = boot();
    assert_eq!(denied.status.code(), Some(1));
    let err = String::from_utf8_lossy(&denied.stderr).into_owned();
    assert!(err.contains("vm_terminated"), "{err}");
    assert!(!boot_config.exists(), "nothing is written on a failed boot");
    guest_logs += &err;
    let m = http_get(metrics, "/metrics");
    assert!(
        m.contains("attesta_kbs_denials_total{reason=\"vm_terminated\"} 1"),
        "{m}"
    );

    // A clean stop signs a final checkpoint; the exported log verifies.
    let _ = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status();
    assert!(server.0.wait().unwrap().success());
    let export = p("audit.jsonl");
    ok(
        kbs()
            .args(["audit", "export", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&export)
            .output()
            .unwrap(),
        "audit export",
    );
    let verified = ok(
        kbs()
            .args(["audit", "verify"])
            .arg(&export)
            .arg("--key")
            .arg(d.join("audit.pub"))
            .output()
            .unwrap(),
        "audit verify",
    );
    assert!(verified.contains("intact"), "{verified}");
    let text = std::fs::read_to_string(&export).unwrap();
    for kind in ["register", "release", "denial", "terminate", "allowlist"] {
        assert!(text.contains(&format!("\"kind\":\"{kind}\"")), "{kind}");
    }

    // The tenant's view: the VM's evidence bundle, checked offline by `attesta-verify` with
    // nothing from the broker but its pinned response key (and here the simulator's chain,
    // named explicitly, as the chip is simulated).
    let bundle = p("vm-7.bundle");
    ok(
        kbs()
            .args(["evidence", "export", "--vm", "vm-7", "--out"])
            .arg(&bundle)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap(),
        "evidence export",
    );
    let chain = p("sim-chain.pem");
    std::fs::write(
        &chain,
        snp::certs::pem_encode("CERTIFICATE", &pki.ask.cert)
            + &snp::certs::pem_encode("CERTIFICATE", &pki.ark.cert),
    )
    .unwrap();
    let verify = |bundle: &std::path::Path, extra: &[&str]| {
        let exe = sibling("attesta-verify");
        assert!(
            exe.exists(),
            "{} is missing: cargo build -p attesta-verify",
            exe.display()
        );
        Command::new(exe)
            .arg("bundle")
            .arg(bundle)
            .arg("--order")
            .arg(p("order.signed"))
            .arg("--broker-key")
            .arg(d.join("response.pub"))
            .arg("--trust-chain")
            .arg(&chain)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = verify(&bundle, &["--json", "--measurement", &image]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{j:#}");
    assert_eq!(j["verdict"], "ok");
    // Every release of vm-7 in the broker's whole log is in the bundle, and verified.
    let released = text
        .lines()
        .filter(|l| l.contains("\"kind\":\"release\"") && l.contains("\"vm_id\":\"vm-7\""))
        .count();
    assert!(released >= 2);
    assert_eq!(
        j["releases"].as_array().map(Vec::len),
        Some(released),
        "{j:#}"
    );
    assert!(
        j["releases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ok"] == true)
    );
    assert_eq!(j["releases"][0]["report"]["chip_id"], json!(chip_id));
    assert!(
        j["denials"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["reasons"][0] == "vm_terminated"))
    );
    assert_eq!(j["amd_rooted"], false, "the simulator's chain is not AMD's");
    // Any other tenant's entries are elided; this VM's release edited: a finding, exit 1.
    let text = std::fs::read_to_string(&bundle).unwrap();
    let edited = p("vm-7.edited.bundle");
    std::fs::write(
        &edited,
        text.replacen("\"boot_counter\":1", "\"boot_counter\":9", 1),
    )
    .unwrap();
    let out = verify(&edited, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FINDING audit_entry_changed"));
    // Another image than the one the tenant built: a finding.
    let out = verify(&bundle, &["--measurement", &"ab".repeat(48)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("measurement_not_expected"));
    assert_eq!(
        verify(&bundle, &["--at", "yesterday"]).status.code(),
        Some(2)
    );

    // No trace of the volume key in any file the broker or the host side wrote, nor in any log:
    // raw, hex or base64, nor any 16-byte run of it.
    let hex_key = hex::encode(&key);
    // log_format = "json": every line the broker logged is a JSON object.
    for line in log.lock().unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("{line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    let logs = log.lock().unwrap().clone() + &guest_logs;
    assert!(!logs.contains(&hex_key) && !logs.contains(&hex_key.to_uppercase()));
    let mut files = vec![];
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() > 10);
    for f in files {
        // The disk image holds the key only inside its LUKS2 keyslot, encrypted.
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(16).any(|w| key.windows(16).any(|k| k == w)),
            "volume-key bytes in {}",
            f.display()
        );
        let text = String::from_utf8_lossy(&bytes).to_lowercase();
        assert!(!text.contains(&hex_key[..32]), "hex key in {}", f.display());
    }
    drop(shm_dir);
}

/// `crls` in kbs.toml: with `revocation = "require"` and none configured the broker warns that
/// every release will be denied; a configured CRL not signed by an ARK stops the start; a
/// genuine one is verified and loaded.
#[test]
fn configured_crls_are_verified_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("kbs");
    let pki = Pki::cached(
        snp::Product::Milan,
        &Seed::from_text("serve-crl-test"),
        &dir.path().join("sim-state"),
        |_| {},
    )
    .unwrap();
    let ark = dir.path().join("sim-ark.der");
    std::fs::write(&ark, &pki.ark.cert).unwrap();
    let now = 1_780_272_000;
    let day = 86_400;
    let genuine = pki
        .ark
        .sign_crl(&[], now - day, Some(now + 7 * day))
        .unwrap();
    let forged = pki
        .ask
        .sign_crl(&[], now - day, Some(now + 7 * day))
        .unwrap();
    std::fs::write(d.with_file_name("genuine.crl"), &genuine).unwrap();
    std::fs::write(d.with_file_name("forged.crl"), &forged).unwrap();
    ok(
        kbs()
            .args(["init", "--dir"])
            .arg(&d)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-listen", "none"])
            .arg("--trust-root")
            .arg(&ark)
            .output()
            .unwrap(),
        "init",
    );
    let base = std::fs::read_to_string(d.join("kbs.toml"))
        .unwrap()
        .replace("revocation = \"if_available\"", "revocation = \"require\"");
    assert!(base.contains("revocation = \"require\""), "{base}");
    let cfg = d.join("kbs.toml");

    // Required but none configured: it serves, and says what that means.
    std::fs::write(&cfg, &base).unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut server = start(&cfg, log.clone());
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        log.lock().unwrap().contains("every release will be denied"),
        "{}",
        log.lock().unwrap()
    );

    // A CRL no ARK signed: the broker refuses to start and names the file.
    std::fs::write(&cfg, format!("{base}crls = [\"../forged.crl\"]\n")).unwrap();
    let out = kbs()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("forged.crl") && err.contains("not signed"),
        "{err}"
    );

    // A genuine one is loaded.
    std::fs::write(&cfg, format!("{base}crls = [\"../genuine.crl\"]\n")).unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut server = start(&cfg, log.clone());
    let _ = server.kill();
    let _ = server.wait();
    let l = log.lock().unwrap();
    assert!(l.contains("CRL loaded") && l.contains("genuine.crl"), "{l}");
}
