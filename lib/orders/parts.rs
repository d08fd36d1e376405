//! Shipments and refunds of an order: asked for by the edge (under the order's action lock,
//! so one is in flight per order at a time and each is computed from settled figures), then
//! settled by the order-lifecycle step from the provider's outcome. The order's status
//! follows from what has shipped and what has been refunded.

use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::allocation::{self, Allocation, Units, UnitsError};
use super::status::OrderStatus;
use crate::domain::Currency;
use crate::saga::events::{Line, Part, PartLine};

/// Why a shipment or refund cannot be asked for (a 4xx, nothing written).
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error(transparent)]
    Units(#[from] UnitsError),
    #[error("only {left} of captured money is left to refund")]
    ExceedsCaptured { left: Decimal },
    #[error("another shipment or refund of this order is in progress")]
    InFlight,
    #[error("this Idempotency-Key was used for a different request")]
    KeyReused,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// What a shipment or refund is and where it stands.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PartRecord {
    pub id: Uuid,
    pub lines: Option<Json<Vec<PartLine>>>,
    pub amount: Decimal,
    /// `capturing`/`shipped`/`failed`, or `refunding`/`refunded`/`failed`.
    pub status: String,
    pub failure: Option<String>,
    /// The provider's id of the capture or refund.
    pub provider_ref: Option<String>,
    /// A refund's reason (none for shipments).
    pub reason: Option<String>,
    pub restock: Option<bool>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub idempotency_key: String,
    pub attempt: i32,
}

impl PartRecord {
    /// The part as its saga events carry it.
    pub fn part(&self) -> Part {
        Part {
            id: self.id,
            amount: self.amount,
            lines: self.lines.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
            restock: self.restock.unwrap_or(false),
            provider_ref: None,
        }
    }
}

/// Units of a part's lines.
pub fn units_of(lines: &[PartLine]) -> Units {
    let mut units = Units::new();
    for line in lines {
        *units.entry(line.sku.clone()).or_default() += line.qty;
    }
    units
}

/// A part's lines from units.
pub fn lines_of(units: &Units) -> Vec<PartLine> {
    units
        .iter()
        .filter(|(_, q)| **q > 0)
        .map(|(sku, qty)| PartLine {
            sku: sku.clone(),
            qty: *qty,
        })
        .collect()
}

const SHIPMENT_COLUMNS: &str = "shipment_id AS id, lines, amount, status, failure, provider_ref,
    NULL::text AS reason, NULL::boolean AS restock, created_at, idempotency_key, attempt";
const REFUND_COLUMNS: &str = "refund_id AS id, lines, amount, status, failure, provider_ref,
    reason, restock, created_at, idempotency_key, attempt";

/// An order's shipments, oldest first.
pub async fn shipments(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<PartRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {SHIPMENT_COLUMNS} FROM orders.shipments WHERE order_id = $1
         ORDER BY created_at, shipment_id"
    ))
    .bind(order_id)
    .fetch_all(conn)
    .await
}

/// An order's refunds, oldest first.
pub async fn refunds(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<PartRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {REFUND_COLUMNS} FROM orders.refunds WHERE order_id = $1
         ORDER BY created_at, refund_id"
    ))
    .bind(order_id)
    .fetch_all(conn)
    .await
}

/// Where an order's units and money stand, from its settled parts.
pub struct Standing {
    pub shipped: Units,
    pub captured: Decimal,
    /// Units refunded by lines (in flight or done).
    pub refunded_units: Units,
    /// Money refunded or being refunded.
    pub refunded: Decimal,
    pub rest_cancelled: bool,
    /// A shipment or refund still waiting for the provider.
    pub in_flight: bool,
}

