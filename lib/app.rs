//! Roles and their start-up: `checkout run <role>` builds an [`App`] with one or more roles,
//! each a set of tasks sharing one cancellation token.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::compensate::{self, CompensateStep};
use crate::config::Settings;
use crate::db::{self, DbError};
use crate::edge::http;
use crate::edge::Edge;
use crate::inventory::{self, ReserveStep};
use crate::orders::{self, LifecycleStep, OrderStep};
use crate::payments::{self, AuthorizeStep, CaptureStep, ProviderError, RefundStep};
use crate::saga::Step;
use crate::tasks::{Consuming, TaskError, TaskResult, Tasks};

/// A long-running process kind. Consumer roles may run in any number of processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Edge,
    Reserve,
    Authorize,
    Order,
    Compensate,
}

impl Role {
    /// Every role, for `checkout run all`.
    pub const ALL: [Role; 5] = [
        Role::Edge,
        Role::Reserve,
        Role::Authorize,
        Role::Order,
        Role::Compensate,
    ];

    /// The durable consumers this role binds (shared by all its processes). The edge's NATS
    /// user is denied every one of them (nats/auth.conf; a test holds the two together).
    pub fn durables(self) -> &'static [&'static str] {
        match self {
            Role::Reserve => &[ReserveStep::DURABLE],
            Role::Authorize => &[
                AuthorizeStep::DURABLE,
                CaptureStep::DURABLE,
                RefundStep::DURABLE,
                payments::updates::PaymentUpdateStep::DURABLE,
            ],
            Role::Order => &[
                OrderStep::DURABLE,
                LifecycleStep::DURABLE,
                crate::webhooks::FeedStep::DURABLE,
            ],
            Role::Compensate => &[CompensateStep::DURABLE],
            Role::Edge => &[],
        }
    }

    fn serves_http(self) -> bool {
        self == Role::Edge
    }

    /// The async runtime's worker threads for a process running `roles` (0: one per core).
    pub fn worker_threads(roles: &[Role], runtime: &crate::config::RuntimeSettings) -> usize {
        if roles.iter().any(|r| r.serves_http()) {
            runtime.http_worker_threads
        } else {
            runtime.consumer_worker_threads
        }
    }

    /// `all`, or a comma-separated list of roles (what `checkout run` takes).
    pub fn parse_list(list: &str) -> Result<Vec<Role>, String> {
        if list == "all" {
            return Ok(Self::ALL.to_vec());
        }
        list.split(',').map(|r| r.trim().parse::<Role>()).collect()
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "edge" => Self::Edge,
            "reserve" => Self::Reserve,
            "authorize" => Self::Authorize,
            "order" => Self::Order,
            "compensate" => Self::Compensate,
            other => {
                return Err(format!(
                    "unknown role {other}: edge, reserve, authorize, order, compensate or all (the sandbox PSP is its own binary, `sandbox-psp`)"
                ))
            }
        })
    }
}

/// Why an app could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Settings(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
    #[error(transparent)]
    TokenKeys(#[from] crate::payments::token_seal::SealError),
    #[error("task {task} failed")]
    Task {
        task: String,
        #[source]
        source: TaskError,
    },
}

/// Running roles.
pub struct App {
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Tasks,
}

impl App {
    /// Starts the given roles. Listeners bind before this returns, so port 0 works.
    pub async fn build(settings: Settings, roles: &[Role]) -> Result<Self, AppError> {
        // Everything the settings can get wrong is refused before anything connects: a bad
        // secret must not look like a server that is down.
        settings.check()?;
        let verifier = if roles.contains(&Role::Edge) {
            Some(Arc::new(crate::auth::Verifier::from_settings(
                &settings.auth,
            )?))
        } else {
            None
        };
        let seal = Arc::new(crate::payments::token_seal::TokenSeal::new(
            settings.payments.token_keys.expose(),
        )?);
        crate::metrics::install();
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::new(shutdown.clone());
        let mut http_addr = None;
        if !roles.is_empty() {
            http_addr = start_saga_roles(&mut tasks, &settings, roles, seal, verifier).await?;
        }
        let mut metrics_addr = None;
        if !roles.contains(&Role::Edge) && !roles.is_empty() {
            // The edge serves /metrics on its own address; other processes on metrics.addr.
            metrics_addr = serve_metrics(&mut tasks, &settings.metrics.addr).await?;
        }
        Ok(Self {
            http_addr,
            metrics_addr,
            shutdown,
            tasks,
        })
    }

