//! Payments: the provider adapter, the authorize step, voids for compensation, and the
//! reconciliation of payments whose outcome was unknown.

mod authorize;
pub mod breaker_status;
pub mod guard;
mod lifecycle;
pub mod provider;
pub mod providers;
pub mod reconcile;
pub mod sandbox_client;
pub mod token_seal;
pub mod updates;
pub mod void;
pub mod webhooks;

pub use authorize::AuthorizeStep;
pub use lifecycle::{CaptureStep, RefundStep};
pub use provider::{PaymentProvider, ProviderError};
pub use providers::{Providers, Route};
pub use void::{abandon, void_for_order, void_rest, VoidOutcome};

use std::sync::Arc;

use rust_decimal::Decimal;
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
    /// The provider holding the payment.
    pub provider: Option<String>,
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
        provider: Option<String>,
    }
    let row: Row = sqlx::query_as(
        "SELECT p.status, p.decline_code, p.expires_at, a.failures, p.next_action_url,
                p.provider
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
        provider: row.provider,
    })
}

/// An order's money as the payments ledger tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoneySummary {
    /// Held at the provider for the order (0 when no authorization was ever granted).
    pub authorized: Decimal,
    pub captured: Decimal,
    pub refunded: Decimal,
    /// Released without being captured (a void of the whole, or of the uncaptured rest).
    pub voided: Decimal,
}

/// What the payments ledger (`payments.movements`) says of an order's money.
pub async fn money_of(pool: &PgPool, order_id: Uuid) -> Result<MoneySummary, sqlx::Error> {
    let (authorized, captured, refunded, voided): (Decimal, Decimal, Decimal, Decimal) =
        sqlx::query_as(
            "SELECT coalesce((SELECT amount FROM payments.payments p WHERE p.order_id = $1
                                AND (p.status IN ('authorized', 'captured', 'refunded')
                                     OR EXISTS (SELECT 1 FROM payments.movements v
                                                WHERE v.order_id = $1 AND v.kind = 'void'))), 0),
                    coalesce(sum(m.amount) FILTER (WHERE m.kind = 'capture'), 0),
                    coalesce(sum(m.amount) FILTER (WHERE m.kind = 'refund'), 0),
                    coalesce(sum(m.amount) FILTER (WHERE m.kind = 'void'), 0)
             FROM payments.movements m WHERE m.order_id = $1",
        )
        .bind(order_id)
        .fetch_one(pool)
        .await?;
    Ok(MoneySummary {
        authorized,
        captured,
        refunded,
        voided,
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

/// The payment providers every step of this process talks to: the primary (and the fallback,
/// if configured), each behind its own rate limit and circuit breaker.
pub fn provider(settings: &crate::config::Settings) -> Result<Arc<Providers>, ProviderError> {
    let psp = &settings.psp;
    let guarded = |client: sandbox_client::SandboxClient| {
        let client: Arc<dyn PaymentProvider> = Arc::new(client);
        Arc::new(guard::GuardedProvider::new(client, &settings.payments))
    };
    let primary = guarded(sandbox_client::SandboxClient::new(&psp.url, psp.timeout)?);
    let fallback = if psp.fallback_url.is_empty() {
        None
    } else {
        // Read once at start-up and kept for the life of the process, like the metric labels.
        let name: &'static str = Box::leak(psp.fallback_name.clone().into_boxed_str());
        Some(guarded(sandbox_client::SandboxClient::named(
            name,
            &psp.fallback_url,
            psp.timeout,
        )?))
    };
    Ok(Arc::new(Providers::new(primary, fallback)))
}

/// What the authorize role runs: the authorize, capture and refund steps, and the breaker's
/// status reports.
pub fn start(
    tasks: &mut crate::tasks::Tasks,
    consuming: &crate::tasks::Consuming,
    settings: &crate::config::Settings,
    leases: &crate::db::Leases,
    providers: &Arc<Providers>,
    seal: &Arc<token_seal::TokenSeal>,
) {
    let payments = &settings.payments;
    let provider: Arc<dyn PaymentProvider> = providers.clone();
    tasks.step(
        consuming,
        AuthorizeStep {
            leases: leases.clone(),
            providers: providers.clone(),
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
    let sweeper = updates::Sweeper {
        pool: leases.pool().clone(),
        bus: consuming.bus.clone(),
        providers: providers.clone(),
        action_timeout: payments.action_timeout,
        webhook_grace: payments.webhook_grace,
    };
    let every = payments.action_sweep_interval;
    tasks.until_shutdown("challenge-sweeper", move |token| {
        updates::run_sweeper(sweeper, every, token)
    });
    let (bus, breaker) = (consuming.bus.clone(), providers.breaker());
    tasks.until_shutdown("breaker-status", move |token| {
        breaker_status::report_breaker(bus, breaker, token)
    });
}
