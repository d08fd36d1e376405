//! The machine's own ceiling, measured in the same run: raw JetStream publishes with awaited
//! PublishAcks (same payload size, same stream settings, same number in flight) and raw
//! PostgreSQL commits of a small transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use sqlx::PgPool;

use crate::bench::BenchError;
use checkout::config::NatsSettings;

/// Publishes per second with `in_flight` publishers each awaiting its ack.
pub async fn jetstream_publish_rate(
    url: &str,
    nats: &NatsSettings,
    payload_size: usize,
    in_flight: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| BenchError::Setup(format!("nats: {e}")))?;
    let js = jetstream::new(client);
    let name = "BENCH_RAW";
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec!["benchraw.>".into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: nats.stream_max_age,
        duplicate_window: nats.duplicate_window,
        num_replicas: nats.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| BenchError::Setup(format!("raw stream: {e}")))?;
    let count = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![b'x'; payload_size]);
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..in_flight.max(1) {
        let (js, count, payload) = (js.clone(), count.clone(), payload.clone());
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let message = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("{worker}.{i}"));
                if let Ok(ack) = js.send_publish(format!("benchraw.{worker}"), message).await {
                    if ack.await.is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_stream(name).await;
    Ok(rate)
}

/// Commits per second of `BEGIN; INSERT one small row; COMMIT` from `connections` clients.
pub async fn postgres_commit_rate(
    pool: &PgPool,
    connections: usize,
    duration: Duration,
) -> Result<f64, BenchError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, body bytea NOT NULL)",
    )
    .execute(pool)
    .await?;
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let (pool, count) = (pool.clone(), count.clone());
        tasks.spawn(async move {
            let body = vec![7u8; 200];
            while Instant::now() < deadline {
                let Ok(mut tx) = pool.begin().await else {
                    continue;
                };
                let inserted = sqlx::query("INSERT INTO bench_commit (body) VALUES ($1)")
                    .bind(&body)
                    .execute(&mut *tx)
                    .await;
                if inserted.is_ok() && tx.commit().await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE IF EXISTS bench_commit")
        .execute(pool)
        .await?;
    Ok(rate)
}
