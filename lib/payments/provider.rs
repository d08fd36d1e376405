//! The `PaymentProvider` trait: what the saga needs from a PSP. The sandbox client is one
//! implementation; a Stripe or Adyen adapter would be another, without touching the saga.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

/// An authorization request; `idempotency_key` makes retries return the same result.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub order_id: Uuid,
    pub amount: Decimal,
    pub currency: String,
    pub token: String,
    pub idempotency_key: String,
    /// Where the provider sends the buyer back after its challenge, if it asks for one.
    pub return_url: Option<String>,
    /// An earlier call for this request failed (as recorded in the database, so it holds
    /// across a restart): another failure is the request's own, not news of the provider.
    pub failed_before: bool,
}

/// The provider's answer to an authorization.
#[derive(Debug, Clone)]
pub enum AuthorizeOutcome {
    Approved {
        auth_id: String,
        expires_at: Option<DateTime<Utc>>,
        risk_score: Option<u8>,
    },
    Declined {
        code: String,
    },
    /// Held, but not decided: the buyer must act first (`next_action`, e.g. a 3-D Secure
    /// challenge page), or the provider answers later. The outcome arrives as a webhook.
    Pending {
        auth_id: String,
        next_action: Option<String>,
        expires_at: Option<DateTime<Utc>>,
    },
}

/// Why a provider call did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Provider trouble, whatever the provider's state now is: timeouts, connection failures,
    /// 5xx, 429, 401/403 (our credentials, e.g. a key rotation), 409 (the same idempotency
    /// key still in flight), an unreadable reply. Retry with the same idempotency key; these
    /// count against the breaker. Never a decline.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused this request outright (400, 404, 422: a wrong state, an expired
    /// authorization, a bug on our side or theirs). Repeating it cannot help.
    #[error("provider rejected the request: {0}")]
    Rejected(String),
    /// Not sent: the circuit breaker is open or the rate limit is spent; try after this.
    #[error("provider call deferred for {0:?}")]
    Deferred(std::time::Duration),
}

/// An authorization the provider holds for an order.
#[derive(Debug, Clone)]
pub struct ProviderAuthorization {
    pub auth_id: String,
    /// `authorized`, `captured`, `voided` or `refunded`.
    pub status: String,
    /// Our order id, as sent with the authorization.
    pub reference: String,
    pub expires_at: Option<DateTime<Utc>>,
    /// Captures and refunds the provider made on it.
    pub captures: u32,
    pub refunds: u32,
    /// The money it captured, refunded and released (voided) so far.
    pub captured: Decimal,
    pub refunded: Decimal,
    pub voided: Decimal,
}

/// A payment service provider.
#[async_trait::async_trait]
pub trait PaymentProvider: Send + Sync {
    /// Short name recorded in `payments.provider`.
    fn name(&self) -> &'static str;
    /// Authorizes (holds) an amount on a payment method.
    async fn authorize(
        &self,
        request: &AuthorizeRequest,
    ) -> Result<AuthorizeOutcome, ProviderError>;
    /// Releases an authorization that will not be captured.
    async fn void(&self, auth_id: &str, idempotency_key: &str) -> Result<(), ProviderError>;
    /// Captures part or all of an authorized amount; answers the provider's capture id.
    async fn capture(
        &self,
        auth_id: &str,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<String, ProviderError>;
    /// The authorizations the provider holds for an order (reconciliation after timeouts).
    async fn authorizations_for(
        &self,
        order_id: uuid::Uuid,
    ) -> Result<Vec<ProviderAuthorization>, ProviderError>;
    /// Every authorization the provider holds for us (its reporting API), for the audit.
    async fn report(&self) -> Result<Vec<ProviderAuthorization>, ProviderError>;
    /// Refunds part or all of the captured amount; answers the provider's refund id.
    async fn refund(
        &self,
        auth_id: &str,
        amount: Decimal,
        idempotency_key: &str,
    ) -> Result<String, ProviderError>;
}