impl Standing {
    /// Reads it (inside the request's transaction, under the order's lock).
    pub async fn read(conn: &mut PgConnection, order_id: Uuid) -> Result<Self, sqlx::Error> {
        let (rest_cancelled,): (bool,) =
            sqlx::query_as("SELECT rest_cancelled FROM orders.orders WHERE order_id = $1")
                .bind(order_id)
                .fetch_one(&mut *conn)
                .await?;
        let mut standing = Self {
            shipped: Units::new(),
            captured: Decimal::ZERO,
            refunded_units: Units::new(),
            refunded: Decimal::ZERO,
            rest_cancelled,
            in_flight: false,
        };
        for s in shipments(conn, order_id).await? {
            standing.in_flight |= s.status == "capturing";
            if s.status == "shipped" {
                let lines = s.lines.map(|l| l.0).unwrap_or_default();
                standing.shipped = allocation::sum(&standing.shipped, &units_of(&lines));
                standing.captured += s.amount;
            }
        }
        for r in refunds(conn, order_id).await? {
            standing.in_flight |= r.status == "refunding";
            if r.status != "failed" {
                let lines = r.lines.map(|l| l.0).unwrap_or_default();
                standing.refunded_units =
                    allocation::sum(&standing.refunded_units, &units_of(&lines));
                standing.refunded += r.amount;
            }
        }
        Ok(standing)
    }

    /// Units not shipped yet (none once the rest is cancelled).
    pub fn left_to_ship(&self, all: &Units) -> Units {
        if self.rest_cancelled {
            return Units::new();
        }
        allocation::left(all, &self.shipped)
    }
}

/// What a shipment or refund asks for.
pub struct Ask<'a> {
    pub order_id: Uuid,
    pub lines: &'a [Line],
    pub total: Decimal,
    pub currency: Currency,
    pub key: &'a str,
    pub attempt: u32,
}

/// Records a shipment of `units` (every unit left when `None`): its share of the total.
/// `Ok(None)`: nothing is left to ship.
pub async fn ask_shipment(
    conn: &mut PgConnection,
    ask: &Ask<'_>,
    units: Option<&Units>,
) -> Result<Option<PartRecord>, PartError> {
    let standing = Standing::read(conn, ask.order_id).await?;
    if standing.in_flight {
        return Err(PartError::InFlight);
    }
    let alloc = Allocation::new(ask.lines, ask.total, ask.currency);
    let all = alloc.all();
    let left = standing.left_to_ship(&all);
    let units = match units {
        Some(u) => {
            allocation::check_within(u, &left, &all)?;
            u.clone()
        }
        None if left.is_empty() => return Ok(None),
        None => left,
    };
    let amount = alloc.next(&standing.shipped, &units, standing.captured);
    let id = Uuid::new_v5(&ask.order_id, format!("shipment:{}", ask.key).as_bytes());
    let lines = Json(lines_of(&units));
    sqlx::query(
        "INSERT INTO orders.shipments
             (shipment_id, order_id, idempotency_key, lines, amount, attempt, status)
         VALUES ($1, $2, $3, $4, $5, $6, 'capturing')",
    )
    .bind(id)
    .bind(ask.order_id)
    .bind(ask.key)
    .bind(&lines)
    .bind(amount)
    .bind(i32::try_from(ask.attempt).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(Some(
        find(conn, PartKind::Shipment, ask.order_id, ask.key)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?,
    ))
}

/// What a refund gives back: units (their share) or an amount.
pub enum RefundOf {
    Units {
        units: Units,
        restock: bool,
    },
    Amount(Decimal),
    /// Whatever captured money is left.
    Rest,
}

/// Records a refund, never more than captured money not refunded yet. `Ok(None)`: nothing is
/// left to refund (for [`RefundOf::Rest`]).
pub async fn ask_refund(
    conn: &mut PgConnection,
    ask: &Ask<'_>,
    of: RefundOf,
    reason: &str,
) -> Result<Option<PartRecord>, PartError> {
    let standing = Standing::read(conn, ask.order_id).await?;
    if standing.in_flight {
        return Err(PartError::InFlight);
    }
    let alloc = Allocation::new(ask.lines, ask.total, ask.currency);
    let money_left = standing.captured - standing.refunded;
    let (amount, units, restock) = match of {
        RefundOf::Units { units, restock } => {
            let refundable = allocation::left(&standing.shipped, &standing.refunded_units);
            allocation::check_within(&units, &refundable, &alloc.all())?;
            let before = alloc.share(&standing.refunded_units);
            let amount = alloc.share(&allocation::sum(&standing.refunded_units, &units)) - before;
            (amount, Some(units), restock)
        }
        RefundOf::Amount(amount) => (amount, None, false),
        RefundOf::Rest if money_left <= Decimal::ZERO => return Ok(None),
        RefundOf::Rest => (money_left, None, false),
    };
    if amount > money_left || amount <= Decimal::ZERO {
        return Err(PartError::ExceedsCaptured {
            left: money_left.max(Decimal::ZERO),
        });
    }
    let id = Uuid::new_v5(&ask.order_id, format!("refund:{}", ask.key).as_bytes());
    sqlx::query(
        "INSERT INTO orders.refunds (refund_id, order_id, idempotency_key, lines, amount, reason,
                                     restock, attempt, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'refunding')",
    )
    .bind(id)
    .bind(ask.order_id)
    .bind(ask.key)
    .bind(units.as_ref().map(|u| Json(lines_of(u))))
    .bind(amount)
    .bind(reason)
    .bind(restock)
    .bind(i32::try_from(ask.attempt).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(Some(
        find(conn, PartKind::Refund, ask.order_id, ask.key)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?,
    ))
}

/// A shipment or a refund: the two kinds of part an order is settled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Shipment,
    Refund,
}

