//! The HTTP client for the sandbox PSP (`sandbox-psp`, the `tools/sandbox-psp` crate), spoken to as a real adapter
//! speaks to Stripe: JSON over HTTP, an `Idempotency-Key` on every mutating call.
//!
//! How answers map: 2xx is the answer; 402 to an authorization is an explicit decline; 401,
//! 403, 409, 429, 5xx, timeouts and unreadable replies are provider trouble (retried with the
//! same key, counted by the breaker, never a decline); other 4xx are refusals.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use tracing::Instrument;

use crate::saga::subjects::HEADER_TRACEPARENT;
use crate::saga::trace::TraceParent;

use super::provider::{
    AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderAuthorization, ProviderError,
};

/// The sandbox's provider name: in `payments.provider` and the webhook route.
pub const NAME: &str = "sandbox";

/// A client of the sandbox PSP.
#[derive(Clone)]
pub struct SandboxClient {
    http: reqwest::Client,
    base: String,
    name: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizeBody<'a> {
    amount: String,
    currency: &'a str,
    token: &'a str,
    reference: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    return_url: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationReply {
    id: String,
    status: String,
    decline_code: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    risk_score: Option<u8>,
    #[serde(default)]
    next_action: Option<NextAction>,
}

/// What the buyer must do before the provider decides (a 3-D Secure challenge page).
#[derive(Deserialize)]
struct NextAction {
    url: String,
}

#[derive(Deserialize)]
struct ErrorReply {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
}

#[derive(Serialize)]
struct AmountBody {
    amount: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listed {
    authorizations: Vec<ListedItem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedItem {
    id: String,
    status: String,
    #[serde(default)]
    reference: String,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    captures: u32,
    #[serde(default)]
    refunds: u32,
    #[serde(default)]
    captured: Decimal,
    #[serde(default)]
    refunded: Decimal,
    #[serde(default)]
    voided: Decimal,
}

/// The reply to a capture or refund: the provider's id of it.
#[derive(Deserialize)]
struct Operated {
    id: String,
}

/// The `traceparent` a provider call carries: the call's own span, so the provider's spans
/// join the checkout's trace.
fn traceparent(span: &tracing::Span) -> String {
    TraceParent::of_span(span, &TraceParent::new_root()).header_value()
}

/// Whether a status means the provider is in trouble (its state unknown to us).
fn is_trouble(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::CONFLICT
                | StatusCode::REQUEST_TIMEOUT
        )
}

impl SandboxClient {
    /// A client of the primary provider (named [`NAME`]) with a per-call timeout.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, ProviderError> {
        Self::named(NAME, base, timeout)
    }

