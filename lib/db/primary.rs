//! Keeping a pool on the primary when `database.url` names several servers (a primary and its
//! standbys under a failover manager). A watcher asks every server over its own connection
//! whether it is a primary and on which timeline; when the primary moves, the pool's options move with it and every
//! connection opened before the move is closed when next taken from the pool. A connection
//! that lands on a standby anyway is refused in `after_connect`, and the pool retries it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};

use super::hosts::Targets;

/// How long one probe (connect, then one query) may take before the server counts as away.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The pool's current target and when it last moved.
pub struct Primary {
    targets: Targets,
    born: Instant,
    /// Milliseconds after `born` of the last move (0: never moved).
    moved_ms: AtomicU64,
    current: AtomicU64,
}

impl Primary {
    /// Finds the primary among `targets` (the first that answers as one; the first target if
    /// none does yet, and the watcher keeps looking).
    pub async fn find(targets: Targets) -> (Arc<Self>, Probes) {
        let mut probes = Probes::new(targets.hosts.len());
        let found = probes.primary(&targets, None).await;
        let primary = Arc::new(Self {
            targets,
            born: Instant::now(),
            moved_ms: AtomicU64::new(0),
            current: AtomicU64::new(found.unwrap_or(0) as u64),
        });
        if let Some(i) = found {
            tracing::info!(primary = %primary.targets.name(i), "PostgreSQL primary found");
        } else {
            tracing::warn!(
                trying = %primary.targets.name(0),
                "no PostgreSQL server answers as primary yet; following the first"
            );
        }
        (primary, probes)
    }

    /// The options of the server the pool should connect to now.
    pub fn options(&self) -> PgConnectOptions {
        self.targets.hosts[self.current()].clone()
    }

    fn current(&self) -> usize {
        usize::try_from(self.current.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Adds the hooks that keep connections on the primary to a pool's options.
    pub fn hooks(self: &Arc<Self>, options: PgPoolOptions) -> PgPoolOptions {
        let fresh = Arc::clone(self);
        options
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    if in_recovery(conn).await? {
                        // Refused here, the pool backs off and connects again, by then to the
                        // options the watcher set.
                        return Err(sqlx::Error::Protocol(
                            "connected to a standby; waiting for the primary".into(),
                        ));
                    }
                    Ok(())
                })
            })
            .before_acquire(move |_conn, meta| {
                let keep = fresh.opened_since_move(meta.age);
                Box::pin(async move { Ok(keep) })
            })
    }

    /// Whether a connection `age` old was opened after the primary last moved.
    fn opened_since_move(&self, age: Duration) -> bool {
        let moved = self.moved_ms.load(Ordering::Relaxed);
        moved == 0 || self.born.elapsed().saturating_sub(age) >= Duration::from_millis(moved)
    }

    /// Asks every server who is primary every `every` and moves the pool when it changed;
    /// ends when the pool is closed.
    pub async fn watch(self: Arc<Self>, pool: PgPool, mut probes: Probes, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pool.is_closed() {
            tick.tick().await;
            let current = self.current();
            let Some(found) = probes.primary(&self.targets, Some(current)).await else {
                continue;
            };
            if found == current {
                continue;
            }
            self.current.store(found as u64, Ordering::Relaxed);
            let since = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.moved_ms.store(since.max(1), Ordering::Relaxed);
            pool.set_connect_options(self.options());
            tracing::warn!(
                from = %self.targets.name(current),
                to = %self.targets.name(found),
                "PostgreSQL primary moved; the pool follows"
            );
            crate::metrics::record_primary_move();
        }
    }
}

/// One kept connection per server, for asking it whether it is the primary, and the newest
/// timeline any primary was seen on.
pub struct Probes {
    conns: Vec<Option<PgConnection>>,
    newest: i64,
}

impl Probes {
    fn new(n: usize) -> Self {
        Self {
            conns: (0..n).map(|_| None).collect(),
            newest: 0,
        }
    }

    /// The primary on the newest timeline: `current` if it still is that, else the first.
    /// A promotion starts a new timeline, so an old primary that comes back still believing it
    /// is one (before its failover manager demotes it) is on an older timeline than the one
    /// that replaced it, and the pool never moves back to its stale data, even when the real
    /// primary misses a probe.
    async fn primary(&mut self, targets: &Targets, current: Option<usize>) -> Option<usize> {
        let mut timelines = Vec::with_capacity(targets.hosts.len());
        for (i, options) in targets.hosts.iter().enumerate() {
            timelines.push(self.timeline(i, options).await);
        }
        if let Some(newest) = timelines.iter().flatten().max() {
            self.newest = self.newest.max(*newest);
        }
        let on_newest = |i: &usize| timelines.get(*i) == Some(&Some(self.newest));
        match current {
            Some(c) if on_newest(&c) => Some(c),
            _ => (0..timelines.len()).find(on_newest),
        }
    }

    /// Server `i`'s timeline if it is a primary; None if it is a standby or does not answer.
    async fn timeline(&mut self, i: usize, options: &PgConnectOptions) -> Option<i64> {
        let slot = &mut self.conns[i];
        if slot.is_none() {
            let options = options
                .clone()
                .application_name("checkout-primary-probe")
                .log_statements(tracing::log::LevelFilter::Off);
            *slot = tokio::time::timeout(PROBE_TIMEOUT, options.connect())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let conn = slot.as_mut()?;
        if let Ok(Ok(timeline)) = tokio::time::timeout(PROBE_TIMEOUT, primary_timeline(conn)).await
        {
            return timeline;
        }
        // Dropped, not closed: closing politely waits on a server that may be gone.
        *slot = None;
        None
    }
}

/// The timeline a primary writes on (the first 8 hex digits of its current WAL file's name),
/// or None on a standby.
async fn primary_timeline(conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    if in_recovery(conn).await? {
        return Ok(None);
    }
    let timeline: i64 = sqlx::query_scalar(
        "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint",
    )
    .fetch_one(conn)
    .await?;
    Ok(Some(timeline))
}

async fn in_recovery(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(conn)
        .await
}