    /// Where the edge listens, if this app runs it.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Where this process serves `/metrics` when it runs no edge.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Cancelling this token stops the app gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until shutdown is requested or a task ends; reports which task ended and why.
    pub async fn run_until_stopped(mut self) -> Result<(), AppError> {
        let first = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            ended = self.tasks.join_next() => ended,
        };
        self.shutdown.cancel();
        let mut failure = None;
        if let Some(ended) = first {
            failure = report(ended);
            if failure.is_none() {
                tracing::warn!("a task ended by itself; stopping");
            }
        }
        while let Some(ended) = self.tasks.join_next().await {
            if let Some(e) = report(ended) {
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Stops gracefully: stop pulling, finish in-flight messages, flush acks.
    pub async fn stop(self) -> Result<(), AppError> {
        self.shutdown.cancel();
        self.run_until_stopped().await
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // Dropping the JoinSet aborts whatever is still running (a crash, for tests).
        self.shutdown.cancel();
    }
}

/// `/metrics` on its own address, for a process without an edge (none if it cannot bind).
async fn serve_metrics(tasks: &mut Tasks, listen: &str) -> Result<Option<SocketAddr>, AppError> {
    let listener = match bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, "no /metrics for this process");
            return Ok(None);
        }
    };
    let addr = local_addr(&listener, listen)?;
    let token = tasks.shutdown().clone();
    tasks.spawn("metrics", async move {
        axum::serve(listener, http::metrics_router())
            .with_graceful_shutdown(token.cancelled_owned())
            .await
            .map_err(TaskError::from)
    });
    tracing::info!(%addr, "metrics listening");
    Ok(Some(addr))
}

/// Connects to PostgreSQL (migrating it if asked) and to NATS (declaring and checking the
/// saga's streams), then starts each role's service; where the edge listens, if it runs.
async fn start_saga_roles(
    tasks: &mut Tasks,
    settings: &Settings,
    roles: &[Role],
    seal: Arc<crate::payments::token_seal::TokenSeal>,
    verifier: Option<Arc<crate::auth::Verifier>>,
) -> Result<Option<SocketAddr>, AppError> {
    if settings.database.migrate_on_start {
        db::create_if_missing(&settings.database).await?;
    }
    let pool = db::connect(&settings.database).await?;
    if settings.database.migrate_on_start {
        db::migrate(&pool).await?;
    }
    let bus = Bus::connect(&settings.nats).await?;
    bus.ensure_streams().await?;
    bus.check_partitions().await?;
    let providers = payments::provider(settings)?;
    let provider: Arc<dyn payments::PaymentProvider> = providers.clone();
    if !seal.enabled() && roles.contains(&Role::Edge) {
        tracing::warn!(
            "payments.token_keys is empty: payment tokens travel unsealed through the \
             stream, inbox rows and dead letters; set it in production"
        );
    }
    let leases = db::Leases::new(pool);
    let consuming = Consuming {
        bus: bus.clone(),
        settings: settings.consumer.clone(),
        chaos: settings.chaos.redeliver,
        group_linger: settings.database.group_linger,
    };
    for role in roles {
        match role {
            Role::Reserve => inventory::start(tasks, &consuming, &leases, &settings.inventory),
            Role::Authorize => {
                payments::start(tasks, &consuming, settings, &leases, &providers, &seal);
            }
            Role::Order => {
                orders::start(tasks, &consuming, &leases);
                crate::webhooks::start(tasks, &consuming, settings, &leases, &seal);
            }
            Role::Compensate => compensate::start(tasks, &consuming, settings, &leases, &provider),
            Role::Edge => {}
        }
    }
    let durables: Vec<&'static str> = roles
        .iter()
        .flat_map(|role| role.durables().iter().copied())
        .collect();
    let (every, gauges) = (settings.metrics.jetstream_interval, bus.clone());
    tasks.until_shutdown("jetstream-gauges", move |token| {
        crate::backlog::report(gauges, durables, every, token)
    });
    let Some(verifier) = verifier else {
        return Ok(None);
    };
    let edge = Edge {
        settings: settings.clone(),
        leases,
        bus,
        seal,
        verifier,
    };
    let addr = edge.start(tasks).await.map_err(|source| AppError::Listen {
        addr: settings.http.addr.clone(),
        source,
    })?;
    Ok(Some(addr))
}

fn report(ended: Result<TaskResult, tokio::task::JoinError>) -> Option<AppError> {
    match ended {
        Ok((task, Ok(()))) => {
            tracing::info!(%task, "task stopped");
            None
        }
        Ok((task, Err(source))) => Some(AppError::Task { task, source }),
        Err(e) => Some(AppError::Task {
            task: "unknown".into(),
            source: e.into(),
        }),
    }
}

async fn bind(addr: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Listen {
            addr: addr.to_owned(),
            source,
        })
}

fn local_addr(listener: &TcpListener, addr: &str) -> Result<SocketAddr, AppError> {
    listener.local_addr().map_err(|source| AppError::Listen {
        addr: addr.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::Role;
    use crate::config::RuntimeSettings;

    #[test]
    fn a_process_serving_http_gets_the_http_threads_and_a_consumer_its_own() {
        let runtime = RuntimeSettings {
            http_worker_threads: 0,
            consumer_worker_threads: 1,
        };
        let threads = |list: &str| -> Result<usize, String> {
            Ok(Role::worker_threads(&Role::parse_list(list)?, &runtime))
        };
        assert_eq!(threads("reserve"), Ok(1));
        assert_eq!(threads("reserve,authorize,order,compensate"), Ok(1));
        assert_eq!(threads("edge"), Ok(0));
        assert_eq!(threads("edge,reserve"), Ok(0));
        assert_eq!(threads("all"), Ok(0));
    }
}
