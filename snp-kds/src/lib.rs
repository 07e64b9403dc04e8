//! Where VCEKs and CRLs come from, all offline-friendly:
//! - [`OfflineStore`]: a directory in trustee's layout, filled by an operator (air-gapped KBS).
//! - [`KdsClient`]: AMD's key server (base URL configurable), with a persistent cache in the same
//!   layout, one fetch for concurrent misses, and backoff on HTTP 429. Once cached, verification
//!   needs no network.
//!
//! The verification itself stays in the sans-IO `snp` crate; this crate only moves bytes.
#![forbid(unsafe_code)]

mod client;
mod store;

pub use client::{Backoff, KdsClient, KdsError, NEGATIVE_TTL};
pub use store::OfflineStore;
