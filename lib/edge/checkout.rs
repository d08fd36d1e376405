//! Checkout submission (the edge's half of the saga): an idempotent request record, the
//! cart lock, and the outbox row that guarantees `checkout.requested` reaches JetStream.
//!
//! The cart is read and priced without a lock, then the request row, the outbox row and the
//! cart's new state commit in one call that first checks, under the cart's lock, that the
//! cart is still what was priced (under load, one statement and commit carry several buyers'
//! calls: `db::group`); the event is published right after, without the buyer waiting for it. Where this edge wrote the cart
//! moments before, it prices what it remembers with its product cache and skips the read; the
//! acceptance then checks the products too, and any difference sends it back to the read. If the process dies in between,
//! the outbox sweeper republishes it (same `Nats-Msg-Id`), so an accepted checkout is never
//! lost.

use std::collections::HashMap;

use chrono::Utc;
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tracing::debug;
use uuid::Uuid;

use crate::catalog::{CatalogCache, Product, ProductRow};
use crate::db::group::{Group, Writes};
use crate::db::Leases;
use crate::domain::Address;
use crate::edge::cart::pricing::{Item, Products};
use crate::edge::cart::{self, CartError, SeenCart, SeenCarts};
use crate::edge::outbox::Outbox;
use crate::inventory::soldout::SoldOut;
use crate::pricing::destination::{DestinationRates, RatesCache};
use crate::pricing::Priced;
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

/// How often a checkout reads and prices the cart again after the cart changed between its
/// read and its acceptance (a concurrent cart change or duplicate of the same buyer).
const ACCEPT_ATTEMPTS: usize = 3;

/// The checkout's one read: the request already recorded under the Idempotency-Key (if
/// any), whether the cart may be checked out, its promotion code, and its lines joined to
/// the catalog's current products. A row per line, or one row of nulls for an empty cart.
const READ: &str = "SELECT k.request_hash, k.order_id, c.checkable, c.promo_code, i.sku, i.qty,
        p.name, p.price, p.currency, p.weight_grams, p.tax_code, p.active
    FROM (SELECT 1) AS one
    LEFT JOIN edge.checkouts k ON k.user_id = $1 AND k.idempotency_key = $2
    LEFT JOIN (SELECT cart_id, promo_code,
                      status = 'open' OR order_id IS NULL OR orders.has_failed(order_id) AS checkable
               FROM edge.carts WHERE cart_id = $3 AND user_id = $1) AS c ON true
    LEFT JOIN edge.cart_items i ON i.cart_id = c.cart_id
    LEFT JOIN LATERAL catalog.product(i.sku) AS p ON true
    ORDER BY i.added_at, i.sku";

/// One row of [`READ`].
#[derive(sqlx::FromRow)]
struct ReadRow {
    request_hash: Option<Vec<u8>>,
    order_id: Option<Uuid>,
    checkable: Option<bool>,
    promo_code: Option<String>,
    sku: Option<String>,
    qty: Option<i32>,
    name: Option<String>,
    price: Option<Decimal>,
    currency: Option<String>,
    weight_grams: Option<i32>,
    tax_code: Option<String>,
    active: Option<bool>,
}

impl ReadRow {
    /// The line's product as the catalog has it now (`None`: no such product).
    fn product(&mut self) -> Option<Product> {
        ProductRow {
            sku: self.sku.clone()?,
            name: self.name.take()?,
            price: self.price?,
            currency: self.currency.take()?,
            weight_grams: self.weight_grams?,
            tax_code: self.tax_code.take()?,
            active: self.active?,
        }
        .into_product()
    }
}

/// What the read found.
enum Found {
    /// The key was used before: its order, or a refusal if the request differs.
    Replay(Result<Uuid, CheckoutError>),
    /// A cart to price: its promotion code, its lines and their products.
    Cart {
        code: Option<String>,
        items: Vec<Item>,
        products: HashMap<String, Product>,
    },
}

/// The request being accepted.
#[derive(Clone, Copy)]
struct Submission<'a> {
    user_id: &'a str,
    key: &'a str,
    hash: &'a [u8],
    request: &'a CheckoutRequest,
    trace: &'a TraceParent,
}

/// What the acceptance checks the cart against: its promotion code and lines as priced, and
/// their products where those came from the edge's cache.
struct ToCheck {
    code: Option<String>,
    skus: Vec<String>,
    qtys: Vec<i32>,
    products: Option<AsPriced>,
}

/// A cart about to be priced.
struct ToPrice {
    code: Option<String>,
    items: Vec<Item>,
    products: HashMap<String, Product>,
    as_of: AsOf,
}

