//! Feature suites of the end-to-end tests, beside the foundation tests in main.rs.

mod ops;
mod rules;
