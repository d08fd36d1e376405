//! `checkout audit`: read-only checks that every promise held, for an operator to run at any
//! time (and for the fault tests to run after their faults). Each check prints one line;
//! any finding makes the command exit non-zero.
//!
//! 1. Every accepted checkout has an order, or is still within the watchdog's limit.
//! 2. No ship, cancel or refund is in flight past that limit, and the outbox is drained.
//! 3. Stock matches its movement ledger (on hand and reserved, per SKU) and the held
//!    reservations.
//! 4. Every authorization the provider holds belongs to an order that should hold it
//!    (confirmed, or still pending), or was voided, captured for a shipped order, or refunded.
//! 5. The money ledger balances, per order and per provider: captured ≤ authorized, refunded ≤
//!    captured, captured + voided ≤ authorized; our movements equal the provider's figures;
//!    the order's shipped shipments and done refunds equal the movements; stock came back
//!    for exactly the units cancelled or refunded with restock.
//! 6. Every order that kept its goods kept its money and its stock: no confirmed or shipped
//!    order's authorization was voided, and no stock came back for a confirmed, shipped or
//!    refunded order (outside a cancellation in flight).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::payments::provider::ProviderAuthorization;
use crate::payments::{PaymentProvider, ProviderError};

/// Why the audit could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub findings: usize,
    pub summary: String,
    /// A few examples of what was found.
    pub examples: Vec<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.findings == 0 { "ok  " } else { "FAIL" };
        write!(f, "{verdict} {}: {}", self.name, self.summary)?;
        if !self.examples.is_empty() {
            write!(f, " (e.g. {})", self.examples.join(", "))?;
        }
        Ok(())
    }
}

/// Every check's result.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// True when nothing was found.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.findings == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(f, "{check}")?;
        }
        Ok(())
    }
}

const EXAMPLES: usize = 5;

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// Runs every check.
pub async fn run(
    pool: &PgPool,
    provider: &dyn PaymentProvider,
    pending_limit: Duration,
) -> Result<Report, AuditError> {
    let theirs = provider.report().await?;
    Ok(Report {
        checks: vec![
            checkouts(pool, pending_limit).await?,
            in_flight(pool, pending_limit).await?,
            stock(pool).await?,
            authorizations(pool, &theirs, pending_limit).await?,
            ledger(pool, &theirs).await?,
            kept(pool, &theirs).await?,
        ],
    })
}

async fn checkouts(pool: &PgPool, limit: Duration) -> Result<Check, AuditError> {
    let (accepted, settled, overdue): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(o.order_id),
                count(*) FILTER (WHERE o.order_id IS NULL AND c.created_at < now() - $1::interval)
         FROM edge.checkouts c LEFT JOIN orders.orders o USING (order_id)",
    )
    .bind(interval(limit))
    .fetch_one(pool)
    .await?;
    let examples: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT c.order_id FROM edge.checkouts c LEFT JOIN orders.orders o USING (order_id)
         WHERE o.order_id IS NULL AND c.created_at < now() - $1::interval
         ORDER BY c.created_at LIMIT $2",
    )
    .bind(interval(limit))
    .bind(EXAMPLES as i64)
    .fetch_all(pool)
    .await?;
    Ok(Check {
        name: "checkouts",
        findings: usize::try_from(overdue).unwrap_or(usize::MAX),
        summary: format!(
            "{accepted} accepted, {settled} with an order, {} pending within {limit:?}, {overdue} pending past it",
            accepted - settled - overdue
        ),
        examples: examples.into_iter().map(|(id,)| id.to_string()).collect(),
    })
}

async fn in_flight(pool: &PgPool, limit: Duration) -> Result<Check, AuditError> {
    let stuck: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT order_id, pending_action FROM orders.orders
         WHERE pending_action IS NOT NULL AND updated_at < now() - $1::interval
         ORDER BY updated_at",
    )
    .bind(interval(limit))
    .fetch_all(pool)
    .await?;
    let (unpublished, old): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE created_at < now() - $1::interval)
         FROM edge.outbox WHERE published_at IS NULL",
    )
    .bind(interval(limit))
    .fetch_one(pool)
    .await?;
    let old = usize::try_from(old).unwrap_or(usize::MAX);
    Ok(Check {
        name: "in flight",
        findings: stuck.len() + old,
        summary: format!(
            "{} ship/cancel/refund locks held past {limit:?}; {unpublished} outbox rows unpublished, {old} of them past it",
            stuck.len()
        ),
        examples: stuck
            .iter()
            .take(EXAMPLES)
            .map(|(id, action)| format!("{id} {action}"))
            .collect(),
    })
}