/// Where a cart to price came from.
#[derive(Clone, Copy)]
enum AsOf {
    /// Read with its products just now.
    ReadNow,
    /// Remembered by this edge ([`SeenCarts`]), its products from the catalog cache: the
    /// acceptance checks both.
    Remembered,
}

impl AsOf {
    /// The `cart` label of `checkout_accepted_carts_total`.
    fn label(self) -> &'static str {
        match self {
            Self::ReadNow => "read",
            Self::Remembered => "remembered",
        }
    }
}

/// Each line's product as priced, for the acceptance to check against the catalog (in the
/// cart's currency, which pricing settled).
struct AsPriced {
    prices: Vec<Decimal>,
    weights: Vec<i32>,
    tax_codes: Vec<&'static str>,
}

impl AsPriced {
    /// The products of `skus`, in order (a SKU without one fails pricing before this counts).
    fn of(skus: &[String], products: &HashMap<String, Product>) -> Self {
        let lines = skus.iter().filter_map(|sku| products.get(sku));
        Self {
            prices: lines.clone().map(|p| p.price.amount()).collect(),
            weights: lines.clone().map(|p| p.weight_grams).collect(),
            tax_codes: lines.map(|p| p.tax_code.as_str()).collect(),
        }
    }
}

/// Sorts the read's rows into a replay or a cart (or a refusal).
fn found(mut rows: Vec<ReadRow>, hash: &[u8]) -> Result<Found, CheckoutError> {
    if let Some((stored_hash, order_id)) = rows
        .first()
        .and_then(|r| Some((r.request_hash.as_ref()?, r.order_id?)))
    {
        // If its publish has not gone out yet, the outbox sweeper owes it.
        return Ok(Found::Replay(if stored_hash.as_slice() == hash {
            Ok(order_id)
        } else {
            Err(CheckoutError::KeyReused)
        }));
    }
    match rows.first().and_then(|r| r.checkable) {
        None => return Err(CheckoutError::CartNotFound),
        Some(false) => return Err(CheckoutError::AlreadyCheckedOut),
        Some(true) => {}
    }
    let code = rows.first().and_then(|r| r.promo_code.clone());
    let mut items = Vec::with_capacity(rows.len());
    let mut products = HashMap::with_capacity(rows.len());
    for row in &mut rows {
        let product = row.product();
        let (Some(sku), Some(qty)) = (row.sku.take(), row.qty) else {
            continue;
        };
        if let Some(product) = product {
            products.insert(sku.clone(), product);
        }
        items.push((sku, qty));
    }
    Ok(Found::Cart {
        code,
        items,
        products,
    })
}

/// The edge's checkout service.
#[derive(Clone)]
pub struct Checkouts {
    leases: Leases,
    /// Accepts checkouts, many buyers' per statement under load.
    accepts: Group<Accepts>,
    seal: std::sync::Arc<crate::payments::token_seal::TokenSeal>,
    outbox: Outbox,
    known: Known,
}

/// What the edge process keeps in memory that a checkout uses instead of asking PostgreSQL.
#[derive(Clone)]
pub struct Known {
    pub rates: RatesCache,
    pub catalog: CatalogCache,
    pub seen: SeenCarts,
    pub sold_out: SoldOut,
}

