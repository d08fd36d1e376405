//! NATS JetStream plumbing: connect, declare streams and durable consumers idempotently,
//! and publish with a deterministic `Nats-Msg-Id`, waiting for the PublishAck. It knows no
//! saga: the saga's streams, subjects and headers are `saga::streams` and `saga::outgoing`.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, consumer, stream};

use crate::config::{redacted, NatsSettings};

/// Failures talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS credentials {0}")]
    Credentials(String),
    /// The server refused who we are: a configuration error, not an outage.
    #[error(
        "NATS at {url} refused {who}: {source}. Check nats.user and nats.password \
         (CHECKOUT__NATS__USER, CHECKOUT__NATS__PASSWORD), nats.creds_file or nats.tls_ca_file \
         against the server's authorization block (nats/auth.conf)"
    )]
    Refused {
        url: String,
        who: String,
        source: async_nats::ConnectError,
    },
    /// The server denied a JetStream call at start-up: the user's permissions, not an outage.
    #[error(
        "NATS denied {who} {what}: {detail}. The user's permissions (the server's authorization \
         block, nats/auth.conf) do not allow it: check that nats.user (CHECKOUT__NATS__USER) is \
         this role's user"
    )]
    Denied {
        who: String,
        what: String,
        detail: String,
    },
    #[error("stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: Cause,
    },
    #[error("consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: Cause,
    },
    /// The server created a consumer without the subject filters it was given.
    #[error(
        "nats-server {version} ignored the subject filters of consumer {consumer}: \
         checkout needs nats-server 2.10 or newer"
    )]
    ServerTooOld { consumer: String, version: String },
    /// `nats.partitions` and the servers' subject mapping disagree.
    #[error("partitions: {0}")]
    Partitions(String),
    /// `hint` says what the failure usually means here (an election, a busy server).
    #[error("publish to {subject}: {source}{hint}")]
    Publish {
        subject: String,
        #[source]
        source: Cause,
        hint: &'static str,
    },
}

/// A typed error kept as another's source (async-nats's own, a `sqlx::Error`, or words).
/// Our errors' messages include their cause: logs print an error's message only.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A connected JetStream context plus the settings that shape streams and consumers.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
    /// The server's permission violations, as its async errors report them.
    denials: Denials,
}

/// Permission violations the server reported (they come apart from the request they
/// refused, which only times out), counted, with the last one's words.
#[derive(Clone, Default)]
struct Denials(std::sync::Arc<std::sync::Mutex<(u64, String)>>);

impl Denials {
    fn record(&self, detail: String) {
        if let Ok(mut d) = self.0.lock() {
            *d = (d.0 + 1, detail);
        }
    }

    fn count(&self) -> u64 {
        self.0.lock().map_or(0, |d| d.0)
    }

    /// The last violation if any came after `since` (a count read before a call).
    fn since(&self, since: u64) -> Option<String> {
        self.0
            .lock()
            .ok()
            .filter(|d| d.0 > since)
            .map(|d| d.1.clone())
    }
}

/// A start-up call that failed for good, or that the server's permissions denied.
enum Settled<E> {
    Failed(E),
    Denied(String),
}

/// One durable consumer's shape.
pub struct ConsumerSpec {
    /// The stream (partition) it reads.
    pub stream: String,
    /// Durable name, shared by every instance of the role (horizontal scaling).
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// The server's delivery limit (`-1`: unlimited).
    pub max_deliver: i64,
}

/// A message the bus publishes: its subject, and the message with its deterministic
/// `Nats-Msg-Id` and headers (built anew for every attempt).
pub trait Publishable {
    /// Where it goes.
    fn subject(&self) -> &str;
    /// The message to send.
    fn message(&self) -> jetstream::message::PublishMessage;
}

impl BusError {
    /// Whether a stream could not be created because its subjects overlap another stream's.
    pub fn is_subject_overlap(&self) -> bool {
        let Self::Stream { source, .. } = self else {
            return false;
        };
        source
            .downcast_ref::<jetstream::context::CreateStreamError>()
            .is_some_and(|e| {
                matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP)
            })
    }
}

impl Bus {
    /// Connects. Until the first connection, what heals by itself (connection refused, a
    /// timeout, a name that does not resolve yet) is retried with a capped backoff, forever;
    /// a refusal of who we are (authorization violation, a bad credential, TLS) is a
    /// configuration error, returned at once. Once connected, the client reconnects forever.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        use async_nats::ConnectErrorKind as K;
        let mut pause = Duration::from_millis(250);
        let denials = Denials::default();
        let client = loop {
            match Self::options(settings, denials.clone())
                .await?
                .connect(settings.servers())
                .await
            {
                Ok(client) => break client,
                Err(e) if matches!(e.kind(), K::Io | K::TimedOut | K::Dns) => {
                    tracing::warn!(url = %redacted(&settings.url), error = %e, retry_in = ?pause,
                        "NATS not reachable yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(source) => {
                    return Err(BusError::Refused {
                        url: redacted(&settings.url),
                        who: who(settings),
                        source,
                    })
                }
            }
        };
        let mut js = jetstream::new(client.clone());
        js.set_timeout(settings.publish_timeout);
        Ok(Self {
            client,
            js,
            settings: settings.clone(),
            denials,
        })
    }

