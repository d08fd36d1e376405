//! Per-user rate limits at the edge: a token bucket per bearer-token subject for every API
//! request, and a stricter one for `POST /api/checkout`. Over the limit is `429` with
//! `Retry-After`, before any database work.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use crate::config::EdgeSettings;

/// The edge's buckets, keyed by user.
#[derive(Clone)]
pub struct UserLimits {
    requests: Arc<DefaultKeyedRateLimiter<String>>,
    checkouts: Arc<DefaultKeyedRateLimiter<String>>,
}

fn quota(per: Duration, count: u32, burst: u32) -> Quota {
    let count = NonZeroU32::new(count.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(per / count.get())
        .unwrap_or_else(|| Quota::per_second(count))
        .allow_burst(burst)
}

impl UserLimits {
    /// Buckets as configured (`edge.requests_per_user_per_s`, `edge.checkouts_per_user_per_min`).
    pub fn new(settings: &EdgeSettings) -> Self {
        Self {
            requests: Arc::new(RateLimiter::keyed(quota(
                Duration::from_secs(1),
                settings.requests_per_user_per_s,
                settings.requests_per_user_burst,
            ))),
            checkouts: Arc::new(RateLimiter::keyed(quota(
                Duration::from_secs(60),
                settings.checkouts_per_user_per_min,
                settings.checkouts_per_user_burst,
            ))),
        }
    }

    /// One API request of `user`.
    pub fn request(&self, user: &str) -> Result<(), ApiError> {
        check(&self.requests, user)
    }

    /// One checkout of `user`.
    pub fn checkout(&self, user: &str) -> Result<(), ApiError> {
        check(&self.checkouts, user)
    }

    /// Forgets users whose buckets are full again (bounded memory).
    pub fn forget_idle(&self) {
        self.requests.retain_recent();
        self.checkouts.retain_recent();
    }
}

fn check(limiter: &DefaultKeyedRateLimiter<String>, user: &str) -> Result<(), ApiError> {
    limiter.check_key(&user.to_owned()).map_err(|not_until| {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        ApiError::TooManyRequests(wait.as_secs().max(1))
    })
}