impl PartKind {
    /// Its table, id column and columns as [`PartRecord`] reads them.
    fn table(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Shipment => ("orders.shipments", "shipment_id", SHIPMENT_COLUMNS),
            Self::Refund => ("orders.refunds", "refund_id", REFUND_COLUMNS),
        }
    }

    /// The status of one in flight, and of one the provider carried out.
    fn statuses(self) -> (&'static str, &'static str) {
        match self {
            Self::Shipment => ("capturing", "shipped"),
            Self::Refund => ("refunding", "refunded"),
        }
    }
}

/// The shipment or refund an Idempotency-Key already asked for.
pub async fn find(
    conn: &mut PgConnection,
    kind: PartKind,
    order_id: Uuid,
    key: &str,
) -> Result<Option<PartRecord>, sqlx::Error> {
    let (table, _, columns) = kind.table();
    sqlx::query_as(&format!(
        "SELECT {columns} FROM {table} WHERE order_id = $1 AND idempotency_key = $2"
    ))
    .bind(order_id)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Settles a shipment (the provider captured its share, or refused) or a refund, and the
/// order's status. Answers whether it moved (a redelivery does not).
pub async fn settle(
    conn: &mut PgConnection,
    kind: PartKind,
    order_id: Uuid,
    part: &Part,
    failure: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let (table, id, _) = kind.table();
    let (in_flight, carried_out) = kind.statuses();
    let done = sqlx::query(&format!(
        "UPDATE {table} SET status = $3, failure = $4, provider_ref = $5, updated_at = now()
         WHERE {id} = $1 AND order_id = $2 AND status = $6"
    ))
    .bind(part.id)
    .bind(order_id)
    .bind(if failure.is_some() {
        "failed"
    } else {
        carried_out
    })
    .bind(failure)
    .bind(&part.provider_ref)
    .bind(in_flight)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    // A redelivery moves nothing, and must not release a lock another action took since.
    if done == 1 {
        settle_status(conn, order_id).await?;
    }
    Ok(done == 1)
}

/// Records a whole-order shipment or refund (an event without a part, from an edge older than
/// parts) as one part of everything for the total, as the migration did for orders before it,
/// so the order's parts still equal its payments ledger.
pub async fn record_whole(
    conn: &mut PgConnection,
    order_id: Uuid,
    action: super::status::Action,
) -> Result<(), sqlx::Error> {
    let statement = match action {
        super::status::Action::Ship => {
            "INSERT INTO orders.shipments (shipment_id, order_id, idempotency_key, lines, amount,
                                          attempt, status)
             SELECT md5(o.order_id::text || ':shipment:whole')::uuid, o.order_id, 'whole',
                    (SELECT jsonb_agg(jsonb_build_object('sku', i.sku, 'qty', i.qty) ORDER BY i.sku)
                     FROM orders.order_items i WHERE i.order_id = o.order_id),
                    o.total, o.action_attempt, 'shipped'
             FROM orders.orders o WHERE o.order_id = $1
             ON CONFLICT DO NOTHING"
        }
        super::status::Action::Refund => {
            "INSERT INTO orders.refunds (refund_id, order_id, idempotency_key, amount, reason,
                                        attempt, status)
             SELECT md5(o.order_id::text || ':refund:whole')::uuid, o.order_id, 'whole', o.total,
                    'requested_by_customer', o.action_attempt, 'refunded'
             FROM orders.orders o WHERE o.order_id = $1 AND o.total > 0
             ON CONFLICT DO NOTHING"
        }
        super::status::Action::Cancel => return Ok(()),
    };
    sqlx::query(statement).bind(order_id).execute(conn).await?;
    Ok(())
}

