//! The authorize step: hold the checkout's total at the provider, exactly once per order.

use std::sync::Arc;

use sqlx::PgPool;

use super::provider::{AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderError};
use super::{idempotency_key, payment_id_for};
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::{self, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.reserved`, emits `checkout.authorized` or `checkout.declined`.
pub struct AuthorizeStep {
    pub pool: PgPool,
    pub provider: Arc<dyn PaymentProvider>,
    /// Failed provider calls allowed per order.
    pub max_attempts: i32,
    /// Risk scores at or above this are refused (the authorization is voided).
    pub max_risk_score: u8,
    /// Fault injection: fail once after the provider answered, before committing.
    pub fail_after_provider_call: bool,
}

const DURABLE: &str = "authorize";

/// What to record and emit.
enum Decision {
    Approved(String, Option<chrono::DateTime<chrono::Utc>>),
    Refused {
        status: &'static str,
        auth_id: Option<String>,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        code: String,
        reason: FailureReason,
    },
}

impl Step for AuthorizeStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Reserved]
    }

    /// Unlimited deliveries: the attempt budget counts real provider failures, not the
    /// naks of an open breaker (an outage must not dead-letter paying customers).
    fn max_deliver(&self) -> Option<i64> {
        Some(-1)
    }

    async fn handle(&self, event: Event, delivery: &Delivery) -> Result<Vec<Event>, StepError> {
        let Event::Reserved { checkout, .. } = event else {
            return Err(StepError::Permanent(format!(
                "authorize cannot handle {:?}",
                event.kind()
            )));
        };
        // The provider call cannot sit inside a transaction, so look first: a redelivery of
        // a handled event must not even reach the provider.
        if let Some(events) = inbox::lookup(
            &self.pool,
            InboxTable::Payments,
            DURABLE,
            &delivery.event_id,
        )
        .await?
        {
            return Ok(events);
        }
        let order_id = checkout.order_id;
        let request = AuthorizeRequest {
            order_id,
            amount: checkout.total,
            currency: checkout.currency.clone(),
            token: checkout.payment_token.clone(),
            // Same key on every retry: the provider returns the first authorization again,
            // so a crash between its answer and our commit never authorizes twice.
            idempotency_key: idempotency_key(order_id, "authorize"),
        };
        let decision = match self.provider.authorize(&request).await {
            Ok(AuthorizeOutcome::Approved {
                auth_id,
                expires_at,
                risk_score,
            }) => match risk_score {
                Some(score) if score >= self.max_risk_score => {
                    tracing::warn!(
                        risk_score = score,
                        "fraud suspected; the authorization will be voided"
                    );
                    Decision::Refused {
                        status: "authorized",
                        auth_id: Some(auth_id),
                        expires_at,
                        code: "fraud_suspected".into(),
                        reason: FailureReason::FraudSuspected,
                    }
                }
                _ => Decision::Approved(auth_id, expires_at),
            },
            Ok(AuthorizeOutcome::Declined { code }) => Decision::Refused {
                status: "declined",
                auth_id: None,
                expires_at: None,
                code,
                reason: FailureReason::PaymentDeclined,
            },
            Err(ProviderError::Deferred(wait)) => return Err(StepError::RetryAfter(wait)),
            Err(ProviderError::Unavailable(e)) => {
                let failures = record_failure(&self.pool, order_id, &e).await?;
                if failures < self.max_attempts {
                    return Err(StepError::Transient(format!(
                        "provider unavailable (attempt {failures} of {}): {e}",
                        self.max_attempts
                    )));
                }
                tracing::warn!(failures, "giving up on the provider");
                // The outcome is unknown (a timeout may have authorized): status `failed`
                // makes compensation ask the provider and void whatever it holds.
                Decision::Refused {
                    status: "failed",
                    auth_id: None,
                    expires_at: None,
                    code: "payment_unavailable".into(),
                    reason: FailureReason::PaymentUnavailable,
                }
            }
            Err(ProviderError::Rejected(e)) => Decision::Refused {
                status: "declined",
                auth_id: None,
                expires_at: None,
                code: format!(
                    "provider_rejected: {}",
                    e.chars().take(200).collect::<String>()
                ),
                reason: FailureReason::PaymentDeclined,
            },
        };
        if self.fail_after_provider_call && delivery.delivered == 1 {
            return Err(StepError::Transient(
                "chaos: failing after the provider call".into(),
            ));
        }
        let payment_id = payment_id_for(order_id);
        let (status, auth_id, decline_code, expires_at, outputs) = match decision {
            Decision::Approved(auth_id, expires_at) => (
                "authorized",
                Some(auth_id.clone()),
                None,
                expires_at,
                vec![Event::Authorized {
                    checkout: checkout.clone(),
                    payment_id,
                    auth_id,
                }],
            ),
            Decision::Refused {
                status,
                auth_id,
                expires_at,
                code,
                reason,
            } => {
                tracing::info!(decline_code = %code, reason = reason.as_str(), "payment refused");
                (
                    status,
                    auth_id,
                    Some(code.clone()),
                    expires_at,
                    vec![Event::Declined {
                        checkout: checkout.clone(),
                        decline_code: code,
                        reason,
                    }],
                )
            }
        };
        let record = PaymentRecord {
            provider: self.provider.name(),
            status,
            auth_id: auth_id.as_deref(),
            decline_code: decline_code.as_deref(),
            expires_at,
        };
        if !claim_and_record(&self.pool, &delivery.event_id, &outputs, &checkout, &record).await? {
            // A concurrent delivery recorded first: emit what it recorded.
            let table = InboxTable::Payments;
            return Ok(
                inbox::lookup(&self.pool, table, DURABLE, &delivery.event_id)
                    .await?
                    .unwrap_or_default(),
            );
        }
        Ok(outputs)
    }
}

/// What the payments row records of the provider's answer.
struct PaymentRecord<'a> {
    provider: &'a str,
    status: &'a str,
    auth_id: Option<&'a str>,
    decline_code: Option<&'a str>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Claims the event and records the payment in one statement (one round trip, one implicit
/// transaction). Returns false, with no effect, if the event was claimed before.
async fn claim_and_record(
    pool: &PgPool,
    event_id: &str,
    outputs: &[Event],
    checkout: &Checkout,
    record: &PaymentRecord<'_>,
) -> Result<bool, StepError> {
    let bytes = rmp_serde::to_vec_named(outputs)
        .map_err(|e| StepError::Permanent(format!("outputs do not encode: {e}")))?;
    let (claimed,): (bool,) = sqlx::query_as(
        "WITH c AS (
             INSERT INTO payments.inbox (consumer, event_id, outputs) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING RETURNING 1),
         p AS (
             INSERT INTO payments.payments
                 (payment_id, order_id, provider, status, auth_id, amount, currency, decline_code, expires_at)
             SELECT $4, $5, $6, $7, $8, $9, $10, $11, $12 WHERE EXISTS (SELECT 1 FROM c)
             ON CONFLICT (order_id) DO NOTHING)
         SELECT EXISTS (SELECT 1 FROM c)",
    )
    .bind(DURABLE)
    .bind(event_id)
    .bind(bytes)
    .bind(payment_id_for(checkout.order_id))
    .bind(checkout.order_id)
    .bind(record.provider)
    .bind(record.status)
    .bind(record.auth_id)
    .bind(checkout.total)
    .bind(&checkout.currency)
    .bind(record.decline_code)
    .bind(record.expires_at)
    .fetch_one(pool)
    .await?;
    Ok(claimed)
}

/// Counts a failed provider call; returns the order's failures so far.
async fn record_failure(
    pool: &PgPool,
    order_id: uuid::Uuid,
    error: &str,
) -> Result<i32, sqlx::Error> {
    let (failures,): (i32,) = sqlx::query_as(
        "INSERT INTO payments.attempts (order_id, failures, last_error) VALUES ($1, 1, $2)
         ON CONFLICT (order_id) DO UPDATE SET failures = payments.attempts.failures + 1,
             last_error = EXCLUDED.last_error, updated_at = now()
         RETURNING failures",
    )
    .bind(order_id)
    .bind(error.chars().take(500).collect::<String>())
    .fetch_one(pool)
    .await?;
    Ok(failures)
}
