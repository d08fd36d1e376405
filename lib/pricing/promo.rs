//! Promotions: the pure rules (eligibility, discounts) and their storage (codes, usage,
//! redemptions at confirmation, given back on cancel).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::Sku;

/// What a promotion takes off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoKind {
    Percent,
    Fixed,
    FreeShipping,
}

impl PromoKind {
    /// Parses `percent`, `fixed` or `free_shipping`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "percent" => Some(Self::Percent),
            "fixed" => Some(Self::Fixed),
            "free_shipping" => Some(Self::FreeShipping),
            _ => None,
        }
    }

    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Percent => "percent",
            Self::Fixed => "fixed",
            Self::FreeShipping => "free_shipping",
        }
    }
}

/// A promotion code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promo {
    /// Lower case.
    pub code: String,
    pub kind: PromoKind,
    /// Percent (0-100] or a fixed amount; none for free shipping.
    pub value: Option<Decimal>,
    pub min_subtotal: Option<Decimal>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub usage_limit: Option<i32>,
    pub per_customer_limit: Option<i32>,
    /// Only these SKUs are eligible; `None` means every line.
    pub skus: Option<Vec<String>>,
    /// Confirmed orders holding a redemption.
    pub used: i32,
}

impl Promo {
    /// Whether a line is eligible.
    pub fn covers(&self, sku: &Sku) -> bool {
        self.skus
            .as_ref()
            .is_none_or(|skus| skus.iter().any(|s| s == sku.as_str()))
    }

    /// Why the promotion does not apply to a cart, if it does not (the pure part).
    pub fn refusal(&self, subtotal: Decimal, any_eligible: bool) -> Option<&'static str> {
        if !any_eligible {
            return Some("promo_not_applicable");
        }
        if self.min_subtotal.is_some_and(|min| subtotal < min) {
            return Some("promo_min_subtotal");
        }
        None
    }

    /// Why the promotion cannot be used at `now`, if it cannot (time window, usage).
    pub fn unusable_at(&self, now: DateTime<Utc>) -> Option<&'static str> {
        if self.starts_at.is_some_and(|s| now < s) {
            return Some("promo_not_started");
        }
        if self.ends_at.is_some_and(|e| now >= e) {
            return Some("promo_expired");
        }
        if self.usage_limit.is_some_and(|limit| self.used >= limit) {
            return Some("promo_exhausted");
        }
        None
    }

    /// Discount per line (zero for ineligible lines), each within `[0, line total]`.
    pub fn line_discounts(
        &self,
        totals: &[Decimal],
        eligible: &[bool],
        round: impl Fn(Decimal) -> Decimal,
    ) -> Vec<Decimal> {
        let value = self.value.unwrap_or(Decimal::ZERO).max(Decimal::ZERO);
        match self.kind {
            PromoKind::FreeShipping => vec![Decimal::ZERO; totals.len()],
            PromoKind::Percent => {
                let pct = value.min(Decimal::ONE_HUNDRED) / Decimal::ONE_HUNDRED;
                totals
                    .iter()
                    .zip(eligible)
                    .map(|(t, e)| {
                        if *e {
                            round(*t * pct).min(*t)
                        } else {
                            Decimal::ZERO
                        }
                    })
                    .collect()
            }
            PromoKind::Fixed => {
                let eligible_total: Decimal = totals
                    .iter()
                    .zip(eligible)
                    .filter(|(_, e)| **e)
                    .map(|(t, _)| *t)
                    .sum();
                let target = round(value.min(eligible_total));
                let mut out = vec![Decimal::ZERO; totals.len()];
                if eligible_total.is_zero() {
                    return out;
                }
                let mut remaining = target;
                for (i, (t, e)) in totals.iter().zip(eligible).enumerate() {
                    if *e {
                        let share = round(target * *t / eligible_total).min(*t).min(remaining);
                        out[i] = share;
                        remaining -= share;
                    }
                }
                // Rounding leftovers go to lines that still have room.
                for (i, (t, e)) in totals.iter().zip(eligible).enumerate() {
                    if remaining.is_zero() {
                        break;
                    }
                    if *e {
                        let room = *t - out[i];
                        let extra = room.min(remaining);
                        out[i] += extra;
                        remaining -= extra;
                    }
                }
                out
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct PromoRow {
    code: String,
    kind: String,
    value: Option<Decimal>,
    min_subtotal: Option<Decimal>,
    starts_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
    usage_limit: Option<i32>,
    per_customer_limit: Option<i32>,
    skus: Option<Vec<String>>,
    used: i32,
}

/// A promotion by code (case-insensitive).
pub async fn get(db: impl sqlx::PgExecutor<'_>, code: &str) -> Result<Option<Promo>, sqlx::Error> {
    let row: Option<PromoRow> = sqlx::query_as(
        "SELECT code, kind, value, min_subtotal, starts_at, ends_at, usage_limit,
                per_customer_limit, skus, used
         FROM pricing.promos WHERE code = lower($1)",
    )
    .bind(code)
    .fetch_optional(db)
    .await?;
    Ok(row.and_then(|r| {
        Some(Promo {
            kind: PromoKind::parse(&r.kind)?,
            code: r.code,
            value: r.value,
            min_subtotal: r.min_subtotal,
            starts_at: r.starts_at,
            ends_at: r.ends_at,
            usage_limit: r.usage_limit,
            per_customer_limit: r.per_customer_limit,
            skus: r.skus,
            used: r.used,
        })
    }))
}

/// Creates or replaces a promotion (its usage count is kept).
pub async fn upsert(pool: &PgPool, promo: &Promo) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pricing.promos
             (code, kind, value, min_subtotal, starts_at, ends_at, usage_limit, per_customer_limit, skus)
         VALUES (lower($1), $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (code) DO UPDATE SET kind = EXCLUDED.kind, value = EXCLUDED.value,
             min_subtotal = EXCLUDED.min_subtotal, starts_at = EXCLUDED.starts_at,
             ends_at = EXCLUDED.ends_at, usage_limit = EXCLUDED.usage_limit,
             per_customer_limit = EXCLUDED.per_customer_limit, skus = EXCLUDED.skus,
             updated_at = now()",
    )
    .bind(&promo.code)
    .bind(promo.kind.as_str())
    .bind(promo.value)
    .bind(promo.min_subtotal)
    .bind(promo.starts_at)
    .bind(promo.ends_at)
    .bind(promo.usage_limit)
    .bind(promo.per_customer_limit)
    .bind(&promo.skus)
    .execute(pool)
    .await?;
    Ok(())
}

/// A customer's redemptions of a code that still count.
pub async fn customer_uses(
    conn: &mut PgConnection,
    code: &str,
    user_id: &str,
) -> Result<i64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pricing.promo_redemptions
         WHERE code = lower($1) AND user_id = $2 AND status = 'redeemed'",
    )
    .bind(code)
    .bind(user_id)
    .fetch_one(conn)
    .await?;
    Ok(n)
}

