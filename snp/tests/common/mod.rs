//! Finds the real-hardware corpus: `$ATTESTA_SNP_CORPUS`, default `../shared/snp-corpus` beside
//! the project's root. Missing: tests skip with a message, but fail when `CI=true`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn corpus_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ATTESTA_SNP_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/snp-corpus"));
    if dir.join("MANIFEST.md").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "SNP corpus not found at {} (set ATTESTA_SNP_CORPUS); required when CI=true",
            dir.display()
        );
    }
    eprintln!(
        "SKIP: SNP corpus not found at {} (set ATTESTA_SNP_CORPUS)",
        dir.display()
    );
    None
}

/// One corpus item: report, signing certificate, optional ASK/ASVK and ARK, and whether it must fail.
pub struct Item {
    pub name: String,
    pub report: Vec<u8>,
    pub vcek: Vec<u8>,
    pub ask: Option<Vec<u8>>,
    pub ark: Option<Vec<u8>>,
    pub expect_fail: bool,
}

fn read(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

pub fn items(dir: &Path) -> Vec<Item> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read corpus")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for d in entries {
        let Some(report) = read(&d.join("report.bin")) else {
            continue;
        };
        let vcek = ["vcek.der", "vcek.pem", "vlek.der", "vlek.pem"]
            .iter()
            .find_map(|f| read(&d.join(f)))
            .expect("item has a VCEK or VLEK");
        let (ask, ark) = if let Some(chain) = read(&d.join("cert_chain.pem")) {
            let blocks = snp::certs::pem_blocks(&chain).expect("chain parses");
            (blocks.first().cloned(), blocks.get(1).cloned())
        } else {
            (read(&d.join("ask.pem")), read(&d.join("ark.pem")))
        };
        let expect_fail =
            read(&d.join("EXPECT")).is_some_and(|e| String::from_utf8_lossy(&e).trim() == "FAIL");
        out.push(Item {
            name: d.file_name().unwrap().to_string_lossy().into_owned(),
            report,
            vcek,
            ask,
            ark,
            expect_fail,
        });
    }
    out
}

/// 2026-06-01T00:00:00Z: inside every genuine VCEK's validity (the VLEK expired 2025-12-10).
pub const AT: u64 = 1_780_272_000;
/// 2025-06-01T00:00:00Z: inside the VLEK's validity.
pub const AT_VLEK: u64 = 1_748_736_000;

pub fn at_for(name: &str) -> u64 {
    if name.contains("vlek") { AT_VLEK } else { AT }
}
