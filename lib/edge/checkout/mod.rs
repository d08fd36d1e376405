//! Checkout submission (the edge's half of the saga): an idempotent request record, the
//! cart lock, and the outbox row that guarantees `checkout.requested` reaches JetStream.
//!
//! A checkout prices a `Snapshot` of the cart, then accepts it (`accept`): the request row,
//! the outbox row and the cart's new state commit in one call that first checks, under the
//! cart's lock, that the cart is still what was priced. The snapshot is what this edge
//! remembers of a cart it wrote moments before, with its product cache (`remembered`: no
//! read; the acceptance then checks the products too), or else one read of the key's request,
//! the cart and its products (`read`). Any difference at acceptance sends the checkout back
//! to the read. The event is published right after the commit, without the buyer waiting for
//! it; if the process dies in between, the outbox sweeper republishes it (same
//! `Nats-Msg-Id`), so an accepted checkout is never lost.

mod accept;
mod read;
mod remembered;

use std::collections::HashMap;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tracing::debug;
use uuid::Uuid;

use self::accept::Accepts;
use self::accept::{AsPriced, ToCheck};
use self::read::Found;
use crate::catalog::{CatalogCache, Product};
use crate::db::group::Group;
use crate::db::Leases;
use crate::domain::Address;
use crate::edge::cart::pricing::{Item, Products};
use crate::edge::cart::{self, CartError, SeenCart, SeenCarts};
use crate::edge::outbox::Outbox;
use crate::inventory::soldout::SoldOut;
use crate::pricing::destination::{DestinationRates, RatesCache};
use crate::saga::events::{Checkout, Event};
use crate::saga::trace::TraceParent;

/// A validated checkout request.
#[derive(Debug, Clone, Serialize)]
pub struct CheckoutRequest {
    pub cart_id: Uuid,
    pub payment_token: String,
    pub address: Address,
    pub shipping_method: String,
    /// Where the provider sends the buyer back after a payment challenge (3-D Secure). Left
    /// out of the request's fingerprint when absent, so earlier requests keep theirs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_url: Option<String>,
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

/// The request being accepted.
#[derive(Clone, Copy)]
struct Submission<'a> {
    user_id: &'a str,
    key: &'a str,
    hash: &'a [u8],
    request: &'a CheckoutRequest,
    trace: &'a TraceParent,
}

/// A cart as a checkout prices it: its promotion code, its lines and their products, and where
/// they came from, which decides what the acceptance checks.
struct Snapshot {
    code: Option<String>,
    items: Vec<Item>,
    products: HashMap<String, Product>,
    source: Source,
}

/// Where a snapshot came from.
#[derive(Clone, Copy)]
enum Source {
    /// Read with its products just now (`read`).
    ReadNow,
    /// Remembered by this edge, its products from the catalog cache (`remembered`): the
    /// acceptance checks both.
    Remembered,
}

impl Source {
    /// The `cart` label of `checkout_accepted_carts_total`.
    fn label(self) -> &'static str {
        match self {
            Self::ReadNow => "read",
            Self::Remembered => "remembered",
        }
    }
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
            let found = read::read(&mut conn, user_id, key, request.cart_id, &hash).await?;
            // Pricing reads the database only for a promotion code, from the pool.
            conn.park();
            let cart = match found {
                Found::Replay(order) => return order,
                Found::Cart(snapshot) => snapshot,
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
        let cart = remembered::snapshot(&self.known.catalog, seen).await?;
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
        cart: Snapshot,
    ) -> Result<Option<Uuid>, CheckoutError> {
        let Snapshot {
            code,
            items,
            products,
            source,
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
        let from_cache =
            matches!(source, Source::Remembered).then(|| AsPriced::of(&skus, &products));
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
        crate::metrics::checkout_accepted(source.label());
        self.outbox.publish_soon(out);
        Ok(Some(order_id))
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
