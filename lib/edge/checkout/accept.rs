//! The acceptance: the request row, the outbox row and the cart's new state commit together
//! in `edge.accept_checkout`, which first checks under the cart's lock that the cart (and,
//! for a remembered cart, each product) is still what was priced. Under load one statement
//! accepts several buyers' checkouts (`db::group`).

use std::collections::HashMap;

use chrono::Utc;
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{CheckoutError, Checkouts, Submission};
use crate::catalog::Product;
use crate::db::group::Writes;
use crate::pricing::Priced;
use crate::saga::events::{Checkout, Event, Line};
use crate::saga::outgoing::Outgoing;

/// What the acceptance checks the cart against: its promotion code and lines as priced, and
/// their products where those came from the edge's cache.
pub(super) struct ToCheck {
    pub code: Option<String>,
    pub skus: Vec<String>,
    pub qtys: Vec<i32>,
    pub products: Option<AsPriced>,
}

/// Each line's product as priced, for the acceptance to check against the catalog (in the
/// cart's currency, which pricing settled).
pub(super) struct AsPriced {
    prices: Vec<Decimal>,
    weights: Vec<i32>,
    tax_codes: Vec<&'static str>,
}

impl AsPriced {
    /// The products of `skus`, in order (a SKU without one fails pricing before this counts).
    pub(super) fn of(skus: &[String], products: &HashMap<String, Product>) -> Self {
        let lines = skus.iter().filter_map(|sku| products.get(sku));
        Self {
            prices: lines.clone().map(|p| p.price.amount()).collect(),
            weights: lines.clone().map(|p| p.weight_grams).collect(),
            tax_codes: lines.map(|p| p.tax_code.as_str()).collect(),
        }
    }
}

impl Checkouts {
    /// Records the priced checkout, its outbox row and the cart's new state, if the cart is
    /// still as it was read and the key still unused; `None` if either changed since.
    pub(super) async fn accept(
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
            return_url: request.return_url.clone(),
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
pub(super) struct Acceptance {
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
pub(super) struct Accepts;

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
