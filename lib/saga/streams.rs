//! The saga's streams on the bus: one per partition (`CHECKOUT` or `CHECKOUT-<p>`) and the
//! dead letters, declared by every process at start-up; the check that the servers' subject
//! mapping agrees with `nats.partitions`; and which node leads each partition.

use std::time::Duration;

use futures::StreamExt;

use super::subjects::{
    checkout_stream, checkout_stream_subjects, checkout_streams, partition_of, DEADLETTER_STREAM,
    DEADLETTER_SUBJECTS, PROBE_PREFIX,
};
use crate::bus::{Bus, BusError};

/// Probes per check: a mapping with another K sends at least one of them elsewhere, except
/// with a chance of about 2^-16 (K and 2K agree on half of all ids).
const PROBES: usize = 16;

/// How one round of partition probes went.
enum Probed {
    Agreed,
    /// A probe never came back (a cluster still forming, or a user denied the subject).
    Lost(String),
}

impl Bus {
    /// Every saga stream (one per partition).
    pub fn saga_streams(&self) -> Vec<String> {
        checkout_streams(self.settings().partitions)
    }

    /// The saga streams this process consumes (`nats.own_partitions`, or all).
    pub fn owned_streams(&self) -> Vec<String> {
        let k = self.settings().partitions;
        self.settings()
            .owned_partitions()
            .into_iter()
            .map(|p| checkout_stream(p, k))
            .collect()
    }

