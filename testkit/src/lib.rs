//! Real servers that the tests and the main job start and stop on loopback, instead of mocks:
//! [`garage`], a production S3-compatible object store, and [`chopsticks`], a Substrate
//! runtime; and [`cut`], a relay that fails the network on cue. Only test code and
//! `attesta-sim` depend on this crate.
#![forbid(unsafe_code)]

pub mod chopsticks;
pub mod cut;
pub mod garage;
