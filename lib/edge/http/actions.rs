//! Order actions after confirmation: shipments (each captures its share of the order),
//! refunds (of lines or of an amount), and cancelling what has not shipped. Each takes the
//! order's action lock and stages its saga request in the outbox in one transaction; the
//! payment step and the order-lifecycle step settle it.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{idempotency_key, parse_sku, Admin, ApiJson, Caller};
use super::views::money;
use super::AppState;
use crate::auth::Principal;
use crate::domain::{is_clean_text, Money, Quantity};
use crate::edge::checkout;
use crate::edge::outbox::Outbox;
use crate::orders::allocation::{Units, UnitsError};
use crate::orders::parts::{
    self, Ask as PartAsk, PartError, PartKind, PartRecord, RefundOf, Standing,
};
use crate::orders::{Action, ActionRequest};
use crate::saga::events::{Checkout, Event, PartLine};
use crate::saga::outgoing::Outgoing;
use crate::saga::trace::TraceParent;
use crate::{orders, payments};

/// What an action asks for.
enum Ask {
    /// `/ship`, `/cancel`, `/refund`: whatever is left.
    Rest,
    Shipment {
        key: String,
        units: Units,
    },
    Refund {
        key: String,
        of: RefundOf,
        reason: String,
    },
}

/// A shipment or refund as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartJson {
    id: Uuid,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    lines: Vec<PartLine>,
    amount: String,
    /// `capturing`, `shipped` or `failed`; `refunding`, `refunded` or `failed`.
    status: String,
    /// Why it failed: `authorization_expired`, `provider_refused`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// The provider's capture or refund id.
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restock: Option<bool>,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl PartJson {
    /// The view of a recorded part, its amount in the order's currency.
    pub fn of(record: PartRecord, currency: &str) -> Self {
        Self {
            id: record.id,
            lines: record.lines.map(|l| l.0).unwrap_or_default(),
            amount: money(record.amount, currency),
            status: record.status,
            failure: record.failure,
            provider_ref: record.provider_ref,
            reason: record.reason,
            restock: record.restock,
            created_at: record.created_at,
        }
    }
}

/// An action request, accepted (or found done).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionAccepted {
    order_id: Uuid,
    /// `accepted` (now in progress) or `done` (already done before, or nothing left).
    request: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipment: Option<PartJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refund: Option<PartJson>,
}

fn answer(status: StatusCode, order_id: Uuid, request: &str, action: Action) -> Response {
    answer_with(status, order_id, request, action, None, "")
}

fn answer_with(
    status: StatusCode,
    order_id: Uuid,
    request: &str,
    action: Action,
    part: Option<PartRecord>,
    currency: &str,
) -> Response {
    let part = part.map(|p| PartJson::of(p, currency));
    let (shipment, refund) = match action {
        Action::Ship => (part, None),
        Action::Refund => (None, part),
        Action::Cancel => (None, None),
    };
    let body = ActionAccepted {
        order_id,
        request: request.to_owned(),
        shipment,
        refund,
    };
    (status, Json(body)).into_response()
}

fn part_error(e: PartError) -> ApiError {
    let message = e.to_string();
    match e {
        PartError::Units(UnitsError::UnknownSku(_)) => {
            ApiError::unprocessable("unknown_sku", message)
        }
        PartError::Units(UnitsError::TooMany { .. }) => {
            ApiError::unprocessable("quantity_exceeds_remaining", message)
        }
        PartError::Units(UnitsError::Empty) => ApiError::unprocessable("no_lines", message),
        PartError::ExceedsCaptured { .. } => {
            ApiError::unprocessable("refund_exceeds_captured", message)
        }
        PartError::InFlight => ApiError::client(StatusCode::CONFLICT, "action_in_flight", message),
        PartError::KeyReused => ApiError::unprocessable("idempotency_key_reused", message),
        PartError::Database(e) => e.into(),
    }
}

fn not_found() -> ApiError {
    ApiError::not_found("order_not_found", "no such order")
}

