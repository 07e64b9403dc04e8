//! # mesh — Attesta's overlay network
//!
//! A Nebula-like overlay on QUIC that will carry all of the system's traffic. This crate so far
//! holds its identity layer ([`cert`]): the mesh CA, intermediate CAs and node certificates, with
//! Nebula-style constraints (a child's groups, networks and validity lie within its issuer's)
//! enforced when signing and again when verifying. Transport, lighthouses, firewall, rotation and
//! revocation come next (issue 5).
#![forbid(unsafe_code)]

pub mod cert;
