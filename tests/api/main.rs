//! Integration tests: every test starts its own nats-server (2.15, on a free port, in a
//! temporary directory) and its own PostgreSQL database, then runs the real roles.

// Tests state what they expect with expect() and compare exact figures: the library's stricter
// lints (Cargo.toml [lints]) are not for them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::pedantic)]

mod bad_input;
mod batches;
mod challenges;
mod checkout_flow;
mod cluster;
mod endings;
mod fallback;
mod faults;
mod flash_sale;
mod group_commit;
mod helpers;
mod idempotency;
mod inventory;
mod leases;
mod merchant_webhooks;
mod nats_auth;
mod observability;
mod old_server;
mod outages;
mod partitions;
mod payments;
mod pg_cluster;
mod pricing;
mod readme;
mod retention;
mod security;
mod shipments;
mod traces;
mod upgrade;