/// Marks the unshipped rest of an order cancelled (compensation, after it voided the
/// uncaptured money and restocked the units), and settles its status.
pub async fn cancel_rest(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE orders.orders SET rest_cancelled = true WHERE order_id = $1")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    settle_status(conn, order_id).await
}

/// The order's status from its parts, and its action lock released.
async fn settle_status(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    let (ordered,): (i64,) = sqlx::query_as(
        "SELECT coalesce(sum(qty), 0)::bigint FROM orders.order_items WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(&mut *conn)
    .await?;
    let standing = Standing::read(conn, order_id).await?;
    let refunded: Decimal = refunds(conn, order_id)
        .await?
        .iter()
        .filter(|r| r.status == "refunded")
        .map(|r| r.amount)
        .sum();
    let shipped: i64 = standing.shipped.values().sum();
    let status = derive_status(
        ordered,
        shipped,
        standing.rest_cancelled,
        standing.captured,
        refunded,
    );
    sqlx::query(
        "UPDATE orders.orders SET status = $2, pending_action = NULL, updated_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(())
}

/// An order's status from its units and money.
pub fn derive_status(
    ordered: i64,
    shipped: i64,
    rest_cancelled: bool,
    captured: Decimal,
    refunded: Decimal,
) -> OrderStatus {
    let all_out = shipped >= ordered || rest_cancelled;
    match () {
        () if shipped == 0 && rest_cancelled => OrderStatus::Cancelled,
        () if shipped == 0 => OrderStatus::Confirmed,
        () if refunded > Decimal::ZERO && refunded >= captured && all_out => OrderStatus::Refunded,
        () if refunded > Decimal::ZERO => OrderStatus::PartiallyRefunded,
        () if all_out => OrderStatus::Shipped,
        () => OrderStatus::PartiallyShipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_follows_units_and_money() {
        let (zero, ten) = (Decimal::ZERO, Decimal::TEN);
        assert_eq!(
            derive_status(5, 0, false, zero, zero),
            OrderStatus::Confirmed
        );
        assert_eq!(
            derive_status(5, 2, false, ten, zero),
            OrderStatus::PartiallyShipped
        );
        assert_eq!(derive_status(5, 5, false, ten, zero), OrderStatus::Shipped);
        assert_eq!(derive_status(5, 2, true, ten, zero), OrderStatus::Shipped);
        assert_eq!(
            derive_status(5, 0, true, zero, zero),
            OrderStatus::Cancelled
        );
        assert_eq!(
            derive_status(5, 5, false, ten, Decimal::ONE),
            OrderStatus::PartiallyRefunded
        );
        assert_eq!(derive_status(5, 5, false, ten, ten), OrderStatus::Refunded);
        // Money back for what shipped, more still to ship: not refunded as a whole.
        assert_eq!(
            derive_status(5, 2, false, ten, ten),
            OrderStatus::PartiallyRefunded
        );
    }
}
