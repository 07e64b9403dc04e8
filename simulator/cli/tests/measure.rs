//! `attesta-sim measure` gives the same launch digest as `sev-snp-measure --mode snp` (PyPI):
//! on Debian's OVMF.fd, and, for direct kernel boot, on a synthetic OVMF image carrying the SEV
//! hashes table (Debian's OVMF has none).

use std::path::Path;
use std::process::Command;

fn tool_available() -> bool {
    let ok = Command::new("sev-snp-measure")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "sev-snp-measure not found (pip install sev-snp-measure); required when CI=true"
            );
        }
        eprintln!("SKIP: sev-snp-measure not installed (pip install sev-snp-measure)");
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

fn both(args: &[&str]) -> (String, String) {
    let ours = last_line(
        Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
            .arg("measure")
            .args(args)
            .output()
            .unwrap(),
    );
    let theirs = last_line(
        Command::new("sev-snp-measure")
            .args(["--mode", "snp"])
            .args(args)
            .output()
            .unwrap(),
    );
    (ours, theirs)
}

#[test]
fn debian_ovmf_matches_sev_snp_measure() {
    let ovmf = Path::new("/usr/share/ovmf/OVMF.fd");
    if !ovmf.is_file() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "Debian's ovmf package is required when CI=true"
        );
        eprintln!("SKIP: /usr/share/ovmf/OVMF.fd missing (apt-get install ovmf)");
        return;
    }
    if !tool_available() {
        return;
    }
    let o = ovmf.to_string_lossy();
    for (vcpus, ty, features) in [
        ("1", "EPYC-Milan", "0x1"),
        ("2", "EPYC-Genoa", "0x1"),
        ("4", "EPYC-Turin", "0x21"),
        ("8", "EPYC-v4", "0x1"),
    ] {
        let (ours, theirs) = both(&[
            "--ovmf",
            &o,
            "--vcpus",
            vcpus,
            "--vcpu-type",
            ty,
            "--guest-features",
            features,
        ]);
        assert_eq!(ours.len(), 96);
        assert_eq!(ours, theirs, "{vcpus} x {ty}, features {features}");
    }
}

#[test]
fn direct_kernel_boot_on_a_synthetic_ovmf_matches() {
    if !tool_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ovmf = dir.path().join("synthetic.fd");
    let st = Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
        .args([
            "synth-ovmf",
            "--size",
            "262144",
            "--out",
            &ovmf.to_string_lossy(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd.img"));
    std::fs::write(
        &kernel,
        (0..300_001u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(
        &initrd,
        (0..123_457u32).map(|i| (i * 13) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let (o, k, i) = (
        ovmf.to_string_lossy(),
        kernel.to_string_lossy(),
        initrd.to_string_lossy(),
    );
    let mut seen = std::collections::HashSet::new();
    for extra in [
        vec!["--kernel", &*k],
        vec!["--kernel", &*k, "--initrd", &*i],
        vec![
            "--kernel",
            &*k,
            "--initrd",
            &*i,
            "--append",
            "console=ttyS0 root=/dev/vda",
        ],
        vec![],
    ] {
        let mut args = vec!["--ovmf", &*o, "--vcpus", "3", "--vcpu-type", "EPYC-Genoa"];
        args.extend(extra.iter().copied());
        let (ours, theirs) = both(&args);
        assert_eq!(ours, theirs, "{extra:?}");
        assert!(seen.insert(ours), "each artifact changes the digest");
    }
}

#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.fd");
    std::fs::write(&junk, vec![0u8; 8192]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
        .args([
            "measure",
            "--ovmf",
            &junk.to_string_lossy(),
            "--vcpus",
            "1",
            "--vcpu-type",
            "EPYC-Milan",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("footer table"));
    let out = Command::new(env!("CARGO_BIN_EXE_attesta-sim"))
        .args([
            "measure",
            "--ovmf",
            &junk.to_string_lossy(),
            "--vcpus",
            "1",
            "--vcpu-type",
            "Pentium",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown vCPU type"));
}
