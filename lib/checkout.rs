//! Checkout submission (the edge's half of the saga): an idempotent request record, the
//! cart lock, and the outbox that guarantees `checkout.requested` reaches JetStream.
//!
//! The request row, the cart lock and the encoded event commit in one transaction; the
//! event is published right after. If the process dies in between, the outbox sweeper
//! republishes it (same `Nats-Msg-Id`), so an accepted checkout is never lost.

use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::Bus;
use crate::cart::{self, CartError};
use crate::domain::Address;
use crate::orders;
use crate::pricing::destination::RatesCache;
use crate::saga::events::{Checkout, Event, Line};
use crate::saga::runner::Outgoing;
use crate::saga::trace::TraceParent;

/// A validated checkout request.
#[derive(Debug, Clone, Serialize)]
pub struct CheckoutRequest {
    pub cart_id: Uuid,
    pub payment_token: String,
    pub address: Address,
    pub shipping_method: String,
}

/// Why a checkout was refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no such cart")]
    CartNotFound,
    #[error("this cart was already checked out under another Idempotency-Key")]
    AlreadyCheckedOut,
    #[error("the cart is empty")]
    EmptyCart,
    #[error("this Idempotency-Key was used with a different request")]
    KeyReused,
    #[error(transparent)]
    Cart(#[from] CartError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("cannot encode the event: {0}")]
    Encode(String),
}

/// A request already recorded under an Idempotency-Key.
#[derive(sqlx::FromRow)]
struct StoredCheckout {
    request_hash: Vec<u8>,
    order_id: Uuid,
    published: bool,
    event: Vec<u8>,
    traceparent: Option<String>,
}

/// The edge's checkout service.
#[derive(Clone)]
pub struct Checkouts {
    pool: PgPool,
    bus: Bus,
    rates: RatesCache,
    published: mpsc::UnboundedSender<Uuid>,
}

impl Checkouts {
    /// The service, and the task that records publishes in batches (run it alongside).
    pub fn new(pool: PgPool, bus: Bus, rates: RatesCache) -> (Self, mpsc::UnboundedReceiver<Uuid>) {
        let (published, rx) = mpsc::unbounded_channel();
        (
            Self {
                pool,
                bus,
                rates,
                published,
            },
            rx,
        )
    }

