//! The root package's integration, end-to-end and docs tests, built as one
//! test binary: each file of `tests/` is a module of it (`tests/openai.rs`
//! is `openai::`), and `tests/common/` is compiled once for all of them
//! instead of once per file, and the dependency tree is linked once:
//! building the tests after a change to every crate took 433 s here as
//! 24 binaries, 231 s as one (docs/testing.md).
//!
//! Run one file's tests with its module path as the filter:
//! `cargo test --release --test suite -- openai:: --test-threads=1`.
//! Tests run one at a time (`scripts/test` passes `--test-threads=1`), so
//! what one file's tests start never shares the machine with another's.

mod common;

mod auth;
mod batching;
mod chaos;
mod chat;
mod cluster;
mod containers;
mod doc_commands;
mod docs;
mod e2e;
mod failover;
mod http_hardening;
mod infer;
mod kv_routing;
mod layout;
mod load;
mod metrics;
mod openai;
mod registry_trust;
mod router;
mod routing;
mod security;
mod serve;
mod tracing;
mod worker_faults;
