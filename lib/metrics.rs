//! Prometheus metrics through the `metrics` facade: one recorder per process, rendered at
//! `GET /metrics` (the edge's address, or `metrics.addr` for processes without an edge).
//!
//! Business counters are counted once per order, where the effect first commits (the terminal
//! order row, the recorded payment), never again on a redelivery. Gauges that describe
//! JetStream (backlogs, dead letters) are read from the server every few seconds (`backlog`).
//!
//! The lowest module of the crate: every layer records through these functions with plain
//! values (labels, counts, durations), so this module knows none of theirs.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Orders reaching a terminal status.
pub const ORDERS: &str = "checkout_orders_total";
/// Calls to the payment provider by operation and result.
pub const PAYMENT_OPERATIONS: &str = "checkout_payment_operations_total";
/// Authorizations our risk policy refused.
pub const FRAUD_FLAGS: &str = "checkout_fraud_flags_total";
/// Checkout lines rejected for lack of stock.
pub const STOCKOUTS: &str = "checkout_stockouts_total";
/// Handler time per saga step.
pub const STEP_DURATION: &str = "checkout_step_duration_seconds";
/// From the accepted request to the terminal status.
pub const END_TO_END: &str = "checkout_end_to_end_seconds";
/// A durable's unprocessed plus unacknowledged messages.
pub const CONSUMER_PENDING: &str = "checkout_consumer_pending_messages";
/// Messages in the dead-letter stream.
pub const DEADLETTERS: &str = "checkout_deadletter_messages";
/// Seconds since this process last read every backlog and the dead letters from JetStream.
pub const JETSTREAM_READ_AGE: &str = "checkout_jetstream_read_age_seconds";
/// The payment breaker: 0 closed, 1 half-open, 2 open.
pub const BREAKER: &str = "checkout_payment_breaker_state";
/// Requests the edge owes JetStream (its outbox).
pub const OUTBOX: &str = "checkout_outbox_unpublished";
/// Orders the watchdog failed (timed out).
pub const TIMEOUTS: &str = "checkout_watchdog_timeouts_total";
/// Rows the pruner removed, by table group.
pub const PRUNED: &str = "checkout_pruned_rows_total";
/// Accepted checkouts by where the edge found the cart it priced.
pub const CHECKOUT_CARTS: &str = "checkout_accepted_carts_total";
/// Provider webhooks by provider and result (accepted, duplicate, or why refused).
pub const PROVIDER_WEBHOOKS: &str = "checkout_provider_webhooks_total";
/// Payment challenges (3-D Secure) by how they ended.
pub const PAYMENT_CHALLENGES: &str = "checkout_payment_challenges_total";
/// New authorizations sent to the fallback provider.
pub const FALLBACK_ROUTINGS: &str = "checkout_payment_fallback_routings_total";
/// Merchant webhook messages queued for the shop's endpoints.
pub const WEBHOOK_QUEUED: &str = "checkout_webhook_messages_queued_total";
/// Merchant webhook delivery attempts by endpoint and result.
pub const WEBHOOK_DELIVERIES: &str = "checkout_webhook_deliveries_total";
/// Merchant webhook request latency by endpoint.
pub const WEBHOOK_LATENCY: &str = "checkout_webhook_delivery_seconds";
/// Merchant webhook deliveries due and not yet delivered, by endpoint.
pub const WEBHOOK_BACKLOG: &str = "checkout_webhook_backlog";
/// How long the oldest committed webhook message has waited behind a transaction still open
/// on the database server (no cursor reads past an open transaction's writes).
pub const WEBHOOK_HELD: &str = "checkout_webhook_held_seconds";
/// Times this process's pool followed the PostgreSQL primary to another server.
pub const DATABASE_PRIMARY_MOVES: &str = "checkout_database_primary_moves_total";
/// Endpoints disabled because they failed for the whole retry period.
pub const WEBHOOK_DISABLED: &str = "checkout_webhook_endpoints_disabled_total";
/// HTTP requests by route template, method and status class.
pub const HTTP_REQUESTS: &str = "checkout_http_requests_total";
/// HTTP request latency by route template and method.
pub const HTTP_DURATION: &str = "checkout_http_request_duration_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs this process's recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .map(PrometheusBuilder::build_recorder);
            let recorder = match recorder {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "metrics buckets refused; using defaults");
                    PrometheusBuilder::new().build_recorder()
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

