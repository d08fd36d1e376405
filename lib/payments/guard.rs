//! Protection around a provider: a per-process rate limit and a circuit breaker. When the
//! provider keeps failing the breaker opens and calls are deferred (the consumer naks them
//! with a delay) until a batch of half-open probes shows the provider answering again.

use std::collections::HashMap;
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

impl BreakerState {
    /// The value of `checkout_payment_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

struct Breaker {
    state: BreakerState,
    /// Bumped on every state change: an outcome that was admitted under an older state
    /// (a slow call that started before the breaker opened) does not decide anything.
    generation: u64,
    window_started: Instant,
    /// Closed: each request's latest outcome in this window (by idempotency key), and how
    /// many are failing. A request retried after failures is one request, not several: a few
    /// cards that fail per request cannot open the breaker, an outage that fails every
    /// request does.
    latest: HashMap<String, bool>,
    failing: u32,
    /// Requests whose last call failed, and when (kept across state changes for one window).
    /// Such a request failing again says nothing new about the provider (a card that fails
    /// per request, retried): it counts neither toward opening nor as a failed probe.
    suspects: HashMap<String, Instant>,
    open_until: Instant,
    /// Half-open: probes admitted and not finished, and the finished probes' outcomes.
    probes_out: u32,
    probe_successes: u32,
    probe_failures: u32,
}

impl Breaker {
    fn enter(&mut self, state: BreakerState, now: Instant) {
        self.state = state;
        self.generation += 1;
        self.window_started = now;
        self.latest.clear();
        self.failing = 0;
        self.probes_out = 0;
        self.probe_successes = 0;
        self.probe_failures = 0;
    }
}

/// A circuit breaker over a window of requests. Closed, it opens when at least `min_calls`
/// requests were made in the window and at least `failure_rate` of them are failing. Half-open,
/// it lets a small batch of probes through and judges their failure rate, so one unlucky
/// request (a card that fails per request, a slow call from before the outage) cannot keep it
/// open.
pub struct CircuitBreaker {
    inner: Mutex<Breaker>,
    window: Duration,
    min_calls: u32,
    failure_rate: f64,
    cooldown: Duration,
    probes: u32,
}

/// Leave to make one call. Record its outcome with [`Permit::record`]; a permit dropped without
/// an outcome (the call was not sent, or its future was dropped) decides nothing and gives a
/// half-open probe slot back.
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    probe: bool,
    recorded: bool,
    key: String,
}

