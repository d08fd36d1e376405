//! Sold-out notices: a fast "no" at every edge when a SKU has run out, without asking
//! PostgreSQL. The reserve step stays the authority; a notice only ever refuses, never promises.
//!
//! - `stock.short.<sku token>` (payload: the units still available, e.g. `0`): the reserve step
//!   could not hold a line. Every edge remembers it for `edge.sold_out_ttl` (2 s), refreshed by
//!   each new notice, and refuses add-to-cart and checkout for more than that many units with
//!   `409 out_of_stock`.
//! - `stock.available.<sku token>`: units came back (a restock, a released or expired hold);
//!   every edge forgets the SKU at once. The edge that made a restock forgets it before it
//!   answers, so its next add-to-cart never sees its own stale notice.
//!
//! Notices carry the stock row's version (`Stock-Version`, bumped by every change of the row),
//! and an edge keeps only the newest it has heard per SKU: a shortage computed before a
//! restock (a reserve batch that committed just before it, or whose notice travelled slower)
//! cannot mark the SKU sold out again after the restock's notice. A notice without a version
//! (an older process) is applied as it comes.
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
/// Header carrying the stock row's version a notice describes.
pub const HEADER_VERSION: &str = "Stock-Version";

/// Announces that `sku` could not serve a line: `available` units are left as of the stock
/// row's `version`.
pub fn announce_short(
    client: &async_nats::Client,
    sku: &str,
    available: i64,
    version: Option<i64>,
) {
    announce(
        client,
        SHORT_PREFIX,
        sku,
        available.max(0).to_string(),
        version,
    );
}

/// Announces that units of `sku` came back, as of the stock row's `version`.
pub fn announce_available(client: &async_nats::Client, sku: &str, version: i64) {
    announce(client, AVAILABLE_PREFIX, sku, String::new(), Some(version));
}

fn announce(
    client: &async_nats::Client,
    prefix: &str,
    sku: &str,
    payload: String,
    version: Option<i64>,
) {
    let Ok(sku) = Sku::parse(sku) else { return };
    let subject = format!("{prefix}.{}", sku_token(&sku));
    let mut headers = async_nats::HeaderMap::new();
    if let Some(version) = version {
        headers.insert(HEADER_VERSION, version.to_string().as_str());
    }
    let client = client.clone();
    // Fire and forget: the change is committed; a lost notice only costs speed.
    tokio::spawn(async move {
        let _ = client
            .publish_with_headers(subject, headers, payload.into())
            .await;
    });
}

/// What an edge knows of one SKU.
#[derive(Clone, Copy)]
struct Known {
    /// The newest stock version any notice told of.
    version: Option<i64>,
    /// Units left and until when that is believed, if the SKU is short.
    short: Option<(i64, Instant)>,
    /// Last notice, for pruning.
    heard: Instant,
}

/// An edge's memory of sold-out SKUs.
#[derive(Clone)]
pub struct SoldOut {
    known: Arc<Mutex<HashMap<String, Known>>>,
    ttl: Duration,
}

/// How long a SKU's version is remembered after its last notice: far longer than any notice
/// takes to arrive, so a late stale one still finds the newer version it lost to.
const REMEMBER_VERSIONS: Duration = Duration::from_secs(60);

impl SoldOut {
    /// An empty memory whose entries last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            known: Arc::default(),
            ttl,
        }
    }

    /// Whether `qty` of `sku` is known not to be there (recently).
    pub fn refuses(&self, sku: &str, qty: i64) -> bool {
        let Ok(known) = self.known.lock() else {
            return false;
        };
        known
            .get(sku)
            .and_then(|k| k.short)
            .is_some_and(|(available, until)| Instant::now() < until && qty > available)
    }

    /// A shortage notice: believed unless a newer version was heard.
    pub fn short(&self, sku: String, available: i64, version: Option<i64>) {
        let until = Instant::now() + self.ttl;
        self.heard(sku, version, Some((available, until)));
    }

    /// Units came back (as of `version`): forget the shortage unless a newer one was heard.
    pub fn available(&self, sku: &str, version: Option<i64>) {
        self.heard(sku.to_owned(), version, None);
    }

    fn heard(&self, sku: String, version: Option<i64>, short: Option<(i64, Instant)>) {
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        let now = Instant::now();
        if known.len() > 100_000 {
            known.retain(|_, k| {
                k.short.is_some_and(|(_, until)| until > now)
                    || now.duration_since(k.heard) < REMEMBER_VERSIONS
            });
        }
        let entry = known.entry(sku).or_insert(Known {
            version: None,
            short: None,
            heard: now,
        });
        if let (Some(theirs), Some(newest)) = (version, entry.version) {
            if theirs < newest {
                return;
            }
        }
        entry.version = version.or(entry.version);
        entry.short = short;
        entry.heard = now;
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
                        self.short(sku_from_token(token), left, version_of(&msg));
                    }
                }
                Some(msg) = available.next() => {
                    if let Some(token) = msg.subject.strip_prefix(&format!("{AVAILABLE_PREFIX}.")) {
                        self.available(&sku_from_token(token), version_of(&msg));
                    }
                }
                else => return,
            }
        }
    }
}

fn version_of(msg: &async_nats::Message) -> Option<i64> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(HEADER_VERSION))
        .and_then(|v| v.as_str().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_more_than_is_left_and_only_for_a_while() {
        let memory = SoldOut::new(Duration::from_millis(50));
        assert!(!memory.refuses("TEE", 1));
        memory.short("TEE".into(), 1, None);
        assert!(!memory.refuses("TEE", 1));
        assert!(memory.refuses("TEE", 2));
        memory.short("TEE".into(), 0, None);
        assert!(memory.refuses("TEE", 1));
        memory.available("TEE", None);
        assert!(!memory.refuses("TEE", 1));
        memory.short("TEE".into(), 0, None);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!memory.refuses("TEE", 1), "a notice lasts only its TTL");
    }

    #[test]
    fn the_newest_version_wins_whatever_order_the_notices_come_in() {
        let memory = SoldOut::new(Duration::from_secs(60));
        memory.short("TEE".into(), 0, Some(7));
        memory.available("TEE", Some(8));
        // A shortage the reserve step saw before the restock arrives late: ignored.
        memory.short("TEE".into(), 0, Some(7));
        assert!(!memory.refuses("TEE", 1));
        // A later sale empties it again: believed.
        memory.short("TEE".into(), 0, Some(9));
        assert!(memory.refuses("TEE", 1));
        // An older restock's notice does not clear the newer shortage.
        memory.available("TEE", Some(8));
        assert!(memory.refuses("TEE", 1));
        // Notices without a version (an older process) apply as they come.
        memory.available("TEE", None);
        assert!(!memory.refuses("TEE", 1));
    }
}