async fn stock(pool: &PgPool) -> Result<Check, AuditError> {
    let rows: Vec<(String, i32, i32, i64, i64, i64)> = sqlx::query_as(
        "SELECT s.sku, s.on_hand, s.reserved,
                coalesce(m.on_hand, 0), coalesce(m.reserved, 0), coalesce(h.held, 0)
         FROM inventory.stock s
         LEFT JOIN (SELECT sku, sum(on_hand)::int8 AS on_hand, sum(reserved)::int8 AS reserved
                    FROM (SELECT sku, sum(on_hand_delta)::int8 AS on_hand,
                                 sum(reserved_delta)::int8 AS reserved
                          FROM inventory.stock_movements GROUP BY sku
                          UNION ALL
                          SELECT sku, sum(on_hand_delta)::int8, sum(reserved_delta)::int8
                          FROM inventory.stock_movement_days GROUP BY sku) l
                    GROUP BY sku) m USING (sku)
         LEFT JOIN (SELECT sku, sum(qty) AS held FROM inventory.inventory_reservations
                    WHERE status = 'held' GROUP BY sku) h USING (sku)
         ORDER BY s.sku",
    )
    .fetch_all(pool)
    .await?;
    let skus = rows.len();
    let wrong: Vec<String> = rows
        .into_iter()
        .filter(|(_, on_hand, reserved, m_on_hand, m_reserved, held)| {
            i64::from(*on_hand) != *m_on_hand
                || i64::from(*reserved) != *m_reserved
                || i64::from(*reserved) != *held
        })
        .map(|(sku, on_hand, reserved, m_on_hand, m_reserved, held)| {
            format!("{sku} on_hand {on_hand}/ledger {m_on_hand}, reserved {reserved}/ledger {m_reserved}/held {held}")
        })
        .collect();
    Ok(Check {
        name: "stock",
        findings: wrong.len(),
        summary: format!(
            "{skus} SKUs, {} disagree with their movement ledger or held reservations",
            wrong.len()
        ),
        examples: wrong.into_iter().take(EXAMPLES).collect(),
    })
}

async fn authorizations(
    pool: &PgPool,
    theirs: &[ProviderAuthorization],
    limit: Duration,
) -> Result<Check, AuditError> {
    let ids: Vec<Uuid> = theirs
        .iter()
        .filter_map(|a| Uuid::parse_str(&a.reference).ok())
        .collect();
    // Each referenced order's status, or pending (accepted, no order yet, within the limit).
    let ours: HashMap<Uuid, (String, Option<String>)> =
        sqlx::query_as::<_, (Uuid, String, Option<String>)>(
            "SELECT r.id,
                coalesce(o.status, CASE WHEN c.created_at >= now() - $2::interval THEN 'pending'
                                        ELSE 'overdue' END),
                o.pending_action
         FROM unnest($1::uuid[]) AS r(id)
         LEFT JOIN orders.orders o ON o.order_id = r.id
         LEFT JOIN edge.checkouts c ON c.order_id = r.id",
        )
        .bind(&ids)
        .bind(interval(limit))
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, status, action)| (id, (status, action)))
        .collect();
    let mut wrong = Vec::new();
    let mut live = 0;
    for auth in theirs {
        let order = Uuid::parse_str(&auth.reference)
            .ok()
            .and_then(|id| ours.get(&id));
        let (status, action) = match order {
            Some((s, a)) => (s.as_str(), a.as_deref()),
            None => ("unknown", None),
        };
        let fine = match auth.status.as_str() {
            // Holds nothing: voided, declined, or a challenge the buyer failed.
            "voided" | "declined" | "failed" => true,
            // Waiting for the buyer or the provider: only an order still pending may wait.
            "requires_action" | "pending" => status == "pending",
            "authorized" => {
                live += 1;
                matches!(status, "confirmed" | "pending")
            }
            // Captured in part or whole: an order that shipped something, or is shipping.
            "captured" => {
                matches!(
                    status,
                    "partially_shipped" | "shipped" | "partially_refunded"
                ) || action == Some("ship")
            }
            "refunded" => status == "refunded" || action == Some("refund"),
            _ => false,
        };
        if !fine {
            wrong.push(format!(
                "{} {} for order {} ({status})",
                auth.auth_id, auth.status, auth.reference
            ));
        }
    }
    // Across every provider, one order holds one authorization that is not voided or refused:
    // two would mean the fallback was used while the primary's attempt had landed.
    let mut held: HashMap<&str, usize> = HashMap::new();
    for auth in theirs.iter().filter(|a| {
        matches!(
            a.status.as_str(),
            "authorized" | "captured" | "refunded" | "requires_action" | "pending"
        )
    }) {
        *held.entry(auth.reference.as_str()).or_default() += 1;
    }
    for (reference, count) in held.into_iter().filter(|(_, n)| *n > 1) {
        wrong.push(format!("order {reference} holds {count} authorizations"));
    }
    Ok(Check {
        name: "authorizations",
        findings: wrong.len(),
        summary: format!(
            "{} at the provider, {live} live; {} not owned by an order that should hold them",
            theirs.len(),
            wrong.len()
        ),
        examples: wrong.into_iter().take(EXAMPLES).collect(),
    })
}

