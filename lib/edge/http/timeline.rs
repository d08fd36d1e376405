//! An order's story: `GET /api/orders/{id}/events` as JSON (the timeline so far) or, with
//! `Accept: text/event-stream`, live as Server-Sent Events.
//!
//! Read from JetStream, not from the services' tables: the per-order subjects
//! (`checkout.*.<order_id>`) already hold every event in order with the server's timestamp, and
//! an ordered consumer on them turns into a live feed without polling anything.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::Caller;
use super::AppState;
use crate::edge::checkout;
use crate::saga::events::{Event, EventKind};
use crate::saga::subjects::{checkout_stream, order_filter, partition_of};

/// Name prefix of the timeline's ephemeral consumers.
pub const TIMELINE_PREFIX: &str = "timeline_";

/// One event of the timeline.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TimelineEvent {
    #[serde(rename = "type")]
    kind: &'static str,
    at: DateTime<Utc>,
    /// Where the order stands after this event.
    stage: &'static str,
    #[schema(value_type = Object)]
    detail: Value,
}

/// An order's timeline, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    order_id: Uuid,
    events: Vec<TimelineEvent>,
}

/// Whether the query asks `?follow=all`: a live stream stays open past confirmation (ship,
/// cancel, refund). Read by hand: axum's query extractor answers a repeated `follow` with a
/// plain-text 400, and any query is fine here (an unknown value means the default).
fn follows_all(query: Option<&str>) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair == "follow=all")
}

/// The order's timeline (JSON), or with `Accept: text/event-stream` its live stream.
#[utoipa::path(get, path = "/api/orders/{order_id}/events", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid),
        ("follow" = Option<String>, Query, description = "`all`: a live stream stays open past confirmation")),
    responses((status = 200, description = "the timeline, or a text/event-stream", body = Timeline,
        content_type = "application/json")))]
pub async fn events(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("order_not_found", "no such order");
    let order_id = Uuid::parse_str(&order_id).map_err(|_| not_found())?;
    let Some(placed) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    if !(caller.admin || caller.user_id == placed.user_id) {
        return Err(not_found());
    }
    let live = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    // An order's events are all in its partition's stream (the servers' mapping and
    // `partition_of` agree), unless the operator changed the partition count while it was in
    // flight: subjects.md, "Partitions".
    let k = state.bus.settings().partitions;
    let consumer = state
        .bus
        .jetstream()
        .get_stream(checkout_stream(partition_of(order_id, k), k))
        .await
        .map_err(|e| ApiError::Unavailable(e.into()))?
        .create_consumer(OrderedConfig {
            // Named, so that the edge's NATS user may create, pull and delete these and no
            // durable (nats/auth.conf); the prefix shows what they are in `nats consumer ls`.
            name: Some(format!("{TIMELINE_PREFIX}{}", Uuid::new_v4().simple())),
            filter_subject: order_filter(order_id, k),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.into()))?;
    let pending = consumer.cached_info().num_pending;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| ApiError::Unavailable(e.into()))?;
    if live {
        let all = follows_all(query.as_deref());
        let shutdown = state.readiness.draining().clone();
        return Ok(stream(messages, all, shutdown).into_response());
    }
    let mut events = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut messages = messages;
    for _ in 0..pending {
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let Ok(Some(Ok(message))) = next else { break };
        if let Some((id, event)) = read(&message) {
            if seen.insert(id) {
                events.push(event);
            }
        }
    }
    Ok(Json(Timeline { order_id, events }).into_response())
}

/// How soon a client whose live stream ended with the server's shutdown should reconnect
/// (to another edge, or this one restarted).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Events so far, then each new one, until the order ends, the client goes, or the edge shuts
/// down: then a `reconnect` event (with an SSE `retry:`) ends it, so that no open stream keeps
/// the process from stopping and the client knows to come back rather than that the order
/// ended.
fn stream(
    messages: async_nats::jetstream::consumer::pull::Ordered,
    follow_all: bool,
    shutdown: tokio_util::sync::CancellationToken,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let state = (messages, false, std::collections::HashSet::new());
    let events = futures::stream::unfold(state, move |(mut messages, done, mut seen)| {
        let shutdown = shutdown.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        let bye = SseEvent::default()
                            .event("reconnect")
                            .retry(RECONNECT_AFTER)
                            .data(r#"{"reason":"the server is shutting down; reconnect"}"#);
                        return Some((Ok(bye), (messages, true, seen)));
                    }
                    next = messages.next() => next,
                };
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "order stream interrupted");
                        return None;
                    }
                    None => return None,
                };
                let Some((id, event)) = read(&message) else {
                    continue;
                };
                if !seen.insert(id) {
                    continue;
                }
                let last = ends(event.kind, follow_all);
                let sse = SseEvent::default()
                    .event(event.kind)
                    .json_data(&event)
                    .unwrap_or_else(|_| SseEvent::default().event(event.kind));
                return Some((Ok(sse), (messages, last, seen)));
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Whether the live stream closes after an event of this kind.
fn ends(kind: &str, follow_all: bool) -> bool {
    if follow_all {
        matches!(kind, "failed" | "cancelled" | "refunded")
    } else {
        matches!(kind, "confirmed" | "failed")
    }
}