    async fn options(
        settings: &NatsSettings,
        denials: Denials,
    ) -> Result<async_nats::ConnectOptions, BusError> {
        // The first connection is expected; only a later one is news.
        let connected_before = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut options = async_nats::ConnectOptions::new()
            .name("checkout")
            .connection_timeout(Duration::from_secs(5))
            // The server says why it refused something (a permission, a limit) only here: log
            // it, loudly, or a denied call looks like a mere timeout.
            .event_callback(move |event| {
                let (connected_before, denials) = (connected_before.clone(), denials.clone());
                async move {
                    use async_nats::Event;
                    use std::sync::atomic::Ordering;
                    match event {
                        Event::ServerError(e) => {
                            tracing::error!(error = %e, "NATS refused a request");
                            let detail = e.to_string();
                            if detail
                                .to_ascii_lowercase()
                                .contains("permissions violation")
                            {
                                denials.record(detail);
                            }
                        }
                        // Losing the server is an incident even when the client gets it back:
                        // publishes wait (edge outbox) and pulls stop until it does.
                        Event::Disconnected => tracing::warn!(
                            "NATS connection lost; reconnecting to any server of nats.url \
                             (publishes wait in the outbox, pulls resume after)"
                        ),
                        Event::Connected if !connected_before.swap(true, Ordering::Relaxed) => {
                            tracing::info!("NATS connected");
                        }
                        Event::Connected => tracing::warn!("NATS connection re-established"),
                        // Our own close, at the end of a shutdown.
                        Event::Closed => tracing::info!("NATS connection closed"),
                        Event::LameDuckMode => tracing::warn!(
                            "the NATS server is shutting down (lame duck); moving to another"
                        ),
                        other => tracing::warn!(event = %other, "NATS"),
                    }
                }
            });
        if !settings.creds_file.is_empty() {
            options = options
                .credentials_file(&settings.creds_file)
                .await
                .map_err(|e| BusError::Credentials(format!("{}: {e}", settings.creds_file)))?;
        } else if !settings.user.is_empty() {
            options = options
                .user_and_password(settings.user.clone(), settings.password.expose().to_owned());
        }
        if !settings.tls_ca_file.is_empty() {
            options = options
                .add_root_certificates(settings.tls_ca_file.clone().into())
                .require_tls(true);
        }
        Ok(options)
    }

    /// The raw client (for flushing and the readiness probe).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The stream settings.
    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    /// Creates or updates a limits stream of file storage with this process's replicas and
    /// dedup window. Safe to run from every process.
    pub async fn ensure_stream(
        &self,
        name: &str,
        subjects: &str,
        max_age: Duration,
        max_bytes: i64,
    ) -> Result<(), BusError> {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            // Limits, not work-queue or interest: acked messages stay, so dedup state and
            // the per-order timeline survive restarts (nats-server #3272).
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age,
            // A ceiling for the disk, sized (docs/capacity.md) so that max_age binds first:
            // reaching it drops the oldest messages, which by then are long handled.
            max_bytes,
            duplicate_window: self.settings.duplicate_window,
            num_replicas: self.settings.replicas,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let what = format!("stream {name}");
        self.settling(&what, stream_error_transient, || {
            self.js.create_or_update_stream(config.clone())
        })
        .await
        .map(|_| ())
        .map_err(|e| match e {
            Settled::Failed(e) => BusError::Stream {
                stream: name.to_owned(),
                source: e.into(),
            },
            Settled::Denied(detail) => self.denied(&what, detail),
        })
    }

    fn denied(&self, what: &str, detail: String) -> BusError {
        BusError::Denied {
            who: who(&self.settings),
            what: what.to_owned(),
            detail,
        }
    }