/// Orders that kept their goods but lost their money or their stock: compensation undid part
/// of an order that stayed (a late or replayed event taken for a failure).
async fn kept(pool: &PgPool, theirs: &[ProviderAuthorization]) -> Result<Check, AuditError> {
    let voided: Vec<Uuid> = theirs
        .iter()
        .filter(|a| a.status == "voided")
        .filter_map(|a| Uuid::parse_str(&a.reference).ok())
        .collect();
    // A cancellation voids first and restocks before it records `cancelled`: while one is in
    // flight (`pending_action = 'cancel'`), both are expected.
    let unpaid: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT order_id, status FROM orders.orders
         WHERE order_id = ANY($1)
           AND status IN ('confirmed', 'partially_shipped', 'shipped', 'partially_refunded')
           AND pending_action IS DISTINCT FROM 'cancel'
         ORDER BY order_id",
    )
    .bind(&voided)
    .fetch_all(pool)
    .await?;
    let restocked: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT o.order_id, o.status FROM orders.orders o
         WHERE o.status IN ('confirmed', 'partially_shipped', 'shipped', 'partially_refunded',
                            'refunded')
           AND o.pending_action IS DISTINCT FROM 'cancel'
           AND EXISTS (SELECT 1 FROM inventory.inventory_reservations r
                       WHERE r.order_id = o.order_id AND r.status = 'released')
         ORDER BY o.order_id",
    )
    .fetch_all(pool)
    .await?;
    let examples = unpaid
        .iter()
        .map(|(id, status)| format!("{id} {status} with its authorization voided"))
        .chain(
            restocked
                .iter()
                .map(|(id, status)| format!("{id} {status} with its stock given back")),
        )
        .take(EXAMPLES)
        .collect();
    Ok(Check {
        name: "kept",
        findings: unpaid.len() + restocked.len(),
        summary: format!(
            "{} orders that kept their goods had their authorization voided, {} had their stock given back",
            unpaid.len(),
            restocked.len()
        ),
        examples,
    })
}

/// One order's money as each side tells it.
#[derive(sqlx::FromRow)]
struct OrderMoney {
    order_id: Uuid,
    auth_id: Option<String>,
    authorized: Decimal,
    captured: Decimal,
    refunded: Decimal,
    voided: Decimal,
    shipped: Decimal,
    refunds_done: Decimal,
}

