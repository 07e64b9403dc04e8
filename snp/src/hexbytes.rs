//! Fixed-size byte strings written as hex in policy documents and JSON.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// `N` bytes, (de)serialized as lowercase hex (an optional `0x` prefix is accepted).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HexBytes<const N: usize>(pub [u8; N]);

impl<const N: usize> HexBytes<N> {
    /// Parses hex of exactly `N` bytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let s = s.strip_prefix("0x").unwrap_or(s);
        let v = hex::decode(s).map_err(|e| format!("invalid hex: {e}"))?;
        let arr: [u8; N] = v
            .as_slice()
            .try_into()
            .map_err(|_| format!("expected {N} bytes ({} hex digits), got {}", 2 * N, v.len()))?;
        Ok(HexBytes(arr))
    }
}

impl<const N: usize> fmt::Debug for HexBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> fmt::Display for HexBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> Serialize for HexBytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de, const N: usize> Deserialize<'de> for HexBytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HexBytes::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A u64 bit vector written as `0x…` hex or a plain integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HexU64(pub u64);

impl Serialize for HexU64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for HexU64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(u64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(v) => Ok(HexU64(v)),
            Repr::Str(s) => {
                let t = s.trim();
                let r = match t.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => t.parse(),
                };
                r.map(HexU64)
                    .map_err(|e| serde::de::Error::custom(format!("invalid number {s:?}: {e}")))
            }
        }
    }
}
