//! # checkout
//!
//! A resilient e-commerce checkout: a thin HTTP edge and a choreographed saga over NATS
//! JetStream, with PostgreSQL as the system of record.
//!
//! ## How a checkout flows through the code
//!
//! 1. The [`edge`] service: [`edge::http`] accepts `POST /api/checkout`; [`edge::checkout`]
//!    prices a snapshot of the [`edge::cart`] with [`pricing`] (current [`catalog`] prices,
//!    promotion, tax, shipping), records the request under its Idempotency-Key and publishes
//!    `checkout.requested` through [`edge::outbox`] (which republishes after a crash).
//! 2. [`inventory`]'s reserve step holds stock for every line or none: `reserved` / `rejected`.
//! 3. [`payments`]' authorize step asks the PSP ([`payments::sandbox_client`]; in development
//!    the `sandbox-psp` crate's server) with a per-order idempotency key: `authorized` / `declined`.
//! 4. [`orders`]' order step, in one transaction, takes the units out of stock
//!    ([`inventory`]'s commit, re-taking a lapsed hold if it can) and creates the confirmed
//!    order: `confirmed` / `rejected`. Expired holds are swept back to available stock.
//! 5. [`compensate`] answers `rejected` and `declined`: releases stock, voids an
//!    authorization, records the failed order: `failed`.
//!
//! ## Plumbing
//!
//! - [`saga`]: event kinds and types, subjects and dedup ids, the saga's streams and the
//!   partition check ([`saga::streams`]), the one shape of every step ([`saga::step`]: input,
//!   outside work, effects), what the runner does with it ([`saga::apply`]: the inbox that makes
//!   every step idempotent, the commit, publishing, acks), [`saga::outgoing`] (an encoded event
//!   with its headers), and the pull loops ([`saga::runner`]: ack only after commit and
//!   PublishAck; nak, term, dead letter).
//! - [`bus`]: JetStream connection, stream and consumer declarations, publishing anything
//!   `Publishable`; it knows no saga.
//! - [`metrics`]: the recorder and one function per metric, with plain values (the lowest
//!   module: every layer records through it); [`backlog`]: the JetStream gauges.
//! - [`db`]: pool and embedded migrations. [`config`]: settings. [`telemetry`]: tracing.
//! - [`app`]: roles (`edge`, `reserve`, `authorize`, `order`, `compensate`); start-up
//!   loops over them, and each service's `start` ([`edge::Edge`], [`inventory::start`],
//!   [`payments::start`], [`orders::start`], [`compensate::start`]) adds its steps and loops to
//!   the process's [`tasks`].
//! - [`domain`]: value types that parse (SKU, quantity, money, address) and `text_enum!` for
//!   stored states ([`orders::OrderStatus`], [`orders::Action`], [`payments::PaymentStatus`]).
//!   [`auth`]: JWTs.
//! - [`retention`]: the pruner that keeps inbox, outbox and ledger tables bounded.
//! - [`payments::breaker_status`]: circuit-breaker states shared through a JetStream
//!   key-value bucket.

pub mod app;
pub mod audit;
pub mod auth;
pub mod backlog;
pub mod bus;
pub mod catalog;
pub mod compensate;
pub mod config;
pub mod db;
pub mod domain;
pub mod edge;
pub mod inventory;
pub mod metrics;
pub mod orders;
pub mod payments;
pub mod pricing;
pub mod retention;
pub mod saga;
pub mod tasks;
pub mod telemetry;
pub mod webhooks;
