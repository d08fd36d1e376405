//! The configured payment providers: a primary and, optionally, a fallback, each behind its own
//! rate limit and circuit breaker.
//!
//! A new authorization goes to the fallback only when the primary's breaker is open (so no
//! call to the primary would be made) and nothing at the primary can be in flight for the
//! order: its first delivery, no failed call on record. The choice is written down before the
//! call (`payments.attempts.provider`), so a redelivery asks the same provider again with the
//! same idempotency key, and no order ever holds two authorizations. An order whose primary
//! attempt failed ambiguously stays with the primary, which reconciles it when it is back.
//!
//! Every later operation (capture, void, refund) goes to the provider that holds the
//! authorization: the fallback's authorization ids are recorded as `<provider>:<its id>`, the
//! primary's as they are (as before there was a fallback).

use std::sync::Arc;

use rust_decimal::Decimal;
use uuid::Uuid;

use super::guard::{BreakerState, CircuitBreaker, GuardedProvider};
use super::provider::{
    AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderAuthorization, ProviderError,
};

/// Which provider a new authorization goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Primary,
    Fallback,
}

/// The primary and the fallback, as one provider to every step.
pub struct Providers {
    primary: Arc<GuardedProvider>,
    fallback: Option<Arc<GuardedProvider>>,
}

impl Providers {
    /// The providers; `fallback` only for new authorizations while the primary's breaker is open.
    pub fn new(primary: Arc<GuardedProvider>, fallback: Option<Arc<GuardedProvider>>) -> Self {
        Self { primary, fallback }
    }

    /// The primary's breaker (the one the status reports show).
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.primary.breaker()
    }

    /// The provider a route names.
    pub fn name_of(&self, route: Route) -> &'static str {
        match (route, &self.fallback) {
            (Route::Fallback, Some(fallback)) => fallback.name(),
            _ => self.primary.name(),
        }
    }

    /// The route of a provider named in `payments.attempts.provider`, if it is configured.
    pub fn route_named(&self, name: &str) -> Option<Route> {
        if name == self.primary.name() {
            Some(Route::Primary)
        } else if self.fallback.as_ref().is_some_and(|f| f.name() == name) {
            Some(Route::Fallback)
        } else {
            None
        }
    }

    /// Where a new authorization goes: the primary, unless its breaker is open, a fallback is
    /// configured, and `may_fall_back` (nothing at the primary can be in flight for the order).
    pub fn route(&self, may_fall_back: bool) -> Route {
        let primary_open = self.primary.breaker().state() == BreakerState::Open;
        if may_fall_back && primary_open && self.fallback.is_some() {
            Route::Fallback
        } else {
            Route::Primary
        }
    }

    /// Authorizes at the routed provider; the outcome's authorization id names its holder.
    pub async fn authorize_at(
        &self,
        route: Route,
        request: &AuthorizeRequest,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        let (provider, qualified) = self.at(route);
        let outcome = provider.authorize(request).await?;
        Ok(match outcome {
            AuthorizeOutcome::Approved {
                auth_id,
                expires_at,
                risk_score,
            } => AuthorizeOutcome::Approved {
                auth_id: qualify(qualified, &auth_id),
                expires_at,
                risk_score,
            },
            AuthorizeOutcome::Pending {
                auth_id,
                next_action,
                expires_at,
            } => AuthorizeOutcome::Pending {
                auth_id: qualify(qualified, &auth_id),
                next_action,
                expires_at,
            },
            declined @ AuthorizeOutcome::Declined { .. } => declined,
        })
    }

    /// The provider that holds a recorded authorization id.
    pub fn holder(&self, auth_id: &str) -> &'static str {
        self.split(auth_id).0.name()
    }

    fn at(&self, route: Route) -> (&GuardedProvider, Option<&'static str>) {
        match (route, &self.fallback) {
            (Route::Fallback, Some(fallback)) => (fallback, Some(fallback.name())),
            _ => (&self.primary, None),
        }
    }

    /// The provider holding `auth_id`, and the id as that provider knows it.
    fn split<'a>(&self, auth_id: &'a str) -> (&GuardedProvider, &'a str) {
        if let (Some(fallback), Some((name, raw))) = (&self.fallback, auth_id.split_once(':')) {
            if name == fallback.name() {
                return (fallback, raw);
            }
        }
        (&self.primary, auth_id)
    }

    fn all(&self) -> impl Iterator<Item = (&GuardedProvider, Option<&'static str>)> {
        std::iter::once((self.primary.as_ref(), None))
            .chain(self.fallback.iter().map(|f| (f.as_ref(), Some(f.name()))))
    }
}

/// The authorization id as recorded, for an id the provider named `provider` sent (in a
/// webhook); `None` for a provider that is not configured.
pub fn recorded_id(psp: &crate::config::PspSettings, provider: &str, raw: &str) -> Option<String> {
    if provider == super::sandbox_client::NAME {
        Some(raw.to_owned())
    } else if !psp.fallback_url.is_empty() && provider == psp.fallback_name {
        Some(format!("{provider}:{raw}"))
    } else {
        None
    }
}

fn qualify(provider: Option<&str>, raw: &str) -> String {
    match provider {
        Some(name) => format!("{name}:{raw}"),
        None => raw.to_owned(),
    }
}

fn qualified(
    provider: Option<&str>,
    found: Vec<ProviderAuthorization>,
) -> Vec<ProviderAuthorization> {
    found
        .into_iter()
        .map(|mut a| {
            a.auth_id = qualify(provider, &a.auth_id);
            a
        })
        .collect()
}

#[async_trait::async_trait]
impl PaymentProvider for Providers {
    fn name(&self) -> &'static str {
        self.primary.name()
    }

    /// At the primary; the authorize step routes with `authorize_at` instead.
    async fn authorize(
        &self,
        request: &AuthorizeRequest,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        self.authorize_at(Route::Primary, request).await
    }

    async fn void(&self, auth_id: &str, key: &str) -> Result<(), ProviderError> {
        let (provider, raw) = self.split(auth_id);
        provider.void(raw, key).await
    }

    async fn capture(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        let (provider, raw) = self.split(auth_id);
        provider.capture(raw, amount, key).await
    }

    /// Every provider's records of the order (an authorization is at one of them, at most).
    async fn authorizations_for(
        &self,
        order_id: Uuid,
    ) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        let mut found = Vec::new();
        for (provider, name) in self.all() {
            found.extend(qualified(
                name,
                provider.authorizations_for(order_id).await?,
            ));
        }
        Ok(found)
    }

    async fn report(&self) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        let mut found = Vec::new();
        for (provider, name) in self.all() {
            found.extend(qualified(name, provider.report().await?));
        }
        Ok(found)
    }

    async fn refund(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        let (provider, raw) = self.split(auth_id);
        provider.refund(raw, amount, key).await
    }
}