/// The money ledger against itself, the orders and the provider, and returned stock against
/// what was cancelled or refunded with restock.
async fn ledger(pool: &PgPool, theirs: &[ProviderAuthorization]) -> Result<Check, AuditError> {
    let rows: Vec<OrderMoney> = sqlx::query_as(
        "SELECT p.order_id, p.auth_id, p.amount AS authorized,
                coalesce(m.captured, 0) AS captured, coalesce(m.refunded, 0) AS refunded,
                coalesce(m.voided, 0) AS voided,
                coalesce((SELECT sum(amount) FROM orders.shipments s
                          WHERE s.order_id = p.order_id AND s.status = 'shipped'), 0) AS shipped,
                coalesce((SELECT sum(amount) FROM orders.refunds r
                          WHERE r.order_id = p.order_id AND r.status = 'refunded'), 0)
                    AS refunds_done
         FROM payments.payments p
         LEFT JOIN (SELECT order_id,
                           sum(amount) FILTER (WHERE kind = 'capture') AS captured,
                           sum(amount) FILTER (WHERE kind = 'refund') AS refunded,
                           sum(amount) FILTER (WHERE kind = 'void') AS voided
                    FROM payments.movements GROUP BY order_id) m USING (order_id)
         WHERE p.status IN ('authorized', 'captured', 'refunded', 'voided')",
    )
    .fetch_all(pool)
    .await?;
    // Ids as the payments record them (the fallback's qualified), as the report gives them.
    let at_provider: HashMap<&str, &ProviderAuthorization> =
        theirs.iter().map(|a| (a.auth_id.as_str(), a)).collect();
    let mut wrong = Vec::new();
    for row in &rows {
        wrong.extend(balance(row).map(|why| format!("{} {why}", row.order_id)));
        if let Some(auth) = row.auth_id.as_deref().and_then(|id| at_provider.get(id)) {
            if (auth.captured, auth.refunded) != (row.captured, row.refunded) {
                wrong.push(format!(
                    "{} ours captured {} refunded {}, the provider's {} and {}",
                    row.order_id, row.captured, row.refunded, auth.captured, auth.refunded
                ));
            }
        }
    }
    let returns = returned_stock(pool).await?;
    let findings = wrong.len() + returns.len();
    let captured: Decimal = rows.iter().map(|r| r.captured).sum();
    let refunded: Decimal = rows.iter().map(|r| r.refunded).sum();
    Ok(Check {
        name: "ledger",
        findings,
        summary: format!(
            "{} payments, {captured} captured, {refunded} refunded; {} do not balance, {} orders' returned stock disagrees",
            rows.len(),
            wrong.len(),
            returns.len()
        ),
        examples: wrong.into_iter().chain(returns).take(EXAMPLES).collect(),
    })
}

/// What is wrong with one order's money, if anything.
fn balance(m: &OrderMoney) -> Option<String> {
    if m.captured > m.authorized {
        return Some(format!(
            "captured {} of {} authorized",
            m.captured, m.authorized
        ));
    }
    if m.refunded > m.captured {
        return Some(format!(
            "refunded {} of {} captured",
            m.refunded, m.captured
        ));
    }
    if m.captured + m.voided > m.authorized {
        return Some(format!(
            "captured {} and voided {} of {} authorized",
            m.captured, m.voided, m.authorized
        ));
    }
    if m.shipped != m.captured {
        return Some(format!(
            "shipments took {}, captures {}",
            m.shipped, m.captured
        ));
    }
    (m.refunds_done != m.refunded).then(|| {
        format!(
            "refunds done {}, refund movements {}",
            m.refunds_done, m.refunded
        )
    })
}

/// Orders whose returned units (`inventory.returns`) are not the units cancelled (the
/// unshipped rest) plus the units refunded with restock.
async fn returned_stock(pool: &PgPool) -> Result<Vec<String>, AuditError> {
    let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "WITH returned AS (SELECT order_id, sum(qty)::int8 AS units FROM inventory.returns
                           GROUP BY order_id),
              restocked AS (SELECT r.order_id, sum((l->>'qty')::int8)::int8 AS units
                            FROM orders.refunds r, jsonb_array_elements(r.lines) l
                            WHERE r.status = 'refunded' AND r.restock GROUP BY r.order_id),
              rest AS (SELECT o.order_id,
                              (SELECT sum(qty) FROM orders.order_items i
                               WHERE i.order_id = o.order_id)::int8
                              - coalesce((SELECT sum((l->>'qty')::int8)
                                          FROM orders.shipments s, jsonb_array_elements(s.lines) l
                                          WHERE s.order_id = o.order_id
                                            AND s.status = 'shipped'), 0)::int8 AS units
                       FROM orders.orders o WHERE o.rest_cancelled)
         SELECT coalesce(returned.order_id, restocked.order_id, rest.order_id),
                coalesce(returned.units, 0),
                coalesce(restocked.units, 0) + coalesce(rest.units, 0)
         FROM returned
         FULL JOIN restocked USING (order_id)
         FULL JOIN rest USING (order_id)
         WHERE coalesce(returned.units, 0)
               <> coalesce(restocked.units, 0) + coalesce(rest.units, 0)",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, returned, expected)| {
            format!("{id} returned {returned} units, cancelled or refunded with restock {expected}")
        })
        .collect())
}