    /// Creates or updates a durable pull consumer.
    pub async fn ensure_consumer(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<consumer::PullConsumer, BusError> {
        let err = |source: Cause| BusError::Consumer {
            consumer: spec.durable.clone(),
            source,
        };
        let what = format!("consumer {}", spec.durable);
        let stream = self
            .settling(&what, get_stream_transient, || {
                self.js.get_stream(&spec.stream)
            })
            .await
            .map_err(|e| match e {
                Settled::Failed(e) => err(e.into()),
                Settled::Denied(detail) => self.denied(&what, detail),
            })?;
        let config = consumer::pull::Config {
            durable_name: Some(spec.durable.clone()),
            filter_subjects: spec.filter_subjects.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            // Only a dead process lets ack_wait run out (running handlers send progress
            // acks), so a redelivery after ack_wait is the crash recovery: no server-side
            // backoff, which would hold a crashed process's backlog for minutes.
            ack_wait: self.settings.ack_wait,
            max_deliver: spec.max_deliver,
            max_ack_pending: self.settings.max_ack_pending,
            ..Default::default()
        };
        // Without an action the server creates the durable or updates it in place, so every
        // instance of a role can run this at start-up.
        let consumer = self
            .settling(&what, consumer_error_transient, || {
                stream.create_consumer(config.clone())
            })
            .await
            .map_err(|e| match e {
                Settled::Failed(e) => err(e.into()),
                Settled::Denied(detail) => self.denied(&what, detail),
            })?;
        // A server older than 2.10 does not know `filter_subjects`: it creates the consumer
        // without any filter, and the step would be handed every event of the stream and
        // dead-letter all it does not consume. Refuse to start instead.
        let applied = &consumer.cached_info().config;
        if !filters_applied(
            &spec.filter_subjects,
            &applied.filter_subject,
            &applied.filter_subjects,
        ) {
            let version = self.client.server_info().version;
            // The consumer as created would misroute every event: leave none behind.
            let _ = stream.delete_consumer(&spec.durable).await;
            return Err(BusError::ServerTooOld {
                consumer: spec.durable.clone(),
                version,
            });
        }
        Ok(consumer)
    }

    /// Publishes one message and waits for its PublishAck. A duplicate (same `Nats-Msg-Id`
    /// within the window) is success: the message is already stored.
    pub async fn publish<P: Publishable>(&self, out: &P) -> Result<(), BusError> {
        self.publish_message(out.subject(), out.message()).await
    }

    /// Publishes many messages pipelined: every publish is sent before any PublishAck is
    /// awaited, so a batch costs about one round trip, not one per message.
    pub async fn publish_all<P: Publishable>(&self, outs: &[P]) -> Vec<Result<(), BusError>> {
        let mut pending = Vec::with_capacity(outs.len());
        for out in outs {
            let sent = self
                .js
                .send_publish(out.subject().to_owned(), out.message())
                .await;
            pending.push(sent);
        }
        let acks = pending.into_iter().zip(outs).map(|(sent, out)| async move {
            let err = |e: PublishError| BusError::Publish {
                subject: out.subject().to_owned(),
                hint: hint(&e),
                source: e.into(),
            };
            match sent {
                Err(e) => Err(err(e)),
                Ok(ack) => match ack.await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
                    Err(e) => Err(err(e)),
                },
            }
        });
        futures::future::join_all(acks).await
    }

    /// [`Self::publish_all`], retrying what failed (pipelined again, same `Nats-Msg-Id`s, so
    /// nothing is stored twice) for up to `within`. A step's effects are committed by now:
    /// retrying here resumes the saga as soon as a new stream leader answers, where a nak
    /// sent during the election could be lost and leave the message to `ack_wait`.
    pub async fn publish_all_retrying<P: Publishable + Clone>(
        &self,
        outs: &[P],
        within: Duration,
    ) -> Vec<Result<(), BusError>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut results = self.publish_all(outs).await;
        let mut pause = Duration::from_millis(100);
        loop {
            let failed: Vec<usize> = (0..results.len())
                .filter(|&i| results[i].is_err())
                .collect();
            if failed.is_empty() || tokio::time::Instant::now() + pause >= deadline {
                return results;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            let again: Vec<P> = failed.iter().map(|&i| outs[i].clone()).collect();
            for (i, result) in failed.into_iter().zip(self.publish_all(&again).await) {
                results[i] = result;
            }
        }
    }

