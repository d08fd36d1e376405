//! The hot paths' connection leases (`db::lease`): a connection handed back clean goes to the
//! next lease as it is, one dropped mid-transaction leaves nothing behind, and a waiter gets a
//! parked connection at once.

use std::time::{Duration, Instant};

use checkout::config::{DatabaseSettings, Secret};
use checkout::db::{self, Leases};
use sqlx::Connection;

use crate::helpers::{eventually, TestDb};

/// Leases over a fresh database's pool of `connections`.
async fn leases(test_db: &TestDb, connections: u32) -> Leases {
    let settings = DatabaseSettings {
        url: Secret::new(test_db.url.clone()),
        max_connections: connections,
        migrate_on_start: false,
        group_linger: Duration::ZERO,
        primary_probe_interval: Duration::from_millis(500),
    };
    db::create_if_missing(&settings).await.expect("database");
    Leases::new(db::connect(&settings).await.expect("pool"))
}

async fn backend(conn: &mut sqlx::PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .expect("pid")
}

#[tokio::test]
async fn a_clean_lease_is_reused_and_a_dropped_one_leaves_no_row_and_no_lock() {
    let test_db = TestDb::new();
    let leases = leases(&test_db, 4).await;
    sqlx::query("CREATE TABLE scratch (id int PRIMARY KEY)")
        .execute(leases.pool())
        .await
        .expect("table");

    let mut first = leases.acquire().await.expect("lease");
    let pid = backend(&mut first).await;
    first.park();
    assert_eq!(leases.parked(), 1);
    let mut again = leases.acquire().await.expect("lease");
    assert_eq!(
        backend(&mut again).await,
        pid,
        "the parked connection, as it is"
    );
    assert_eq!(leases.parked(), 0);

    // Work that stops half-way: a row written and locked in a transaction never committed.
    let mut tx = again.begin().await.expect("begin");
    sqlx::query("INSERT INTO scratch VALUES (1)")
        .execute(&mut *tx)
        .await
        .expect("insert");
    drop(tx);
    drop(again);
    assert_eq!(leases.parked(), 0, "a dropped lease is not parked");
    eventually("the dropped transaction's locks to go", Duration::from_secs(10), || async {
        let locks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE relation = 'scratch'::regclass AND pid <> pg_backend_pid()",
        )
        .fetch_one(leases.pool())
        .await
        .expect("locks");
        locks == 0
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch")
        .fetch_one(leases.pool())
        .await
        .expect("rows");
    assert_eq!(rows, 0, "the half-done work was rolled back");
    // And the next lease can take the same row: nothing holds it.
    let mut next = leases.acquire().await.expect("lease");
    sqlx::query("SET lock_timeout = '2s'")
        .execute(&mut *next)
        .await
        .expect("timeout");
    sqlx::query("INSERT INTO scratch VALUES (1)")
        .execute(&mut *next)
        .await
        .expect("the row is free");
}

#[tokio::test]
async fn a_waiting_lease_gets_a_parked_connection_at_once() {
    let test_db = TestDb::new();
    // Three connections: one lease at a time, two left for the pool's own users.
    let leases = leases(&test_db, 3).await;
    let mut held = leases.acquire().await.expect("lease");
    let pid = backend(&mut held).await;
    let waiter = tokio::spawn({
        let leases = leases.clone();
        async move {
            let started = Instant::now();
            let mut lease = leases.acquire().await.expect("lease");
            (started.elapsed(), backend(&mut lease).await)
        }
    });
    // The pool's other connections stay available while the lease is taken.
    let mut direct = leases.pool().acquire().await.expect("a pool connection");
    assert_ne!(backend(&mut direct).await, pid);
    drop(direct);
    assert!(!waiter.is_finished(), "only one lease at a time");
    held.park();
    let (waited, got) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter got a connection")
        .expect("task");
    assert_eq!(got, pid, "the parked connection");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[tokio::test]
async fn a_parked_connection_left_idle_goes_back_to_the_pool() {
    let test_db = TestDb::new();
    let leases = leases(&test_db, 4).await;
    let lease = leases.acquire().await.expect("lease");
    lease.park();
    assert_eq!(leases.parked(), 1);
    eventually(
        "the idle parked connection to go back",
        Duration::from_secs(10),
        || async { leases.parked() == 0 && leases.pool().num_idle() == 1 },
    )
    .await;
}
