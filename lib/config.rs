//! Settings: the defaults file compiled into the binary, then `CHECKOUT__SECTION__KEY` env vars.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// The defaults, embedded so that the binary runs from any directory.
const DEFAULTS: &str = include_str!("../config/default.toml");

/// Everything a role needs to start.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub nats: NatsSettings,
    pub consumer: ConsumerSettings,
    pub auth: AuthSettings,
    pub psp: PspSettings,
    pub inventory: InventorySettings,
    pub payments: PaymentsSettings,
    pub edge: EdgeSettings,
    pub watchdog: WatchdogSettings,
    pub retention: RetentionSettings,
    pub metrics: MetricsSettings,
    pub telemetry: TelemetrySettings,
    pub runtime: RuntimeSettings,
    pub chaos: ChaosSettings,
    pub webhooks: WebhooksSettings,
}

/// The HTTP edge.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    pub addr: String,
    pub body_limit_bytes: usize,
    /// How long requests in flight may finish after SIGTERM before their connections close.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// PostgreSQL, the system of record.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub migrate_on_start: bool,
    /// How long a group-committed statement waits for company while another is in flight.
    #[serde(with = "humantime_serde")]
    pub group_linger: Duration,
    /// With several servers in `url`: how often each is asked whether it is the primary.
    #[serde(with = "humantime_serde")]
    pub primary_probe_interval: Duration,
}

/// JetStream streams and consumer defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct NatsSettings {
    /// One server URL, or several separated by commas (a cluster's seeds).
    pub url: String,
    /// Credentials: a user and password, or a `.creds` file (JWT + nkey); empty: none.
    pub user: String,
    pub password: Secret,
    pub creds_file: String,
    /// A CA certificate (PEM) to trust for `tls://` connections; empty: the system's roots.
    pub tls_ca_file: String,
    #[serde(with = "humantime_serde")]
    pub stream_max_age: Duration,
    /// Bytes the saga streams (all partitions together) and the dead-letter stream may hold
    /// (-1: no limit).
    pub stream_max_bytes: i64,
    pub deadletter_max_bytes: i64,
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    pub replicas: usize,
    /// Saga partitions K: one stream per partition (`CHECKOUT-<p>`) when above 1.
    pub partitions: u32,
    /// The partitions this process consumes; empty: all of them.
    pub own_partitions: Vec<u32>,
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

impl NatsSettings {
    /// The partitions this process consumes: `own_partitions`, or every one.
    pub fn owned_partitions(&self) -> Vec<u32> {
        if self.own_partitions.is_empty() {
            (0..self.partitions).collect()
        } else {
            self.own_partitions.clone()
        }
    }