/// Locks the order for an action, records its shipment or refund and publishes the request;
/// a repeat (the same Idempotency-Key) answers what it asked for before.
async fn request(
    state: &AppState,
    caller: &Principal,
    order_id: &str,
    action: Action,
    ask: Ask,
) -> Result<Response, ApiError> {
    let order_id = Uuid::parse_str(order_id).map_err(|_| not_found())?;
    let Some(checkout) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    if !(caller.admin || caller.user_id == checkout.user_id) {
        return Err(not_found());
    }
    let currency = checkout.currency.code();
    if let Some(found) = replay(state, order_id, &ask).await? {
        let request = if matches!(found.status.as_str(), "capturing" | "refunding") {
            "accepted"
        } else {
            "done"
        };
        return Ok(answer_with(
            StatusCode::OK,
            order_id,
            request,
            action,
            Some(found),
            currency,
        ));
    }
    if action == Action::Ship
        && payments::payment_view(&state.pool, order_id)
            .await?
            .expired()
    {
        return Err(ApiError::client(
            StatusCode::CONFLICT,
            "authorization_expired",
            "the payment authorization has expired and cannot be captured; ask the buyer to pay again",
        ));
    }
    // The lock, the part and the request's outbox row commit together: once the lock is
    // taken, the request reaches JetStream even if this process dies right after.
    let mut tx = state.pool.begin().await?;
    let attempt = match orders::request_action(&mut tx, order_id, action).await? {
        ActionRequest::AlreadyDone => return nothing_left(order_id, action, &ask),
        ActionRequest::Refused { status, in_flight } => return Err(refused(status, in_flight)),
        ActionRequest::Accepted { attempt } => attempt,
    };
    let snapshot = checkout.spent().for_the_bus();
    let staged = match stage(&mut tx, &snapshot, action, ask, attempt).await {
        Ok(Some(staged)) => staged,
        Ok(None) => return Ok(answer(StatusCode::ACCEPTED, order_id, "done", action)),
        // `/ship` or `/refund` again while it is in flight: the same request, still going.
        Err(Staging::RestInFlight) => {
            return Ok(answer(StatusCode::ACCEPTED, order_id, "accepted", action))
        }
        Err(Staging::Part(e)) => return Err(part_error(e)),
    };
    let out = traced(state, order_id, action, attempt, &staged.0).await?;
    Outbox::stage(&mut tx, &out).await?;
    tx.commit().await?;
    state.outbox.publish_soon(out);
    Ok(answer_with(
        StatusCode::ACCEPTED,
        order_id,
        "accepted",
        action,
        staged.1,
        snapshot.currency.code(),
    ))
}

/// The order is shipped or refunded whole: `/ship` and `/refund` are done; a shipment or
/// refund of something named asks for what is not there.
fn nothing_left(order_id: Uuid, action: Action, ask: &Ask) -> Result<Response, ApiError> {
    match ask {
        Ask::Rest => Ok(answer(StatusCode::ACCEPTED, order_id, "done", action)),
        Ask::Shipment { .. } => Err(ApiError::unprocessable(
            "quantity_exceeds_remaining",
            "nothing of this order is left to ship",
        )),
        Ask::Refund { .. } => Err(part_error(PartError::ExceedsCaptured {
            left: Decimal::ZERO,
        })),
    }
}

fn refused(status: Option<orders::OrderStatus>, in_flight: Option<Action>) -> ApiError {
    let now = match (in_flight, status) {
        (Some(action), _) => format!("{action} in progress"),
        (None, Some(status)) => status.to_string(),
        (None, None) => "pending".to_owned(),
    };
    ApiError::client(
        StatusCode::CONFLICT,
        "invalid_order_state",
        format!("the order is {now}"),
    )
}

/// The request as a message in the order's trace, as a child of this request's span.
async fn traced(
    state: &AppState,
    order_id: Uuid,
    action: Action,
    attempt: u32,
    event: &Event,
) -> Result<Outgoing, ApiError> {
    let span = tracing::info_span!("order_action", action = ?action, attempt);
    let started = checkout::trace_of(&state.pool, order_id).await?;
    if let Some(parent) = &started {
        parent.adopt(&span);
    }
    let fallback = started.unwrap_or_else(TraceParent::new_root);
    let trace = TraceParent::of_span(&span, &fallback);
    Outgoing::new(event, Some(&trace)).map_err(|e| ApiError::Internal(e.into()))
}

