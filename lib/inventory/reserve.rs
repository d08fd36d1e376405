//! The reserve step: hold stock for every line of a checkout, all or nothing.
//!
//! Batch-native and race-free with any number of reserve processes: a batch locks every
//! stock row it touches in SKU order (like every other writer, so two batches never
//! deadlock), decides each checkout in arrival order against the stock it sees under those
//! locks, then writes every hold with set-based statements. A checkout that cannot be held
//! in full holds nothing and is rejected `out_of_stock`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use super::soldout;
use crate::db::Leases;
use crate::saga::events::{Checkout, Event, EventKind, FailureReason, Short};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// Consumes `checkout.requested`, emits `checkout.reserved` or `checkout.rejected`.
pub struct ReserveStep {
    pub leases: Leases,
    pub ttl: Duration,
    /// Where shortages are announced to every edge (see `soldout`); none in some tests.
    pub notices: Option<async_nats::Client>,
}

/// The holds a batch writes, as parallel columns for `unnest`.
#[derive(Default)]
struct Holds {
    ids: Vec<Uuid>,
    orders: Vec<Uuid>,
    skus: Vec<String>,
    qtys: Vec<i32>,
}

impl Step for ReserveStep {
    const DURABLE: &'static str = "reserve";
    const INBOX: InboxTable = InboxTable::Inventory;
    const SHAPE: Shape = Shape::Batch;
    type Input = Checkout;
    type Found = ();

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Requested]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Checkout, String> {
        match event {
            Event::Requested { checkout } => Ok(checkout),
            other => Err(format!("reserve cannot handle {:?}", other.kind())),
        }
    }

    async fn prepare(&self, _: &Checkout, _: &Delivery) -> Result<(), StepError> {
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Checkout, &())],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let inputs: Vec<&Checkout> = items.iter().map(|(checkout, ())| *checkout).collect();
        let outputs = self.reserve(tx.conn, &inputs).await?;
        let (notices, announced) = (self.notices.clone(), announcements(&outputs));
        tx.after_commit(move || announced.announce(notices.as_ref()));
        Ok(outputs)
    }
}

/// What a committed batch tells every edge and the stockout counter.
struct Announced {
    stockouts: usize,
    /// `(sku, units left, stock version)` of every shortage.
    short: Vec<(String, i64, Option<i64>)>,
}

fn announcements(outputs: &[Vec<Event>]) -> Announced {
    let mut announced = Announced {
        stockouts: 0,
        short: Vec::new(),
    };
    for event in outputs.iter().flatten() {
        match event {
            Event::Rejected { short, .. } => {
                announced.stockouts += short.len();
                let lines = short
                    .iter()
                    .map(|l| (l.sku.clone(), l.available, l.version));
                announced.short.extend(lines);
            }
            // This order took the last units: every edge hears it now, not at the next
            // buyer's refusal.
            Event::Reserved { sold_out, .. } => {
                let skus = sold_out.iter().map(|s| (s.sku.clone(), 0, s.version));
                announced.short.extend(skus);
            }
            _ => {}
        }
    }
    announced
}

impl Announced {
    fn announce(self, notices: Option<&async_nats::Client>) {
        crate::metrics::stockouts(self.stockouts);
        if let Some(client) = notices {
            for (sku, left, version) in self.short {
                soldout::announce_short(client, &sku, left, version);
            }
        }
    }
}