    /// The server URLs of `url`: the client starts with any that answers and learns the rest
    /// of the cluster from it.
    pub fn servers(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// How each consumer process pulls and retries.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerSettings {
    pub concurrency: usize,
    pub batch: usize,
    /// How long a `Batch` step waits for more messages to join a group before handling it.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    #[serde(with = "humantime_serde")]
    pub pull_expires: Duration,
    #[serde(with = "humantime_serde")]
    pub nak_base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub nak_max_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub newer_schema_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Bearer-token verification.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    pub jwt_secret: Secret,
    pub jwks_file: String,
    pub issuer: String,
    pub audience: String,
}

/// The payment service provider (the sandbox PSP, `sandbox-psp`, in development and tests).
#[derive(Debug, Clone, Deserialize)]
pub struct PspSettings {
    /// Secrets the provider signs its webhooks with (comma-separated; any of them verifies,
    /// so a rotation keeps the old one until the provider has switched).
    pub webhook_secrets: Secret,
    /// How old a webhook's signed timestamp may be (replays of a captured delivery).
    #[serde(with = "humantime_serde")]
    pub webhook_tolerance: Duration,
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A second provider for new authorizations while the primary's breaker is open; empty for none.
    pub fallback_url: String,
    /// The fallback's name, as recorded on payments and in its webhook route.
    pub fallback_name: String,
    /// The secrets the fallback signs its webhooks with (another account or PSP has its own);
    /// empty: `webhook_secrets`.
    pub fallback_webhook_secrets: Secret,
}

/// Retries, fraud policy, rate limit and circuit breaker for the payment provider.
#[derive(Debug, Clone, Deserialize)]
pub struct PaymentsSettings {
    /// Keys sealing payment tokens on the bus (hex, comma-separated, newest first).
    pub token_keys: Secret,
    pub max_attempts: i32,
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    #[serde(with = "humantime_serde")]
    pub reconcile_delay: Duration,
    pub max_risk_score: u8,
    pub rate_limit_per_s: f64,
    #[serde(with = "humantime_serde")]
    pub breaker_window: Duration,
    pub breaker_min_calls: u32,
    pub breaker_failure_rate: f64,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    pub breaker_half_open_probes: u32,
    /// How long a buyer has for the provider's challenge (3-D Secure) before the order fails.
    #[serde(with = "humantime_serde")]
    pub action_timeout: Duration,
    /// How often each authorize process looks for challenges past `action_timeout`.
    #[serde(with = "humantime_serde")]
    pub action_sweep_interval: Duration,
    /// How long a pending payment waits for the provider's webhook before the provider is asked.
    #[serde(with = "humantime_serde")]
    pub webhook_grace: Duration,
}

/// Merchant webhooks: delivering order events to the shop's endpoints (Standard Webhooks).
#[derive(Debug, Clone, Deserialize)]
pub struct WebhooksSettings {
    /// Endpoints on private, loopback or link-local addresses are refused unless this is set.
    pub allow_private_targets: bool,
    /// One delivery request, connecting included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a delivery is retried; an endpoint failing for all of it is disabled.
    #[serde(with = "humantime_serde")]
    pub retry_period: Duration,
    /// The first retry's wait, doubled at each attempt up to `backoff_max`, with full jitter.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Requests in flight per endpoint and process: a slow endpoint fills its own slots only.
    pub max_in_flight_per_endpoint: usize,
    /// How often each process looks for deliveries due.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// The most of an endpoint's answer read (its status is what counts).
    pub max_response_bytes: usize,
}

/// Stock reservations.
#[derive(Debug, Clone, Deserialize)]
pub struct InventorySettings {
    #[serde(with = "humantime_serde")]
    pub reservation_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
    pub expiry_batch: i64,
}

/// The edge's outbox of checkout requests.
#[derive(Debug, Clone, Deserialize)]
pub struct EdgeSettings {
    #[serde(with = "humantime_serde")]
    pub outbox_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub outbox_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub outbox_max_backoff: Duration,
    /// The marker records published rows at most once per this interval (one commit).
    #[serde(with = "humantime_serde")]
    pub outbox_mark_every: Duration,
    pub cart_max_lines: i64,
    #[serde(with = "humantime_serde")]
    pub sold_out_ttl: Duration,
    pub max_in_flight: usize,
    pub requests_per_user_per_s: u32,
    pub requests_per_user_burst: u32,
    pub checkouts_per_user_per_min: u32,
    pub checkouts_per_user_burst: u32,
    #[serde(with = "humantime_serde")]
    pub admission_wait: Duration,
    pub product_cache_capacity: u64,
    #[serde(with = "humantime_serde")]
    pub product_cache_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub rates_cache_ttl: Duration,
    /// Carts whose last write each edge process remembers, so their checkout skips a read.
    pub seen_carts_capacity: u64,
    #[serde(with = "humantime_serde")]
    pub seen_carts_ttl: Duration,
}

/// The watchdog that ends orders stuck pending, and the reconciler of unknown payments.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchdogSettings {
    #[serde(with = "humantime_serde")]
    pub pending_limit: Duration,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub batch: i64,
}

/// How long rows that only serve dedup, retries or debugging are kept (see `lib/retention.rs`).
#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub batch: i64,
    #[serde(with = "humantime_serde")]
    pub inbox: Duration,
    #[serde(with = "humantime_serde")]
    pub outbox: Duration,
    #[serde(with = "humantime_serde")]
    pub payment_attempts: Duration,
    #[serde(with = "humantime_serde")]
    pub stock_movements: Duration,
    /// Merchant webhook deliveries that ended (delivered or given up), their attempts and
    /// messages: how far back the delivery log and replay reach.
    #[serde(with = "humantime_serde")]
    pub webhooks: Duration,
}

/// Where processes without an edge serve `/metrics`, and how often JetStream gauges refresh.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    pub addr: String,
    #[serde(with = "humantime_serde")]
    pub jetstream_interval: Duration,
}

