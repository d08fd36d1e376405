//! Finalizing an authorized checkout's stock: its units leave stock.
//!
//! The order step calls this in its own transaction, before it inserts the order, so that no
//! order is ever confirmed without its stock: if a hold expired while the payment was
//! pending, the units are taken again from what is available, and if they are gone the
//! checkout is rejected with `reservation_expired` (compensation then voids the
//! authorization). Holds that compensation released (the watchdog unwound the order) are never
//! committed, and a hold committed already is not committed again.
//!
//! Set-based: the batch's holds are locked first, then every stock row it touches in SKU order
//! (like every other writer), each order is decided against what the batch has seen, and the
//! writes are one statement.

use std::collections::{BTreeMap, HashMap};

use sqlx::PgConnection;
use uuid::Uuid;

use crate::saga::events::{Checkout, Event, FailureReason};

/// One SKU's stock as the batch changes it.
#[derive(Clone, Copy)]
struct Level {
    on_hand: i32,
    reserved: i32,
}

/// What a batch writes, as parallel columns for `unnest`.
#[derive(Default)]
struct Writes {
    /// Per SKU: (on_hand delta, reserved delta).
    stock: BTreeMap<String, (i32, i32)>,
    committed_orders: Vec<Uuid>,
    committed_skus: Vec<String>,
    moved_skus: Vec<String>,
    moved_orders: Vec<Uuid>,
    moved_on_hand: Vec<i32>,
    moved_reserved: Vec<i32>,
}

/// Commits the stock of `checkouts` (authorized, their holds placed by reserve) in the
/// caller's transaction. For each checkout, in order: `None` if its units left stock (now or
/// before), or the `rejected` event that ends it.
pub(crate) async fn commit_stock(
    conn: &mut PgConnection,
    checkouts: &[&Checkout],
) -> Result<Vec<Option<Event>>, sqlx::Error> {
    if checkouts.is_empty() {
        return Ok(Vec::new());
    }
    let order_ids: Vec<Uuid> = checkouts.iter().map(|c| c.order_id).collect();
    // The orders' holds first, so a concurrent compensation either ran before (its holds
    // are `released`) or waits for us.
    let mut holds: HashMap<Uuid, HashMap<String, (i32, String)>> = HashMap::new();
    let rows: Vec<(Uuid, String, i32, String)> = sqlx::query_as(
        "SELECT order_id, sku, qty, status FROM inventory.inventory_reservations
             WHERE order_id = ANY($1) ORDER BY order_id, sku FOR UPDATE",
    )
    .bind(&order_ids)
    .fetch_all(&mut *conn)
    .await?;
    for (order_id, sku, qty, status) in rows {
        holds
            .entry(order_id)
            .or_default()
            .insert(sku, (qty, status));
    }
    let mut levels: HashMap<String, Level> = super::stock::lock_rows(&mut *conn, checkouts)
        .await?
        .into_iter()
        .map(|(sku, stock)| {
            let (on_hand, reserved) = (stock.on_hand, stock.reserved);
            (sku, Level { on_hand, reserved })
        })
        .collect();
    let mut writes = Writes::default();
    let mut outputs = Vec::with_capacity(checkouts.len());
    let none = HashMap::new();
    for checkout in checkouts {
        let held = holds.get(&checkout.order_id).unwrap_or(&none);
        outputs.push(decide(checkout, held, &mut levels, &mut writes));
    }
    write(conn, &writes).await?;
    Ok(outputs)
}

