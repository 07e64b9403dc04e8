//! AMD EPYC generations that produce SEV-SNP reports, and what differs between them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A processor generation. It decides the TCB layout, the hwID length and the AMD root of trust.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    /// EPYC 7003 (Zen 3), CPUID family 19h models 00h–0Fh.
    Milan,
    /// EPYC 9004/8004 (Zen 4: Genoa, Bergamo, Siena), family 19h models 10h–1Fh and A0h–AFh.
    Genoa,
    /// EPYC 9005 (Zen 5), family 1Ah models 00h–1Fh.
    Turin,
}

impl Product {
    /// Every product this crate knows, in release order.
    pub const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// The name AMD uses in certificate names and key-server URLs (`Milan`, `Genoa`, `Turin`).
    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }

    /// Bytes of CHIP_ID that the VCEK's hwID extension carries (Turin keeps only the first 8).
    pub fn hwid_len(self) -> usize {
        match self {
            Product::Turin => 8,
            _ => 64,
        }
    }

    /// Whether the TCB has a firmware-management-controller (FMC) component.
    pub fn has_fmc(self) -> bool {
        self == Product::Turin
    }

    /// Product from the CPUID family/model bytes that report versions 3 and later carry.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match (family, model) {
            (0x19, 0x00..=0x0f) => Some(Product::Milan),
            (0x19, 0x10..=0x1f) | (0x19, 0xa0..=0xaf) => Some(Product::Genoa),
            (0x1a, 0x00..=0x1f) => Some(Product::Turin),
            _ => None,
        }
    }

    /// Product from a VCEK/VLEK `productName` extension (`Milan-B0`, `Genoa`, `Turin`, …).
    pub fn from_product_name(name: &str) -> Option<Product> {
        let base = name.split('-').next().unwrap_or(name);
        base.parse().ok()
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A product name that is not Milan, Genoa or Turin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown product {0:?} (expected milan, genoa or turin)")]
pub struct UnknownProduct(pub String);

impl FromStr for Product {
    type Err = UnknownProduct;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "milan" => Ok(Product::Milan),
            "genoa" => Ok(Product::Genoa),
            "turin" => Ok(Product::Turin),
            _ => Err(UnknownProduct(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_mapping() {
        assert_eq!(Product::from_cpuid(0x19, 0x01), Some(Product::Milan));
        assert_eq!(Product::from_cpuid(0x19, 0x11), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x19, 0xa0), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x1a, 0x02), Some(Product::Turin));
        assert_eq!(Product::from_cpuid(0x17, 0x31), None);
        assert_eq!(Product::from_cpuid(0x19, 0x50), None);
    }

    #[test]
    fn names() {
        assert_eq!(Product::from_product_name("Milan-B0"), Some(Product::Milan));
        assert_eq!(Product::from_product_name("Turin"), Some(Product::Turin));
        assert_eq!(Product::from_product_name("Rome"), None);
        assert_eq!("GENOA".parse::<Product>(), Ok(Product::Genoa));
        assert!("naples".parse::<Product>().is_err());
    }
}
