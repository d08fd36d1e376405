//! PostgreSQL high availability with pg_auto_failover (#31): the primary is SIGKILLed, the
//! synchronous standby takes writes within seconds with every committed row, and the old
//! primary comes back as a standby that refuses writes (and takes the primary back in a
//! planned switchover).

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::helpers::PgCluster;

const ROWS: i64 = 200;

async fn connect(port: u16) -> Result<PgConnection, sqlx::Error> {
    let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/shop");
    tokio::time::timeout(Duration::from_secs(2), PgConnection::connect(&url))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
}

async fn insert(port: u16, id: i64) -> Result<(), sqlx::Error> {
    let mut conn = connect(port).await?;
    sqlx::query("INSERT INTO rows (id) VALUES ($1)")
        .bind(id)
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Writes through the multi-host URL with psql (libpq picks the read-write node).
fn psql(url: &str, sql: &str) {
    let ok = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .status()
        .expect("psql runs")
        .success();
    assert!(ok, "psql {sql:?} through {url}");
}

#[tokio::test]
async fn pg_cluster_fails_over_to_the_synchronous_standby() {
    let mut cluster = PgCluster::start().await;
    cluster.create_database("shop").await;
    let url = cluster.url("shop");
    psql(&url, "CREATE TABLE rows (id bigint PRIMARY KEY)");
    psql(&url, "INSERT INTO rows (id) VALUES (0)");

    // Every row committed on the primary (synchronous commit: the standby has it too).
    let primary = cluster.primary().await.expect("a primary");
    let standby = 1 - primary;
    let mut conn = connect(cluster.port(primary)).await.expect("the primary");
    for id in 1..ROWS {
        sqlx::query("INSERT INTO rows (id) VALUES ($1)")
            .bind(id)
            .execute(&mut conn)
            .await
            .expect("committed on the primary");
    }
    drop(conn);

    let killed = Instant::now();
    cluster.kill(primary);
    let mut next = ROWS;
    while insert(cluster.port(standby), next).await.is_err() {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the standby took no write in 30 s; monitor says {:?}",
            cluster.states().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover = killed.elapsed();
    println!("failover: the standby took writes {failover:.1?} after the primary was SIGKILLed");
    assert!(
        failover < Duration::from_secs(15),
        "failover took {failover:?}"
    );
    // The monitor hears of the promotion at the node's next report (about a second), after
    // the node already takes writes.
    let reported = Instant::now();
    while cluster.primary().await != Some(standby) {
        assert!(
            reported.elapsed() < Duration::from_secs(10),
            "the monitor does not report node {standby} as primary: {:?}",
            cluster.states().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // RPO 0: every row committed before the kill is on the new primary.
    let mut conn = connect(cluster.port(standby))
        .await
        .expect("the new primary");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM rows WHERE id < $1")
        .bind(ROWS)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, ROWS, "committed rows lost in the failover");
    next += 1;

    // The old primary comes back demoted (rewound) as the synchronous standby: fenced.
    let restarted = Instant::now();
    cluster.restart(primary);
    cluster
        .wait_secondary(primary, Duration::from_secs(60))
        .await;
    println!(
        "rejoin: the old primary is the synchronous standby {:.1?} after its restart",
        restarted.elapsed()
    );
    let refused = insert(cluster.port(primary), next)
        .await
        .expect_err("the old primary refuses writes");
    let code = refused
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("25006"), "{refused}");
    psql(&url, &format!("INSERT INTO rows (id) VALUES ({next})"));

    // A planned switchover hands the primary back, the other node its synchronous standby.
    let started = Instant::now();
    cluster.switchover().await;
    println!("switchover: done in {:.1?}", started.elapsed());
    assert_eq!(cluster.primary().await, Some(primary));
    psql(
        &url,
        &format!("INSERT INTO rows (id) VALUES ({})", next + 1),
    );
}
