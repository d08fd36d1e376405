//! Order routes: lookup, and the asynchronous ship, cancel and refund requests.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{Admin, Caller};
use super::views::money;
use super::AppState;
use crate::auth::Principal;
use crate::edge::checkout;
use crate::edge::outbox::Outbox;
use crate::orders::{Action, ActionRequest};
use crate::payments::PaymentView;
use crate::saga::events::Event;
use crate::saga::outgoing::Outgoing;
use crate::saga::trace::TraceParent;
use crate::{inventory, orders, payments};

/// An order line.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemJson {
    sku: String,
    qty: i32,
    unit_price: String,
    line_total: String,
}

/// An order.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderJson {
    order_id: Uuid,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// While the stage is `requires_action`: where the buyer completes the payment challenge.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_action: Option<NextActionJson>,
    items: Vec<ItemJson>,
    subtotal: String,
    discount: String,
    tax: String,
    shipping: String,
    total: String,
    currency: String,
    payment: PaymentJson,
    /// Where the order ships (from the accepted checkout; the saga's events never carry it).
    #[serde(skip_serializing_if = "Option::is_none")]
    ship_to: Option<crate::domain::Address>,
}

/// What the buyer must do for the payment to go on (a 3-D Secure challenge).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NextActionJson {
    /// Always `redirect_to_url`.
    #[serde(rename = "type")]
    kind: &'static str,
    url: String,
}

impl NextActionJson {
    /// The challenge to show while the order's stage is `requires_action`.
    fn of(stage: &str, payment: &PaymentView) -> Option<Self> {
        let url = payment.next_action_url.clone()?;
        (stage == "requires_action").then_some(Self {
            kind: "redirect_to_url",
            url,
        })
    }
}

/// The order's payment.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentJson {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    decline_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// True when an authorization can no longer be captured.
    expired: bool,
    failed_attempts: i32,
    /// The provider holding the payment (the fallback's name when it was routed there).
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
}

impl PaymentJson {
    fn new(view: PaymentView, settled: bool) -> Self {
        let expired = view.expired();
        Self {
            // A settled order without a payment row never reached the provider.
            status: match view.status {
                Some(status) => status.to_string(),
                None if settled => "none".into(),
                None => "pending".into(),
            },
            decline_code: view.decline_code,
            expires_at: view.expires_at,
            expired,
            failed_attempts: view.failed_attempts,
            provider: view.provider,
        }
    }
}

fn not_found() -> ApiError {
    ApiError::not_found("order_not_found", "no such order")
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| not_found())
}

fn may_see(caller: &Principal, owner: &str) -> bool {
    caller.admin || caller.user_id == owner
}

/// An order: pending (with its stage) until the saga settles, then its status.
#[utoipa::path(get, path = "/api/orders/{order_id}", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order id checkout returned", format = Uuid)),
    responses((status = 200, description = "the order", body = OrderJson)))]
pub async fn get_order(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<Json<OrderJson>, ApiError> {
    let order_id = parse_id(&order_id)?;
    // The order first, its payment after: compensation settles the payment before it records
    // the failed order, so a payment read after the order is never older than the order.
    let settled = orders::get_order(&state.pool, order_id).await?;
    let payment = payments::payment_view(&state.pool, order_id).await?;
    if let Some(order) = settled {
        if !may_see(&caller, &order.user_id) {
            return Err(not_found());
        }
        let currency = order.currency.clone();
        let ship_to = checkout::find_by_order(&state.pool, order_id)
            .await?
            .and_then(|c| c.address);
        let stage = order.pending_action.map(orders::Action::stage);
        return Ok(Json(OrderJson {
            order_id,
            status: order.status.to_string(),
            stage,
            reason: order.reason,
            next_action: None,
            items: order
                .items
                .iter()
                .map(|i| ItemJson {
                    sku: i.sku.clone(),
                    qty: i.qty,
                    unit_price: money(i.price, &currency),
                    line_total: money(i.price * rust_decimal::Decimal::from(i.qty), &currency),
                })
                .collect(),
            subtotal: money(order.subtotal, &currency),
            discount: money(order.discount, &currency),
            tax: money(order.tax, &currency),
            shipping: money(order.shipping, &currency),
            total: money(order.total, &currency),
            payment: PaymentJson::new(payment, true),
            currency,
            ship_to,
        }));
    }
    // Not settled yet: the edge's own record of the checkout answers, so the owner never
    // sees a 404 for an id that checkout returned.
    let Some(pending) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    if !may_see(&caller, &pending.user_id) {
        return Err(not_found());
    }
    let reserved = inventory::reservation_status(&state.pool, order_id)
        .await?
        .is_some();
    let stage = pending_stage(reserved, &payment);
    let currency = pending.currency.code().to_owned();
    Ok(Json(OrderJson {
        order_id,
        status: "pending".into(),
        stage: Some(stage),
        reason: None,
        next_action: NextActionJson::of(stage, &payment),
        items: pending
            .items
            .iter()
            .map(|l| ItemJson {
                sku: l.sku.to_string(),
                qty: l.qty.get(),
                unit_price: money(l.unit_price, &currency),
                line_total: money(l.line_total, &currency),
            })
            .collect(),
        subtotal: money(pending.subtotal, &currency),
        discount: money(pending.discount, &currency),
        tax: money(pending.tax, &currency),
        shipping: money(pending.shipping, &currency),
        total: money(pending.total, &currency),
        currency,
        payment: PaymentJson::new(payment, false),
        ship_to: pending.address.clone(),
    }))
}

/// Where a pending order stands, from its hold and its payment.
fn pending_stage(reserved: bool, payment: &PaymentView) -> &'static str {
    match payment.status {
        _ if !reserved => "reserving",
        None if payment.failed_attempts > 0 => "payment_pending",
        Some(payments::PaymentStatus::Pending) if payment.next_action_url.is_some() => {
            "requires_action"
        }
        None | Some(payments::PaymentStatus::Pending) => "authorizing",
        Some(_) => "confirming",
    }
}

