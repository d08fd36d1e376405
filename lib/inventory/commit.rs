//! The commit step: once the payment is authorized, the order's units leave stock.
//!
//! It runs before the order is confirmed, so that no order is ever confirmed without its
//! stock: if a hold expired while the payment was pending, the units are taken again from
//! what is available, and if they are gone the checkout is rejected with
//! `reservation_expired` (compensation then voids the authorization). Holds that compensation
//! released (the watchdog unwound the order) are never committed.
//!
//! Batch-native: a batch locks its orders' holds, then every stock row it touches in SKU order
//! (like every other writer), decides each order against what it sees, and writes with
//! set-based statements.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::Leases;
use crate::saga::batch::BatchStep;
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;

/// Consumes `checkout.authorized`, emits `checkout.committed` or `checkout.rejected`.
pub struct CommitStep {
    pub leases: Leases,
}

/// An authorized checkout.
pub struct Authorized {
    checkout: Checkout,
    payment_id: Uuid,
    auth_id: String,
}

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

impl BatchStep for CommitStep {
    type Input = Authorized;

    fn durable(&self) -> &'static str {
        "inventory-commit"
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Authorized]
    }

    fn inbox(&self) -> InboxTable {
        InboxTable::Inventory
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Authorized, String> {
        match event {
            Event::Authorized {
                checkout,
                payment_id,
                auth_id,
            } => Ok(Authorized {
                checkout,
                payment_id,
                auth_id,
            }),
            other => Err(format!("inventory-commit cannot handle {:?}", other.kind())),
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        inputs: &[&Authorized],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let order_ids: Vec<Uuid> = inputs.iter().map(|i| i.checkout.order_id).collect();
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
        let skus: BTreeSet<&str> = inputs
            .iter()
            .flat_map(|i| i.checkout.items.iter().map(|l| l.sku.as_str()))
            .collect();
        let skus: Vec<&str> = skus.into_iter().collect();
        let mut levels: HashMap<String, Level> = sqlx::query_as::<_, (String, i32, i32)>(
            "SELECT sku, on_hand, reserved FROM inventory.stock
             WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
        )
        .bind(&skus)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(sku, on_hand, reserved)| (sku, Level { on_hand, reserved }))
        .collect();
        let mut writes = Writes::default();
        let mut outputs = Vec::with_capacity(inputs.len());
        let none = HashMap::new();
        for input in inputs {
            let held = holds.get(&input.checkout.order_id).unwrap_or(&none);
            outputs.push(decide(input, held, &mut levels, &mut writes));
        }
        write(conn, &writes).await?;
        Ok(outputs)
    }
}

/// Decides one order against the levels the batch has seen so far, recording its writes.
fn decide(
    input: &Authorized,
    held: &HashMap<String, (i32, String)>,
    levels: &mut HashMap<String, Level>,
    writes: &mut Writes,
) -> Vec<Event> {
    let checkout = &input.checkout;
    if held.values().any(|(_, status)| status == "released") {
        tracing::warn!(order_id = %checkout.order_id, "the order was unwound before its stock was committed");
        return vec![Event::Rejected {
            short: Vec::new(),
            checkout: checkout.clone(),
            reason: FailureReason::TimedOut,
            detail: "the order was unwound before its stock was committed".into(),
        }];
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
        let level = scratch
            .get(sku)
            .copied()
            .or_else(|| levels.get(*sku).copied())
            .unwrap_or(Level {
                on_hand: 0,
                reserved: 0,
            });
        let still_held = held
            .get(*sku)
            .is_some_and(|(q, status)| status == "held" && q == qty);
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
            return vec![Event::Rejected {
                short: Vec::new(),
                checkout: checkout.clone(),
                reason: FailureReason::ReservationExpired,
                detail: format!("hold expired and no stock left for {sku}"),
            }];
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
    vec![Event::Committed {
        checkout: checkout.clone(),
        payment_id: input.payment_id,
        auth_id: input.auth_id.clone(),
    }]
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