/// Span export.
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`); empty: no export.
    pub otlp_endpoint: String,
}

/// Threads of a process's async runtime.
#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeSettings {
    /// Worker threads of a process that serves HTTP (the edge, the sandbox PSP, `run all`);
    /// 0: one per core.
    pub http_worker_threads: usize,
    /// Worker threads of a process that only consumes (reserve, authorize, order, compensate);
    /// 0: one per core.
    pub consumer_worker_threads: usize,
}

/// Fault injection, off unless a test turns it on.
#[derive(Debug, Clone, Deserialize)]
pub struct ChaosSettings {
    pub redeliver: Redeliver,
}

/// Where a handler pretends to die, once per message, to force a redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redeliver {
    None,
    BeforePublish,
    AfterPublish,
    /// The authorize step fails after the provider answered, before it commits.
    AfterProviderCall,
}

/// A string that never prints (database URLs carry passwords, JWT secrets are secrets).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A settings file or variable that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] config::ConfigError);

impl Settings {
    /// Loads the defaults, then `.run/local.toml` if there is one (`./dev up` writes the
    /// generated secrets there), then the environment.
    pub fn load() -> Result<Self, ConfigError> {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(
                config::File::new(".run/local.toml", config::FileFormat::Toml).required(false),
            )
            .add_source(
                config::Environment::with_prefix("CHECKOUT")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        let settings: Self = settings.try_deserialize()?;
        settings.check()?;
        Ok(settings)
    }

    /// Refuses addresses that cannot work, before anything connects: a typo in a URL must
    /// stop the process with its setting's name, not look like a server that is down.
    fn check_addresses(&self) -> Result<(), ConfigError> {
        let refuse = |setting: &str, value: &str, why: String| {
            Err(ConfigError(config::ConfigError::Message(format!(
                "{setting} ({value}) {why}"
            ))))
        };
        let servers = self.nats.servers();
        if servers.is_empty() {
            return refuse("nats.url", "", "names no server".into());
        }
        for server in &servers {
            if let Err(e) = server.parse::<async_nats::ServerAddr>() {
                return refuse(
                    "nats.url",
                    &redacted(server),
                    format!("is not a NATS URL: {e}"),
                );
            }
        }
        let database = self.database.url.expose();
        let postgres = ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| database.starts_with(scheme));
        if let Err(e) = crate::db::hosts::parse(database) {
            return refuse(
                "database.url",
                &redacted(database),
                format!("is not a PostgreSQL URL: {e}"),
            );
        }
        if !postgres {
            return refuse(
                "database.url",
                &redacted(database),
                "is not a PostgreSQL URL (postgres://...)".into(),
            );
        }
        match reqwest::Url::parse(&self.psp.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(url) => {
                return refuse(
                    "psp.url",
                    &self.psp.url,
                    format!("is not http(s): {}", url.scheme()),
                )
            }
            Err(e) => return refuse("psp.url", &self.psp.url, format!("is not a URL: {e}")),
        }
        Ok(())
    }

    /// Refuses settings that would break a guarantee rather than a preference.
    pub fn check(&self) -> Result<(), ConfigError> {
        // A message can be redelivered (or replayed by an operator) for as long as the stream
        // keeps it; the inbox must remember it at least that long or the step runs twice.
        let floor = self.nats.stream_max_age + self.nats.duplicate_window;
        if self.retention.inbox < floor {
            return Err(ConfigError(config::ConfigError::Message(format!(
                "retention.inbox ({}) must be at least nats.stream_max_age + \
                 nats.duplicate_window ({}): a redelivered message would be handled twice",
                humantime::format_duration(self.retention.inbox),
                humantime::format_duration(floor)
            ))));
        }
        // The watchdog fails whatever is still pending at its limit: a challenge allowed to
        // last longer would be timed out (`timed_out`) instead of expiring as itself.
        if self.payments.action_timeout >= self.watchdog.pending_limit {
            return Err(ConfigError(config::ConfigError::Message(format!(
                "payments.action_timeout ({}) must be shorter than watchdog.pending_limit ({}): \
                 the watchdog would fail a checkout whose payment challenge is still allowed",
                humantime::format_duration(self.payments.action_timeout),
                humantime::format_duration(self.watchdog.pending_limit)
            ))));
        }
        if self.nats.partitions == 0 {
            return Err(ConfigError(config::ConfigError::Message(
                "nats.partitions must be at least 1".into(),
            )));
        }
        self.check_addresses()?;
        if let Some(p) = self
            .nats
            .own_partitions
            .iter()
            .find(|p| **p >= self.nats.partitions)
        {
            return Err(ConfigError(config::ConfigError::Message(format!(
                "partition {p} does not exist: nats.partitions is {}",
                self.nats.partitions
            ))));
        }
        Ok(())
    }
}

/// URLs (one, or several separated by commas) without their passwords, for messages.
pub fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::Settings;
    use std::time::Duration;

    #[test]
    fn an_inbox_kept_shorter_than_the_stream_keeps_messages_is_refused() {
        let mut settings = Settings::load().expect("the defaults load");
        assert!(settings.check().is_ok());
        settings.retention.inbox = settings
            .nats
            .stream_max_age
            .checked_sub(Duration::from_secs(3600))
            .unwrap();
        let error = settings.check().expect_err("refused").to_string();
        assert!(error.contains("retention.inbox"), "{error}");
    }

    #[test]
    fn addresses_that_cannot_work_are_refused_by_name_before_anything_connects() {
        let defaults = Settings::load().expect("the defaults load");
        for (set, expect) in [
            (
                Box::new(|s: &mut Settings| s.nats.url = "nats://127.0.0.1:notaport".into())
                    as Box<dyn Fn(&mut Settings)>,
                "nats.url",
            ),
            (
                Box::new(|s: &mut Settings| s.nats.url = " , ".into()),
                "nats.url",
            ),
            (
                Box::new(|s: &mut Settings| {
                    s.database.url = super::Secret::new("mysql://u:hunter2@db/x");
                }),
                "database.url",
            ),
            (
                Box::new(|s: &mut Settings| s.psp.url = "localhost:9000".into()),
                "psp.url",
            ),
        ] {
            let mut settings = defaults.clone();
            set(&mut settings);
            let error = settings.check().expect_err(expect).to_string();
            assert!(error.contains(expect), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}
