//! The authorize step: hold the checkout's total at the provider, exactly once per order.

use std::sync::Arc;

use sqlx::PgPool;

use super::provider::{AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderError};
use super::{idempotency_key, payment_id_for};
use crate::saga::events::{Event, EventKind};
use crate::saga::inbox::{self, Claim, InboxTable};
use crate::saga::runner::{Delivery, Step, StepError};

/// Consumes `checkout.reserved`, emits `checkout.authorized` or `checkout.declined`.
pub struct AuthorizeStep {
    pub pool: PgPool,
    pub provider: Arc<dyn PaymentProvider>,
}

const DURABLE: &str = "authorize";

impl Step for AuthorizeStep {
    fn durable(&self) -> &'static str {
        DURABLE
    }

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Reserved]
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
        let outcome = match self.provider.authorize(&request).await {
            Ok(outcome) => outcome,
            Err(ProviderError::Unavailable(e)) => return Err(StepError::Transient(e)),
            Err(ProviderError::Rejected(e)) => AuthorizeOutcome::Declined {
                code: format!(
                    "provider_rejected: {}",
                    e.chars().take(200).collect::<String>()
                ),
            },
        };
        let mut tx = match inbox::claim(
            &self.pool,
            InboxTable::Payments,
            DURABLE,
            &delivery.event_id,
        )
        .await?
        {
            Claim::Done(events) => return Ok(events),
            Claim::Fresh(tx) => tx,
        };
        let payment_id = payment_id_for(order_id);
        let (status, auth_id, decline_code, expires_at) = match &outcome {
            AuthorizeOutcome::Approved {
                auth_id,
                expires_at,
                ..
            } => ("authorized", Some(auth_id.clone()), None, *expires_at),
            AuthorizeOutcome::Declined { code } => ("declined", None, Some(code.clone()), None),
        };
        sqlx::query(
            "INSERT INTO payments.payments
                 (payment_id, order_id, provider, status, auth_id, amount, currency, decline_code, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(payment_id)
        .bind(order_id)
        .bind(self.provider.name())
        .bind(status)
        .bind(&auth_id)
        .bind(checkout.total)
        .bind(&checkout.currency)
        .bind(&decline_code)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        let outputs = match outcome {
            AuthorizeOutcome::Approved { auth_id, .. } => vec![Event::Authorized {
                checkout,
                payment_id,
                auth_id,
            }],
            AuthorizeOutcome::Declined { code } => {
                tracing::info!(decline_code = %code, "payment declined");
                vec![Event::Declined {
                    checkout,
                    decline_code: code,
                }]
            }
        };
        inbox::complete(
            tx,
            InboxTable::Payments,
            DURABLE,
            &delivery.event_id,
            &outputs,
        )
        .await?;
        Ok(outputs)
    }
}