/// Why nothing was staged.
enum Staging {
    /// A whole-order request repeated while its part is in flight.
    RestInFlight,
    Part(PartError),
}

impl From<PartError> for Staging {
    fn from(e: PartError) -> Self {
        Self::Part(e)
    }
}

impl From<sqlx::Error> for Staging {
    fn from(e: sqlx::Error) -> Self {
        Self::Part(e.into())
    }
}

/// Records the shipment or refund under the lock and builds its request. `None`: nothing is
/// left to do.
async fn stage(
    tx: &mut sqlx::PgConnection,
    snapshot: &Checkout,
    action: Action,
    ask: Ask,
    attempt: u32,
) -> Result<Option<(Event, Option<PartRecord>)>, Staging> {
    let order_id = snapshot.order_id;
    let rest = matches!(ask, Ask::Rest);
    let key = match &ask {
        Ask::Rest => format!("{action}:{attempt}"),
        Ask::Shipment { key, .. } | Ask::Refund { key, .. } => key.clone(),
    };
    let part_ask = PartAsk {
        order_id,
        lines: &snapshot.items,
        total: snapshot.total,
        currency: snapshot.currency,
        key: &key,
        attempt,
    };
    let found = match (action, ask) {
        (Action::Cancel, _) => {
            let standing = Standing::read(tx, order_id).await?;
            let all = orders::allocation::Allocation::new(
                &snapshot.items,
                snapshot.total,
                snapshot.currency,
            )
            .all();
            if standing.in_flight {
                return Err(PartError::InFlight.into());
            }
            if standing.left_to_ship(&all).is_empty() {
                return Ok(None);
            }
            let event = Event::CancelRequested {
                checkout: snapshot.clone(),
                attempt,
            };
            return Ok(Some((event, None)));
        }
        (Action::Ship, Ask::Shipment { units, .. }) => {
            parts::ask_shipment(tx, &part_ask, Some(&units)).await
        }
        (Action::Ship, _) => parts::ask_shipment(tx, &part_ask, None).await,
        (Action::Refund, Ask::Refund { of, reason, .. }) => {
            parts::ask_refund(tx, &part_ask, of, &reason).await
        }
        (Action::Refund, _) => {
            parts::ask_refund(tx, &part_ask, RefundOf::Rest, "requested_by_customer").await
        }
    };
    let record = match found {
        Err(PartError::InFlight) if rest => return Err(Staging::RestInFlight),
        other => other?,
    };
    let Some(record) = record else {
        return Ok(None);
    };
    let (checkout, part) = (snapshot.clone(), Some(record.part()));
    let event = match action {
        Action::Ship => Event::ShipRequested {
            checkout,
            attempt,
            part,
        },
        _ => Event::RefundRequested {
            checkout,
            attempt,
            part,
        },
    };
    Ok(Some((event, Some(record))))
}

/// The shipment or refund this Idempotency-Key asked for before, if it asked for the same.
async fn replay(
    state: &AppState,
    order_id: Uuid,
    ask: &Ask,
) -> Result<Option<PartRecord>, ApiError> {
    let (kind, key) = match ask {
        Ask::Rest => return Ok(None),
        Ask::Shipment { key, .. } => (PartKind::Shipment, key),
        Ask::Refund { key, .. } => (PartKind::Refund, key),
    };
    let mut conn = state.pool.acquire().await?;
    let Some(found) = parts::find(&mut conn, kind, order_id, key).await? else {
        return Ok(None);
    };
    let lines = found
        .lines
        .as_ref()
        .map(|l| l.0.clone())
        .unwrap_or_default();
    let same = match ask {
        Ask::Shipment { units, .. }
        | Ask::Refund {
            of: RefundOf::Units { units, .. },
            ..
        } => parts::units_of(&lines) == *units,
        Ask::Refund {
            of: RefundOf::Amount(amount),
            ..
        } => lines.is_empty() && found.amount == *amount,
        _ => true,
    };
    if !same {
        return Err(part_error(PartError::KeyReused));
    }
    Ok(Some(found))
}

/// Units of one SKU in a request.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct LineBody {
    sku: String,
    qty: i64,
}

/// `POST /api/orders/{id}/shipments`.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct ShipmentBody {
    lines: Vec<LineBody>,
}