/// The merchant webhook families.
fn describe_webhooks() {
    describe_counter!(
        WEBHOOK_QUEUED,
        "Merchant webhook messages queued (one per order event that an endpoint asked for; each endpoint reads it from its cursor)."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Merchant webhook delivery attempts by endpoint and result: delivered, failed (to be retried), gave_up (past webhooks.retry_period)."
    );
    describe_histogram!(
        WEBHOOK_LATENCY,
        metrics::Unit::Seconds,
        "Merchant webhook requests by endpoint, from connecting to the endpoint's status."
    );
    describe_gauge!(
        WEBHOOK_BACKLOG,
        "Merchant webhook messages not yet delivered by endpoint: not yet tried, or waiting for a retry (each counted up to 100,000)."
    );
    describe_gauge!(
        WEBHOOK_HELD,
        "Age of the oldest committed merchant webhook message no endpoint may read yet, because a transaction older than it is still open on the PostgreSQL server (0 when none waits)."
    );
    describe_counter!(
        WEBHOOK_DISABLED,
        "Merchant webhook endpoints disabled because every attempt failed for webhooks.retry_period."
    );
}

/// The Prometheus text exposition of everything recorded so far.
pub fn render() -> String {
    install().render()
}

fn describe() {
    describe_counter!(ORDERS, "Orders reaching a terminal status (confirmed or failed, with the reason), counted once per order.");
    describe_counter!(PAYMENT_OPERATIONS, "Payment provider calls by provider, operation (authorize, capture, void, refund) and result (succeeded, declined, failed, requires_action).");
    describe_counter!(FRAUD_FLAGS, "Authorizations refused by our risk policy.");
    describe_counter!(PROVIDER_WEBHOOKS, "Provider webhooks by provider and result: accepted, duplicate, or refused (signature, timestamp, amount, malformed).");
    describe_counter!(
        FALLBACK_ROUTINGS,
        "New authorizations sent to the fallback provider because the primary's breaker was open."
    );
    describe_counter!(PAYMENT_CHALLENGES, "Asynchronous authorizations (3-D Secure challenges, webhook answers) by outcome: approved, failed, expired, late_voided.");
    describe_counter!(STOCKOUTS, "Checkout lines rejected for lack of stock.");
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "Handler time per saga step."
    );
    describe_histogram!(
        END_TO_END,
        metrics::Unit::Seconds,
        "From the accepted checkout request to the order's terminal status."
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "A durable consumer's unprocessed plus unacknowledged messages."
    );
    describe_gauge!(DEADLETTERS, "Messages in the dead-letter stream.");
    describe_gauge!(
        JETSTREAM_READ_AGE,
        "Seconds since this process last read every consumer backlog and the dead letters from JetStream (the two gauges above keep their last reading meanwhile)."
    );
    describe_gauge!(
        BREAKER,
        "The payment provider's circuit breaker: 0 closed, 1 half-open, 2 open."
    );
    describe_gauge!(
        OUTBOX,
        "Events the edge owes JetStream (outbox rows not yet published)."
    );
    describe_counter!(
        TIMEOUTS,
        "Orders failed with reason timed_out because they were pending past the watchdog's limit (not those that settled before compensation took the watchdog's request)."
    );
    describe_counter!(
        PRUNED,
        "Rows the pruner removed past retention, by what they were (inbox, outbox, payment_attempts, stock_movements)."
    );
    describe_counter!(
        CHECKOUT_CARTS,
        "Accepted checkouts by where the edge found the cart it priced: remembered (its own last write, no read) or read (from PostgreSQL)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by route template, method and status class."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency by route template and method."
    );
    describe_counter!(
        DATABASE_PRIMARY_MOVES,
        "Times this process's pool followed the PostgreSQL primary to another server named in database.url (a failover or switchover)."
    );
    describe_webhooks();
    // Counters that may stay at zero for a long time are exported from the start, so that
    // rate() and alerts see them before their first event.
    counter!(FRAUD_FLAGS).increment(0);
    counter!(STOCKOUTS).increment(0);
    counter!(TIMEOUTS).increment(0);
    counter!(WEBHOOK_DISABLED).increment(0);
    counter!(DATABASE_PRIMARY_MOVES).increment(0);
    for cart in ["remembered", "read"] {
        counter!(CHECKOUT_CARTS, "cart" => cart).increment(0);
    }
}

/// An order reached its terminal status (call once, where that status commits): confirmed
/// (`failure` None) or failed with that reason.
pub fn order_ended(failure: Option<&'static str>, requested_at: DateTime<Utc>) {
    let (outcome, reason) = match failure {
        None => ("confirmed", ""),
        Some(reason) => ("failed", reason),
    };
    counter!(ORDERS, "outcome" => outcome, "reason" => reason).increment(1);
    let secs = (Utc::now() - requested_at).num_milliseconds().max(0) as f64 / 1000.0;
    histogram!(END_TO_END, "outcome" => outcome).record(secs);
}

