//! Feature suites of the end-to-end tests, beside the foundation tests in main.rs.

mod brokers;
mod cluster;
mod faults;
mod fence;
pub(crate) mod ops;
mod replicas;
mod rules;
mod sentinel;
mod silent;
mod standby;
mod streaming;
mod tls;
