//! # kbs — the Attesta key broker
//!
//! The broker's decision logic lives here as pure functions and types (no sockets, files or
//! clocks passed implicitly); the `attesta-kbs` binary is a thin shell around it.
#![forbid(unsafe_code)]

pub mod allowlist;
pub mod audit;
pub mod challenges;
pub mod client;
pub mod collateral;
pub mod config;
pub mod evidence;
pub mod export;
pub mod floor;
pub mod guest_issuer;
pub mod guest_revocation;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod nonces;
pub mod orders;
pub mod quic;
pub mod release;
pub mod service;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod tls;
