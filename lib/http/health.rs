//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::saga::subjects::{CHECKOUT_STREAM, DEADLETTER_STREAM};

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// PostgreSQL answers, NATS is connected, and the streams exist.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    let nats = matches!(
        state.bus.client().connection_state(),
        async_nats::connection::State::Connected
    );
    let mut streams = true;
    for name in [CHECKOUT_STREAM, DEADLETTER_STREAM] {
        streams &= state.bus.jetstream().get_stream(name).await.is_ok();
    }
    let ready = database && nats && streams;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {"database": database, "nats": nats, "streams": streams},
            "details": {"payments": {"breakers": crate::status::breakers(&state.bus).await}},
        })),
    )
}
