//! Latency percentiles and throughput of one run.

use std::time::Duration;

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub completed: u64,
    pub confirmed: u64,
    pub failed: u64,
    /// Buyers answered `409 out_of_stock` at the edge (settled, without an order).
    pub refused: u64,
    /// Requests repeated after a 503/429 with `Retry-After` (not errors).
    pub retries: u64,
    pub errors: u64,
    pub elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl RunStats {
    /// Records one settled checkout.
    pub fn record(&mut self, latency: Duration, confirmed: bool) {
        self.completed += 1;
        if confirmed {
            self.confirmed += 1;
        } else {
            self.failed += 1;
        }
        self.latencies_us
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Records a buyer answered `409 out_of_stock` at the edge: settled, no order.
    pub fn refuse(&mut self, latency: Duration) {
        self.completed += 1;
        self.refused += 1;
        self.latencies_us
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Merges another worker's numbers.
    pub fn merge(&mut self, other: RunStats) {
        self.completed += other.completed;
        self.confirmed += other.confirmed;
        self.failed += other.failed;
        self.refused += other.refused;
        self.retries += other.retries;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
    }

    /// Settled checkouts per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.completed as f64 / secs
        } else {
            0.0
        }
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let rank = ((self.latencies_us.len() as f64 - 1.0) * q).round() as usize;
        self.latencies_us[rank.min(self.latencies_us.len() - 1)] as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut s = RunStats::default();
        for ms in 1..=100 {
            s.record(Duration::from_millis(ms), true);
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s.quantile_ms(0.5), 51.0));
        assert!(close(s.quantile_ms(0.99), 99.0));
        assert!(close(s.quantile_ms(1.0), 100.0));
        s.elapsed = Duration::from_secs(10);
        assert!(close(s.per_second(), 10.0));
    }
}