/// Decides one order against the levels the batch has seen so far, recording its writes:
/// `None` if its units leave stock, or the event that rejects it.
fn decide(
    checkout: &Checkout,
    held: &HashMap<String, (i32, String)>,
    levels: &mut HashMap<String, Level>,
    writes: &mut Writes,
) -> Option<Event> {
    if held.values().any(|(_, status)| status == "released") {
        tracing::warn!(order_id = %checkout.order_id, "the order was unwound before its stock was committed");
        return Some(Event::Rejected {
            short: Vec::new(),
            checkout: checkout.clone(),
            reason: FailureReason::TimedOut,
            detail: "the order was unwound before its stock was committed".into(),
        });
    }
    let mut lines: Vec<(&str, i32)> = checkout
        .items
        .iter()
        .map(|l| (l.sku.as_str(), l.qty.get()))
        .collect();
    lines.sort_unstable();
    // Plan on a copy: an order that cannot take every line changes nothing.
    let mut planned = Vec::with_capacity(lines.len());
    let mut scratch: HashMap<&str, Level> = HashMap::new();
    for (sku, qty) in &lines {
        let hold = held
            .get(*sku)
            .filter(|(q, _)| q == qty)
            .map(|(_, s)| s.as_str());
        // Committed already (an `authorized` event handled by a process of the version that
        // committed stock in a step of its own): its units left stock once, and only once.
        if hold == Some("committed") {
            continue;
        }
        let level = scratch
            .get(sku)
            .copied()
            .or_else(|| levels.get(*sku).copied())
            .unwrap_or(Level {
                on_hand: 0,
                reserved: 0,
            });
        let still_held = hold == Some("held");
        // A held unit moves from reserved to gone; a lapsed one is taken from available.
        let next = if still_held {
            Level {
                on_hand: level.on_hand - qty,
                reserved: level.reserved - qty,
            }
        } else if level.on_hand - level.reserved >= *qty {
            Level {
                on_hand: level.on_hand - qty,
                reserved: level.reserved,
            }
        } else {
            tracing::warn!(order_id = %checkout.order_id, %sku, "reservation expired and the stock is gone");
            return Some(Event::Rejected {
                short: Vec::new(),
                checkout: checkout.clone(),
                reason: FailureReason::ReservationExpired,
                detail: format!("hold expired and no stock left for {sku}"),
            });
        };
        scratch.insert(sku, next);
        planned.push((*sku, *qty, still_held));
    }
    for (sku, level) in scratch {
        levels.insert(sku.to_owned(), level);
    }
    for (sku, qty, still_held) in planned {
        let reserved_delta = if still_held { -qty } else { 0 };
        let entry = writes.stock.entry(sku.to_owned()).or_default();
        entry.0 -= qty;
        entry.1 += reserved_delta;
        writes.committed_orders.push(checkout.order_id);
        writes.committed_skus.push(sku.to_owned());
        writes.moved_skus.push(sku.to_owned());
        writes.moved_orders.push(checkout.order_id);
        writes.moved_on_hand.push(-qty);
        writes.moved_reserved.push(reserved_delta);
    }
    None
}

async fn write(conn: &mut PgConnection, writes: &Writes) -> Result<(), sqlx::Error> {
    if writes.committed_orders.is_empty() {
        return Ok(());
    }
    let skus: Vec<&str> = writes.stock.keys().map(String::as_str).collect();
    let on_hand: Vec<i32> = writes.stock.values().map(|d| d.0).collect();
    let reserved: Vec<i32> = writes.stock.values().map(|d| d.1).collect();
    // One statement: the stock rows are locked already (read FOR UPDATE in SKU order), so
    // the order in which its parts run does not matter.
    sqlx::query(
        "WITH stock AS (
             UPDATE inventory.stock s SET on_hand = s.on_hand + d.on_hand,
                 reserved = s.reserved + d.reserved, updated_at = now()
             FROM unnest($1::text[], $2::int[], $3::int[]) AS d(sku, on_hand, reserved)
             WHERE s.sku = d.sku AND s.sku = ANY($1)),
         c AS (
             UPDATE inventory.inventory_reservations r SET status = 'committed', updated_at = now()
             FROM unnest($4::uuid[], $5::text[]) AS c(order_id, sku)
             WHERE r.order_id = c.order_id AND r.sku = c.sku AND r.order_id = ANY($4))
         INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
         SELECT sku, 'commit', order_id, on_hand, reserved
         FROM unnest($6::text[], $7::uuid[], $8::int[], $9::int[]) AS m(sku, order_id, on_hand, reserved)",
    )
    .bind(&skus)
    .bind(&on_hand)
    .bind(&reserved)
    .bind(&writes.committed_orders)
    .bind(&writes.committed_skus)
    .bind(&writes.moved_skus)
    .bind(&writes.moved_orders)
    .bind(&writes.moved_on_hand)
    .bind(&writes.moved_reserved)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