impl Permit<'_> {
    /// Records the call's outcome (`true` when the provider answered).
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        let key = std::mem::take(&mut self.key);
        self.breaker
            .record(self.generation, self.probe, Some(success), key);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            let key = std::mem::take(&mut self.key);
            self.breaker.record(self.generation, self.probe, None, key);
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(
        window: Duration,
        min_calls: u32,
        failure_rate: f64,
        cooldown: Duration,
        probes: u32,
    ) -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Breaker {
                state: BreakerState::Closed,
                generation: 0,
                window_started: now,
                latest: HashMap::new(),
                failing: 0,
                suspects: HashMap::new(),
                open_until: now,
                probes_out: 0,
                probe_successes: 0,
                probe_failures: 0,
            }),
            window,
            min_calls: min_calls.max(1),
            failure_rate: failure_rate.clamp(0.01, 1.0),
            cooldown,
            probes: probes.max(1),
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.inner.lock().map_or(BreakerState::Open, |b| b.state)
    }

    /// Failed probes that reopen a half-open breaker.
    fn failures_to_reopen(&self) -> u32 {
        let needed = (f64::from(self.probes) * self.failure_rate).ceil();
        // Bounded by `probes` (a u32), so the cast cannot truncate.
        (needed as u32).clamp(1, self.probes)
    }

    /// May a call for the request `key` (its idempotency key) go out now? `Err(wait)` when
    /// it must not.
    pub fn admit(&self, key: &str) -> Result<Permit<'_>, Duration> {
        let Ok(mut b) = self.inner.lock() else {
            return Err(self.cooldown);
        };
        let now = Instant::now();
        if b.state == BreakerState::Open {
            if now < b.open_until {
                return Err(b.open_until - now);
            }
            tracing::warn!(
                probes = self.probes,
                "payment provider breaker half-open: probing"
            );
            b.enter(BreakerState::HalfOpen, now);
        }
        let probe = b.state == BreakerState::HalfOpen;
        if probe {
            if b.probes_out + b.probe_successes + b.probe_failures >= self.probes {
                // Every probe slot is taken; the others wait a little and ask again.
                return Err(
                    Duration::from_millis(250).min(self.cooldown.max(Duration::from_millis(10)))
                );
            }
            b.probes_out += 1;
        }
        Ok(Permit {
            breaker: self,
            generation: b.generation,
            probe,
            recorded: false,
            key: key.to_owned(),
        })
    }

    /// Tells the breaker that the request `key` failed before, as the caller's own records
    /// say: a process that restarted has forgotten it, and would count the retries of a
    /// backlog of failing requests as news that the provider is failing.
    pub fn failed_before(&self, key: &str) {
        let Ok(mut b) = self.inner.lock() else { return };
        if b.suspects.len() < MAX_TRACKED && !b.suspects.contains_key(key) {
            b.suspects.insert(key.to_owned(), Instant::now());
        }
    }

    /// A half-open breaker's probe came back: enough failures reopen it, enough successes
    /// close it.
    fn judge_probe(
        &self,
        b: &mut Breaker,
        outcome: Option<bool>,
        repeated_failure: bool,
        now: Instant,
    ) {
        b.probes_out = b.probes_out.saturating_sub(1);
        match outcome {
            // No answer, or a request known to fail failing again: the slot is free for
            // another probe and nothing is decided.
            None => {}
            Some(false) if repeated_failure => {}
            Some(true) => b.probe_successes += 1,
            Some(false) => b.probe_failures += 1,
        }
        let reopen_at = self.failures_to_reopen();
        if b.probe_failures >= reopen_at {
            tracing::warn!(
                failed = b.probe_failures,
                succeeded = b.probe_successes,
                cooldown = ?self.cooldown,
                "payment provider breaker reopened"
            );
            b.enter(BreakerState::Open, now);
            b.open_until = now + self.cooldown;
        } else if b.probe_successes > self.probes - reopen_at {
            tracing::warn!(
                failed = b.probe_failures,
                succeeded = b.probe_successes,
                "payment provider breaker closed"
            );
            b.enter(BreakerState::Closed, now);
        }
    }

    fn record(&self, generation: u64, probe: bool, outcome: Option<bool>, key: String) {
        let Ok(mut b) = self.inner.lock() else { return };
        let now = Instant::now();
        let repeated_failure = outcome == Some(false)
            && b.suspects
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < self.window);
        match outcome {
            Some(true) => {
                b.suspects.remove(&key);
            }
            Some(false) => {
                if b.suspects.len() >= MAX_TRACKED {
                    let window = self.window;
                    b.suspects.retain(|_, t| now.duration_since(*t) < window);
                }
                if b.suspects.len() < MAX_TRACKED {
                    b.suspects.insert(key.clone(), now);
                }
            }
            None => {}
        }
        if b.generation != generation {
            return;
        }
        if probe {
            self.judge_probe(&mut b, outcome, repeated_failure, now);
            return;
        }
        let Some(success) = outcome else { return };
        if repeated_failure {
            return;
        }
        if now.duration_since(b.window_started) > self.window {
            b.window_started = now;
            b.latest.clear();
            b.failing = 0;
        }
        if b.latest.len() >= MAX_TRACKED && !b.latest.contains_key(&key) {
            return;
        }
        match b.latest.insert(key, success) {
            None | Some(true) if !success => b.failing += 1,
            Some(false) if success => b.failing = b.failing.saturating_sub(1),
            _ => {}
        }
        let requests = u32::try_from(b.latest.len()).unwrap_or(u32::MAX);
        let rate = f64::from(b.failing) / f64::from(requests.max(1));
        if requests >= self.min_calls && rate >= self.failure_rate {
            tracing::warn!(
                requests,
                failing = b.failing,
                cooldown = ?self.cooldown,
                "payment provider breaker opened"
            );
            b.enter(BreakerState::Open, now);
            b.open_until = now + self.cooldown;
        }
    }
}

