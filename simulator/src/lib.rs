//! # simulator — a software SEV-SNP
//!
//! The one stand-in of the system: it replaces AMD's hardware and key server, nothing else.
//! Its certificates follow AMD's profile (names, RSASSA-PSS parameters, extensions) and its
//! reports are byte-exact in AMD's layout, so what passes here passes the same code on hardware.
//! The only difference is the root of trust, which verifiers accept only when configured to.
#![forbid(unsafe_code)]

pub mod attacks;
pub mod chip;
pub mod der;
pub mod fleet;
pub mod pki;
pub mod psp;
pub mod seed;

/// The launch measurement lives in its own crate (the host agent and image builder use it
/// without the simulator); re-exported where it always was.
pub use ::measure;
pub use chip::{Chip, ChipConfig, GuestLaunch, SimGuest};
pub use fleet::{Fleet, Vm};
pub use pki::{Pki, SimError, Vcek};
pub use seed::Seed;
