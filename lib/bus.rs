//! NATS JetStream plumbing: connect, declare streams and durable consumers idempotently,
//! and publish with a deterministic `Nats-Msg-Id`, waiting for the PublishAck.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use async_nats::HeaderMap;

use crate::config::NatsSettings;
use crate::saga::runner::Outgoing;
use crate::saga::subjects::{
    CHECKOUT_STREAM, CHECKOUT_SUBJECTS, DEADLETTER_STREAM, DEADLETTER_SUBJECTS, HEADER_EVENT,
    HEADER_ORDER_ID, HEADER_SCHEMA, HEADER_TRACEPARENT,
};

/// Failures talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("NATS credentials {0}")]
    Credentials(String),
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("publish to {subject}: {message}")]
    Publish { subject: String, message: String },
}

/// A connected JetStream context plus the settings that shape streams and consumers.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
}

/// One durable consumer's shape.
pub struct ConsumerSpec {
    /// Durable name, shared by every instance of the role (horizontal scaling).
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// The server's delivery limit (`-1`: unlimited).
    pub max_deliver: i64,
}

impl Bus {
    /// Connects; retries are the client's (it reconnects forever once connected).
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        let err = |source| BusError::Connect {
            url: redacted(&settings.url),
            source,
        };
        let mut options = async_nats::ConnectOptions::new()
            .name("checkout")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            // The server says why it refused something (a permission, a limit) only here: log
            // it, loudly, or a denied call looks like a mere timeout.
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::ServerError(e) => {
                        tracing::error!(error = %e, "NATS refused a request")
                    }
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    other => tracing::info!(event = %other, "NATS"),
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
        let client = options.connect(&settings.url).await.map_err(err)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(settings.publish_timeout);
        Ok(Self {
            client,
            js,
            settings: settings.clone(),
        })
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

    /// Creates or updates the saga and dead-letter streams. Safe to run from every process.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        self.ensure_stream(
            CHECKOUT_STREAM,
            CHECKOUT_SUBJECTS,
            self.settings.stream_max_age,
        )
        .await?;
        // Dead letters are kept longer: a human must look at each.
        self.ensure_stream(
            DEADLETTER_STREAM,
            DEADLETTER_SUBJECTS,
            self.settings.stream_max_age * 4,
        )
        .await
    }

    async fn ensure_stream(
        &self,
        name: &str,
        subjects: &str,
        max_age: Duration,
    ) -> Result<(), BusError> {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            // Limits, not work-queue or interest: acked messages stay, so dedup state and
            // the per-order timeline survive restarts (nats-server #3272).
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age,
            duplicate_window: self.settings.duplicate_window,
            num_replicas: self.settings.replicas,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        self.js
            .create_or_update_stream(config)
            .await
            .map(|_| ())
            .map_err(|e| BusError::Stream {
                stream: name.to_owned(),
                message: e.to_string(),
            })
    }

    /// Creates or updates a durable pull consumer on the saga stream.
    pub async fn ensure_consumer(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<consumer::PullConsumer, BusError> {
        let err = |message: String| BusError::Consumer {
            consumer: spec.durable.clone(),
            message,
        };
        let stream = self
            .js
            .get_stream(CHECKOUT_STREAM)
            .await
            .map_err(|e| err(e.to_string()))?;
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
        stream
            .create_consumer(config)
            .await
            .map_err(|e| err(e.to_string()))
    }

    /// Publishes one event and waits for its PublishAck. A duplicate (same `Nats-Msg-Id`
    /// within the window) is success: the message is already stored.
    pub async fn publish(&self, out: &Outgoing) -> Result<(), BusError> {
        self.publish_message(&out.subject, Self::message(out)).await
    }

    /// Publishes many events pipelined: every publish is sent before any PublishAck is
    /// awaited, so a batch costs about one round trip, not one per event.
    pub async fn publish_all(&self, outs: &[Outgoing]) -> Vec<Result<(), BusError>> {
        let mut pending = Vec::with_capacity(outs.len());
        for out in outs {
            let sent = self
                .js
                .send_publish(out.subject.clone(), Self::message(out))
                .await;
            pending.push(sent);
        }
        let acks = pending.into_iter().zip(outs).map(|(sent, out)| async move {
            let err = |message: String| BusError::Publish {
                subject: out.subject.clone(),
                message,
            };
            match sent {
                Err(e) => Err(err(e.to_string())),
                Ok(ack) => match ack.await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
                    Err(e) => Err(err(e.to_string())),
                },
            }
        });
        futures::future::join_all(acks).await
    }

    fn message(out: &Outgoing) -> jetstream::message::PublishMessage {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT, out.kind.as_str());
        headers.insert(HEADER_ORDER_ID, out.order_id.to_string().as_str());
        headers.insert(
            HEADER_SCHEMA,
            crate::saga::events::SCHEMA_VERSION.to_string().as_str(),
        );
        if let Some(tp) = &out.traceparent {
            headers.insert(HEADER_TRACEPARENT, tp.as_str());
        }
        jetstream::message::PublishMessage::build()
            .payload(out.payload.clone().into())
            .headers(headers)
            .message_id(&out.msg_id)
    }

    /// Publishes a prepared message and waits for its PublishAck.
    pub async fn publish_message(
        &self,
        subject: &str,
        message: jetstream::message::PublishMessage,
    ) -> Result<(), BusError> {
        let err = |message: String| BusError::Publish {
            subject: subject.to_owned(),
            message,
        };
        let ack = self
            .js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(|e| err(e.to_string()))?;
        match ack.await {
            Ok(_) => Ok(()),
            // Only reachable with an expected-sequence header: the message is already there.
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
            Err(e) => Err(err(e.to_string())),
        }
    }
}

/// A NATS URL fit for logs: credentials (`user:password@`) replaced.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn credentials_never_reach_the_logs() {
        assert_eq!(
            redacted("nats://reserve:s3cret@n1:4222"),
            "nats://***@n1:4222"
        );
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