/// Locks the order for an action and publishes the request; a repeat does nothing more.
async fn request(
    state: &AppState,
    caller: &Principal,
    order_id: &str,
    action: Action,
) -> Result<impl IntoResponse, ApiError> {
    let order_id = parse_id(order_id)?;
    let Some(checkout) = checkout::find_by_order(&state.pool, order_id).await? else {
        return Err(not_found());
    };
    if !may_see(caller, &checkout.user_id) {
        return Err(not_found());
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
    // The lock and the request's outbox row commit together: once the lock is taken, the
    // request reaches JetStream even if this process dies right after.
    let mut tx = state.pool.begin().await?;
    let status = match orders::request_action(&mut tx, order_id, action).await? {
        ActionRequest::AlreadyDone => "done",
        ActionRequest::Accepted { attempt } => {
            let event = match action {
                Action::Ship => Event::ShipRequested {
                    checkout: checkout.spent().for_the_bus(),
                    attempt,
                },
                Action::Cancel => Event::CancelRequested {
                    checkout: checkout.spent().for_the_bus(),
                    attempt,
                },
                Action::Refund => Event::RefundRequested {
                    checkout: checkout.spent().for_the_bus(),
                    attempt,
                },
            };
            // The request joins the order's trace, as a child of this request's span.
            let span = tracing::info_span!("order_action", action = ?action, attempt);
            let started = checkout::trace_of(&state.pool, order_id).await?;
            if let Some(parent) = &started {
                parent.adopt(&span);
            }
            let fallback = started.unwrap_or_else(TraceParent::new_root);
            let trace = TraceParent::of_span(&span, &fallback);
            let out =
                Outgoing::new(&event, Some(&trace)).map_err(|e| ApiError::Internal(e.into()))?;
            Outbox::stage(&mut tx, &out).await?;
            tx.commit().await?;
            state.outbox.publish_soon(out);
            "accepted"
        }
        ActionRequest::Refused { status, in_flight } => {
            let now = match (in_flight, status) {
                (Some(action), _) => format!("{action} in progress"),
                (None, Some(status)) => status.to_string(),
                (None, None) => "pending".to_owned(),
            };
            return Err(ApiError::client(
                StatusCode::CONFLICT,
                "invalid_order_state",
                format!("the order is {now}"),
            ));
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionAccepted {
            order_id,
            request: status.to_owned(),
        }),
    ))
}

/// A ship, cancel or refund request, accepted.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionAccepted {
    order_id: Uuid,
    /// `accepted` (now in progress) or `done` (already done before).
    request: String,
}

/// Ships the order (admin): captures the payment.
#[utoipa::path(post, path = "/api/orders/{order_id}/ship", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid)),
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn ship(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(order_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    request(&state, &admin, &order_id, Action::Ship).await
}

/// Cancels the order before shipment (owner or admin): voids the payment, restocks.
#[utoipa::path(post, path = "/api/orders/{order_id}/cancel", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid)),
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn cancel(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    request(&state, &caller, &order_id, Action::Cancel).await
}

/// Refunds a shipped order (admin).
#[utoipa::path(post, path = "/api/orders/{order_id}/refund", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "the order", format = Uuid)),
    responses((status = 202, description = "accepted", body = ActionAccepted)))]
pub async fn refund(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(order_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    request(&state, &admin, &order_id, Action::Refund).await
}
