//! The load driver: virtual users who add to a cart and check out over real HTTP; a checkout's
//! latency runs from `POST /api/checkout` until its `confirmed` or `failed` event is seen on NATS.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::bench::BenchError;
use crate::stats::RunStats;

/// What the buyers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Many SKUs with ample stock.
    Spread,
    /// One SKU, far more buyers than units: a flash sale.
    Hot,
    /// Spread, with a few percent declined cards and slow payments.
    Mixed,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Self::Spread),
            "hot" => Ok(Self::Hot),
            "mixed" => Ok(Self::Mixed),
            other => Err(format!("unknown scenario {other} (spread, hot, mixed)")),
        }
    }
}

/// How to drive one run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub base: String,
    pub nats_url: String,
    pub jwt_secret: String,
    pub scenario: Scenario,
    /// Concurrent users (closed loop) or the in-flight cap (open loop).
    pub users: usize,
    pub duration: Duration,
    /// Arrivals per second; `None` runs closed-loop.
    pub rate: Option<f64>,
    pub seed: u64,
    pub skus: usize,
    /// Units on sale in the hot scenario.
    pub hot_units: i64,
    /// Buyers in the hot scenario.
    pub hot_buyers: usize,
    pub quiet: bool,
    /// Put the products and their stock first (a phase of an alternating run has them).
    pub prepare: bool,
}

enum Slot {
    Waiting(oneshot::Sender<(Instant, bool)>),
    Done(Instant, bool),
}

/// Matches settled orders seen on NATS with the buyers waiting for them.
#[derive(Clone, Default)]
struct Settlements(Arc<Mutex<HashMap<Uuid, Slot>>>);

impl Settlements {
    fn settle(&self, order_id: Uuid, confirmed: bool) {
        let now = Instant::now();
        let Ok(mut map) = self.0.lock() else { return };
        match map.remove(&order_id) {
            Some(Slot::Waiting(tx)) => {
                let _ = tx.send((now, confirmed));
            }
            // Settled before the buyer registered (faster than the HTTP reply), or a repeat.
            Some(done @ Slot::Done(..)) => {
                map.insert(order_id, done);
            }
            None => {
                map.insert(order_id, Slot::Done(now, confirmed));
            }
        }
    }

