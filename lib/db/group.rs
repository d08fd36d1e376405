//! Group commit: concurrent callers' writes of one kind go to PostgreSQL together, as one
//! statement and one commit.
//!
//! A caller hands its row to [`Group::write`] and awaits its own answer. While every lease is
//! busy with a statement, the rows that arrive queue, and the next statement takes them all
//! (up to [`MAX_ROWS`]). While another statement of the group is in flight, the next one also
//! waits for company until that one lands or the linger ends (Nagle's rule, as the saga's
//! steps do: `database.group_linger`). With nothing in flight a row goes at once and alone;
//! under load one round trip and one WAL flush serve many callers, where each caller's own
//! commit made PostgreSQL wake, write and flush once per row.
//!
//! A statement never carries two rows with the same key (a repeat gets a statement of its
//! own after it), so a write can tell its rows apart by key; and it carries its rows in key
//! order, so statements that lock per key lock in one order. If the database refuses a
//! statement of several rows, each of its rows is written again alone: one bad row fails only
//! its own caller, with its own error. If no statement could run (no connection), every row
//! fails at once.
//! A caller that gave up (its future dropped) before its row was taken is not written for.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tracing::{debug, Instrument};

use super::Leases;

/// The most rows one statement carries.
pub const MAX_ROWS: usize = 256;

/// A kind of write that can carry many callers' rows in one statement.
pub trait Writes: Send + Sync + 'static {
    /// One caller's row.
    type Row: Send + Sync + 'static;
    /// What one caller learns of its row.
    type Answer: Send + 'static;
    /// Rows with the same key never share a statement, and a statement's rows come in key
    /// order: two statements that lock what their rows' keys name lock it in the same order,
    /// so they cannot deadlock each other.
    type Key: Ord + Hash + Send;

    /// The row's key.
    fn key(row: &Self::Row) -> Self::Key;

    /// Writes `rows` (distinct keys) durably, and answers each, in order.
    fn write<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        rows: &'a [Self::Row],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, sqlx::Error>> + Send + 'a;
}

/// A queue of rows of one kind and the task that writes them (see the module's documentation).
pub struct Group<W: Writes> {
    queue: mpsc::UnboundedSender<Pending<W>>,
}

impl<W: Writes> Clone for Group<W> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

struct Pending<W: Writes> {
    row: W::Row,
    reply: oneshot::Sender<Result<W::Answer, sqlx::Error>>,
}

impl<W: Writes> Group<W> {
    /// Starts the writing task (it ends when the group is dropped); a statement waits up to
    /// `linger` for company while another of the group's is in flight (zero: never).
    pub fn new(writes: W, leases: Leases, linger: Duration) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(run(Arc::new(writes), leases, linger, pending));
        Self { queue }
    }

    /// Writes `row`, together with whatever other rows are waiting, and returns its answer.
    pub async fn write(&self, row: W::Row) -> Result<W::Answer, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { row, reply })
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn run<W: Writes>(
    writes: Arc<W>,
    leases: Leases,
    linger: Duration,
    mut queue: mpsc::UnboundedReceiver<Pending<W>>,
) {
    // At most as many statements in flight as there are leases: rows also gather behind
    // statements that hold every lease.
    let slots = leases.size();
    let in_flight = Arc::new(Semaphore::new(slots));
    // Told whenever a statement of this group lands.
    let landed = Arc::new(Notify::new());
    while let Some(first) = queue.recv().await {
        // Waiting for a free slot is what lets rows gather behind a statement in flight.
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut taken = vec![first];
        while taken.len() < MAX_ROWS {
            match queue.try_recv() {
                Ok(pending) => taken.push(pending),
                Err(_) => break,
            }
        }
        // Nagle's rule: with another statement in flight the database is busy with this
        // group anyway, so rows arriving meanwhile share this statement and its commit
        // (without it, statements at 500 checkouts/s carried 1.1 rows: docs/benchmarks-history.md).
        let until = tokio::time::Instant::now() + linger;
        while !linger.is_zero() && taken.len() < MAX_ROWS {
            let one_landed = landed.notified();
            tokio::pin!(one_landed);
            one_landed.as_mut().enable();
            // This statement holds one slot; any other taken slot is a statement in flight.
            if in_flight.available_permits() + 1 >= slots {
                break;
            }
            tokio::select! {
                biased;
                next = queue.recv() => match next {
                    Some(pending) => taken.push(pending),
                    None => break,
                },
                () = &mut one_landed => {}
                () = tokio::time::sleep_until(until) => break,
            }
        }
        let writes = writes.clone();
        let leases = leases.clone();
        let landed = landed.clone();
        let span = tracing::debug_span!("group_commit", rows = taken.len());
        tokio::spawn(
            async move {
                write_all(&*writes, &leases, taken).await;
                drop(slot);
                landed.notify_waiters();
            }
            .instrument(span),
        );
    }
}

/// Writes the rows whose callers still wait: those with distinct keys in one statement, the
/// repeats after it, alone.
async fn write_all<W: Writes>(writes: &W, leases: &Leases, taken: Vec<Pending<W>>) {
    let (mut first, repeats): (Vec<_>, Vec<_>) = {
        let mut keys = HashSet::new();
        taken
            .into_iter()
            .filter(|p| !p.reply.is_closed())
            .partition(|p| keys.insert(W::key(&p.row)))
    };
    first.sort_by_key(|p| W::key(&p.row));
    if !first.is_empty() {
        write_together(writes, leases, first).await;
    }
    for pending in repeats {
        write_together(writes, leases, vec![pending]).await;
    }
}

/// One statement for `pending`; if it fails and carried several rows, each again alone.
async fn write_together<W: Writes>(writes: &W, leases: &Leases, pending: Vec<Pending<W>>) {
    let (rows, replies): (Vec<W::Row>, Vec<_>) =
        pending.into_iter().map(|p| (p.row, p.reply)).unzip();
    match write_once(writes, leases, &rows).await {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) if rows.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        // The statement itself was refused: one of its rows may be the cause, so each row
        // again alone (at once, each on its own lease), and each caller gets its own answer.
        Err(e @ sqlx::Error::Database(_)) => {
            debug!(error = %e, rows = rows.len(), "group write failed; each row again alone");
            let alone = rows.iter().map(|row| async move {
                write_once(writes, leases, std::slice::from_ref(row))
                    .await
                    .and_then(|mut answers| answers.pop().ok_or_else(|| unanswered(0, 1)))
            });
            for (answer, reply) in futures::future::join_all(alone)
                .await
                .into_iter()
                .zip(replies)
            {
                let _ = reply.send(answer);
            }
        }
        // No statement ran (no connection, a lost connection): every row failed for the
        // same reason, and trying them one by one would only make each wait again.
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(same_failure(&e)));
            }
        }
    }
}

/// The same failure for another caller (`sqlx::Error` is not `Clone`).
fn same_failure(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// One statement on a lease, answering every row.
async fn write_once<W: Writes>(
    writes: &W,
    leases: &Leases,
    rows: &[W::Row],
) -> Result<Vec<W::Answer>, sqlx::Error> {
    let mut lease = leases.acquire().await?;
    let answers = writes.write(&mut lease, rows).await?;
    lease.park();
    if answers.len() != rows.len() {
        return Err(unanswered(answers.len(), rows.len()));
    }
    Ok(answers)
}

fn unanswered(answered: usize, rows: usize) -> sqlx::Error {
    sqlx::Error::Protocol(format!("a group write answered {answered} of {rows} rows"))
}
