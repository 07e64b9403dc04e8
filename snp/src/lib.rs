//! # snp — AMD SEV-SNP evidence verification
//!
//! Sans-IO: every function takes bytes and an instant and returns a verdict. No sockets, files
//! or clocks inside, so the same code runs in the key broker, the CLI, the simulator's attack
//! catalogue, fuzzers and benchmarks.
//!
//! ## What it does
//! - Parses report versions 2, 3, 4 and 5 without ever panicking, keeping the bytes as received.
//! - Detects the product (Milan, Genoa, Turin) and decodes TCBs with that product's layout.
//! - Verifies ARK → ASK → VCEK and ARK → ASVK → VLEK (RSASSA-PSS/SHA-384), with AMD's roots
//!   built in and pinned by their bytes; validity at a caller-given instant; CRLs signed by the ARK.
//! - Verifies the report's ECDSA P-384 signature over bytes 0x000–0x29F as received.
//! - Binds the VCEK to the report: hwID = CHIP_ID, SPLs = REPORTED_TCB, key kind = KEY_INFO.
//! - Appraises against a versioned policy document (TCB minimums and anti-rollback, guest
//!   policy, platform info, VMPL, identity fields, ID/author keys, measurements, chips,
//!   firmware, mitigation vectors) and reports **every** failed check as a typed [`Reason`].
//! - Parses the extended report's certificate table.
//!
//! ## What it does not do
//! - No network and no files: fetching VCEKs and CRLs is the `snp-kds` crate's job.
//! - No way to turn verification off. A non-AMD root (the simulator's) must be configured
//!   explicitly, and the verdict then says it is not AMD-rooted.
//! - No `unsafe` code.
#![forbid(unsafe_code)]

pub mod certs;
pub mod certtable;
mod der;
pub mod device;
pub mod floor;
pub mod hexbytes;
pub mod json;
pub mod kds;
pub mod policy;
mod product;
pub mod reason;
pub mod report;
pub mod roots;
pub mod tcb;
pub mod verify;

pub use certs::{AmdCert, Crl};
pub use certtable::CertTable;
pub use floor::Floor;
pub use policy::Policy;
pub use product::{Product, UnknownProduct};
pub use reason::Reason;
pub use report::{AttestationReport, ReportBody};
pub use tcb::Tcb;
pub use verify::{Evidence, Revocation, Root, SignerKind, Verdict, Verifier, VerifierConfig};