/// The message's dedup id and its timeline entry.
fn read(message: &async_nats::jetstream::Message) -> Option<(String, TimelineEvent)> {
    let event = Event::decode(&message.payload).ok()?;
    let at = message.info().map_or_else(|_| Utc::now(), |i| i.published);
    Some((event.msg_id(), describe(&event, at)))
}

fn describe(event: &Event, at: DateTime<Utc>) -> TimelineEvent {
    let kind = event.kind();
    let attempt = event.attempt();
    let detail = match event {
        Event::Requested { checkout } => json!({
            "total": checkout.total.to_string(),
            "currency": checkout.currency,
            "lines": checkout.items.len(),
        }),
        Event::Reserved { expires_at, .. } => json!({"holdExpiresAt": expires_at}),
        Event::Rejected {
            reason,
            detail,
            short,
            ..
        } => json!({"reason": reason.as_str(), "message": detail, "skus": short}),
        Event::Authorized { payment_id, .. } | Event::Committed { payment_id, .. } => {
            json!({"paymentId": payment_id})
        }
        Event::Declined {
            decline_code,
            reason,
            ..
        } => json!({"reason": reason.as_str(), "declineCode": decline_code}),
        Event::Failed { reason, .. } => json!({"reason": reason.as_str()}),
        Event::CaptureFailed { detail, part, .. } | Event::RefundFailed { detail, part, .. } => {
            with_part(
                json!({"attempt": attempt, "message": detail}),
                part.as_ref(),
            )
        }
        Event::CancelFailed { detail, .. } => json!({"attempt": attempt, "message": detail}),
        Event::ShipRequested { part, .. }
        | Event::Captured { part, .. }
        | Event::Shipped { part, .. }
        | Event::RefundRequested { part, .. }
        | Event::Refunded { part, .. } => with_part(json!({"attempt": attempt}), part.as_ref()),
        Event::CancelRequested { .. } | Event::Cancelled { .. } => json!({"attempt": attempt}),
        Event::ActionRequired { next_action, .. } => match next_action {
            Some(url) => json!({"nextAction": {"type": "redirect_to_url", "url": url}}),
            None => json!({}),
        },
        // What the provider said, never its amounts' raw payload.
        Event::ProviderUpdate { update, .. } => json!({
            "provider": update.provider,
            "type": update.event_type,
        }),
        Event::Confirmed { .. } | Event::TimedOut { .. } | Event::ActionExpired { .. } => {
            json!({})
        }
    };
    TimelineEvent {
        kind: kind.as_str(),
        at,
        stage: stage_after(kind),
        detail,
    }
}

/// A shipment's or refund's id, amount, units and provider id beside an event's detail.
fn with_part(mut detail: Value, part: Option<&crate::saga::events::Part>) -> Value {
    if let (Some(part), Some(fields)) = (part, detail.as_object_mut()) {
        fields.insert("partId".into(), json!(part.id));
        fields.insert("amount".into(), json!(part.amount.to_string()));
        if !part.lines.is_empty() {
            fields.insert("lines".into(), json!(part.lines));
        }
        if let Some(id) = &part.provider_ref {
            fields.insert("providerRef".into(), json!(id));
        }
    }
    detail
}

/// Where the order stands after an event of this kind.
fn stage_after(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Requested => "reserving",
        EventKind::Reserved | EventKind::ProviderUpdate | EventKind::ActionExpired => "authorizing",
        // The order step commits the stock and inserts the order together.
        EventKind::Authorized | EventKind::Committed => "confirming",
        EventKind::Rejected | EventKind::Declined | EventKind::TimedOut => "compensating",
        EventKind::ActionRequired => "requires_action",
        EventKind::Confirmed | EventKind::CaptureFailed | EventKind::CancelFailed => "confirmed",
        EventKind::Failed => "failed",
        EventKind::ShipRequested | EventKind::Captured => "shipping",
        EventKind::Shipped | EventKind::RefundFailed => "shipped",
        EventKind::CancelRequested => "cancelling",
        EventKind::Cancelled => "cancelled",
        EventKind::RefundRequested => "refunding",
        EventKind::Refunded => "refunded",
    }
}