/// `POST /api/orders/{id}/refunds`: `lines` or `amount`, and why.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct RefundBody {
    #[serde(default)]
    lines: Option<Vec<LineBody>>,
    /// A decimal string, e.g. `"12.50"`.
    #[serde(default)]
    amount: Option<String>,
    reason: String,
    /// Whether refunded lines go back on hand (default true; amounts never restock).
    #[serde(default)]
    restock: Option<bool>,
}

fn units(lines: &[LineBody]) -> Result<Units, ApiError> {
    if lines.is_empty() {
        return Err(ApiError::unprocessable(
            "no_lines",
            "name at least one line",
        ));
    }
    let mut units = Units::new();
    for line in lines {
        let sku = parse_sku(&line.sku)?;
        let qty = Quantity::new(line.qty).map_err(|_| {
            ApiError::unprocessable(
                "invalid_quantity",
                format!("qty must be 1 to {}", Quantity::MAX),
            )
        })?;
        *units.entry(sku.to_string()).or_default() += i64::from(qty.get());
    }
    Ok(units)
}

/// Ships part of an order (admin): captures those units' share of the total.
#[utoipa::path(post, path = "/api/orders/{order_id}/shipments", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid),
        ("Idempotency-Key" = String, Header, description = "the same key and body return the same shipment")),
    request_body = ShipmentBody,
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn ship_part(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ShipmentBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let units = units(&body.lines)?;
    let ask = Ask::Shipment { key, units };
    request(&state, &admin, &order_id, Action::Ship, ask).await
}

/// Refunds lines (their share) or an amount of a shipped order (admin).
#[utoipa::path(post, path = "/api/orders/{order_id}/refunds", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid),
        ("Idempotency-Key" = String, Header, description = "the same key and body return the same refund")),
    request_body = RefundBody,
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn refund_part(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RefundBody>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let reason = body.reason.trim().to_owned();
    if reason.is_empty() || reason.len() > 200 || !is_clean_text(&reason) {
        return Err(ApiError::unprocessable(
            "invalid_reason",
            "reason must be 1 to 200 characters",
        ));
    }
    let of = match (&body.lines, &body.amount) {
        (Some(lines), None) => RefundOf::Units {
            units: units(lines)?,
            restock: body.restock.unwrap_or(true),
        },
        (None, Some(amount)) => RefundOf::Amount(amount_of(&state, &order_id, amount).await?),
        _ => {
            return Err(ApiError::unprocessable(
                "lines_or_amount",
                "give either lines or an amount",
            ))
        }
    };
    let ask = Ask::Refund { key, of, reason };
    request(&state, &admin, &order_id, Action::Refund, ask).await
}

/// A refund's amount: positive, exact to the order's currency.
async fn amount_of(state: &AppState, order_id: &str, raw: &str) -> Result<Decimal, ApiError> {
    let invalid = || {
        ApiError::unprocessable(
            "invalid_amount",
            "amount must be a positive decimal string in the order's currency",
        )
    };
    let amount: Decimal = raw.trim().parse().map_err(|_| invalid())?;
    let order_id = Uuid::parse_str(order_id).map_err(|_| not_found())?;
    let Some(checkout) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    match Money::exact(amount, checkout.currency) {
        Some(m) if m.amount() > Decimal::ZERO => Ok(m.amount()),
        _ => Err(invalid()),
    }
}

/// Ships whatever is left of the order (admin): captures its share.
#[utoipa::path(post, path = "/api/orders/{order_id}/ship", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid)),
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn ship(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    request(&state, &admin, &order_id, Action::Ship, Ask::Rest).await
}

/// Cancels what has not shipped (owner or admin): restocks it and releases the uncaptured
/// money; the promotion comes back only if nothing shipped.
#[utoipa::path(post, path = "/api/orders/{order_id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid)),
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn cancel(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    request(&state, &caller, &order_id, Action::Cancel, Ask::Rest).await
}

/// Refunds whatever captured money is left (admin).
#[utoipa::path(post, path = "/api/orders/{order_id}/refund", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid)),
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn refund(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    request(&state, &admin, &order_id, Action::Refund, Ask::Rest).await
}
