//! The HTTP client for the sandbox PSP (`checkout run psp`), spoken to as a real adapter
//! speaks to Stripe: JSON over HTTP, an `Idempotency-Key` on every mutating call.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::provider::{
    AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderAuthorization, ProviderError,
};

/// A client of the sandbox PSP.
#[derive(Clone)]
pub struct SandboxClient {
    http: reqwest::Client,
    base: String,
}

#[derive(Serialize)]
struct AuthorizeBody<'a> {
    amount: String,
    currency: &'a str,
    token: &'a str,
    reference: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthorizationReply {
    id: String,
    status: String,
    decline_code: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    risk_score: Option<u8>,
}

#[derive(Serialize)]
struct AmountBody {
    amount: String,
}

impl SandboxClient {
    /// A client with a per-call timeout.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| ProviderError::Rejected(format!("http client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    async fn post<B: Serialize>(
        &self,
        path: &str,
        key: &str,
        body: &B,
    ) -> Result<reqwest::Response, ProviderError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        let status = response.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(ProviderError::Unavailable(format!("{path}: HTTP {status}")));
        }
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(ProviderError::Rejected(format!(
                "{path}: HTTP {status}: {text}"
            )));
        }
        Ok(response)
    }
}

#[async_trait::async_trait]
impl PaymentProvider for SandboxClient {
    fn name(&self) -> &'static str {
        "sandbox"
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
        };
        let reply: AuthorizationReply = self
            .post("/v1/authorizations", &request.idempotency_key, &body)
            .await?
            .json()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("bad reply: {e}")))?;
        Ok(match reply.status.as_str() {
            "authorized" => AuthorizeOutcome::Approved {
                auth_id: reply.id,
                expires_at: reply.expires_at,
                risk_score: reply.risk_score,
            },
            _ => AuthorizeOutcome::Declined {
                code: reply.decline_code.unwrap_or_else(|| "declined".into()),
            },
        })
    }

    async fn void(&self, auth_id: &str, key: &str) -> Result<(), ProviderError> {
        self.post(
            &format!("/v1/authorizations/{auth_id}/void"),
            key,
            &serde_json::json!({}),
        )
        .await
        .map(|_| ())
    }

    async fn authorizations_for(
        &self,
        order_id: uuid::Uuid,
    ) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        #[derive(Deserialize)]
        struct Found {
            authorizations: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            id: String,
            status: String,
        }
        let response = self
            .http
            .get(format!("{}/v1/authorizations", self.base))
            .query(&[("reference", order_id.to_string())])
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ProviderError::Unavailable(format!(
                "authorizations: HTTP {}",
                response.status()
            )));
        }
        let found: Found = response
            .json()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("bad reply: {e}")))?;
        Ok(found
            .authorizations
            .into_iter()
            .map(|i| ProviderAuthorization {
                auth_id: i.id,
                status: i.status,
            })
            .collect())
    }

    async fn capture(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<(), ProviderError> {
        let body = AmountBody {
            amount: amount.to_string(),
        };
        self.post(&format!("/v1/authorizations/{auth_id}/capture"), key, &body)
            .await
            .map(|_| ())
    }

    async fn refund(&self, auth_id: &str, amount: Decimal, key: &str) -> Result<(), ProviderError> {
        let body = AmountBody {
            amount: amount.to_string(),
        };
        self.post(&format!("/v1/authorizations/{auth_id}/refund"), key, &body)
            .await
            .map(|_| ())
    }
}
