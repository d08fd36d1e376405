//! The test harness, by concern: the servers a test owns (`servers`), the app under test
//! (`app`) and the client's verbs (`client`).

mod app;
mod client;
mod pg_cluster;
mod servers;

pub use app::*;
pub use client::*;
pub use pg_cluster::*;
pub use servers::*;