impl ReserveStep {
    /// Holds every line of each checkout or none, in arrival order, against the stock locked
    /// for the batch; the events each emits.
    async fn reserve(
        &self,
        conn: &mut PgConnection,
        inputs: &[&Checkout],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::minutes(10));
        let expires_at = Utc::now() + ttl;
        let rows = super::stock::lock_rows(&mut *conn, inputs).await?;
        let mut available: HashMap<String, i64> = rows
            .iter()
            .map(|(sku, stock)| (sku.clone(), i64::from(stock.available())))
            .collect();
        let mut outputs = Vec::with_capacity(inputs.len());
        let mut holds = Holds::default();
        let mut taken: BTreeMap<String, i32> = BTreeMap::new();
        for checkout in inputs {
            let demand = demand(checkout);
            let short: Vec<Short> = demand
                .iter()
                .map(|(sku, qty)| (sku, qty, available.get(sku).copied().unwrap_or(0)))
                .filter(|(_, qty, left)| *left < i64::from(**qty))
                .map(|(sku, _, left)| Short {
                    sku: sku.clone(),
                    available: left.max(0),
                    version: None,
                })
                .collect();
            if !short.is_empty() {
                outputs.push(rejected((*checkout).clone(), short));
                continue;
            }
            let mut sold_out = Vec::new();
            for (sku, qty) in demand {
                let left = available.entry(sku.clone()).or_default();
                *left -= i64::from(qty);
                if *left <= 0 {
                    sold_out.push(Short {
                        sku: sku.clone(),
                        available: 0,
                        version: None,
                    });
                }
                *taken.entry(sku.clone()).or_default() += qty;
                holds
                    .ids
                    .push(Uuid::new_v5(&checkout.order_id, sku.as_bytes()));
                holds.orders.push(checkout.order_id);
                holds.skus.push(sku);
                holds.qtys.push(qty);
            }
            outputs.push(vec![Event::Reserved {
                checkout: (*checkout).clone(),
                expires_at,
                sold_out,
            }]);
        }
        stamp_versions(&mut outputs, &rows, &taken);
        if holds.ids.is_empty() {
            return Ok(outputs);
        }
        write_holds(conn, taken, &holds, expires_at).await?;
        Ok(outputs)
    }
}

/// Writes a batch's holds, their stock and their movements in one statement (the stock rows
/// are locked already, in SKU order).
async fn write_holds(
    conn: &mut PgConnection,
    taken: BTreeMap<String, i32>,
    holds: &Holds,
    expires_at: chrono::DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let (taken_skus, taken_qtys): (Vec<String>, Vec<i32>) = taken.into_iter().unzip();
    sqlx::query(
        "WITH stock AS (
             UPDATE inventory.stock s SET reserved = s.reserved + d.qty, updated_at = now()
             FROM unnest($1::text[], $2::int[]) AS d(sku, qty)
             WHERE s.sku = d.sku AND s.sku = ANY($1)),
         held AS (
             INSERT INTO inventory.inventory_reservations
                 (reservation_id, order_id, sku, qty, status, expires_at)
             SELECT id, order_id, sku, qty, 'held', $7
             FROM unnest($3::uuid[], $4::uuid[], $5::text[], $6::int[])
                  AS r(id, order_id, sku, qty)
             RETURNING order_id, sku, qty)
         INSERT INTO inventory.stock_movements (sku, kind, order_id, on_hand_delta, reserved_delta)
         SELECT sku, 'reserve', order_id, 0, qty FROM held",
    )
    .bind(&taken_skus)
    .bind(&taken_qtys)
    .bind(&holds.ids)
    .bind(&holds.orders)
    .bind(&holds.skus)
    .bind(&holds.qtys)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stamps each notice-to-be with the stock row's version after this batch: the version read
/// under the lock, plus one where the batch's single update of the row bumps it.
fn stamp_versions(
    outputs: &mut [Vec<Event>],
    rows: &[(String, super::Stock)],
    taken: &BTreeMap<String, i32>,
) {
    let versions: HashMap<&str, i64> = rows
        .iter()
        .map(|(sku, stock)| {
            let bump = i64::from(taken.contains_key(sku));
            (sku.as_str(), stock.version + bump)
        })
        .collect();
    for event in outputs.iter_mut().flatten() {
        let notices = match event {
            Event::Rejected { short, .. } => short,
            Event::Reserved { sold_out, .. } => sold_out,
            _ => continue,
        };
        for notice in notices {
            notice.version = versions.get(notice.sku.as_str()).copied();
        }
    }
}

/// A checkout's quantities per SKU, in SKU order.
fn demand(checkout: &Checkout) -> BTreeMap<String, i32> {
    let mut demand = BTreeMap::new();
    for line in &checkout.items {
        *demand.entry(line.sku.as_str().to_owned()).or_insert(0) += line.qty.get();
    }
    demand
}

fn rejected(checkout: Checkout, short: Vec<Short>) -> Vec<Event> {
    let skus: Vec<&str> = short.iter().map(|s| s.sku.as_str()).collect();
    tracing::info!(order_id = %checkout.order_id, ?skus, "out of stock");
    vec![Event::Rejected {
        detail: format!("not enough stock for {}", skus.join(", ")),
        checkout: checkout.spent(),
        reason: FailureReason::OutOfStock,
        short,
    }]
}
