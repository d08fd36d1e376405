//! Integration tests: every test starts its own nats-server (2.15, on a free port, in a
//! temporary directory) and its own PostgreSQL database, then runs the real roles.

mod bad_input;
mod batches;
mod checkout_flow;
mod cluster;
mod endings;
mod faults;
mod flash_sale;
mod helpers;
mod idempotency;
mod inventory;
mod nats_auth;
mod observability;
mod outages;
mod partitions;
mod payments;
mod pricing;
mod retention;
mod security;
mod traces;