    /// A client of a provider recorded as `name` (e.g. the fallback).
    pub fn named(name: &'static str, base: &str, timeout: Duration) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| ProviderError::Rejected(format!("http client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            name,
        })
    }

    /// Sends a mutating call; returns the response unless the provider is in trouble.
    async fn send<B: Serialize>(
        &self,
        path: &str,
        key: &str,
        body: &B,
    ) -> Result<reqwest::Response, ProviderError> {
        let span = tracing::info_span!("psp_call", method = "POST", path);
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Idempotency-Key", key)
            .header(HEADER_TRACEPARENT, traceparent(&span))
            .json(body);
        let response = request
            .send()
            .instrument(span)
            .await
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        let status = response.status();
        if is_trouble(status) {
            return Err(ProviderError::Unavailable(format!("{path}: HTTP {status}")));
        }
        Ok(response)
    }

    /// A mutating call whose only answer is success or refusal.
    async fn operate<B: Serialize>(
        &self,
        path: &str,
        key: &str,
        body: &B,
    ) -> Result<(), ProviderError> {
        self.operated(path, key, body).await.map(drop)
    }

    /// A mutating call that answers the id of what it did (a capture, a refund).
    async fn operated<B: Serialize>(
        &self,
        path: &str,
        key: &str,
        body: &B,
    ) -> Result<String, ProviderError> {
        let response = self.send(path, key, body).await?;
        let status = response.status();
        if status.is_success() {
            let done: Operated = response
                .json()
                .await
                .map_err(|e| ProviderError::Unavailable(format!("{path}: bad reply: {e}")))?;
            return Ok(done.id);
        }
        let text = response.text().await.unwrap_or_default();
        Err(ProviderError::Rejected(format!(
            "{path}: HTTP {status}: {text}"
        )))
    }

    async fn list(
        &self,
        query: &[(&str, String)],
    ) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        let span = tracing::info_span!("psp_call", method = "GET", path = "/v1/authorizations");
        let response = self
            .http
            .get(format!("{}/v1/authorizations", self.base))
            .query(query)
            .header(HEADER_TRACEPARENT, traceparent(&span))
            .send()
            .instrument(span)
            .await
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ProviderError::Unavailable(format!(
                "authorizations: HTTP {}",
                response.status()
            )));
        }
        let found: Listed = response
            .json()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("bad reply: {e}")))?;
        Ok(found
            .authorizations
            .into_iter()
            .map(|i| ProviderAuthorization {
                auth_id: i.id,
                status: i.status,
                reference: i.reference,
                expires_at: i.expires_at,
                captures: i.captures,
                refunds: i.refunds,
                captured: i.captured,
                refunded: i.refunded,
                voided: i.voided,
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl PaymentProvider for SandboxClient {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn authorize(
        &self,
        request: &AuthorizeRequest,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        let body = AuthorizeBody {
            amount: request.amount.to_string(),
            currency: &request.currency,
            token: &request.token,
            reference: request.order_id.to_string(),
            return_url: request.return_url.as_deref(),
        };
        let path = "/v1/authorizations";
        let response = self.send(path, &request.idempotency_key, &body).await?;
        let status = response.status();
        if status == StatusCode::PAYMENT_REQUIRED {
            // An explicit decline, as Stripe answers a card error.
            let code = response
                .json::<ErrorReply>()
                .await
                .map_or_else(|_| "declined".to_owned(), |e| e.error.code);
            return Ok(AuthorizeOutcome::Declined { code });
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(ProviderError::Rejected(format!(
                "{path}: HTTP {status}: {text}"
            )));
        }
        // A 2xx we cannot read leaves the provider's state unknown: trouble, not a decline.
        let reply: AuthorizationReply = response
            .json()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("bad reply: {e}")))?;
        match reply.status.as_str() {
            "authorized" => Ok(AuthorizeOutcome::Approved {
                auth_id: reply.id,
                expires_at: reply.expires_at,
                risk_score: reply.risk_score,
            }),
            // The outcome comes later, by webhook: after the buyer's challenge, or the
            // provider's own processing.
            "requires_action" | "pending" => Ok(AuthorizeOutcome::Pending {
                auth_id: reply.id,
                next_action: reply.next_action.map(|a| a.url),
                expires_at: reply.expires_at,
            }),
            "declined" => Ok(AuthorizeOutcome::Declined {
                code: reply.decline_code.unwrap_or_else(|| "declined".into()),
            }),
            other => Err(ProviderError::Unavailable(format!(
                "unexpected authorization status {other}"
            ))),
        }
    }

    async fn void(&self, auth_id: &str, key: &str) -> Result<(), ProviderError> {
        self.operate(
            &format!("/v1/authorizations/{auth_id}/void"),
            key,
            &serde_json::json!({}),
        )
        .await
    }

    async fn authorizations_for(
        &self,
        order_id: uuid::Uuid,
    ) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        self.list(&[("reference", order_id.to_string())]).await
    }

    async fn report(&self) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        self.list(&[]).await
    }

    async fn capture(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        let body = AmountBody {
            amount: amount.to_string(),
        };
        self.operated(&format!("/v1/authorizations/{auth_id}/capture"), key, &body)
            .await
    }

    async fn refund(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        let body = AmountBody {
            amount: amount.to_string(),
        };
        self.operated(&format!("/v1/authorizations/{auth_id}/refund"), key, &body)
            .await
    }
}