impl Checkouts {
    /// The service; accepted requests go out through `outbox`.
    pub fn new(
        leases: Leases,
        seal: std::sync::Arc<crate::payments::token_seal::TokenSeal>,
        outbox: Outbox,
        known: Known,
        group_linger: std::time::Duration,
    ) -> Self {
        Self {
            accepts: Group::new(Accepts, leases.clone(), group_linger),
            leases,
            seal,
            outbox,
            known,
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
            .known
            .rates
            .get(&request.address.country, request.address.region.as_deref())
            .await?;
        let submission = Submission {
            user_id,
            key,
            hash: &hash,
            request,
            trace,
        };
        // The cart as this edge wrote it moments ago: priced without reading it, and checked
        // at acceptance instead (one statement fewer per checkout).
        if let Some(seen) = self.known.seen.take(request.cart_id, user_id).await {
            if let Some(order_id) = self.accept_as_seen(&submission, &rates, &seen).await? {
                return Ok(order_id);
            }
        }
        // Optimistic: read and price without a lock, then accept only if the cart is still
        // what was priced (`edge.accept_checkout` takes the cart's lock and checks). Two
        // round trips instead of a six-statement transaction; a cart changed in between is
        // read again.
        for _ in 0..ACCEPT_ATTEMPTS {
            let mut conn = self.leases.acquire().await?;
            let rows: Vec<ReadRow> = sqlx::query_as(READ)
                .bind(user_id)
                .bind(key)
                .bind(request.cart_id)
                .fetch_all(&mut *conn)
                .await?;
            // Pricing reads the database only for a promotion code, from the pool.
            conn.park();
            let cart = match found(rows, &hash)? {
                Found::Replay(order) => return order,
                Found::Cart {
                    code,
                    items,
                    products,
                } => ToPrice {
                    code,
                    items,
                    products,
                    as_of: AsOf::ReadNow,
                },
            };
            if let Some(order_id) = self.price_and_accept(&submission, &rates, cart).await? {
                return Ok(order_id);
            }
        }
        Err(CheckoutError::Cart(CartError::Contended))
    }

    /// Prices the cart as this edge last wrote it, with the catalog cache's products, and
    /// accepts it if the cart and its products are still what was priced. `None` if not, or
    /// if pricing refused it: the memory may be what is wrong, so the read decides.
    async fn accept_as_seen(
        &self,
        submission: &Submission<'_>,
        rates: &DestinationRates,
        seen: &SeenCart,
    ) -> Result<Option<Uuid>, CheckoutError> {
        let skus: Vec<String> = seen.items.iter().map(|(sku, _)| sku.clone()).collect();
        let products = self
            .known
            .catalog
            .get_many(&skus)
            .await?
            .into_iter()
            .map(|p| (p.sku.to_string(), p))
            .collect();
        let cart = ToPrice {
            code: seen.promo_code.clone(),
            items: seen.items.clone(),
            products,
            as_of: AsOf::Remembered,
        };
        match self.price_and_accept(submission, rates, cart).await {
            Ok(accepted) => Ok(accepted),
            Err(
                e @ (CheckoutError::Database(_)
                | CheckoutError::Encode(_)
                | CheckoutError::Cart(CartError::Database(_))),
            ) => Err(e),
            Err(refused) => {
                debug!(reason = %refused, "the remembered cart does not price; reading it");
                Ok(None)
            }
        }
    }

    /// Prices the cart and accepts it if it is still what was priced, then publishes its
    /// request; `None` if the cart (or a remembered product) changed since.
    async fn price_and_accept(
        &self,
        submission: &Submission<'_>,
        rates: &DestinationRates,
        cart: ToPrice,
    ) -> Result<Option<Uuid>, CheckoutError> {
        let ToPrice {
            code,
            items,
            products,
            as_of,
        } = cart;
        let (skus, qtys): (Vec<String>, Vec<i32>) = items.iter().cloned().unzip();
        // A product taken off sale (discontinued, recalled) stays in carts but is not sold.
        if let Some(sku) = skus
            .iter()
            .find(|sku| products.get(*sku).is_some_and(|p| !p.active))
        {
            return Err(CartError::Inactive(sku.clone()).into());
        }
        // What gets charged is the catalog's price now: read just before, or remembered by
        // the edge's cache and checked against the catalog at acceptance.
        let from_cache = matches!(as_of, AsOf::Remembered).then(|| AsPriced::of(&skus, &products));
        let ship_to = cart::ShipTo {
            rates,
            method: &submission.request.shipping_method,
        };
        let priced = cart::pricing::price_lines(
            self.leases.pool(),
            code.clone(),
            items,
            Products::Read(products),
            Some(ship_to),
        )
        .await?
        .ok_or(CheckoutError::EmptyCart)?;
        // A SKU every edge has just heard is sold out: refuse here, before any write or
        // the saga (the reserve step would only refuse it later). Never a promise of stock.
        if let Some(line) = priced.lines.iter().find(|l| {
            self.known
                .sold_out
                .refuses(l.sku.as_str(), i64::from(l.qty.get()))
        }) {
            return Err(CheckoutError::OutOfStock(line.sku.to_string()));
        }
        let to_check = ToCheck {
            code,
            skus,
            qtys,
            products: from_cache,
        };
        let accepted = self.accept(submission, priced, to_check).await?;
        let Some((order_id, out)) = accepted else {
            return Ok(None);
        };
        crate::metrics::checkout_accepted(as_of.label());
        self.outbox.publish_soon(out);
        Ok(Some(order_id))
    }

    /// Records the priced checkout, its outbox row and the cart's new state, if the cart is
    /// still as it was read and the key still unused; `None` if either changed since.
    async fn accept(
        &self,
        submission: &Submission<'_>,
        priced: Priced,
        to_check: ToCheck,
    ) -> Result<Option<(Uuid, Outgoing)>, CheckoutError> {
        let Submission {
            user_id,
            key,
            hash,
            request,
            trace,
        } = *submission;
        let promo_code = priced
            .promo
            .as_ref()
            .filter(|p| p.applied)
            .map(|p| p.code.clone());
        let priced_currency = priced.currency.code();
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
        let acceptance = Acceptance {
            user_id: user_id.to_owned(),
            key: key.to_owned(),
            hash: hash.to_vec(),
            order_id,
            cart_id: request.cart_id,
            promo: to_check.code,
            skus: to_check.skus,
            qtys: to_check.qtys,
            currency: priced_currency,
            products: to_check.products,
            event: kept,
            traceparent: out.traceparent.clone(),
            msg_id: out.msg_id.clone(),
            subject: out.subject.clone(),
            payload: out.payload.clone(),
        };
        // Refused (false) also when the key was accepted after this request read it: on
        // another cart (the cart locks did not serialize the two, the key's primary key did),
        // or on this one by an identical request whose order then failed. The next read finds
        // the key and tells a replay from a reused key.
        let accepted = self.accepts.write(acceptance).await?;
        Ok(accepted.then_some((order_id, out)))
    }
}

/// A checkout to accept: the arguments of `edge.accept_checkout`.
pub struct Acceptance {
    user_id: String,
    key: String,
    hash: Vec<u8>,
    order_id: Uuid,
    cart_id: Uuid,
    promo: Option<String>,
    skus: Vec<String>,
    qtys: Vec<i32>,
    /// The cart's currency, checked with the products.
    currency: &'static str,
    /// Checked against the catalog if given.
    products: Option<AsPriced>,
    event: Vec<u8>,
    traceparent: Option<String>,
    msg_id: String,
    subject: String,
    payload: Vec<u8>,
}

/// Accepts checkouts of different buyers in one statement ([`Group`]), each answered as
/// `edge.accept_checkout` answers it. The buyer is the key: `accept_checkout` locks the
/// buyer's cart, so statements lock carts in buyer order.
pub struct Accepts;

/// One statement: `edge.accept_checkout` per row, in the rows' order. The lines of every row
/// travel as flat arrays (arrays of arrays must be rectangular); each row takes its slice.
/// A row's products are checked if it has a currency (its products came from the cache).
const ACCEPT_ALL: &str = "SELECT edge.accept_checkout(r.user_id, r.key, r.hash, r.order_id,
        r.cart_id, r.promo, ($7::text[])[r.lo:r.hi], ($8::int[])[r.lo:r.hi], r.event,
        r.traceparent, r.msg_id, r.subject, r.payload, r.currency,
        CASE WHEN r.currency IS NOT NULL THEN ($17::numeric[])[r.lo:r.hi] END,
        ($18::int[])[r.lo:r.hi], ($19::text[])[r.lo:r.hi])
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::uuid[], $6::text[],
                $9::int[], $10::int[], $11::bytea[], $12::text[], $13::text[], $14::text[],
                $15::bytea[], $16::text[])
        WITH ORDINALITY AS r(user_id, key, hash, order_id, cart_id, promo, lo, hi, event,
                             traceparent, msg_id, subject, payload, currency, n)
    ORDER BY r.n";

