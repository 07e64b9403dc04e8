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

/// One simulated chip, a report from a guest on it (measurement `[3; 48]`), and a verifier that
/// trusts the simulator's root: what the benchmarks compare their pieces against.
pub struct Simulated {
    pub pki: std::sync::Arc<simulator::Pki>,
    pub chip: simulator::Chip,
    pub report: Vec<u8>,
    pub verifier: snp::Verifier,
}

/// 2026-06-01T00:00:00Z, inside the simulated certificates' validity.
pub const AT: u64 = 1_780_272_000;

impl Simulated {
    /// For `product`, from the fixed seed "bench"; panics (it is a benchmark's setup) if the
    /// report does not verify.
    pub fn new(product: snp::Product) -> Simulated {
        use snp::device::GuestDevice;
        let pki = std::sync::Arc::new(
            simulator::Pki::from_seed(product, simulator::Seed::from_text("bench")).expect("pki"),
        );
        let chip = simulator::Chip::new(pki.clone(), simulator::ChipConfig::typical(&pki, 0))
            .expect("chip");
        let report = chip
            .launch(Self::launch())
            .get_report(&[1; 64], 0)
            .expect("report");
        let verifier = snp::Verifier::new(snp::VerifierConfig {
            trust_roots: vec![pki.ark.cert.clone()],
            revocation: snp::Revocation::IfAvailable,
            ..Default::default()
        });
        let s = Simulated {
            pki,
            chip,
            report,
            verifier,
        };
        assert!(s.verifier.verify(&s.evidence(), AT).accepted());
        s
    }

    /// How the guest is launched.
    pub fn launch() -> simulator::GuestLaunch {
        simulator::GuestLaunch {
            measurement: [3; 48],
            ..Default::default()
        }
    }

    /// The report with its full chain.
    pub fn evidence(&self) -> snp::Evidence<'_> {
        snp::Evidence {
            report: &self.report,
            vcek: Some(&self.chip.vcek().cert),
            ask: Some(&self.pki.ask.cert),
            ark: Some(&self.pki.ark.cert),
            crls: &[],
        }
    }
}
