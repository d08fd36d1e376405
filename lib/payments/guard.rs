//! Protection around a provider: a per-process rate limit and a circuit breaker. When the
//! provider keeps failing the breaker opens and calls are deferred (the authorize consumer
//! naks them with a delay) until a half-open probe succeeds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use super::provider::{
    AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderAuthorization, ProviderError,
};
use crate::config::PaymentsSettings;

/// The breaker's state, as logs and `/readyz` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

struct Breaker {
    state: BreakerState,
    window_started: Instant,
    calls: u32,
    failures: u32,
    open_until: Instant,
    probing: bool,
}

/// A circuit breaker over a sliding window of calls.
pub struct CircuitBreaker {
    inner: Mutex<Breaker>,
    window: Duration,
    min_calls: u32,
    failure_rate: f64,
    cooldown: Duration,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(window: Duration, min_calls: u32, failure_rate: f64, cooldown: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Breaker {
                state: BreakerState::Closed,
                window_started: now,
                calls: 0,
                failures: 0,
                open_until: now,
                probing: false,
            }),
            window,
            min_calls: min_calls.max(1),
            failure_rate,
            cooldown,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.inner.lock().map_or(BreakerState::Open, |b| b.state)
    }

    /// May a call go out now? `Err(wait)` when it must not.
    pub fn admit(&self) -> Result<(), Duration> {
        let Ok(mut b) = self.inner.lock() else {
            return Err(self.cooldown);
        };
        let now = Instant::now();
        match b.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open if now < b.open_until => Err(b.open_until - now),
            BreakerState::Open | BreakerState::HalfOpen => {
                if b.probing {
                    // One probe at a time; the others wait a little and ask again.
                    return Err(Duration::from_millis(250).min(self.cooldown));
                }
                if b.state == BreakerState::Open {
                    tracing::warn!("payment provider breaker half-open: probing");
                }
                b.state = BreakerState::HalfOpen;
                b.probing = true;
                Ok(())
            }
        }
    }

    /// Records a call's outcome (`true` when the provider answered).
    pub fn record(&self, success: bool) {
        let Ok(mut b) = self.inner.lock() else { return };
        let now = Instant::now();
        if b.state == BreakerState::HalfOpen {
            b.probing = false;
            if success {
                tracing::warn!("payment provider breaker closed");
                b.state = BreakerState::Closed;
                b.window_started = now;
                b.calls = 0;
                b.failures = 0;
            } else {
                tracing::warn!(cooldown = ?self.cooldown, "payment provider breaker reopened");
                b.state = BreakerState::Open;
                b.open_until = now + self.cooldown;
            }
            return;
        }
        if now.duration_since(b.window_started) > self.window {
            b.window_started = now;
            b.calls = 0;
            b.failures = 0;
        }
        b.calls += 1;
        if !success {
            b.failures += 1;
        }
        let rate = f64::from(b.failures) / f64::from(b.calls);
        if b.state == BreakerState::Closed && b.calls >= self.min_calls && rate >= self.failure_rate
        {
            tracing::warn!(
                calls = b.calls,
                failures = b.failures,
                cooldown = ?self.cooldown,
                "payment provider breaker opened"
            );
            b.state = BreakerState::Open;
            b.open_until = now + self.cooldown;
        }
    }
}

/// A token bucket: `rate` calls per second with bursts of up to `rate`.
pub struct RateLimiter {
    inner: Mutex<(f64, Instant)>,
    rate: f64,
    max_wait: Duration,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: f64, max_wait: Duration) -> Self {
        let rate = rate.max(0.001);
        Self {
            inner: Mutex::new((rate.max(1.0), Instant::now())),
            rate,
            max_wait,
        }
    }

    /// Takes a token, waiting for it if that is quick; `Err(wait)` if it is not.
    pub async fn acquire(&self) -> Result<(), Duration> {
        let wait = {
            let Ok(mut guard) = self.inner.lock() else {
                return Err(self.max_wait);
            };
            let (tokens, last) = &mut *guard;
            let now = Instant::now();
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate)
                .min(self.rate.max(1.0));
            *last = now;
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                return Ok(());
            }
            let wait = Duration::from_secs_f64(-*tokens / self.rate);
            if wait > self.max_wait {
                *tokens += 1.0;
                return Err(wait);
            }
            wait
        };
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// A provider behind a rate limit and a circuit breaker.
pub struct GuardedProvider {
    inner: Arc<dyn PaymentProvider>,
    breaker: Arc<CircuitBreaker>,
    limiter: RateLimiter,
}

impl GuardedProvider {
    /// Wraps `inner` with the configured limits.
    pub fn new(inner: Arc<dyn PaymentProvider>, settings: &PaymentsSettings) -> Self {
        Self {
            inner,
            breaker: Arc::new(CircuitBreaker::new(
                settings.breaker_window,
                settings.breaker_min_calls,
                settings.breaker_failure_rate,
                settings.breaker_cooldown,
            )),
            limiter: RateLimiter::new(settings.rate_limit_per_s, Duration::from_secs(1)),
        }
    }

    /// The breaker, for status reports.
    pub fn breaker(&self) -> Arc<CircuitBreaker> {
        self.breaker.clone()
    }

    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.breaker.admit().map_err(ProviderError::Deferred)?;
        if let Err(wait) = self.limiter.acquire().await {
            // Not sent: a half-open probe slot must be given back.
            self.breaker.record(true);
            return Err(ProviderError::Deferred(wait));
        }
        let result = call.await;
        self.breaker
            .record(!matches!(result, Err(ProviderError::Unavailable(_))));
        result
    }
}

#[async_trait::async_trait]
impl PaymentProvider for GuardedProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn authorize(
        &self,
        request: &AuthorizeRequest,
    ) -> Result<AuthorizeOutcome, ProviderError> {
        self.guarded(self.inner.authorize(request)).await
    }

    async fn void(&self, auth_id: &str, key: &str) -> Result<(), ProviderError> {
        self.guarded(self.inner.void(auth_id, key)).await
    }

    async fn capture(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<(), ProviderError> {
        self.guarded(self.inner.capture(auth_id, amount, key)).await
    }

    async fn authorizations_for(
        &self,
        order_id: Uuid,
    ) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        self.guarded(self.inner.authorizations_for(order_id)).await
    }

    async fn refund(&self, auth_id: &str, amount: Decimal, key: &str) -> Result<(), ProviderError> {
        self.guarded(self.inner.refund(auth_id, amount, key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failures_and_closes_after_a_good_probe() {
        let b = CircuitBreaker::new(Duration::from_secs(60), 4, 0.5, Duration::from_millis(0));
        for _ in 0..4 {
            assert!(b.admit().is_ok());
            b.record(false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        // Cooldown of zero: the next call is the probe, others wait while it runs.
        assert!(b.admit().is_ok());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit().is_err());
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = CircuitBreaker::new(Duration::from_secs(60), 1, 0.5, Duration::from_secs(30));
        b.record(false);
        assert!(b.admit().is_err());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn the_rate_limit_defers_long_waits() {
        let limiter = RateLimiter::new(2.0, Duration::from_millis(100));
        assert!(limiter.acquire().await.is_ok());
        assert!(limiter.acquire().await.is_ok());
        // The bucket is empty; the next token is 500 ms away, more than max_wait.
        assert!(limiter.acquire().await.is_err());
    }
}
