//! Sold-out notices: a fast "no" at every edge when a SKU has run out, without asking
//! PostgreSQL. The reserve step stays the authority; a notice only ever refuses, never promises.
//!
//! - `stock.short.<sku token>` (payload: the units still available, e.g. `0`): the reserve step
//!   could not hold a line. Every edge remembers it for `edge.sold_out_ttl` (2 s), refreshed by
//!   each new notice, and refuses add-to-cart and checkout for more than that many units with
//!   `409 out_of_stock`.
//! - `stock.available.<sku token>`: units came back (a restock, a released or expired hold);
//!   every edge forgets the SKU at once.
//!
//! Core NATS (at most once, fan-out to every edge): a lost notice costs at most the TTL of wrong
//! refusals, or one buyer walking the saga to the reserve step's authoritative answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::catalog::{sku_from_token, sku_token};
use crate::domain::Sku;

/// Subject prefix of shortage notices.
pub const SHORT_PREFIX: &str = "stock.short";
/// Subject prefix of availability notices.
pub const AVAILABLE_PREFIX: &str = "stock.available";

/// Announces that `sku` could not serve a line: `available` units are left.
pub fn announce_short(client: &async_nats::Client, sku: &str, available: i64) {
    let Ok(sku) = Sku::parse(sku) else { return };
    let subject = format!("{SHORT_PREFIX}.{}", sku_token(&sku));
    let client = client.clone();
    // Fire and forget: the step's transaction is committed; a lost notice only costs speed.
    tokio::spawn(async move {
        let _ = client
            .publish(subject, available.max(0).to_string().into())
            .await;
    });
}

/// Announces that units of `sku` came back.
pub fn announce_available(client: &async_nats::Client, sku: &str) {
    let Ok(sku) = Sku::parse(sku) else { return };
    let subject = format!("{AVAILABLE_PREFIX}.{}", sku_token(&sku));
    let client = client.clone();
    tokio::spawn(async move {
        let _ = client.publish(subject, bytes::Bytes::new()).await;
    });
}

/// An edge's memory of sold-out SKUs.
#[derive(Clone)]
pub struct SoldOut {
    short: Arc<Mutex<HashMap<String, (i64, Instant)>>>,
    ttl: Duration,
}

impl SoldOut {
    /// An empty memory whose entries last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            short: Arc::default(),
            ttl,
        }
    }

    /// Whether `qty` of `sku` is known not to be there (recently).
    pub fn refuses(&self, sku: &str, qty: i64) -> bool {
        let Ok(short) = self.short.lock() else {
            return false;
        };
        short
            .get(sku)
            .is_some_and(|(available, until)| Instant::now() < *until && qty > *available)
    }

    fn short(&self, sku: String, available: i64) {
        if let Ok(mut short) = self.short.lock() {
            short.insert(sku, (available, Instant::now() + self.ttl));
            if short.len() > 100_000 {
                let now = Instant::now();
                short.retain(|_, (_, until)| *until > now);
            }
        }
    }

    fn available(&self, sku: &str) {
        if let Ok(mut short) = self.short.lock() {
            short.remove(sku);
        }
    }

    /// Follows the notices until shutdown.
    pub async fn follow(self, client: async_nats::Client, shutdown: CancellationToken) {
        let subs = tokio::try_join!(
            client.subscribe(format!("{SHORT_PREFIX}.*")),
            client.subscribe(format!("{AVAILABLE_PREFIX}.*"))
        );
        let (mut short, mut available) = match subs {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow sold-out notices; every buyer goes to the reserve step");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(msg) = short.next() => {
                    if let Some(token) = msg.subject.strip_prefix(&format!("{SHORT_PREFIX}.")) {
                        let left = std::str::from_utf8(&msg.payload)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        self.short(sku_from_token(token), left);
                    }
                }
                Some(msg) = available.next() => {
                    if let Some(token) = msg.subject.strip_prefix(&format!("{AVAILABLE_PREFIX}.")) {
                        self.available(&sku_from_token(token));
                    }
                }
                else => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_more_than_is_left_and_only_for_a_while() {
        let memory = SoldOut::new(Duration::from_millis(50));
        assert!(!memory.refuses("TEE", 1));
        memory.short("TEE".into(), 1);
        assert!(!memory.refuses("TEE", 1));
        assert!(memory.refuses("TEE", 2));
        memory.short("TEE".into(), 0);
        assert!(memory.refuses("TEE", 1));
        memory.available("TEE");
        assert!(!memory.refuses("TEE", 1));
        memory.short("TEE".into(), 0);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!memory.refuses("TEE", 1), "a notice lasts only its TTL");
    }
}
