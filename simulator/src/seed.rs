//! Determinism: every key the simulator makes comes from a seed and a label, so the same seed
//! gives the same key hierarchy, chips and VCEKs on every machine.

use aws_lc_rs::digest::{Context, SHA256};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

/// A 32-byte seed, usually the SHA-256 of a user-given string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed(pub [u8; 32]);

impl Seed {
    /// A seed from text (`--seed S`).
    pub fn from_text(s: &str) -> Seed {
        Seed(hash(&[b"attesta-sim seed v1\0", s.as_bytes()]))
    }

    /// A fresh random seed.
    pub fn random() -> Seed {
        let mut b = [0u8; 32];
        // aws-lc's RNG does not fail in practice; a zero seed would still be a valid seed.
        let _ = aws_lc_rs::rand::fill(&mut b);
        Seed(b)
    }

    /// A derived seed for one purpose.
    pub fn derive(&self, label: &[u8]) -> Seed {
        Seed(hash(&[&self.0, b"\0", label]))
    }

    /// A deterministic RNG for one purpose.
    pub fn rng(&self, label: &[u8]) -> ChaCha20Rng {
        ChaCha20Rng::from_seed(self.derive(label).0)
    }

    /// Short hex identity, for directory names.
    pub fn id(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

/// SHA-256 over the concatenation of `parts`.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}
