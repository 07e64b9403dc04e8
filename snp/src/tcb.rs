//! TCB versions: a little-endian u64 whose bytes are security patch levels (SPLs).
//!
//! The byte positions differ by product, which is why a TCB can only be decoded once the
//! product is known: Milan and Genoa put bootloader, TEE, SNP and microcode at bytes 0, 1, 6
//! and 7; Turin puts FMC, bootloader, TEE and SNP at bytes 0–3 and microcode at byte 7.

use crate::Product;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A decoded TCB. `fmc` is `Some` only on products that have it (Turin).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tcb {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

/// One TCB component, named as AMD's certificate extensions and key-server URLs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Fmc,
    Bootloader,
    Tee,
    Snp,
    Microcode,
}

impl Component {
    /// Short name used in messages and the key-server query (`bl`, `tee`, `snp`, `ucode`, `fmc`).
    pub fn short(self) -> &'static str {
        match self {
            Component::Fmc => "fmc",
            Component::Bootloader => "bl",
            Component::Tee => "tee",
            Component::Snp => "snp",
            Component::Microcode => "ucode",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

impl Tcb {
    /// Decodes a raw TCB_VERSION for `product`.
    pub fn decode(raw: u64, product: Product) -> Tcb {
        let b = raw.to_le_bytes();
        match product {
            Product::Turin => Tcb {
                fmc: Some(b[0]),
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            },
            Product::Milan | Product::Genoa => Tcb {
                fmc: None,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            },
        }
    }

    /// Encodes for `product`; an FMC value is dropped on products without one.
    pub fn encode(&self, product: Product) -> u64 {
        let mut b = [0u8; 8];
        match product {
            Product::Turin => {
                b[0] = self.fmc.unwrap_or(0);
                b[1] = self.bootloader;
                b[2] = self.tee;
                b[3] = self.snp;
                b[7] = self.microcode;
            }
            Product::Milan | Product::Genoa => {
                b[0] = self.bootloader;
                b[1] = self.tee;
                b[6] = self.snp;
                b[7] = self.microcode;
            }
        }
        u64::from_le_bytes(b)
    }

    /// The components present, each with its value.
    pub fn components(&self) -> impl Iterator<Item = (Component, u8)> {
        let fmc = self.fmc.map(|v| (Component::Fmc, v));
        fmc.into_iter().chain([
            (Component::Bootloader, self.bootloader),
            (Component::Tee, self.tee),
            (Component::Snp, self.snp),
            (Component::Microcode, self.microcode),
        ])
    }

    /// The value of one component (`None` for FMC where the product has none).
    pub fn get(&self, c: Component) -> Option<u8> {
        match c {
            Component::Fmc => self.fmc,
            Component::Bootloader => Some(self.bootloader),
            Component::Tee => Some(self.tee),
            Component::Snp => Some(self.snp),
            Component::Microcode => Some(self.microcode),
        }
    }

    /// Components where `self` is below `min`, as (component, have, need).
    /// A minimum for FMC is ignored on TCBs without FMC.
    pub fn below(&self, min: &TcbMinimum) -> Vec<(Component, u8, u8)> {
        let mut out = Vec::new();
        for (c, need) in min.components() {
            if let Some(have) = self.get(c)
                && have < need
            {
                out.push((c, have, need));
            }
        }
        out
    }
}

impl fmt::Display for Tcb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (c, v) in self.components() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{c}={v}")?;
        }
        Ok(())
    }
}

/// Per-component minimums. Absent components are unconstrained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcbMinimum {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootloader: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snp: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microcode: Option<u8>,
}

impl TcbMinimum {
    /// The stricter of two minimums: per component, the higher (an absent one constrains
    /// nothing).
    pub fn stricter(&self, other: &TcbMinimum) -> TcbMinimum {
        let m = |a: Option<u8>, b: Option<u8>| a.max(b);
        TcbMinimum {
            fmc: m(self.fmc, other.fmc),
            bootloader: m(self.bootloader, other.bootloader),
            tee: m(self.tee, other.tee),
            snp: m(self.snp, other.snp),
            microcode: m(self.microcode, other.microcode),
        }
    }

    /// The value required of one component, if any.
    pub fn get(&self, c: Component) -> Option<u8> {
        match c {
            Component::Fmc => self.fmc,
            Component::Bootloader => self.bootloader,
            Component::Tee => self.tee,
            Component::Snp => self.snp,
            Component::Microcode => self.microcode,
        }
    }

    pub(crate) fn components(&self) -> impl Iterator<Item = (Component, u8)> {
        [
            (Component::Fmc, self.fmc),
            (Component::Bootloader, self.bootloader),
            (Component::Tee, self.tee),
            (Component::Snp, self.snp),
            (Component::Microcode, self.microcode),
        ]
        .into_iter()
        .filter_map(|(c, v)| v.map(|v| (c, v)))
    }
}

/// Components where `a` < `b` (both decoded for the same product): the anti-rollback relations.
pub fn regressions(a: &Tcb, b: &Tcb) -> Vec<(Component, u8, u8)> {
    a.components()
        .filter_map(|(c, have)| match b.get(c) {
            Some(need) if have < need => Some((c, have, need)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milan_layout() {
        // bl=3 tee=0 snp=8 ucode=115 (0x73): a real Milan TCB.
        let raw = 0x7308_0000_0000_0003u64;
        let t = Tcb::decode(raw, Product::Milan);
        assert_eq!(
            (t.bootloader, t.tee, t.snp, t.microcode, t.fmc),
            (3, 0, 8, 115, None)
        );
        assert_eq!(t.encode(Product::Milan), raw);
    }

    #[test]
    fn turin_layout() {
        // The genuine Turin TCB from the corpus: fmc=1 bl=1 tee=1 snp=4 ucode=81.
        let raw = 0x5100_0000_0401_0101u64;
        let t = Tcb::decode(raw, Product::Turin);
        assert_eq!(
            (t.fmc, t.bootloader, t.tee, t.snp, t.microcode),
            (Some(1), 1, 1, 4, 81)
        );
        assert_eq!(t.encode(Product::Turin), raw);
        // The Milan layout reads a different snp for the same bytes.
        assert_eq!(Tcb::decode(raw, Product::Milan).snp, 0);
    }

    #[test]
    fn minimums_and_regressions() {
        let t = Tcb {
            fmc: None,
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
        };
        let min = TcbMinimum {
            snp: Some(9),
            microcode: Some(115),
            fmc: Some(5),
            ..Default::default()
        };
        assert_eq!(t.below(&min), vec![(Component::Snp, 8, 9)]);
        let newer = Tcb { snp: 10, ..t };
        assert_eq!(regressions(&t, &newer), vec![(Component::Snp, 8, 10)]);
        assert!(regressions(&newer, &t).is_empty());
    }
}
