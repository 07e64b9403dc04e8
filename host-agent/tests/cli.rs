//! The `attesta-host` binary: `vm xml` prints XML libvirt's schema accepts and refuses a spec
//! that asks for the debug policy; `measure` gives `sev-snp-measure --mode snp`'s digest.

use std::process::Command;

mod common;

fn host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attesta-host"))
}

#[test]
fn vm_xml_prints_valid_xml_and_refuses_debug() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/vm.toml");
    let out = host()
        .args(["vm", "xml", "--spec", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.xml");
    std::fs::write(&f, &out.stdout).unwrap();
    let v = Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    let debug = dir.path().join("debug.toml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("policy = \"0x30000\"", "policy = \"0xb0000\"");
    std::fs::write(&debug, text).unwrap();
    let out = host()
        .args(["vm", "xml", "--spec"])
        .arg(&debug)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG") && err.contains("debug.toml"), "{err}");
    assert!(out.stdout.is_empty());
}

fn sev_snp_measure() -> bool {
    let ok = Command::new("sev-snp-measure")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "sev-snp-measure (pip) is required when CI=true"
        );
        eprintln!("SKIP: sev-snp-measure not installed");
    }
    ok
}

fn last_line(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn measure_matches_sev_snp_measure_for_direct_boot() {
    if !sev_snp_measure() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ovmf = dir.path().join("ovmf.fd");
    std::fs::write(&ovmf, measure::synthetic_ovmf(262_144, 3)).unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(
        &kernel,
        (0..200_003u32).map(|i| (i * 5) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(
        &initrd,
        (0..77_777u32).map(|i| (i * 3) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let args: Vec<String> = [
        "--ovmf",
        &ovmf.to_string_lossy(),
        "--kernel",
        &kernel.to_string_lossy(),
        "--initrd",
        &initrd.to_string_lossy(),
        "--append",
        "console=ttyS0 ro",
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Genoa",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ours = last_line(host().arg("measure").args(&args).output().unwrap());
    let theirs = last_line(
        Command::new("sev-snp-measure")
            .args(["--mode", "snp"])
            .args(&args)
            .output()
            .unwrap(),
    );
    assert_eq!(ours.len(), 96);
    assert_eq!(ours, theirs);
    let bad = host()
        .args([
            "measure",
            "--ovmf",
            "/nonexistent",
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC-Milan",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent"));
}

/// The daemon as miners run it: `serve --config` on the test driver; `vm create/list/stop/
/// terminate` and `platform` through its control socket (mode 0600); a second agent on the
/// same socket is refused; SIGTERM stops the agent and removes the socket.
#[test]
fn serve_and_drive_it_through_the_control_socket() {
    use aws_lc_rs::signature::Ed25519KeyPair;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = common::spec(d, "vm-cli");
    std::fs::write(d.join("vm.toml"), &spec).unwrap();
    let digest = common::digest(&spec);
    let op = Ed25519KeyPair::generate().unwrap();
    let chip_id = common::chip_id("genoa", 1);
    std::fs::write(
        d.join("register.order"),
        common::register_order(&op, "vm-cli", &spec, &chip_id, None),
    )
    .unwrap();
    std::fs::write(
        d.join("terminate.order"),
        common::terminate_order(&op, "vm-cli"),
    )
    .unwrap();
    let config = d.join("host.toml");
    std::fs::write(
        &config,
        common::host_toml(
            &op,
            "[platform]\nkind = \"simulator\"\nproduct = \"genoa\"\nchip = 1\n",
        ),
    )
    .unwrap();

    let mut agent = host()
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = d.join("run/control.sock");
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed().as_secs() < 60,
            "the agent did not open its socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let m = std::fs::metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);

    let run = |args: &[&str]| {
        let out = host()
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&[
        "vm",
        "create",
        "--start",
        "--spec",
        d.join("vm.toml").to_str().unwrap(),
        "--order",
        d.join("register.order").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("vm-cli: running") && out.contains(&hex::encode(digest)),
        "{out}"
    );
    assert!(out.contains("no [kbs] configured"), "{out}");
    let (code, out, _) = run(&["vm", "list", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vm_id"] == "vm-cli")
        .unwrap();
    assert_eq!(
        (row["state"].as_str(), row["managed"].as_bool()),
        (Some("running"), Some(true))
    );
    // A terminate needs a terminate order.
    let (code, _, err) = run(&[
        "vm",
        "terminate",
        "vm-cli",
        "--order",
        d.join("register.order").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected a terminate order"), "{err}");
    let (code, out, err) = run(&["vm", "reboot", "vm-cli"]);
    assert_eq!((code, out.trim()), (Some(0), "vm-cli: running"), "{err}");
    let (code, out, err) = run(&["vm", "stop", "vm-cli"]);
    assert_eq!((code, out.trim()), (Some(0), "vm-cli: stopped"), "{err}");
    let (code, _, err) = run(&["vm", "stop", "vm-cli"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("already stopped"), "{err}");
    let (code, out, _) = run(&["platform", "--json"]);
    assert_eq!(code, Some(0));
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["chip_id"], hex::encode(&chip_id));
    assert_eq!(p["product"], "Genoa");
    let (code, out, _) = run(&["billing", "status", "--json"]);
    assert_eq!((code, out.trim()), (Some(0), "[]"));

    // A second agent on the same socket is refused.
    let second = host()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another agent is listening"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let (code, out, err) = run(&[
        "vm",
        "terminate",
        "vm-cli",
        "--order",
        d.join("terminate.order").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("vm-cli: terminated"), "{out}");
    assert!(!d.join("vm-cli.img").exists());

    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed on SIGTERM");
}
