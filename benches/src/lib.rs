//! Shared helpers for the benchmarks: finding the real-hardware corpus.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The corpus directory (`$ATTESTA_SNP_CORPUS`, default `../shared/snp-corpus`), if present.
pub fn corpus_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ATTESTA_SNP_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/snp-corpus")
        });
    dir.join("MANIFEST.md").is_file().then_some(dir)
}