/// Why a redemption was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RedeemRefusal {
    Exhausted,
    CustomerLimit,
}

/// Redeems a code for a confirmed order, inside the order's transaction. The usage counter
/// is a conditional update on the promo row, so concurrent orders can never exceed the limit.
pub async fn redeem(
    conn: &mut PgConnection,
    code: &str,
    user_id: &str,
    order_id: Uuid,
) -> Result<Result<(), RedeemRefusal>, sqlx::Error> {
    let mut attempt = sqlx::Acquire::begin(&mut *conn).await?;
    let row: Option<(Option<i32>,)> = sqlx::query_as(
        "UPDATE pricing.promos SET used = used + 1, updated_at = now()
         WHERE code = lower($1) AND (usage_limit IS NULL OR used < usage_limit)
         RETURNING per_customer_limit",
    )
    .bind(code)
    .fetch_optional(&mut *attempt)
    .await?;
    let Some((per_customer,)) = row else {
        attempt.rollback().await?;
        return Ok(Err(RedeemRefusal::Exhausted));
    };
    if let Some(limit) = per_customer {
        // The promo row is locked by the update above: these counts cannot race.
        if customer_uses(&mut attempt, code, user_id).await? >= i64::from(limit) {
            attempt.rollback().await?;
            return Ok(Err(RedeemRefusal::CustomerLimit));
        }
    }
    sqlx::query(
        "INSERT INTO pricing.promo_redemptions (order_id, code, user_id, status)
         VALUES ($1, lower($2), $3, 'redeemed') ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(code)
    .bind(user_id)
    .execute(&mut *attempt)
    .await?;
    attempt.commit().await?;
    Ok(Ok(()))
}

/// Gives an order's redemption back (cancellation). Idempotent.
pub async fn release(pool: &PgPool, order_id: Uuid) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let released: Option<(String,)> = sqlx::query_as(
        "UPDATE pricing.promo_redemptions SET status = 'released', updated_at = now()
         WHERE order_id = $1 AND status = 'redeemed' RETURNING code",
    )
    .bind(order_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((code,)) = released {
        sqlx::query(
            "UPDATE pricing.promos SET used = used - 1, updated_at = now() WHERE code = $1",
        )
        .bind(code)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
