//! Liveness and readiness.
//!
//! `/readyz` answers from a snapshot a background task refreshes every second, so a load
//! balancer's probe costs no database query and no JetStream API call, and answers at once even
//! while NATS elects a leader. It turns not-ready as soon as the process starts draining, and
//! says nothing about hosts or processes.
//!
//! Ready means PostgreSQL answers and the NATS connection is up. The streams' answer is
//! reported but does not decide: during a leader election (seconds, on a cluster) the edge
//! still accepts checkouts into its outbox and publishes them once a leader is back, so taking
//! it out of a load balancer then would turn an invisible election into refused buyers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::bus::Bus;
use crate::saga::subjects::DEADLETTER_STREAM;

/// The last readiness check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    database: bool,
    nats: bool,
    streams: bool,
    /// Authorize processes' breakers by state: `{"closed": 2, "open": 0, "half_open": 0}`.
    breakers: Value,
}

/// Readiness as of the last check, and whether the process is draining.
#[derive(Clone)]
pub struct Readiness {
    last: Arc<Mutex<Snapshot>>,
    draining: CancellationToken,
}

impl Readiness {
    /// Not ready until the first check; draining once `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            last: Arc::default(),
            draining: shutdown,
        }
    }

    /// Cancelled when the process starts draining (live streams end on it).
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Checks every `every` until shutdown.
    pub async fn run(self, pool: PgPool, bus: Bus, every: Duration) {
        loop {
            let database = tokio::time::timeout(every, sqlx::query("SELECT 1").execute(&pool))
                .await
                .is_ok_and(|r| r.is_ok());
            let nats = matches!(
                bus.client().connection_state(),
                async_nats::connection::State::Connected
            );
            let mut streams = nats;
            let mut names = bus.saga_streams();
            names.push(DEADLETTER_STREAM.to_owned());
            for name in &names {
                if streams {
                    streams = tokio::time::timeout(every, bus.jetstream().get_stream(name))
                        .await
                        .is_ok_and(|r| r.is_ok());
                }
            }
            let breakers =
                tokio::time::timeout(every, crate::payments::breaker_status::breaker_counts(&bus))
                    .await
                    .unwrap_or_else(|_| json!({}));
            if let Ok(mut last) = self.last.lock() {
                *last = Snapshot {
                    database,
                    nats,
                    streams,
                    breakers,
                };
            }
            tokio::select! {
                _ = self.draining.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the last check found PostgreSQL and a NATS connection, and not draining.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let snapshot = state
        .readiness
        .last
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let draining = state.readiness.draining.is_cancelled();
    let ready = !draining && snapshot.database && snapshot.nats;
    let status = if draining {
        "draining"
    } else if ready {
        "ready"
    } else {
        "not_ready"
    };
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "status": status,
            "checks": {"database": snapshot.database, "nats": snapshot.nats, "streams": snapshot.streams},
            "payments": {"breakers": snapshot.breakers},
        })),
    )
}
