//! Payments: the provider adapter, the authorize step, voids for compensation, and the
//! reconciliation of payments whose outcome was unknown.

mod authorize;
pub mod breaker_status;
pub mod guard;
mod lifecycle;
pub mod provider;
pub mod reconcile;
pub mod sandbox_client;
pub mod token_seal;
pub mod updates;
pub mod void;
pub mod webhooks;

pub use authorize::AuthorizeStep;
pub use lifecycle::{CaptureStep, RefundStep};
pub use provider::{PaymentProvider, ProviderError};
pub use void::{abandon, void_for_order, VoidOutcome};

use std::sync::Arc;

use sqlx::PgPool;
use uuid::Uuid;

crate::text_enum! {
    /// Where an order's payment stands (`payments.payments.status`).
    pub enum PaymentStatus {
        /// Held by the provider but undecided: a challenge for the buyer, or a webhook to come.
        Pending = "pending",
        Authorized = "authorized",
        Captured = "captured",
        Voided = "voided",
        Refunded = "refunded",
        Declined = "declined",
        /// The provider's answer is unknown; the reconciler looks again later.
        Failed = "failed",
        /// The order timed out before any authorization was recorded.
        Abandoned = "abandoned",
    }
}

/// What the API shows of an order's payment.
#[derive(Debug, Clone)]
pub struct PaymentView {
    /// `None` while the provider has not answered yet (no payment row).
    pub status: Option<PaymentStatus>,
    pub decline_code: Option<String>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Failed provider calls so far (retries in progress when no status yet).
    pub failed_attempts: i32,
    /// Where the buyer completes the provider's challenge, while the payment is pending.
    pub next_action_url: Option<String>,
}

impl PaymentView {
    /// An authorization past its provider-side expiry cannot be captured any more.
    pub fn expired(&self) -> bool {
        self.status == Some(PaymentStatus::Authorized)
            && self.expires_at.is_some_and(|t| t <= chrono::Utc::now())
    }
}

/// An order's payment as the API shows it.
pub async fn payment_view(pool: &PgPool, order_id: Uuid) -> Result<PaymentView, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        status: Option<PaymentStatus>,
        decline_code: Option<String>,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        failures: Option<i32>,
        next_action_url: Option<String>,
    }
    let row: Row = sqlx::query_as(
        "SELECT p.status, p.decline_code, p.expires_at, a.failures, p.next_action_url
         FROM (SELECT $1::uuid AS order_id) o
         LEFT JOIN payments.payments p USING (order_id)
         LEFT JOIN payments.attempts a USING (order_id)",
    )
    .bind(order_id)
    .fetch_one(pool)
    .await?;
    Ok(PaymentView {
        status: row.status,
        decline_code: row.decline_code,
        expires_at: row.expires_at,
        failed_attempts: row.failures.unwrap_or(0),
        next_action_url: row.next_action_url,
    })
}

/// The payment id of an order: deterministic, so a retried step names the same payment.
pub fn payment_id_for(order_id: Uuid) -> Uuid {
    Uuid::new_v5(&order_id, b"payment")
}

/// The idempotency key sent to the provider for one operation on one order.
pub fn idempotency_key(order_id: Uuid, operation: &str) -> String {
    format!("{order_id}:{operation}")
}

/// The payment provider every step of this process talks to: the sandbox PSP's client behind
/// the rate limit and the circuit breaker (whose state the authorize role reports).
pub fn provider(
    settings: &crate::config::Settings,
) -> Result<(Arc<dyn PaymentProvider>, Arc<guard::CircuitBreaker>), ProviderError> {
    let sandbox: Arc<dyn PaymentProvider> = Arc::new(sandbox_client::SandboxClient::new(
        &settings.psp.url,
        settings.psp.timeout,
    )?);
    let guarded = Arc::new(guard::GuardedProvider::new(sandbox, &settings.payments));
    let breaker = guarded.breaker();
    Ok((guarded, breaker))
}

/// What the authorize role runs: the authorize, capture and refund steps, and the breaker's
/// status reports.
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    consuming: &crate::tasks::Consuming,
    settings: &crate::config::Settings,
    leases: &crate::db::Leases,
    (provider, breaker): (&Arc<dyn PaymentProvider>, &Arc<guard::CircuitBreaker>),
    seal: &Arc<token_seal::TokenSeal>,
) {
    let payments = &settings.payments;
    tasks.step(
        consuming,
        AuthorizeStep {
            leases: leases.clone(),
            provider: provider.clone(),
            max_attempts: payments.max_attempts,
            retry_window: payments.retry_window,
            max_risk_score: payments.max_risk_score,
            seal: seal.clone(),
            fail_after_provider_call: settings.chaos.redeliver
                == crate::config::Redeliver::AfterProviderCall,
            pending_limit: settings.watchdog.pending_limit,
            action_timeout: payments.action_timeout,
        },
    );
    tasks.step(
        consuming,
        CaptureStep::new(leases.clone(), provider.clone()),
    );
    tasks.step(consuming, RefundStep::new(leases.clone(), provider.clone()));
    tasks.step(
        consuming,
        updates::PaymentUpdateStep {
            leases: leases.clone(),
            provider: provider.clone(),
        },
    );
    let (pool, bus) = (leases.pool().clone(), consuming.bus.clone());
    let (timeout, every) = (payments.action_timeout, payments.action_sweep_interval);
    tasks.until_shutdown("challenge-expiry", move |token| {
        updates::run_expiry(pool, bus, timeout, every, token)
    });
    let (bus, breaker) = (consuming.bus.clone(), breaker.clone());
    tasks.until_shutdown("breaker-status", move |token| {
        breaker_status::report_breaker(bus, breaker, token)
    });
}
