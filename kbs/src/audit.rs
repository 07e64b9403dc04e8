//! The tamper-evident audit log. Its format lives in [`proto::audit`], shared with the tenant's
//! offline verifier (`attesta-verify`), which must read it without depending on the broker.

pub use proto::audit::*;
