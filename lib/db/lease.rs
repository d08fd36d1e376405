//! Leases: pool connections for the hot paths that skip the pool's release ping when their
//! work finished cleanly.
//!
//! sqlx tests every connection handed back to its pool with a Sync/ReadyForQuery round trip
//! (a send, a receive, and a wake-up on both sides), whatever the connection just did: on the
//! hot paths, several per checkout that did nothing (docs/benchmarks-history.md has the measurements). A
//! lease whose work ended cleanly (its transaction committed, its statement answered) is
//! [`Lease::park`]ed instead and goes to the next lease as it is. A lease dropped any other way
//! (an error, a cancelled future) goes back the pool's way, ping included: that ping is what
//! sends the ROLLBACK a dropped transaction queued, so such a connection never carries its locks
//! to the next caller.
//!
//! Leases queue on their own semaphore, with fewer permits than the pool has connections: a
//! waiter then always sees a parked connection (a task waiting inside the pool's own queue would
//! not), and the paths that use the pool directly (sweepers, the watchdog, admin requests)
//! always find connections left. A parked connection idle for [`PARKED_FOR`] goes back to the
//! pool, so an idle process falls back to the pool's own idle handling.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a parked connection waits for its next lease before it goes back to the pool.
const PARKED_FOR: Duration = Duration::from_secs(1);

/// How long a lease waits for a permit, as the pool waits for a connection (`db::connect`).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections of one pool for the hot paths (see the module's documentation).
#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    permits: Arc<Semaphore>,
    /// How many leases there can be at once.
    size: usize,
    /// Newest last.
    parked: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
}

/// A connection on lease: use it as a `PgConnection`, then [`Lease::park`] it if its work
/// finished cleanly, or drop it.
pub struct Lease {
    conn: PoolConnection<Postgres>,
    permit: OwnedSemaphorePermit,
    inner: Arc<Inner>,
}

impl Leases {
    /// Leases over `pool`: as many at once as the pool has connections, less the two kept for
    /// the paths that use the pool directly (at least one lease; with a pool of one, those
    /// paths wait for the parked connection to go stale, at most [`PARKED_FOR`]).
    pub fn new(pool: PgPool) -> Self {
        let connections = pool.options().get_max_connections() as usize;
        let permits = connections.saturating_sub(2).max(1);
        let inner = Arc::new(Inner {
            pool,
            permits: Arc::new(Semaphore::new(permits)),
            size: permits,
            parked: Mutex::new(Vec::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// How many leases there can be at once.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// The pool the leases come from.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// A connection: the newest parked one, or one from the pool.
    pub async fn acquire(&self) -> Result<Lease, sqlx::Error> {
        let permit =
            tokio::time::timeout(ACQUIRE_TIMEOUT, self.inner.permits.clone().acquire_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
        let conn = match self.inner.take() {
            Some(conn) => conn,
            None => self.inner.pool.acquire().await?,
        };
        Ok(Lease {
            conn,
            permit,
            inner: self.inner.clone(),
        })
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.inner.lock().len()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // A panic while holding the lock leaves a plain Vec behind, still valid.
        self.parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest parked connection still fresh; stale ones go back to the pool.
    fn take(&self) -> Option<PoolConnection<Postgres>> {
        let (stale, found) = {
            let mut parked = self.lock();
            let stale = drain_stale(&mut parked);
            (stale, parked.pop().map(|(conn, _)| conn))
        };
        // Dropped outside the lock: each spawns the pool's return (and its ping).
        drop(stale);
        found
    }

    /// Hands back the connections parked for longer than [`PARKED_FOR`].
    fn reap(&self) {
        let stale = drain_stale(&mut self.lock());
        drop(stale);
    }
}

/// Takes out the connections parked for longer than [`PARKED_FOR`]: the oldest ones, as
/// connections are parked in time order.
fn drain_stale(
    parked: &mut Vec<(PoolConnection<Postgres>, Instant)>,
) -> Vec<(PoolConnection<Postgres>, Instant)> {
    let fresh = parked
        .iter()
        .position(|(_, since)| since.elapsed() < PARKED_FOR)
        .unwrap_or(parked.len());
    parked.drain(..fresh).collect()
}

/// Reaps stale parked connections until the leases are gone.
async fn reap(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(PARKED_FOR).await;
        match inner.upgrade() {
            Some(inner) => inner.reap(),
            None => return,
        }
    }
}

impl Lease {
    /// Hands the connection to the next lease without the pool's ping. Only for a connection
    /// whose work finished cleanly: its transaction committed or rolled back, or its last
    /// statement answered. Anything else: drop the lease.
    pub fn park(self) {
        let Lease {
            conn,
            permit,
            inner,
        } = self;
        inner.lock().push((conn, Instant::now()));
        // After the push: the waiter this permit wakes finds the connection parked.
        drop(permit);
    }
}

impl Deref for Lease {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