    /// Publishes a prepared message and waits for its PublishAck.
    pub async fn publish_message(
        &self,
        subject: &str,
        message: jetstream::message::PublishMessage,
    ) -> Result<(), BusError> {
        let err = |e: PublishError| BusError::Publish {
            subject: subject.to_owned(),
            hint: hint(&e),
            source: e.into(),
        };
        let ack = self
            .js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(&err)?;
        match ack.await {
            Ok(_) => Ok(()),
            // Only reachable with an expected-sequence header: the message is already there.
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

/// How long start-up keeps retrying JetStream calls that fail only because the cluster is
/// still settling (forming, electing a leader, a peer coming back).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Who we say we are, for an error message (never the password).
fn who(settings: &NatsSettings) -> String {
    if !settings.creds_file.is_empty() {
        format!("the credentials in {}", settings.creds_file)
    } else if !settings.user.is_empty() {
        format!("user `{}`", settings.user)
    } else {
        "an anonymous connection (nats.user is empty)".to_owned()
    }
}

impl Bus {
    /// Runs a start-up JetStream call, retrying failures that heal by themselves within
    /// seconds on a cluster (a request timeout during an election, "no leader", too few peers
    /// yet) until [`SETTLE_TIMEOUT`]; anything else (a bad config) fails at once. Two processes
    /// creating the same R3 stream on a just-formed cluster is the usual case. A denied call
    /// only times out, so the server's report of a permission violation during it ends the
    /// retries at once: that is a configuration error, not an election.
    async fn settling<T, E, F, Fut>(
        &self,
        what: &str,
        transient: fn(&E) -> bool,
        mut call: F,
    ) -> Result<T, Settled<E>>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        let mut pause = Duration::from_millis(200);
        let before = self.denials.count();
        loop {
            match call().await {
                Err(e) if transient(&e) => {
                    if let Some(detail) = self.denials.since(before) {
                        return Err(Settled::Denied(detail));
                    }
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(Settled::Failed(e));
                    }
                    tracing::warn!(%what, error = %e, retry_in = ?pause, "JetStream not settled yet (cluster forming or electing); retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(Settled::Failed(e)),
                Ok(v) => return Ok(v),
            }
        }
    }
}

/// JetStream API codes that mean "not now", not "no".
/// Whether the consumer the server created filters as asked: a single filter may come back
/// in either field, several only in `filter_subjects`.
fn filters_applied(asked: &[String], single: &str, several: &[String]) -> bool {
    match asked {
        [] => true,
        [one] if single == one.as_str() => true,
        _ => {
            let mut asked = asked.to_vec();
            let mut got = several.to_vec();
            asked.sort();
            got.sort();
            asked == got
        }
    }
}

fn code_transient(e: &jetstream::Error) -> bool {
    use jetstream::ErrorCode as C;
    e.code() == 503
        || [
            C::CLUSTER_NOT_AVAILABLE,
            C::CLUSTER_NOT_LEADER,
            C::CLUSTER_NOT_ACTIVE,
            C::CLUSTER_NO_PEERS,
            C::CLUSTER_INCOMPLETE,
            C::INSUFFICIENT_RESOURCES,
            C::RAFT_GENERAL,
            // Right after a restart a stream can be briefly unknown to the node asked.
            C::STREAM_NOT_FOUND,
        ]
        .contains(&e.error_code())
}

fn stream_error_transient(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    match e.kind() {
        K::TimedOut | K::JetStreamUnavailable | K::Response => true,
        K::JetStream(js) => code_transient(&js),
        _ => false,
    }
}

fn get_stream_transient(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::GetStreamErrorKind as K;
    match e.kind() {
        K::Request => true,
        K::JetStream(js) => code_transient(&js),
        _ => false,
    }
}

fn consumer_error_transient(e: &jetstream::stream::ConsumerError) -> bool {
    use jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::TimedOut | K::Request => true,
        K::JetStream(js) => code_transient(&js),
        _ => false,
    }
}

/// What a publish error usually means, in words an operator can act on. The server's own words for a stream
/// without a leader ("no stream found for given subject", or no responders) suggest the
/// stream is gone, when on a cluster it is most often being given a new leader.
fn hint(e: &PublishError) -> &'static str {
    match e.kind() {
        PublishErrorKind::StreamNotFound => {
            " (no stream leader answered: on a cluster this is usually a leader election, \
             retried; on one server the stream may be missing)"
        }
        PublishErrorKind::TimedOut => {
            " (no PublishAck in nats.publish_timeout: server busy or electing; retried)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::filters_applied;
    use crate::config::redacted;

    #[test]
    fn a_consumer_created_without_its_filters_is_noticed() {
        let two = [
            "checkout.reserved.*".to_owned(),
            "checkout.failed.*".to_owned(),
        ];
        let one = ["checkout.reserved.*".to_owned()];
        // What nats-server 2.9 answers: neither field set.
        assert!(!filters_applied(&two, "", &[]));
        assert!(!filters_applied(&one, "", &[]));
        assert!(filters_applied(&two, "", &[two[1].clone(), two[0].clone()]));
        assert!(filters_applied(&one, "checkout.reserved.*", &[]));
        assert!(filters_applied(&one, "", &one));
        assert!(!filters_applied(&two, "", &one));
        assert!(filters_applied(&[], "", &[]));
    }

    #[test]
    fn credentials_never_reach_the_logs() {
        assert_eq!(
            redacted("nats://reserve:s3cret@n1:4222"),
            "nats://***@n1:4222"
        );
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redacted("nats://a:x@n1:4222,nats://n2:4222,nats://b:y@n3:4222"),
            "nats://***@n1:4222,nats://n2:4222,nats://***@n3:4222"
        );
    }
}