    async fn wait(&self, order_id: Uuid, timeout: Duration) -> Option<(Instant, bool)> {
        let rx = {
            let mut map = self.0.lock().ok()?;
            if let Some(Slot::Done(at, ok)) = map.remove(&order_id) {
                return Some((at, ok));
            }
            let (tx, rx) = oneshot::channel();
            map.insert(order_id, Slot::Waiting(tx));
            rx
        };
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

fn token(secret: &str, user: &str, admin: bool) -> Result<String, BenchError> {
    checkout::auth::mint(secret, user, admin, Duration::from_secs(24 * 3600))
        .map_err(|e| BenchError::Setup(e.to_string()))
}

fn sku_name(i: usize) -> String {
    format!("BENCH-{i:05}")
}

/// Creates the scenario's products and stock through the admin API.
pub async fn prepare(http: &reqwest::Client, opts: &LoadOptions) -> Result<(), BenchError> {
    let admin = token(&opts.jwt_secret, "bench-admin", true)?;
    let products: Vec<(String, i64)> = match opts.scenario {
        Scenario::Hot => vec![("HOT-1".to_owned(), opts.hot_units)],
        _ => (0..opts.skus)
            .map(|i| (sku_name(i), 1_000_000_000))
            .collect(),
    };
    for (sku, units) in products {
        let put = |path: String, body: Value| {
            http.put(format!("{}{path}", opts.base))
                .bearer_auth(&admin)
                .json(&body)
                .send()
        };
        let price = format!("{}.{:02}", 5 + sku.len() % 20, sku.len() % 100);
        let r = put(
            format!("/api/admin/products/{sku}"),
            json!({"name": sku, "price": price, "currency": "USD", "weightGrams": 250}),
        )
        .await?;
        check(r, "create product").await?;
        let r = put(format!("/api/admin/stock/{sku}"), json!({"onHand": units})).await?;
        check(r, "set stock").await?;
    }
    Ok(())
}

async fn check(r: reqwest::Response, what: &str) -> Result<reqwest::Response, BenchError> {
    if r.status().is_success() {
        Ok(r)
    } else {
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        Err(BenchError::Setup(format!("{what}: HTTP {status}: {text}")))
    }
}

/// How one buyer's checkout ended.
struct Outcome {
    latency: Duration,
    /// `Some(confirmed)` for an order, `None` for a 409 `out_of_stock` at the edge.
    order: Option<bool>,
    retries: u64,
}

/// Most retries of one request after 503/429, and the longest wait honoured.
const MAX_RETRIES: u64 = 30;
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// Sends a request, repeating it after a 503 or 429 as its `Retry-After` says (with jitter,
/// bounded), like a well-behaved client; counts the repeats.
async fn send_patiently(
    request: impl Fn() -> reqwest::RequestBuilder,
    retries: &mut u64,
) -> Result<reqwest::Response, String> {
    loop {
        let response = request().send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        if (status != 503 && status != 429) || *retries >= MAX_RETRIES {
            return Ok(response);
        }
        let after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let Some(after) = after else {
            return Ok(response);
        };
        *retries += 1;
        let jitter = 0.5 + rand::random::<f64>();
        let wait = Duration::from_secs_f64(after * jitter).min(MAX_RETRY_WAIT);
        tokio::time::sleep(wait).await;
    }
}

/// One buyer's checkout: add one item, check out, wait for the saga to settle.
async fn one_checkout(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    sku: &str,
    card: &str,
    key: &str,
    settlements: &Settlements,
) -> Result<Outcome, String> {
    let mut retries = 0;
    let begun = Instant::now();
    let r = send_patiently(
        || {
            http.post(format!("{base}/api/cart/items"))
                .bearer_auth(token)
                .json(&json!({"sku": sku, "qty": 1}))
        },
        &mut retries,
    )
    .await?;
    if r.status().as_u16() == 409 {
        return Ok(Outcome {
            latency: begun.elapsed(),
            order: None,
            retries,
        });
    }
    if !r.status().is_success() {
        return Err(format!("add: HTTP {}", r.status()));
    }
    let cart: Value = r.json().await.map_err(|e| e.to_string())?;
    let cart_id = cart["cartId"].as_str().unwrap_or_default().to_owned();
    let started = Instant::now();
    let body = json!({
        "cartId": cart_id,
        "paymentMethod": {"token": card},
        "address": {"name": "Bench Buyer", "line1": "1 Load St", "city": "Berlin",
                    "postalCode": "10115", "country": "DE"}
    });
    let r = send_patiently(
        || {
            http.post(format!("{base}/api/checkout"))
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .json(&body)
        },
        &mut retries,
    )
    .await?;
    if r.status().as_u16() == 409 {
        return Ok(Outcome {
            latency: begun.elapsed(),
            order: None,
            retries,
        });
    }
    if r.status().as_u16() != 202 {
        return Err(format!("checkout: HTTP {}", r.status()));
    }
    let body: Value = r.json().await.map_err(|e| e.to_string())?;
    let order_id = body["orderId"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or("checkout: no orderId")?;
    let (at, confirmed) = settlements
        .wait(order_id, Duration::from_secs(60))
        .await
        .ok_or_else(|| format!("order {order_id} did not settle in 60 s"))?;
    Ok(Outcome {
        latency: at.saturating_duration_since(started),
        order: Some(confirmed),
        retries,
    })
}

/// Watches the saga's settlements on NATS (confirmed and failed), matching them with the
/// buyers waiting for them.
async fn watch(nats_url: &str) -> Result<(Settlements, tokio::task::JoinHandle<()>), BenchError> {
    let settlements = Settlements::default();
    let client = async_nats::connect(nats_url)
        .await
        .map_err(|e| BenchError::Setup(format!("nats: {e}")))?;
    let mut confirmed_sub = client
        .subscribe("checkout.confirmed.>")
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut failed_sub = client
        .subscribe("checkout.failed.>")
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let watcher = {
        let settlements = settlements.clone();
        tokio::spawn(async move {
            loop {
                let (msg, ok) = tokio::select! {
                    Some(m) = confirmed_sub.next() => (m, true),
                    Some(m) = failed_sub.next() => (m, false),
                    else => break,
                };
                // checkout.<event>.<order_id>, and .<partition> after it when partitioned.
                if let Some(id) = msg
                    .subject
                    .split('.')
                    .nth(2)
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    settlements.settle(id, ok);
                }
            }
        })
    };
    Ok((settlements, watcher))
}

/// Runs the scenario and returns what it measured.
pub async fn drive(opts: &LoadOptions) -> Result<RunStats, BenchError> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.users.max(1))
        .timeout(Duration::from_secs(30))
        .build()?;
    if opts.prepare {
        prepare(&http, opts).await?;
    }
    let (settlements, watcher) = watch(&opts.nats_url).await?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = (!opts.quiet).then(|| {
        let (done, errors) = (done.clone(), errors.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(0.001);
                eprint!(
                    "\r  {:>5.1}s  settled {:>7}  {:>8.1}/s  errors {:>4}   ",
                    secs,
                    n,
                    n as f64 / secs,
                    errors.load(Ordering::Relaxed)
                );
                let _ = std::io::stderr().flush();
            }
        })
    });
    let deadline = started + opts.duration;
    let mut workers = tokio::task::JoinSet::new();
    let buyers = match opts.scenario {
        Scenario::Hot => opts.hot_buyers,
        _ => opts.users,
    };
    let spawn_buyer = |workers: &mut tokio::task::JoinSet<RunStats>, index: usize, repeat: bool| {
        let http = http.clone();
        let opts = opts.clone();
        let settlements = settlements.clone();
        let (done, errors) = (done.clone(), errors.clone());
        workers.spawn(async move {
            let mut stats = RunStats::default();
            let mut rng =
                StdRng::seed_from_u64(opts.seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
            let user = format!("bench-{}-{index}", opts.seed);
            let Ok(token) = token(&opts.jwt_secret, &user, false) else {
                stats.errors += 1;
                return stats;
            };
            loop {
                let sku = match opts.scenario {
                    Scenario::Hot => "HOT-1".to_owned(),
                    _ => sku_name(rng.gen_range(0..opts.skus.max(1))),
                };
                // Mixed: 5 % declined cards and 2 % slow (~1 s) authorizations.
                let card = match (opts.scenario, rng.gen_range(0..100)) {
                    (Scenario::Mixed, 0..=4) => "tok_declined",
                    (Scenario::Mixed, 5..=6) => "tok_slow",
                    _ => "tok_visa",
                };
                let key = format!("{:032x}", rng.gen::<u128>());
                match one_checkout(&http, &opts.base, &token, &sku, card, &key, &settlements).await
                {
                    Ok(outcome) => {
                        stats.retries += outcome.retries;
                        match outcome.order {
                            Some(confirmed) => stats.record(outcome.latency, confirmed),
                            None => stats.refuse(outcome.latency),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if stats.errors < 3 {
                            tracing::warn!(error = %e, "checkout failed");
                        }
                        stats.errors += 1;
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if !repeat || Instant::now() >= deadline {
                    return stats;
                }
            }
        });
    };
    // Open loop reaps finished buyers as it goes; their numbers land here.
    let mut early = RunStats::default();
    match (opts.scenario, opts.rate) {
        (Scenario::Hot, _) => {
            for i in 0..buyers {
                spawn_buyer(&mut workers, i, false);
            }
        }
        (_, None) => {
            for i in 0..buyers {
                spawn_buyer(&mut workers, i, true);
            }
        }
        (_, Some(rate)) => {
            // Open loop: arrivals on a fixed schedule, whatever the latency.
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let mut next = Instant::now();
            let mut index = 0usize;
            while Instant::now() < deadline {
                if workers.len() < opts.users.max(1) * 16 {
                    spawn_buyer(&mut workers, index, false);
                    index += 1;
                }
                while let Some(finished) = workers.try_join_next() {
                    if let Ok(s) = finished {
                        early.merge(s);
                    }
                }
                next += interval;
                tokio::time::sleep_until(next.into()).await;
            }
        }
    }
    let mut stats = early;
    while let Some(result) = workers.join_next().await {
        if let Ok(s) = result {
            stats.merge(s);
        }
    }
    stats.elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    watcher.abort();
    Ok(stats)
}
