//! The HTTP edge: a thin JSON API over the catalog, carts, checkout and order lookup.

mod actions;
mod admin;
mod carts;
mod checkout;
pub mod error;
mod extract;
pub mod health;
pub mod limits;
pub mod openapi;
mod orders;
mod timeline;
mod views;
mod webhooks;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use sqlx::PgPool;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::bus::Bus;
use crate::catalog::CatalogCache;
use crate::edge::cart::CartLimits;
use crate::edge::checkout::Checkouts;
use crate::edge::outbox::Outbox;
use crate::inventory::soldout::SoldOut;
use crate::pricing::destination::RatesCache;

/// What every handler can reach. Axum clones the state for every request: one `Arc`
/// instead of a dozen handles (pools, caches, a NATS client) each with its own counters.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<EdgeState>);

impl AppState {
    /// The state handlers share.
    pub fn new(state: EdgeState) -> Self {
        Self(std::sync::Arc::new(state))
    }
}

impl std::ops::Deref for AppState {
    type Target = EdgeState;

    fn deref(&self) -> &EdgeState {
        &self.0
    }
}

/// The edge's services and settings, behind [`AppState`].
pub struct EdgeState {
    pub pool: PgPool,
    /// The hot paths' connections from `pool` (see `db::lease`).
    pub leases: crate::db::Leases,
    /// Cart line changes (many buyers' per statement under load).
    pub lines: crate::edge::cart::Lines,
    pub bus: Bus,
    pub checkouts: Checkouts,
    /// Publishes ship, cancel and refund requests staged with their order locks.
    pub outbox: Outbox,
    /// SKUs recently sold out (a fast "no" at add-to-cart and checkout).
    pub sold_out: SoldOut,
    /// Admission control: API requests in flight (see `edge.max_in_flight`).
    pub admission: Admission,
    /// Per-user rate limits.
    pub limits: limits::UserLimits,
    /// The last readiness check.
    pub readiness: health::Readiness,
    pub cart_limits: CartLimits,
    pub catalog: CatalogCache,
    pub rates: RatesCache,
    /// Checks bearer tokens.
    pub verifier: std::sync::Arc<crate::auth::Verifier>,
    /// Checks each payment provider's webhook signatures.
    pub webhooks: crate::payments::webhooks::Verifiers,
    /// The providers' names (webhook routes) and addresses.
    pub psp: crate::config::PspSettings,
    /// Seals merchant webhook secrets at rest (`payments.token_keys`).
    pub seal: std::sync::Arc<crate::payments::token_seal::TokenSeal>,
    /// Merchant webhook targets' rules.
    pub merchant_webhooks: crate::config::WebhooksSettings,
}

/// The edge's routes.
pub fn router(state: AppState, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/admin/products/{sku}", put(admin::put_product))
        .route(
            "/admin/stock/{sku}",
            put(admin::put_stock).get(admin::get_stock),
        )
        .route("/admin/promos/{code}", put(admin::put_promo))
        .route(
            "/admin/webhooks",
            post(admin::create_webhook).get(admin::list_webhooks),
        )
        .route(
            "/admin/webhooks/{id}",
            get(admin::get_webhook).delete(admin::delete_webhook),
        )
        .route("/admin/webhooks/{id}/rotate", post(admin::rotate_webhook))
        .route("/admin/webhooks/{id}/enable", post(admin::enable_webhook))
        .route("/admin/webhooks/{id}/disable", post(admin::disable_webhook))
        .route(
            "/admin/webhooks/{id}/deliveries",
            get(admin::webhook_deliveries),
        )
        .route("/admin/webhooks/{id}/replay", post(admin::replay_webhook))
        .route("/admin/tax-rates/{country}", put(admin::put_tax_rates))
        .route(
            "/admin/shipping-rates/{zone}",
            put(admin::put_shipping_rates),
        )
        .route("/cart", get(carts::get_cart))
        .route(
            "/cart/promo",
            post(carts::apply_promo).delete(carts::remove_promo),
        )
        .route("/cart/quote", post(carts::quote))
        .route("/cart/items", post(carts::add_item))
        .route(
            "/cart/items/{sku}",
            put(carts::set_item).delete(carts::remove_item),
        )
        .route("/checkout", post(checkout::checkout))
        .route("/orders/{order_id}", get(orders::get_order))
        .route("/orders/{order_id}/events", get(timeline::events))
        .route("/orders/{order_id}/ship", post(actions::ship))
        .route("/orders/{order_id}/shipments", post(actions::ship_part))
        .route("/orders/{order_id}/cancel", post(actions::cancel))
        .route("/orders/{order_id}/refund", post(actions::refund))
        .route("/orders/{order_id}/refunds", post(actions::refund_part))
        .route("/webhooks/psp/{provider}", post(webhooks::provider_webhook))
        .fallback(|| async { error::ApiError::not_found("not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.admission.clone(),
            admit,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .nest("/api", api)
        .method_not_allowed_fallback(|| async {
            error::ApiError::client(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .with_state(state)
        // Refuse big bodies before reading them (413), not after buffering them.
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(track))
}

/// How many API requests an edge works on at once, and how long one waits for a slot.
#[derive(Clone)]
pub struct Admission {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    wait: std::time::Duration,
    /// Requests turned away in the current second (and which second that is): the harder
    /// the edge is shedding, the later it asks clients back, so retries spread out instead of
    /// arriving as a second storm.
    shed: std::sync::Arc<std::sync::Mutex<(u64, usize)>>,
    max: usize,
}

impl Admission {
    /// Waits (at most `wait`) for a slot; `Busy` with a Retry-After that grows with the line.
    pub async fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit, error::ApiError> {
        let slot = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await;
        if let Ok(Ok(slot)) = slot {
            return Ok(slot);
        }
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let shed = match self.shed.lock() {
            Ok(mut shed) => {
                if shed.0 != second {
                    *shed = (second, 0);
                }
                shed.1 += 1;
                shed.1
            }
            Err(_) => 0,
        };
        // One more second per eight rounds of slots turned away this second, up to 30 s.
        Err(error::ApiError::Busy(
            (1 + shed / (self.max * 8)).min(30) as u64
        ))
    }

    /// `max` requests at once; a request waits at most `wait` for a slot.
    pub fn new(max: usize, wait: std::time::Duration) -> Self {
        Self {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            wait,
            shed: std::sync::Arc::default(),
            max: max.max(1),
        }
    }
}

/// Admits a request if a slot frees up in time; otherwise answers 503 with Retry-After at once.
async fn admit(
    axum::extract::State(admission): axum::extract::State<Admission>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Adding to a cart takes its slot itself, after the sold-out check: a buyer of a sold-out
    // SKU is answered at once, without waiting in line for the database.
    let adds_to_cart = request.method() == axum::http::Method::POST
        && request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .is_some_and(|p| p.as_str().ends_with("/cart/items"));
    if adds_to_cart {
        return next.run(request).await;
    }
    match admission.enter().await {
        Ok(slot) => {
            let response = next.run(request).await;
            drop(slot);
            response
        }
        Err(busy) => busy.into_response(),
    }
}

/// Prometheus text exposition of this process's metrics (no auth: keep the port internal).
pub async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

/// Counts every request by route template (not raw path: ids would explode the series).
async fn track(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    crate::metrics::http_request(route, method, response.status().as_u16(), started.elapsed());
    response
}

/// The router of a process without an edge: `/metrics` only.
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}