    /// Creates or updates the saga and dead-letter streams. Safe to run from every process.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let k = self.settings().partitions;
        // The ceiling is for the saga as a whole: each partition gets its share.
        let per_partition = match self.settings().stream_max_bytes {
            n if n > 0 => (n / i64::from(k.max(1))).max(1),
            n => n,
        };
        for p in 0..k.max(1) {
            let name = checkout_stream(p, k);
            self.ensure_stream(
                &name,
                &checkout_stream_subjects(p, k),
                self.settings().stream_max_age,
                per_partition,
            )
            .await
            .map_err(|e| {
                if !e.is_subject_overlap() {
                    return e;
                }
                // The saga's streams of another partition count (CHECKOUT vs CHECKOUT-<p>).
                BusError::Partitions(format!(
                    "stream {name} overlaps with saga streams made for another \
                     nats.partitions ({k}): {e}. Set CHECKOUT__NATS__PARTITIONS to what the \
                     servers were set up for (subjects.md, \"Partitions\")"
                ))
            })?;
        }
        // Dead letters are kept longer: a human must look at each.
        self.ensure_stream(
            DEADLETTER_STREAM,
            DEADLETTER_SUBJECTS,
            self.settings().stream_max_age * 4,
            self.settings().deadletter_max_bytes,
        )
        .await
    }

    /// Checks that the servers' subject mapping agrees with `nats.partitions`: every order's
    /// events must land in the stream `partition_of` names, or publishes go to streams that do
    /// not exist and the outbox (and the watchdog) retry them forever.
    ///
    /// A few probes on `checkout.probe.<random id>`, published with `Nats-Expected-Stream`
    /// and an impossible `Nats-Expected-Last-Sequence`, so no stream ever stores one; a plain
    /// subscription sees the subject each probe was delivered on after the servers' mapping.
    pub async fn check_partitions(&self) -> Result<(), BusError> {
        // A probe lost once (seen on a cluster still forming while every process starts) is
        // tried again; a user denied the probes' subject fails every round.
        let mut rounds = 3;
        loop {
            rounds -= 1;
            match self.probe_partitions().await? {
                Probed::Agreed => return Ok(()),
                Probed::Lost(why) if rounds > 0 => {
                    tracing::warn!(%why, "partition probe lost; probing again");
                }
                Probed::Lost(why) => return Err(BusError::Partitions(why)),
            }
        }
    }

    /// One round of probes: each landed where this process expects, or one was lost.
    async fn probe_partitions(&self) -> Result<Probed, BusError> {
        let k = self.settings().partitions;
        let mut seen = self
            .client()
            .subscribe(format!("{PROBE_PREFIX}.>"))
            .await
            .map_err(|e| BusError::Partitions(format!("cannot watch the probes: {e}")))?;
        let probes: Vec<uuid::Uuid> = (0..PROBES).map(|_| uuid::Uuid::new_v4()).collect();
        let mut acks = Vec::with_capacity(probes.len());
        for id in &probes {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(bytes::Bytes::new())
                .expected_stream(checkout_stream(partition_of(*id, k), k))
                .expected_last_sequence(u64::MAX);
            if let Ok(ack) = self
                .jetstream()
                .send_publish(format!("{PROBE_PREFIX}.{id}"), message)
                .await
            {
                acks.push(std::future::IntoFuture::into_future(ack));
            }
        }
        // Refused by design (a wrong sequence, another stream), or unanswered where no stream
        // takes the subject: only where each probe was delivered matters, so a short wait.
        let _ = tokio::time::timeout(Duration::from_secs(1), futures::future::join_all(acks)).await;
        let mut landed: std::collections::HashMap<String, String> =
            std::collections::HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while landed.len() < probes.len() {
            let Ok(Some(message)) = tokio::time::timeout_at(deadline, seen.next()).await else {
                break;
            };
            let mut tokens = message.subject.as_str().splitn(4, '.').skip(2);
            if let Some(id) = tokens.next() {
                landed.insert(id.to_owned(), tokens.next().unwrap_or_default().to_owned());
            }
        }
        let _ = seen.unsubscribe().await;
        for id in &probes {
            let Some(partition) = landed.get(&id.to_string()) else {
                return Ok(Probed::Lost(format!(
                    "a probe on {PROBE_PREFIX}.{id} never came back: check this user's \
                     permissions for {PROBE_PREFIX}.* (nats/auth.conf)"
                )));
            };
            let expected = partition_of(*id, k);
            let agrees = match (k, partition.as_str()) {
                (1, "") => true,
                (1, _) => false,
                (_, p) => p.parse::<u32>().ok() == Some(expected),
            };
            if !agrees {
                let theirs = if partition.is_empty() {
                    "no partition (no mapping)".to_owned()
                } else {
                    format!("partition {partition}")
                };
                let ours = if k == 1 {
                    "none (one stream)".to_owned()
                } else {
                    format!("partition {expected} of {k}")
                };
                return Err(BusError::Partitions(format!(
                    "nats.partitions is {k}, but the servers' subject mapping disagrees: order {id} \
                     goes to {theirs}, where this process expects {ours}. Set \
                     CHECKOUT__NATS__PARTITIONS to the K of the servers' `partition(K, 2)` mapping \
                     (nats/cluster/partitions.conf), or 1 where there is none"
                )));
            }
        }
        Ok(Probed::Agreed)
    }

    /// The node leading each saga stream (partition), and the nodes that host it.
    pub async fn stream_leaders(&self) -> Result<Vec<(String, String, Vec<String>)>, BusError> {
        let mut out = Vec::new();
        for name in self.saga_streams() {
            let info = self
                .jetstream()
                .get_stream(&name)
                .await
                .map_err(|e| BusError::Stream {
                    stream: name.clone(),
                    source: e.into(),
                })?
                .get_info()
                .await
                .map_err(|e| BusError::Stream {
                    stream: name.clone(),
                    source: e.into(),
                })?;
            let cluster = info.cluster.unwrap_or_default();
            let leader = cluster.leader.unwrap_or_default();
            let mut hosts: Vec<String> = cluster.replicas.into_iter().map(|p| p.name).collect();
            hosts.push(leader.clone());
            out.push((name, leader, hosts));
        }
        Ok(out)
    }

    /// Moves partition leaders apart, so that K partitions' writes land on as many nodes as
    /// host them. JetStream elects each stream's leader on its own and may put several on one
    /// node; a leader step-down makes its group elect again (another node), repeated until no
    /// node leads two partitions while another leads none. Needs the JetStream API's
    /// `STREAM.LEADER.STEPDOWN` (the operator user); a few elections of a few seconds each.
    pub async fn spread_leaders(&self) -> Result<Vec<(String, String)>, BusError> {
        for _ in 0..12 {
            let leaders = self.stream_leaders().await?;
            let mut led: std::collections::HashMap<&str, Vec<&str>> =
                std::collections::HashMap::new();
            let mut hosts = std::collections::HashSet::new();
            for (name, leader, on) in &leaders {
                led.entry(leader.as_str()).or_default().push(name);
                hosts.extend(on.iter().map(String::as_str));
            }
            let crowded = led.values().find(|streams| streams.len() > 1);
            let (Some(streams), true) = (crowded, led.len() < hosts.len()) else {
                return Ok(leaders.into_iter().map(|(n, l, _)| (n, l)).collect());
            };
            let name = streams[0].to_owned();
            let before = leaders
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, l, _)| l.clone())
                .unwrap_or_default();
            tracing::info!(stream = %name, leader = %before, "asking a crowded leader to step down");
            self.client()
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"),
                    bytes::Bytes::new(),
                )
                .await
                .map_err(|e| BusError::Stream {
                    stream: name.clone(),
                    source: format!("leader step-down: {e}").into(),
                })?;
            // Wait for the group's next leader before looking again.
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = self.stream_leaders().await?;
                if now
                    .iter()
                    .any(|(n, l, _)| *n == name && !l.is_empty() && *l != before)
                {
                    break;
                }
            }
        }
        Ok(self
            .stream_leaders()
            .await?
            .into_iter()
            .map(|(n, l, _)| (n, l))
            .collect())
    }
}