/// One provider call's outcome.
pub fn payment_operation(provider: &'static str, operation: &'static str, result: &'static str) {
    counter!(PAYMENT_OPERATIONS, "operation" => operation, "result" => result, "provider" => provider)
        .increment(1);
}

/// A provider webhook: accepted, a duplicate, or refused (and why).
pub fn provider_webhook(provider: &str, result: &'static str) {
    counter!(PROVIDER_WEBHOOKS, "provider" => provider.to_owned(), "result" => result).increment(1);
}

/// An asynchronous authorization ended: approved, failed, expired, late_voided.
pub fn payment_challenge(outcome: &'static str) {
    counter!(PAYMENT_CHALLENGES, "outcome" => outcome).increment(1);
}

/// A new authorization went to the fallback provider (the primary's breaker was open).
pub fn fallback_routing() {
    counter!(FALLBACK_ROUTINGS).increment(1);
}

/// Our risk policy refused an authorization.
pub fn fraud_flag() {
    counter!(FRAUD_FLAGS).increment(1);
}

/// Lines rejected for lack of stock.
pub fn stockouts(lines: usize) {
    counter!(STOCKOUTS).increment(lines as u64);
}

/// Time a saga step spent on one message.
pub fn step_duration(step: &'static str, took: Duration) {
    histogram!(STEP_DURATION, "step" => step).record(took.as_secs_f64());
}

/// The breaker's state: 0 closed, 1 half-open, 2 open.
pub fn breaker(state: u8) {
    gauge!(BREAKER).set(f64::from(state));
}

/// Unpublished outbox rows.
pub fn outbox_unpublished(rows: i64) {
    gauge!(OUTBOX).set(rows as f64);
}

/// An order was failed for being pending past the watchdog's limit (call once, where that
/// failure commits).
pub fn watchdog_timed_out() {
    counter!(TIMEOUTS).increment(1);
}

/// Rows one pruning pass removed from a group of tables (inbox, outbox, ...).
pub fn pruned(table: &'static str, rows: u64) {
    counter!(PRUNED, "table" => table).increment(rows);
}

/// A checkout was accepted, its cart `remembered` by the edge or `read` from PostgreSQL.
pub fn checkout_accepted(cart: &'static str) {
    counter!(CHECKOUT_CARTS, "cart" => cart).increment(1);
}

/// One HTTP request.
pub fn http_request(route: String, method: String, status: u16, took: Duration) {
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => class)
        .increment(1);
    histogram!(HTTP_DURATION, "route" => route, "method" => method).record(took.as_secs_f64());
}

/// A durable's backlog (unprocessed plus unacknowledged), summed over the partitions.
pub fn consumer_pending(durable: &'static str, pending: u64) {
    gauge!(CONSUMER_PENDING, "consumer" => durable).set(pending as f64);
}

/// Messages in the dead-letter stream.
pub fn deadletters(messages: u64) {
    gauge!(DEADLETTERS).set(messages as f64);
}

/// How old the JetStream readings above are.
pub fn jetstream_read_age(age: Duration) {
    gauge!(JETSTREAM_READ_AGE).set(age.as_secs_f64());
}

/// Merchant webhook messages queued.
pub fn webhook_queued(messages: u64) {
    counter!(WEBHOOK_QUEUED).increment(messages);
}

/// One merchant webhook attempt: `delivered`, `failed` or `gave_up`, and how long it took.
pub fn webhook_attempt(endpoint: &str, result: &'static str, secs: f64) {
    counter!(WEBHOOK_DELIVERIES, "endpoint" => endpoint.to_owned(), "result" => result)
        .increment(1);
    histogram!(WEBHOOK_LATENCY, "endpoint" => endpoint.to_owned()).record(secs);
}

/// An endpoint's deliveries not yet delivered.
pub fn webhook_backlog(endpoint: &str, deliveries: i64) {
    gauge!(WEBHOOK_BACKLOG, "endpoint" => endpoint.to_owned()).set(deliveries as f64);
}

/// How long committed messages have waited behind an open transaction.
pub fn webhook_held(seconds: f64) {
    gauge!(WEBHOOK_HELD).set(seconds);
}

/// An endpoint was disabled for failing through the whole retry period.
pub fn webhook_endpoint_disabled() {
    counter!(WEBHOOK_DISABLED).increment(1);
}

/// The pool followed the PostgreSQL primary to another server.
pub fn record_primary_move() {
    counter!(DATABASE_PRIMARY_MOVES).increment(1);
}