/// Requests tracked per window; past it new requests are not counted (bounded memory).
const MAX_TRACKED: usize = 100_000;

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
                settings.breaker_half_open_probes,
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
        key: &str,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let permit = self.breaker.admit(key).map_err(ProviderError::Deferred)?;
        // Not sent: the permit is dropped unrecorded, which is neither success nor failure.
        self.limiter
            .acquire()
            .await
            .map_err(ProviderError::Deferred)?;
        let result = call.await;
        permit.record(!matches!(result, Err(ProviderError::Unavailable(_))));
        result
    }
}

/// How a failed call is counted: refused by the provider (`declined`), provider trouble
/// (`failed`), or not made at all (deferred: not counted).
fn result_of(e: &ProviderError) -> Option<&'static str> {
    match e {
        ProviderError::Rejected(_) => Some("declined"),
        ProviderError::Unavailable(_) => Some("failed"),
        ProviderError::Deferred(_) => None,
    }
}

fn counted<T>(
    provider: &'static str,
    operation: &'static str,
    result: Result<T, ProviderError>,
) -> Result<T, ProviderError> {
    let outcome = match &result {
        Ok(_) => Some("succeeded"),
        Err(e) => result_of(e),
    };
    if let Some(outcome) = outcome {
        crate::metrics::payment_operation(provider, operation, outcome);
    }
    result
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
        if request.failed_before {
            self.breaker.failed_before(&request.idempotency_key);
        }
        let result = self
            .guarded(&request.idempotency_key, self.inner.authorize(request))
            .await;
        let outcome = match &result {
            Ok(AuthorizeOutcome::Approved { .. }) => Some("succeeded"),
            Ok(AuthorizeOutcome::Declined { .. }) => Some("declined"),
            Ok(AuthorizeOutcome::Pending { .. }) => Some("requires_action"),
            Err(e) => result_of(e),
        };
        if let Some(outcome) = outcome {
            crate::metrics::payment_operation(self.inner.name(), "authorize", outcome);
        }
        result
    }

    async fn void(&self, auth_id: &str, key: &str) -> Result<(), ProviderError> {
        counted(
            self.inner.name(),
            "void",
            self.guarded(key, self.inner.void(auth_id, key)).await,
        )
    }

    async fn capture(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        let result = self
            .guarded(key, self.inner.capture(auth_id, amount, key))
            .await;
        counted(self.inner.name(), "capture", result)
    }

    async fn authorizations_for(
        &self,
        order_id: Uuid,
    ) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        let key = format!("{order_id}:lookup");
        self.guarded(&key, self.inner.authorizations_for(order_id))
            .await
    }

    async fn refund(
        &self,
        auth_id: &str,
        amount: Decimal,
        key: &str,
    ) -> Result<String, ProviderError> {
        let result = self
            .guarded(key, self.inner.refund(auth_id, amount, key))
            .await;
        counted(self.inner.name(), "refund", result)
    }

    async fn report(&self) -> Result<Vec<ProviderAuthorization>, ProviderError> {
        self.inner.report().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(min_calls: u32, cooldown_ms: u64, probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            Duration::from_secs(60),
            min_calls,
            0.5,
            Duration::from_millis(cooldown_ms),
            probes,
        )
    }

    fn fail(b: &CircuitBreaker, n: usize) {
        for i in 0..n {
            b.admit(&format!("k{i}")).expect("admitted").record(false);
        }
    }

    #[test]
    fn opens_on_failures_and_closes_after_good_probes() {
        let b = breaker(4, 0, 3);
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Open);
        // Cooldown of zero: three probes go out at once, a fourth call waits.
        let probes: Vec<_> = (0..3)
            .map(|i| b.admit(&format!("p{i}")).expect("probe"))
            .collect();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit("p").is_err());
        let mut probes = probes.into_iter();
        probes.next().expect("probe").record(true);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probes.next().expect("probe").record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn one_failed_probe_among_good_ones_does_not_reopen() {
        let b = breaker(4, 0, 5);
        fail(&b, 4);
        let probes: Vec<_> = (0..5)
            .map(|i| b.admit(&format!("p{i}")).expect("probe"))
            .collect();
        let mut outcomes = [false, true, false, true, true].into_iter();
        for p in probes {
            p.record(outcomes.next().expect("outcome"));
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failure_rate_among_probes_reopens() {
        let b = breaker(4, 0, 5);
        fail(&b, 4);
        let probes: Vec<_> = (0..5)
            .map(|i| b.admit(&format!("p{i}")).expect("probe"))
            .collect();
        for p in probes.into_iter().take(3) {
            p.record(false);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_dropped_probe_gives_its_slot_back() {
        let b = breaker(1, 0, 1);
        fail(&b, 1);
        let probe = b.admit("p").expect("probe");
        assert!(b.admit("p").is_err(), "one probe at a time");
        drop(probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.admit("p").expect("the slot is free again").record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn outcomes_from_before_a_state_change_decide_nothing() {
        let b = breaker(2, 0, 1);
        // A slow call admitted while closed...
        let slow = b.admit("slow").expect("admitted");
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Open);
        let probe = b.admit("p").expect("probe");
        // ...finishes while half-open: it is not the probe, so it neither closes nor reopens.
        slow.record(true);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.record(false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_few_requests_failing_again_and_again_do_not_open_it() {
        let b = breaker(10, 60_000, 5);
        // 8 healthy requests and 2 that fail on every retry (cards failing per request).
        for i in 0..8 {
            b.admit(&format!("ok{i}")).expect("admitted").record(true);
        }
        for _ in 0..20 {
            for key in ["flaky1", "flaky2"] {
                b.admit(key).expect("admitted").record(false);
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // A request that failed and then went through is no longer failing.
        b.admit("flaky1").expect("admitted").record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        for i in 0..3 {
            b.admit(&format!("new{i}")).expect("admitted").record(false);
        }
        // 13 requests, 4 failing: still closed. An outage fails new requests too.
        assert_eq!(b.state(), BreakerState::Closed);
        for i in 0..10 {
            if let Ok(permit) = b.admit(&format!("down{i}")) {
                permit.record(false);
            }
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn probes_that_are_retries_of_failing_requests_decide_nothing() {
        let b = breaker(4, 0, 3);
        fail(&b, 4);
        assert_eq!(b.state(), BreakerState::Open);
        // The backlog's retries fail again (they fail per request): no verdict, the slots
        // go round.
        for i in 0..4 {
            b.admit(&format!("k{i}")).expect("probe").record(false);
        }
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Fresh requests decide: two good ones close it.
        b.admit("fresh1").expect("probe").record(true);
        b.admit("fresh2").expect("probe").record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        // After it closed, the same retries failing again do not reopen it.
        for _ in 0..3 {
            for i in 0..4 {
                b.admit(&format!("k{i}")).expect("admitted").record(false);
            }
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn requests_known_to_have_failed_before_a_restart_do_not_open_it() {
        // A fresh process (a restart) takes over a backlog of retries: most of them are
        // requests that fail per request, which the database says failed before.
        let b = breaker(10, 60_000, 5);
        for i in 0..12 {
            let key = format!("retry{i}");
            b.failed_before(&key);
            b.admit(&key).expect("admitted").record(false);
        }
        for i in 0..4 {
            b.admit(&format!("new{i}")).expect("admitted").record(true);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // Without that knowledge, ten such calls open it.
        let forgetful = breaker(10, 60_000, 5);
        fail(&forgetful, 10);
        assert_eq!(forgetful.state(), BreakerState::Open);
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
