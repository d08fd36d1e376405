//! Group commit (`db::group`): concurrent callers' rows share statements, every caller gets
//! its own answer, a bad row fails only its own caller, rows with the same key never share a
//! statement, and rows arriving while a statement is in flight wait for it and go together.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checkout::config::{DatabaseSettings, Secret};
use checkout::db::group::{Group, Writes};
use checkout::db::{self, Leases};
use sqlx::PgConnection;

use crate::helpers::{eventually, TestDb};

/// Rows of `scratch`: (key, value); the table refuses negative values.
struct Scratch {
    statements: Arc<AtomicUsize>,
    /// The keys of every statement, to check none carried a key twice.
    seen: Arc<Mutex<Vec<Vec<i32>>>>,
}

impl Writes for Scratch {
    type Row = (i32, i32);
    type Answer = i64;
    type Key = i32;

    fn key(row: &(i32, i32)) -> i32 {
        row.0
    }

    async fn write(
        &self,
        conn: &mut PgConnection,
        rows: &[(i32, i32)],
    ) -> Result<Vec<i64>, sqlx::Error> {
        self.statements.fetch_add(1, Ordering::SeqCst);
        self.seen
            .lock()
            .expect("lock")
            .push(rows.iter().map(|r| r.0).collect());
        let keys: Vec<i32> = rows.iter().map(|r| r.0).collect();
        let values: Vec<i32> = rows.iter().map(|r| r.1).collect();
        // Each row's answer is its row id: the caller must get its own.
        let ids: Vec<(i32, i64)> = sqlx::query_as(
            "INSERT INTO scratch (key, value) SELECT * FROM unnest($1::int[], $2::int[])
             RETURNING key, id",
        )
        .bind(&keys)
        .bind(&values)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                ids.iter()
                    .find(|(k, _)| *k == r.0)
                    .map_or(-1, |(_, id)| *id)
            })
            .collect())
    }
}

async fn group(test_db: &TestDb, linger: Duration) -> (Group<Scratch>, Leases, Scratch) {
    let settings = DatabaseSettings {
        url: Secret::new(test_db.url.clone()),
        max_connections: 6,
        migrate_on_start: false,
        group_linger: Duration::ZERO,
        primary_probe_interval: Duration::from_millis(500),
    };
    db::create_if_missing(&settings).await.expect("database");
    let leases = Leases::new(db::connect(&settings).await.expect("pool"));
    sqlx::query(
        "CREATE TABLE scratch (id bigserial PRIMARY KEY, key int NOT NULL,
                               value int NOT NULL CHECK (value >= 0))",
    )
    .execute(leases.pool())
    .await
    .expect("table");
    let statements = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let writes = Scratch {
        statements: statements.clone(),
        seen: seen.clone(),
    };
    let probe = Scratch { statements, seen };
    (Group::new(writes, leases.clone(), linger), leases, probe)
}

#[tokio::test]
async fn concurrent_rows_share_statements_and_each_caller_gets_its_own_answer() {
    let test_db = TestDb::new();
    let (group, leases, probe) = group(&test_db, Duration::ZERO).await;
    let group = Arc::new(group);
    let callers: Vec<_> = (0..300)
        .map(|n| {
            let group = group.clone();
            // Every tenth key is written twice by two callers.
            let key = if n % 10 == 9 { n - 1 } else { n };
            tokio::spawn(async move { (key, n, group.write((key, n)).await) })
        })
        .collect();
    for caller in callers {
        let (key, value, answer) = caller.await.expect("caller");
        let id = answer.expect("written");
        let (k, v): (i32, i32) = sqlx::query_as("SELECT key, value FROM scratch WHERE id = $1")
            .bind(id)
            .fetch_one(leases.pool())
            .await
            .expect("the caller's row");
        assert_eq!((k, v), (key, value), "the answer is the caller's own row");
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch")
        .fetch_one(leases.pool())
        .await
        .expect("count");
    assert_eq!(rows, 300);
    let statements = probe.statements.load(Ordering::SeqCst);
    assert!(
        statements < 300,
        "300 concurrent rows took {statements} statements"
    );
    for keys in probe.seen.lock().expect("lock").iter() {
        let mut distinct = keys.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "a statement carried a key twice: {keys:?}"
        );
    }
}

#[tokio::test]
async fn a_bad_row_fails_only_its_own_caller() {
    let test_db = TestDb::new();
    let (group, leases, _probe) = group(&test_db, Duration::ZERO).await;
    let group = Arc::new(group);
    let callers: Vec<_> = (0..100)
        .map(|n| {
            let group = group.clone();
            // Row 37 breaks the table's check: wherever it lands, only it may fail.
            let value = if n == 37 { -1 } else { n };
            tokio::spawn(async move { (n, group.write((n, value)).await) })
        })
        .collect();
    for caller in callers {
        let (n, answer) = caller.await.expect("caller");
        if n == 37 {
            let error = answer.expect_err("the bad row is refused");
            let code = error
                .as_database_error()
                .and_then(|e| e.code())
                .unwrap_or_default();
            assert_eq!(code, "23514", "its own error (a check violation): {error}");
        } else {
            answer.expect("a good row is written whatever shared its statement");
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch")
        .fetch_one(leases.pool())
        .await
        .expect("count");
    assert_eq!(rows, 99);
}

#[tokio::test]
async fn rows_arriving_while_a_statement_is_in_flight_wait_for_it_and_share_the_next() {
    let test_db = TestDb::new();
    // A linger longer than the test: only the landing of the statement in flight ends the wait.
    let linger = Duration::from_secs(60);
    let (group, leases, probe) = group(&test_db, linger).await;
    let group = Arc::new(group);
    let started = Instant::now();
    // The table held by another transaction keeps the first statement in flight.
    let mut holder = leases.pool().begin().await.expect("transaction");
    sqlx::query("LOCK TABLE scratch IN SHARE MODE")
        .execute(&mut *holder)
        .await
        .expect("lock");
    let write = |row: (i32, i32)| {
        let group = group.clone();
        tokio::spawn(async move { group.write(row).await })
    };
    let first = write((1, 1));
    let statements = probe.statements.clone();
    eventually(
        "the first statement to be in flight",
        Duration::from_secs(5),
        || {
            let statements = statements.clone();
            async move { statements.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    // Five leases are free, yet a row arriving now does not get a statement of its own: watched
    // for 300 ms (the wait is the point: without the rule it goes within milliseconds).
    let second = write((2, 2));
    let watch_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < watch_until {
        assert_eq!(
            probe.statements.load(Ordering::SeqCst),
            1,
            "a row went alone while a statement was in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let third = write((3, 3));
    holder.commit().await.expect("release the table");
    for caller in [first, second, third] {
        caller.await.expect("caller").expect("written");
    }
    let seen = probe.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "statements: {seen:?}");
    let mut next = seen[1].clone();
    next.sort_unstable();
    assert_eq!(next, vec![2, 3], "the rows that waited went together");
    assert!(
        started.elapsed() < linger,
        "they went when the first statement landed, not when the linger ran out"
    );
}
