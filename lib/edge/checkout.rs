//! Checkout submission (the edge's half of the saga): an idempotent request record, the
//! cart lock, and the outbox row that guarantees `checkout.requested` reaches JetStream.
//!
//! The request row, the cart lock and the outbox row commit in one statement; the event is
//! published right after. If the process dies in between, the outbox sweeper republishes it
//! (same `Nats-Msg-Id`), so an accepted checkout is never lost.

use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::Address;
use crate::edge::cart::{self, CartError};
use crate::edge::outbox::Outbox;
use crate::inventory::soldout::SoldOut;
use crate::pricing::destination::RatesCache;
use crate::saga::events::{Checkout, Event, Line};
use crate::saga::outgoing::Outgoing;
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
    #[error("{0} is sold out")]
    OutOfStock(String),
    #[error("this Idempotency-Key was used with a different request")]
    KeyReused,
    #[error(transparent)]
    Cart(#[from] CartError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("cannot encode the event: {0}")]
    Encode(#[source] crate::bus::Cause),
}

/// The request already recorded under the Idempotency-Key (if any) beside one of the cart's
/// lines (if any).
#[derive(sqlx::FromRow)]
struct KeyAndLine {
    request_hash: Option<Vec<u8>>,
    order_id: Option<Uuid>,
    promo_code: Option<String>,
    sku: Option<String>,
    qty: Option<i32>,
}

/// The edge's checkout service.
#[derive(Clone)]
pub struct Checkouts {
    pool: PgPool,
    seal: std::sync::Arc<crate::payments::token_seal::TokenSeal>,
    outbox: Outbox,
    rates: RatesCache,
    sold_out: SoldOut,
}

impl Checkouts {
    /// The service; accepted requests go out through `outbox`.
    pub fn new(
        pool: PgPool,
        seal: std::sync::Arc<crate::payments::token_seal::TokenSeal>,
        outbox: Outbox,
        rates: RatesCache,
        sold_out: SoldOut,
    ) -> Self {
        Self {
            pool,
            seal,
            outbox,
            rates,
            sold_out,
        }
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
        // The cart's row lock serializes every request for this cart, duplicates included:
        // a concurrent duplicate waits here, then finds the first one's key below.
        let cart: Option<(bool,)> = sqlx::query_as(
            "SELECT status = 'open' OR order_id IS NULL OR orders.has_failed(order_id)
             FROM edge.carts WHERE cart_id = $1 AND user_id = $2 FOR UPDATE",
        )
        .bind(request.cart_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        // The key and the cart's lines in one round trip, read after the lock.
        let rows: Vec<KeyAndLine> = sqlx::query_as(
            "SELECT k.request_hash, k.order_id, c.promo_code, i.sku, i.qty
             FROM (SELECT 1) AS one
             LEFT JOIN edge.checkouts k ON k.user_id = $1 AND k.idempotency_key = $2
             LEFT JOIN edge.carts c ON c.cart_id = $3 AND c.user_id = $1
             LEFT JOIN edge.cart_items i ON i.cart_id = c.cart_id
             ORDER BY i.added_at, i.sku",
        )
        .bind(user_id)
        .bind(key)
        .bind(request.cart_id)
        .fetch_all(&mut *tx)
        .await?;
        if let Some((stored_hash, order_id)) = rows
            .first()
            .and_then(|r| Some((r.request_hash.as_ref()?, r.order_id?)))
        {
            if *stored_hash != hash {
                return Err(CheckoutError::KeyReused);
            }
            // If its publish has not gone out yet, the outbox sweeper owes it.
            return Ok(order_id);
        }
        match cart {
            None => return Err(CheckoutError::CartNotFound),
            Some((false,)) => return Err(CheckoutError::AlreadyCheckedOut),
            Some((true,)) => {}
        }
        let code = rows.first().and_then(|r| r.promo_code.clone());
        let items = rows
            .into_iter()
            .filter_map(|r| Some((r.sku?, r.qty?)))
            .collect();
        // Current prices from the database (not the edge cache): this is what gets charged.
        let ship_to = cart::ShipTo {
            rates: &rates,
            method: &request.shipping_method,
        };
        let priced = cart::pricing::price_lines(&mut tx, code, items, None, Some(ship_to))
            .await?
            .ok_or(CheckoutError::EmptyCart)?;
        // A SKU every edge has just heard is sold out: refuse here, before any write or the
        // saga (the reserve step would only refuse it later). Never a promise of stock.
        if let Some(line) = priced.lines.iter().find(|l| {
            self.sold_out
                .refuses(l.sku.as_str(), i64::from(l.qty.get()))
        }) {
            return Err(CheckoutError::OutOfStock(line.sku.to_string()));
        }
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
                    qty: l.qty,
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
            currency: priced.currency,
            payment_token: self
                .seal
                .seal(&request.payment_token)
                .map_err(|e| CheckoutError::Encode(e.into()))?,
            address: Some(request.address.clone()),
            requested_at: Utc::now(),
            promo_code,
            shipping_method: Some(request.shipping_method.clone()),
        };
        // The request row keeps the order's checkout for good (the order's view, shipping,
        // refunds and the watchdog read it) with its address but not the payment token; the
        // event on the bus carries the token to authorize and no address (no step needs it).
        let kept = Event::Requested {
            checkout: checkout.clone().spent(),
        }
        .encode()
        .map_err(|e| CheckoutError::Encode(e.into()))?;
        let out = Outgoing::new(
            &Event::Requested {
                checkout: checkout.for_the_bus(),
            },
            Some(trace),
        )
        .map_err(|e| CheckoutError::Encode(e.into()))?;
        // The request row, the outbox row and the cart lock in one statement.
        sqlx::query(
            "WITH accepted AS (
                 INSERT INTO edge.checkouts
                     (user_id, idempotency_key, request_hash, order_id, cart_id, event, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $10, $7)),
             owed AS (
                 INSERT INTO edge.outbox (msg_id, subject, payload, traceparent)
                 VALUES ($8, $9, $6, $7))
             UPDATE edge.carts SET status = 'checked_out', order_id = $4, updated_at = now()
             WHERE cart_id = $5",
        )
        .bind(user_id)
        .bind(key)
        .bind(&hash)
        .bind(order_id)
        .bind(request.cart_id)
        .bind(&out.payload)
        .bind(&out.traceparent)
        .bind(&out.msg_id)
        .bind(&out.subject)
        .bind(&kept)
        .execute(&mut *tx)
        .await
        .map_err(|e| match e {
            // The same key on another cart, accepted concurrently: the cart locks did not
            // serialize the two, the key's primary key did.
            sqlx::Error::Database(db) if db.constraint() == Some("checkouts_pkey") => {
                CheckoutError::KeyReused
            }
            e => CheckoutError::Database(e),
        })?;
        tx.commit().await?;
        self.outbox.publish(&out).await;
        Ok(order_id)
    }
}

/// The trace an order's checkout started, so later requests (ship, cancel, refund) join it.
pub async fn trace_of(pool: &PgPool, order_id: Uuid) -> Result<Option<TraceParent>, sqlx::Error> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT traceparent FROM edge.checkouts WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(row
        .and_then(|(tp,)| tp)
        .and_then(|tp| TraceParent::parse(&tp)))
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

/// A fingerprint of what the request asks for, to tell a replay from a reused key.
fn request_hash(request: &CheckoutRequest) -> Vec<u8> {
    let canonical = serde_json::to_vec(request).unwrap_or_default();
    Sha256::digest(&canonical).to_vec()
}