    /// Accepts a checkout, or returns the order a previous identical request created.
    pub async fn submit(
        &self,
        user_id: &str,
        key: &str,
        request: &CheckoutRequest,
        trace: &TraceParent,
    ) -> Result<Uuid, CheckoutError> {
        let hash = request_hash(request);
        let rates = self
            .rates
            .get(&request.address.country, request.address.region.as_deref())
            .await?;
        let mut tx = self.pool.begin().await?;
        // Serialize requests with one key: concurrent duplicates wait, then replay.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 1))")
            .bind(user_id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let existing: Option<StoredCheckout> = sqlx::query_as(
            "SELECT request_hash, order_id, published_at IS NOT NULL AS published, event, traceparent
             FROM edge.checkouts WHERE user_id = $1 AND idempotency_key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(stored) = existing {
            tx.commit().await?;
            if stored.request_hash != hash {
                return Err(CheckoutError::KeyReused);
            }
            if !stored.published {
                self.publish(
                    stored.order_id,
                    &stored.event,
                    stored.traceparent.as_deref(),
                )
                .await;
            }
            return Ok(stored.order_id);
        }
        let cart: Option<(String, Option<Uuid>)> = sqlx::query_as(
            "SELECT status, order_id FROM edge.carts WHERE cart_id = $1 AND user_id = $2 FOR UPDATE",
        )
        .bind(request.cart_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        match cart {
            None => return Err(CheckoutError::CartNotFound),
            Some((status, order_id)) if status == "checked_out" => {
                let failed = match order_id {
                    Some(order_id) => orders::is_failed(&mut tx, order_id).await?,
                    None => true,
                };
                if !failed {
                    return Err(CheckoutError::AlreadyCheckedOut);
                }
            }
            Some(_) => {}
        }
        // Current prices from the database (not the edge cache): this is what gets charged.
        let ship_to = cart::ShipTo {
            rates: &rates,
            method: &request.shipping_method,
        };
        let priced = cart::price_cart(&mut tx, request.cart_id, None, Some(ship_to))
            .await?
            .ok_or(CheckoutError::EmptyCart)?;
        let promo_code = priced
            .promo
            .as_ref()
            .filter(|p| p.applied)
            .map(|p| p.code.clone());
        let order_id = Uuid::now_v7();
        let checkout = Checkout {
            order_id,
            user_id: user_id.to_owned(),
            cart_id: request.cart_id,
            items: priced
                .lines
                .iter()
                .map(|l| Line {
                    sku: l.sku.clone(),
                    qty: l.qty.get(),
                    unit_price: l.unit_price.amount(),
                    line_total: l.line_total.amount(),
                    discount: l.discount.amount(),
                    tax: l.tax.amount(),
                })
                .collect(),
            subtotal: priced.subtotal.amount(),
            discount: priced.discount.amount(),
            tax: priced.tax.amount(),
            shipping: priced.shipping.amount(),
            total: priced.total.amount(),
            currency: priced.currency.code().to_owned(),
            payment_token: request.payment_token.clone(),
            address: request.address.clone(),
            requested_at: Utc::now(),
            promo_code,
            shipping_method: Some(request.shipping_method.clone()),
        };
        let event = Event::Requested { checkout }
            .encode()
            .map_err(|e| CheckoutError::Encode(e.to_string()))?;
        let traceparent = trace.header_value();
        // The request row and the cart lock in one statement.
        sqlx::query(
            "WITH accepted AS (
                 INSERT INTO edge.checkouts
                     (user_id, idempotency_key, request_hash, order_id, cart_id, event, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $6, $7))
             UPDATE edge.carts SET status = 'checked_out', order_id = $4, updated_at = now()
             WHERE cart_id = $5",
        )
        .bind(user_id)
        .bind(key)
        .bind(&hash)
        .bind(order_id)
        .bind(request.cart_id)
        .bind(&event)
        .bind(&traceparent)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.publish(order_id, &event, Some(&traceparent)).await;
        Ok(order_id)
    }

    /// Publishes a stored `checkout.requested`; on failure the sweeper retries later.
    async fn publish(&self, order_id: Uuid, event: &[u8], traceparent: Option<&str>) -> bool {
        let out = requested_outgoing(order_id, event, traceparent);
        match self.bus.publish(&out).await {
            Ok(()) => {
                let _ = self.published.send(order_id);
                true
            }
            Err(e) => {
                tracing::warn!(%order_id, error = %e, "publish failed; the outbox will retry");
                false
            }
        }
    }

    /// Marks published requests in batches (one UPDATE per batch, off the request path).
    pub async fn run_marker(self, mut rx: mpsc::UnboundedReceiver<Uuid>) {
        let mut batch = Vec::with_capacity(512);
        while rx.recv_many(&mut batch, 512).await > 0 {
            let result = sqlx::query(
                "UPDATE edge.checkouts SET published_at = now()
                 WHERE order_id = ANY($1) AND published_at IS NULL",
            )
            .bind(&batch)
            .execute(&self.pool)
            .await;
            if let Err(e) = result {
                // Unmarked rows are republished by the sweeper; dedup makes that harmless.
                tracing::warn!(error = %e, "could not mark published checkouts");
            }
            batch.clear();
        }
    }

    /// Republishes accepted checkouts whose publish never completed, until shutdown.
    pub async fn run_sweeper(
        self,
        interval: Duration,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.sweep_once(grace).await {
                tracing::warn!(error = %e, "outbox sweep failed");
            }
        }
    }

    /// One sweep: every unpublished request older than `grace`, locked so that several
    /// edge instances share the work without publishing the same row at once.
    pub async fn sweep_once(&self, grace: Duration) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, Vec<u8>, Option<String>)> = sqlx::query_as(
            "SELECT order_id, event, traceparent FROM edge.checkouts
             WHERE published_at IS NULL AND created_at < now() - $1::interval
             ORDER BY created_at LIMIT 200 FOR UPDATE SKIP LOCKED",
        )
        .bind(format!("{} milliseconds", grace.as_millis()))
        .fetch_all(&mut *tx)
        .await?;
        let mut done = Vec::new();
        for (order_id, event, traceparent) in &rows {
            let out = requested_outgoing(*order_id, event, traceparent.as_deref());
            match self.bus.publish(&out).await {
                Ok(()) => done.push(*order_id),
                Err(e) => {
                    tracing::warn!(%order_id, error = %e, "outbox republish failed");
                    break;
                }
            }
        }
        sqlx::query("UPDATE edge.checkouts SET published_at = now() WHERE order_id = ANY($1)")
            .bind(&done)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if !done.is_empty() {
            tracing::info!(count = done.len(), "outbox republished checkout requests");
        }
        Ok(done.len())
    }
}

/// The stored checkout of an order (pending or settled), with the user who placed it.
pub async fn find_by_order(pool: &PgPool, order_id: Uuid) -> Result<Option<Checkout>, sqlx::Error> {
    let row: Option<(Vec<u8>,)> =
        sqlx::query_as("SELECT event FROM edge.checkouts WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(bytes,)| match Event::decode(&bytes) {
        Ok(Event::Requested { checkout }) => Some(checkout),
        _ => None,
    }))
}

fn requested_outgoing(order_id: Uuid, event: &[u8], traceparent: Option<&str>) -> Outgoing {
    use crate::saga::events::EventKind;
    use crate::saga::subjects::{event_msg_id, event_subject};
    Outgoing {
        kind: EventKind::Requested,
        order_id,
        subject: event_subject(EventKind::Requested, order_id),
        msg_id: event_msg_id(EventKind::Requested, order_id),
        payload: event.to_vec(),
        traceparent: traceparent.map(str::to_owned),
    }
}

/// A fingerprint of what the request asks for, to tell a replay from a reused key.
fn request_hash(request: &CheckoutRequest) -> Vec<u8> {
    let canonical = serde_json::to_vec(request).unwrap_or_default();
    Sha256::digest(&canonical).to_vec()
}
