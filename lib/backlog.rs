//! The JetStream gauges: each durable's backlog and the dead letters, read from the servers
//! every `metrics.jetstream_interval`, with how old the readings are.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::metrics;
use crate::saga::subjects::DEADLETTER_STREAM;

/// Reads backlogs of `durables` and the dead-letter count from JetStream every `every`.
///
/// A backlog is the sum over every partition this process consumes, each at its last reading:
/// a partition that cannot be read (no leader during an election, NATS away) keeps its last
/// value rather than dropping out of the sum, and `checkout_jetstream_read_age_seconds` says
/// how old the readings are, so an alert can tell "no backlog" from "no idea".
pub async fn report(
    bus: Bus,
    durables: Vec<&'static str>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut last: HashMap<(String, &'static str), u64> = HashMap::new();
    let mut read_at = tokio::time::Instant::now();
    // One round is bounded: a server that does not answer must not stop the age from growing.
    let within = every.max(Duration::from_secs(2));
    loop {
        let round = tokio::time::timeout(within, read_jetstream(&bus, &durables, &mut last)).await;
        if matches!(round, Ok(true)) {
            read_at = tokio::time::Instant::now();
        }
        let mut backlog: HashMap<&str, u64> = durables.iter().map(|d| (*d, 0)).collect();
        for ((_, durable), pending) in &last {
            *backlog.entry(durable).or_default() += pending;
        }
        for (durable, pending) in backlog {
            metrics::consumer_pending(durable, pending);
        }
        metrics::jetstream_read_age(read_at.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Reads every backlog into `last` (per partition and durable) and the dead-letter gauge;
/// whether every read succeeded.
async fn read_jetstream(
    bus: &Bus,
    durables: &[&'static str],
    last: &mut HashMap<(String, &'static str), u64>,
) -> bool {
    let js = bus.jetstream();
    let mut complete = true;
    for name in bus.owned_streams() {
        let Ok(stream) = js.get_stream(&name).await else {
            complete = false;
            continue;
        };
        for durable in durables {
            let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                stream.get_consumer(durable).await;
            match consumer {
                Ok(mut c) => match c.info().await {
                    Ok(info) => {
                        let pending = info.num_pending + info.num_ack_pending as u64;
                        last.insert((name.clone(), *durable), pending);
                    }
                    Err(_) => complete = false,
                },
                Err(_) => complete = false,
            }
        }
    }
    match js.get_stream(DEADLETTER_STREAM).await {
        Ok(mut dead) => match dead.info().await {
            Ok(info) => metrics::deadletters(info.state.messages),
            Err(_) => complete = false,
        },
        Err(_) => complete = false,
    }
    complete
}