impl Writes for Accepts {
    type Row = Acceptance;
    type Answer = bool;
    type Key = String;

    fn key(row: &Acceptance) -> String {
        row.user_id.clone()
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        rows: &[Acceptance],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let (mut skus, mut qtys, mut lo, mut hi) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut prices, mut weights, mut tax_codes) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            // PostgreSQL arrays count from 1; an empty slice (lo > hi) is an empty array.
            lo.push(i32::try_from(skus.len() + 1).unwrap_or(i32::MAX));
            skus.extend(row.skus.iter().map(String::as_str));
            qtys.extend(row.qtys.iter().copied());
            hi.push(i32::try_from(skus.len()).unwrap_or(i32::MAX));
            // Every row fills its slice of the product arrays, checked or not, so that the
            // slices line up.
            match &row.products {
                Some(p) if p.prices.len() == row.skus.len() => {
                    prices.extend(p.prices.iter().copied());
                    weights.extend(p.weights.iter().copied());
                    tax_codes.extend(p.tax_codes.iter().copied());
                }
                _ => {
                    prices.extend(row.skus.iter().map(|_| Decimal::ZERO));
                    weights.extend(row.skus.iter().map(|_| 0));
                    tax_codes.extend(row.skus.iter().map(|_| ""));
                }
            }
        }
        sqlx::query_scalar(ACCEPT_ALL)
            .bind(rows.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.hash.as_slice()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.cart_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.promo.as_deref()).collect::<Vec<_>>())
            .bind(skus)
            .bind(qtys)
            .bind(lo)
            .bind(hi)
            .bind(rows.iter().map(|r| r.event.as_slice()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.traceparent.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|r| r.payload.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.iter()
                    .map(|r| r.products.is_some().then_some(r.currency))
                    .collect::<Vec<_>>(),
            )
            .bind(prices)
            .bind(weights)
            .bind(tax_codes)
            .fetch_all(&mut *conn)
            .await
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
