//! The `attesta-host` binary: `vm xml` prints XML libvirt's schema accepts and refuses a spec
//! that asks for the debug policy; `measure` gives `sev-snp-measure --mode snp`'s digest.

use std::process::Command;

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
    std::fs::write(&ovmf, simulator::measure::synthetic_ovmf(262_144, 3)).unwrap();
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
