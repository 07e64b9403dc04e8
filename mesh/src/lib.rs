//! # mesh — Attesta's overlay network
//!
//! A Nebula-like overlay on QUIC that will carry all of the system's traffic. This crate so far
//! holds its sans-IO cores: the identity layer ([`cert`]: the mesh CA, intermediate CAs and node
//! certificates, with Nebula-style constraints — a child's groups, networks and validity lie
//! within its issuer's — enforced when signing and again when verifying) and the default-deny
//! [`firewall`] with self-testing rule files. Transport, lighthouses, rotation, revocation and
//! the tun overlay come next (issue 5).
#![forbid(unsafe_code)]

pub mod cert;
pub mod firewall;
pub mod transport;
