//! Roles and their start-up: `checkout run <role>` builds an [`App`] with one or more roles,
//! each a set of tasks sharing one cancellation token.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::catalog::CatalogCache;
use crate::compensate::CompensateStep;
use crate::config::Settings;
use crate::db::{self, DbError};
use crate::edge::cart::CartLimits;
use crate::edge::checkout::Checkouts;
use crate::edge::http::{self, AppState, EdgeState};
use crate::edge::outbox::Outbox;
use crate::inventory::soldout::SoldOut;
use crate::inventory::{self, ReserveStep};
use crate::orders::watchdog::Watchdog;
use crate::orders::{LifecycleStep, OrderStep};
use crate::payments::guard::GuardedProvider;
use crate::payments::sandbox_client::SandboxClient;
use crate::payments::{
    reconcile, AuthorizeStep, CaptureStep, PaymentProvider, ProviderError, RefundStep,
};
use crate::pricing::destination::RatesCache;
use crate::saga::batch::BatchStep;
use crate::saga::runner::{self, Step};
use crate::tools::sandbox_psp::Sandbox;

/// A long-running process kind. Consumer roles may run in any number of processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Edge,
    Reserve,
    Authorize,
    Order,
    Compensate,
    Psp,
}

impl Role {
    /// Every role, for `checkout run all`.
    pub const ALL: [Role; 6] = [
        Role::Psp,
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
            Role::Reserve => &["reserve"],
            Role::Authorize => &["authorize", "capture", "refund"],
            Role::Order => &["order", "order-lifecycle"],
            Role::Compensate => &["compensate"],
            Role::Edge | Role::Psp => &[],
        }
    }

    fn needs_saga(self) -> bool {
        self != Role::Psp
    }

    fn serves_http(self) -> bool {
        matches!(self, Role::Edge | Role::Psp)
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
            "psp" => Self::Psp,
            other => {
                return Err(format!(
                    "unknown role {other}: edge, reserve, authorize, order, compensate, psp or all"
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

type TaskResult = (String, Result<(), TaskError>);

/// Why a long-running task ended with an error (its cause kept as the source).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("serving HTTP")]
    Serve(#[from] std::io::Error),
    #[error("consuming")]
    Consume(#[from] BusError),
    #[error("the task panicked or was cancelled")]
    Join(#[from] tokio::task::JoinError),
}

/// Running roles.
pub struct App {
    http_addr: Option<SocketAddr>,
    psp_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<TaskResult>,
}

impl App {
    /// Starts the given roles. Listeners bind before this returns, so port 0 works.
    pub async fn build(mut settings: Settings, roles: &[Role]) -> Result<Self, AppError> {
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
        let mut tasks: JoinSet<TaskResult> = JoinSet::new();
        let mut psp_addr = None;
        if roles.contains(&Role::Psp) {
            let listener = bind(&settings.psp.listen_addr).await?;
            let addr = local_addr(&listener, &settings.psp.listen_addr)?;
            // An in-process authorize talks to the sandbox where it really listens.
            settings.psp.url = format!("http://{addr}");
            psp_addr = Some(addr);
            let token = shutdown.clone();
            tasks.spawn(async move {
                let result = axum::serve(listener, Sandbox::default().router())
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await
                    .map_err(TaskError::from);
                ("psp".to_owned(), result)
            });
            tracing::info!(%addr, "sandbox PSP listening");
        }
        let mut http_addr = None;
        if roles.iter().any(|r| r.needs_saga()) {
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
            let sandbox: Arc<dyn PaymentProvider> =
                Arc::new(SandboxClient::new(&settings.psp.url, settings.psp.timeout)?);
            let guarded = Arc::new(GuardedProvider::new(sandbox, &settings.payments));
            let breaker = guarded.breaker();
            let provider: Arc<dyn PaymentProvider> = guarded;
            if !seal.enabled() && roles.contains(&Role::Edge) {
                tracing::warn!(
                    "payments.token_keys is empty: payment tokens travel unsealed through the \
                     stream, inbox rows and dead letters; set it in production"
                );
            }
            let shared = Shared {
                settings: settings.clone(),
                leases: db::Leases::new(pool.clone()),
                pool: pool.clone(),
                bus: bus.clone(),
                provider: provider.clone(),
                breaker: breaker.clone(),
                seal: seal.clone(),
                shutdown: shutdown.clone(),
            };
            for role in roles {
                match role {
                    Role::Reserve => shared.reserve(&mut tasks),
                    Role::Authorize => shared.authorize(&mut tasks),
                    Role::Order => shared.order(&mut tasks),
                    Role::Compensate => shared.compensate(&mut tasks),
                    Role::Edge | Role::Psp => {}
                }
            }
            let durables: Vec<&'static str> = roles
                .iter()
                .flat_map(|role| role.durables().iter().copied())
                .collect();
            tasks.spawn({
                let (bus, token) = (bus.clone(), shutdown.clone());
                let every = settings.metrics.jetstream_interval;
                async move {
                    crate::backlog::report(bus, durables, every, token).await;
                    ("jetstream-gauges".to_owned(), Ok(()))
                }
            });
            if let Some(verifier) = verifier {
                http_addr = Some(shared.edge(&mut tasks, verifier).await?);
            }
        }
        let mut metrics_addr = None;
        if !roles.contains(&Role::Edge) && roles.iter().any(|r| r.needs_saga()) {
            // The edge serves /metrics on its own address; other processes on metrics.addr.
            match bind(&settings.metrics.addr).await {
                Ok(listener) => {
                    let addr = local_addr(&listener, &settings.metrics.addr)?;
                    metrics_addr = Some(addr);
                    let token = shutdown.clone();
                    tasks.spawn(async move {
                        let result = axum::serve(listener, http::metrics_router())
                            .with_graceful_shutdown(token.cancelled_owned())
                            .await
                            .map_err(TaskError::from);
                        ("metrics".to_owned(), result)
                    });
                    tracing::info!(%addr, "metrics listening");
                }
                Err(e) => tracing::warn!(error = %e, "no /metrics for this process"),
            }
        }
        Ok(Self {
            http_addr,
            psp_addr,
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

    /// Where the sandbox PSP listens, if this app runs it.
    pub fn psp_addr(&self) -> Option<SocketAddr> {
        self.psp_addr
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

/// What every consumer role's wiring shares: one pool, one NATS connection, one guarded
/// payment provider (its breaker), the token seal, and the shutdown signal.
struct Shared {
    settings: Settings,
    pool: sqlx::PgPool,
    /// The hot paths' connections from `pool` (see `db::lease`).
    leases: db::Leases,
    bus: Bus,
    provider: Arc<dyn PaymentProvider>,
    breaker: Arc<crate::payments::guard::CircuitBreaker>,
    seal: Arc<crate::payments::token_seal::TokenSeal>,
    shutdown: CancellationToken,
}

impl Shared {
    /// Runs a step's consumer until shutdown.
    fn step(&self, tasks: &mut JoinSet<TaskResult>, step: Arc<dyn StepLauncher>) {
        let (bus, settings, token) = (
            self.bus.clone(),
            self.settings.clone(),
            self.shutdown.clone(),
        );
        tasks.spawn(async move { step.launch(bus, settings, token).await });
    }

    /// The HTTP edge and its helpers (readiness, rate limits, caches, outbox, sold-out notices);
    /// where it listens.
    async fn edge(
        &self,
        tasks: &mut JoinSet<TaskResult>,
        verifier: Arc<crate::auth::Verifier>,
    ) -> Result<SocketAddr, AppError> {
        let limits = http::limits::UserLimits::new(&self.settings.edge);
        let readiness = http::health::Readiness::new(self.shutdown.clone());
        tasks.spawn({
            let (readiness, pool, bus) = (readiness.clone(), self.pool.clone(), self.bus.clone());
            async move {
                readiness
                    .run(pool, bus, std::time::Duration::from_secs(1))
                    .await;
                ("readiness".to_owned(), Ok(()))
            }
        });
        tasks.spawn({
                let (limits, token) = (limits.clone(), self.shutdown.clone());
                async move {
                    loop {
                        tokio::select! {
                            _ = token.cancelled() => break,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => limits.forget_idle(),
                        }
                    }
                    ("rate-limits".to_owned(), Ok(()))
                }
            });
        let rates = RatesCache::new(self.pool.clone(), self.settings.edge.rates_cache_ttl);
        let catalog = CatalogCache::new(
            self.pool.clone(),
            self.settings.edge.product_cache_capacity,
            self.settings.edge.product_cache_ttl,
        );
        tasks.spawn({
            let (client, catalog, rates) =
                (self.bus.client().clone(), catalog.clone(), rates.clone());
            let token = self.shutdown.clone();
            async move {
                crate::catalog::run_invalidation(client, catalog, rates, token).await;
                ("cache-invalidation".to_owned(), Ok(()))
            }
        });
        let (outbox, marks) = Outbox::new(self.pool.clone(), self.bus.clone());
        tasks.spawn({
            let (outbox, token) = (outbox.clone(), self.shutdown.clone());
            let every = self.settings.edge.outbox_mark_every;
            async move {
                outbox.run_marker(marks, every, token).await;
                ("outbox-marker".to_owned(), Ok(()))
            }
        });
        tasks.spawn({
            let (outbox, token) = (outbox.clone(), self.shutdown.clone());
            let edge = self.settings.edge.clone();
            async move {
                outbox
                    .run_sweeper(
                        edge.outbox_interval,
                        edge.outbox_grace,
                        edge.outbox_max_backoff,
                        token,
                    )
                    .await;
                ("outbox-sweeper".to_owned(), Ok(()))
            }
        });
        let sold_out = SoldOut::new(self.settings.edge.sold_out_ttl);
        tasks.spawn({
            let (client, memory) = (self.bus.client().clone(), sold_out.clone());
            let token = self.shutdown.clone();
            async move {
                memory.follow(client, token).await;
                ("sold-out-notices".to_owned(), Ok(()))
            }
        });
        let seen = crate::edge::cart::SeenCarts::new(
            self.settings.edge.seen_carts_capacity,
            self.settings.edge.seen_carts_ttl,
        );
        let checkouts = Checkouts::new(
            self.leases.clone(),
            self.seal.clone(),
            outbox.clone(),
            crate::edge::checkout::Known {
                rates: rates.clone(),
                catalog: catalog.clone(),
                seen: seen.clone(),
                sold_out: sold_out.clone(),
            },
            self.settings.database.group_linger,
        );
        let state = AppState::new(EdgeState {
            pool: self.pool.clone(),
            leases: self.leases.clone(),
            lines: crate::edge::cart::Lines::new(
                self.leases.clone(),
                self.settings.database.group_linger,
                seen,
            ),
            bus: self.bus.clone(),
            checkouts,
            outbox,
            sold_out,
            limits: limits.clone(),
            readiness: readiness.clone(),
            admission: http::Admission::new(
                self.settings.edge.max_in_flight,
                self.settings.edge.admission_wait,
            ),
            cart_limits: CartLimits {
                max_lines: self.settings.edge.cart_max_lines,
            },
            catalog,
            rates,
            verifier: verifier.clone(),
        });
        let listener = bind(&self.settings.http.addr).await?;
        let addr = local_addr(&listener, &self.settings.http.addr)?;
        let router = http::router(state, self.settings.http.body_limit_bytes);
        let token = self.shutdown.clone();
        let drain = self.settings.http.drain_timeout;
        tasks.spawn(async move {
            let serving = axum::serve(listener, router)
                .with_graceful_shutdown(token.clone().cancelled_owned())
                .into_future();
            // Graceful shutdown waits for every connection; a client that never hangs up
            // must not keep the process alive, so the drain has a deadline.
            let deadline = async {
                token.cancelled().await;
                tokio::time::sleep(drain).await;
            };
            let result = tokio::select! {
                served = serving => served.map_err(TaskError::from),
                () = deadline => {
                    tracing::warn!(?drain, "HTTP drain deadline passed; closing the connections left");
                    Ok(())
                }
            };
            ("edge".to_owned(), result)
        });
        tracing::info!(%addr, "edge listening");
        Ok(addr)
    }

    /// The reserve step and the sweeper of expired holds.
    fn reserve(&self, tasks: &mut JoinSet<TaskResult>) {
        self.step(
            tasks,
            Arc::new(Batch(Arc::new(ReserveStep {
                leases: self.leases.clone(),
                ttl: self.settings.inventory.reservation_ttl,
                notices: Some(self.bus.client().clone()),
            }))),
        );
        let (pool, token) = (self.pool.clone(), self.shutdown.clone());
        let notices = self.bus.client().clone();
        let inv = self.settings.inventory.clone();
        tasks.spawn(async move {
            inventory::run_sweeper(pool, inv.expiry_interval, inv.expiry_batch, notices, token)
                .await;
            ("reservation-expiry".to_owned(), Ok(()))
        });
    }

    /// Authorize, capture and refund steps, and the breaker's status reports.
    fn authorize(&self, tasks: &mut JoinSet<TaskResult>) {
        self.step(
            tasks,
            Arc::new(AuthorizeStep {
                leases: self.leases.clone(),
                claims: crate::db::group::Group::new(
                    crate::payments::Claims,
                    self.leases.clone(),
                    self.settings.database.group_linger,
                ),
                provider: self.provider.clone(),
                max_attempts: self.settings.payments.max_attempts,
                retry_window: self.settings.payments.retry_window,
                max_risk_score: self.settings.payments.max_risk_score,
                seal: self.seal.clone(),
                fail_after_provider_call: self.settings.chaos.redeliver
                    == crate::config::Redeliver::AfterProviderCall,
                pending_limit: self.settings.watchdog.pending_limit,
            }),
        );
        self.step(
            tasks,
            Arc::new(CaptureStep {
                pool: self.pool.clone(),
                provider: self.provider.clone(),
            }),
        );
        self.step(
            tasks,
            Arc::new(RefundStep {
                pool: self.pool.clone(),
                provider: self.provider.clone(),
            }),
        );
        let (bus, breaker, token) = (
            self.bus.clone(),
            self.breaker.clone(),
            self.shutdown.clone(),
        );
        tasks.spawn(async move {
            crate::payments::breaker_status::report_breaker(bus, breaker, token).await;
            ("breaker-status".to_owned(), Ok(()))
        });
    }

    /// The order (confirm) and order-lifecycle steps.
    fn order(&self, tasks: &mut JoinSet<TaskResult>) {
        self.step(
            tasks,
            Arc::new(Batch(Arc::new(OrderStep {
                leases: self.leases.clone(),
            }))),
        );
        self.step(
            tasks,
            Arc::new(LifecycleStep {
                pool: self.pool.clone(),
            }),
        );
    }

    /// The compensate step, the watchdog, the pruner and the payment reconciler.
    fn compensate(&self, tasks: &mut JoinSet<TaskResult>) {
        self.step(
            tasks,
            Arc::new(CompensateStep {
                pool: self.pool.clone(),
                provider: self.provider.clone(),
                notices: Some(self.bus.client().clone()),
            }),
        );
        let watchdog = Watchdog {
            pool: self.pool.clone(),
            bus: self.bus.clone(),
            pending_limit: self.settings.watchdog.pending_limit,
            interval: self.settings.watchdog.interval,
            batch: self.settings.watchdog.batch,
        };
        let token = self.shutdown.clone();
        tasks.spawn(async move {
            watchdog.run(token).await;
            ("watchdog".to_owned(), Ok(()))
        });
        let pruner = crate::retention::Pruner {
            pool: self.pool.clone(),
            settings: self.settings.retention.clone(),
        };
        let token = self.shutdown.clone();
        tasks.spawn(async move {
            pruner.run(token).await;
            ("pruner".to_owned(), Ok(()))
        });
        let (pool, provider, token) = (
            self.pool.clone(),
            self.provider.clone(),
            self.shutdown.clone(),
        );
        let (delay, every, batch) = (
            self.settings.payments.reconcile_delay,
            self.settings.watchdog.interval,
            self.settings.watchdog.batch,
        );
        tasks.spawn(async move {
            reconcile::run(pool, provider, delay, every, batch, token).await;
            ("payment-reconciler".to_owned(), Ok(()))
        });
    }
}

/// Lets `build` spawn different step types through one closure.
trait StepLauncher: Send + Sync {
    fn launch(
        self: Arc<Self>,
        bus: Bus,
        settings: Settings,
        token: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TaskResult> + Send>>;
}

/// A batch-native step, launched through the same closure.
struct Batch<S>(Arc<S>);

impl<S: BatchStep> StepLauncher for Batch<S> {
    fn launch(
        self: Arc<Self>,
        bus: Bus,
        settings: Settings,
        token: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TaskResult> + Send>> {
        Box::pin(async move {
            let name = self.0.durable().to_owned();
            let result = crate::saga::batch::run(
                self.0.clone(),
                bus,
                settings.consumer,
                settings.chaos.redeliver,
                token,
            )
            .await
            .map_err(TaskError::from);
            (name, result)
        })
    }
}

impl<S: Step> StepLauncher for S {
    fn launch(
        self: Arc<Self>,
        bus: Bus,
        settings: Settings,
        token: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TaskResult> + Send>> {
        Box::pin(async move {
            let name = self.durable().to_owned();
            let result = runner::run(
                self,
                bus,
                settings.consumer,
                settings.chaos.redeliver,
                token,
            )
            .await
            .map_err(TaskError::from);
            (name, result)
        })
    }
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
        assert_eq!(threads("psp"), Ok(0));
        assert_eq!(threads("edge,reserve"), Ok(0));
        assert_eq!(threads("all"), Ok(0));
    }
}
