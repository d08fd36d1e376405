//! One benchmark: its options, its runs (each with its own nats-server, database and processes) and the report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use crate::load::Scenario;
use crate::procs::{
    cores, cpu_seconds, cpu_seconds_of_command, free_port, nats_server_bin, peak_rss_mib,
    wait_ready, Proc,
};
pub use crate::stats::RunStats;
use crate::{ceiling, load};

use checkout::config::Settings;
use checkout::saga::events::{Checkout, Event, Line};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("setup: {0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Db(#[from] checkout::db::DbError),
}

/// `fsync` policy of the nats-server a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Default,
    Always,
}

/// `--sync`: which fsync policies to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncChoice {
    Default,
    Always,
    Both,
}

impl SyncChoice {
    /// The runs this asks for at one process per role, then one per extra process count.
    pub fn runs(self, processes: &[usize]) -> Vec<(Sync, usize)> {
        let mut runs: Vec<(Sync, usize)> = match self {
            Self::Default => vec![(Sync::Default, 1)],
            Self::Always => vec![(Sync::Always, 1)],
            Self::Both => vec![(Sync::Default, 1), (Sync::Always, 1)],
        };
        runs.extend(
            processes
                .iter()
                .filter(|p| **p > 1)
                .map(|p| (Sync::Default, *p)),
        );
        runs
    }
}

/// What `checkout-bench` was asked to do: the command line, parsed once.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "checkout-bench",
    version,
    about = "Benchmark the checkout pipeline against this machine's own ceiling (BENCHMARKS.md)"
)]
pub struct BenchOptions {
    /// spread (many SKUs), hot (flash sale on one SKU) or mixed (declines and slow payments).
    #[arg(long, default_value = "spread")]
    pub scenario: Scenario,
    /// Concurrent buyers (closed loop), or the in-flight cap with --rate.
    #[arg(long, default_value_t = 64)]
    pub users: usize,
    /// Length of each run.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Open loop: checkouts started per second, whatever the latency.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// SKUs in the spread and mixed scenarios.
    #[arg(long, default_value_t = 200)]
    pub skus: usize,
    /// Units on sale in the flash sale.
    #[arg(long, default_value_t = 50)]
    pub hot_units: i64,
    /// Buyers in the flash sale.
    #[arg(long, default_value_t = 500)]
    pub hot_buyers: usize,
    /// nats-server fsync policy.
    #[arg(long, value_enum, default_value_t = SyncChoice::Both)]
    pub sync: SyncChoice,
    /// Processes per consumer role to compare, e.g. 1,2.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub processes: Vec<usize>,
    /// Saga partitions on the bench's nats-server (`nats.partitions`): K > 1 adds the servers'
    /// subject mapping, so the saga runs on K streams.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub partitions: u32,
    /// Skip the flash-sale comparison run.
    #[arg(long)]
    pub no_hot: bool,
    /// The peak of a sale: the flash sale with 10,000 buyers for 1,000 units.
    #[arg(long)]
    pub surge: bool,
    /// Load before each measured run (then ANALYZE): a shop's database is not empty, and
    /// plans made on empty tables (sequential scans) would be measured instead of ours.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Length of each ceiling measurement.
    #[arg(long = "ceiling", default_value = "4s", value_parser = humantime::parse_duration)]
    pub ceiling_duration: Duration,
    /// Register three merchant webhook endpoints for `order.confirmed` before the load: one
    /// healthy, one answering after 2 s, one dead. The report gives the healthy one's delivery
    /// latency (from the checkout's acceptance to its arrival).
    #[arg(long)]
    pub webhooks: bool,
    /// With `--webhooks`: the measured run alternates phases of this length with the endpoints
    /// enabled and disabled (on, off, off, on, on, off, ...), so both are measured on
    /// the same processes, database and minutes of the host; the report gives each side's rate.
    #[arg(long, requires = "webhooks", value_parser = humantime::parse_duration)]
    pub alternate: Option<Duration>,
    /// Where each run keeps its logs and its nats-server's store.
    #[arg(long, default_value = ".run/bench")]
    pub work_dir: PathBuf,
}

impl BenchOptions {
    /// The options as the runs read them: `--surge` sets the flash sale's size.
    pub fn resolved(mut self) -> Self {
        if self.surge {
            self.hot_units = 1000;
            self.hot_buyers = 10_000;
        }
        self
    }

    /// Runs to make: (sync policy, processes per consumer role).
    fn runs(&self) -> Vec<(Sync, usize)> {
        self.sync.runs(&self.processes)
    }

    /// Whether the flash sale runs after the main scenario, to compare hot with spread.
    fn with_hot(&self) -> bool {
        !self.no_hot && self.scenario != Scenario::Hot
    }
}

/// One run's outcome.
struct RunReport {
    label: String,
    stats: RunStats,
    ceiling_per_s: f64,
    js_rate: f64,
    pg_rate: f64,
    cpu_ms_per_checkout: Vec<(String, f64)>,
    /// What PostgreSQL did per checkout, as counted rather than timed.
    pg_work: PgWork,
    /// Peak resident memory per process, MiB.
    peak_rss_mib: Vec<(String, f64)>,
    note: String,
}

/// PostgreSQL's work, counted: its counters do not depend on how fast the host is that minute,
/// so two builds compare on them where their rates differ by less than the host's noise.
#[derive(Default)]
struct PgWork {
    transactions: f64,
    rows_written: f64,
    wal_kb: f64,
}

impl PgWork {
    /// The bench database's counters now (WAL is the server's: nothing else writes during a
    /// run). The statistics reach the view within about a second: small against a run.
    async fn read(pool: &sqlx::PgPool) -> Self {
        let row: Result<(i64, i64, f64), _> = sqlx::query_as(
            "SELECT (xact_commit + xact_rollback)::bigint,
                    (tup_inserted + tup_updated + tup_deleted)::bigint,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await;
        row.map_or_else(
            |_| Self::default(),
            |(t, r, w)| Self {
                transactions: t as f64,
                rows_written: r as f64,
                wal_kb: w / 1024.0,
            },
        )
    }

    /// The difference from `before`, per checkout.
    fn since(self, before: &Self, checkouts: f64) -> Self {
        Self {
            transactions: (self.transactions - before.transactions) / checkouts,
            rows_written: (self.rows_written - before.rows_written) / checkouts,
            wal_kb: (self.wal_kb - before.wal_kb) / checkouts,
        }
    }
}

/// Publishes and commits one confirmed checkout costs on the happy path.
const PUBLISHES_PER_CHECKOUT: f64 = 4.0; // requested, reserved, authorized, confirmed
const COMMITS_PER_CHECKOUT: f64 = 5.0; // cart add, checkout, reserve, authorize, order (with the stock)

/// Runs every configured run and prints the report; the last line is machine-readable.
pub async fn run(mut settings: Settings, opts: BenchOptions) -> Result<(), BenchError> {
    std::fs::create_dir_all(&opts.work_dir)?;
    // Its own token secret: the edges it starts refuse the built-in development one.
    settings.auth.jwt_secret = checkout::config::Secret::new(format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    ));
    // Sealed payment tokens, as in production, so their cost is in the figures.
    settings.payments.token_keys = checkout::config::Secret::new(format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    ));
    let mut reports = Vec::new();
    for (i, (sync, processes)) in opts.runs().iter().enumerate() {
        let label = format!(
            "{:?} sync={} processes/role={}",
            opts.scenario,
            match sync {
                Sync::Default => "default",
                Sync::Always => "always",
            },
            processes
        )
        .to_lowercase()
            + &partitions_label(opts.partitions);
        eprintln!("== run {}: {label}", i + 1);
        let measure_ceiling = *processes == 1;
        reports.push(
            one_run(
                &settings,
                &opts,
                opts.scenario,
                *sync,
                *processes,
                measure_ceiling,
                label,
                i,
            )
            .await?,
        );
    }
    if opts.with_hot() {
        let label = format!(
            "hot flash sale: {} units, {} buyers, sync=default processes/role=1",
            opts.hot_units, opts.hot_buyers
        );
        eprintln!("== run {}: {label}", reports.len() + 1);
        reports.push(
            one_run(
                &settings,
                &opts,
                Scenario::Hot,
                Sync::Default,
                1,
                false,
                label,
                reports.len(),
            )
            .await?,
        );
    }
    print_report(&opts, &mut reports);
    Ok(())
}

/// What a run's label adds for partitions (nothing for one).
fn partitions_label(partitions: u32) -> String {
    if partitions > 1 {
        format!(" partitions={partitions}")
    } else {
        String::new()
    }
}

/// The servers' subject mapping for K partitions, as `nats/cluster/partitions.conf` has it
/// for three (none for one: a single `CHECKOUT` stream stores `checkout.>`).
fn partition_mapping(partitions: u32) -> String {
    if partitions > 1 {
        format!(
            "mappings = {{\n  \"checkout.*.*\": \"checkout.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({partitions},2)}}}}\"\n}}\n"
        )
    } else {
        String::new()
    }
}

#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
async fn one_run(
    settings: &Settings,
    opts: &BenchOptions,
    scenario: Scenario,
    sync: Sync,
    processes: usize,
    measure_ceiling: bool,
    label: String,
    index: usize,
) -> Result<RunReport, BenchError> {
    let dir = opts.work_dir.join(format!("run-{index}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // NATS: its own server, store and port.
    let nats_port = free_port()?;
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{nats_port}\nmax_payload: 1MB\njetstream {{\n  store_dir: \"{}\"\n{}}}\n{}",
            dir.join("js").display(),
            if sync == Sync::Always { "  sync_interval: always\n" } else { "" },
            partition_mapping(opts.partitions),
        ),
    )?;
    let nats = Proc::spawn(
        "nats-server",
        &nats_server_bin(),
        &["-c", &conf.to_string_lossy()],
        &[],
        &dir.join("nats.log"),
    )?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    // PostgreSQL: a fresh database on the configured server.
    let mut db = settings.database.clone();
    let base_url = db.url.expose().to_owned();
    let db_name = format!("checkout_bench_{}_{index}", std::process::id());
    db.url = checkout::config::Secret::new(with_database(&base_url, &db_name));
    checkout::db::create_if_missing(&db).await?;
    let pool = checkout::db::connect(&db).await?;
    checkout::db::migrate(&pool).await?;

    let http_port = free_port()?;
    let psp_port = free_port()?;
    let env = vec![
        ("CHECKOUT__NATS__URL".to_owned(), nats_url.clone()),
        (
            "CHECKOUT__DATABASE__URL".to_owned(),
            db.url.expose().to_owned(),
        ),
        (
            "CHECKOUT__HTTP__ADDR".to_owned(),
            format!("127.0.0.1:{http_port}"),
        ),
        (
            "CHECKOUT__PSP__URL".to_owned(),
            format!("http://127.0.0.1:{psp_port}"),
        ),
        (
            "CHECKOUT__AUTH__JWT_SECRET".to_owned(),
            settings.auth.jwt_secret.expose().to_owned(),
        ),
        (
            "CHECKOUT__PAYMENTS__TOKEN_KEYS".to_owned(),
            settings.payments.token_keys.expose().to_owned(),
        ),
        (
            "CHECKOUT__DATABASE__MIGRATE_ON_START".to_owned(),
            "false".to_owned(),
        ),
        (
            "CHECKOUT__NATS__PARTITIONS".to_owned(),
            opts.partitions.to_string(),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
        // --webhooks: the receivers run on this machine.
        (
            "CHECKOUT__WEBHOOKS__ALLOW_PRIVATE_TARGETS".to_owned(),
            "true".to_owned(),
        ),
        // One process per role on one host: each serves /metrics on a port of its own.
        (
            "CHECKOUT__METRICS__ADDR".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        // The sandbox's protections must not be what the benchmark measures.
        (
            "CHECKOUT__PAYMENTS__RATE_LIMIT_PER_S".to_owned(),
            BENCH_RATE_LIMIT.to_string(),
        ),
        (
            "CHECKOUT__PAYMENTS__BREAKER_MIN_CALLS".to_owned(),
            "1000000".to_owned(),
        ),
        // Each closed-loop buyer checks out again and again with one token: per-user limits
        // are for people, not for the load generator.
        (
            "CHECKOUT__EDGE__REQUESTS_PER_USER_PER_S".to_owned(),
            "1000000".to_owned(),
        ),
        (
            "CHECKOUT__EDGE__REQUESTS_PER_USER_BURST".to_owned(),
            "1000000".to_owned(),
        ),
        (
            "CHECKOUT__EDGE__CHECKOUTS_PER_USER_PER_MIN".to_owned(),
            "1000000".to_owned(),
        ),
        (
            "CHECKOUT__EDGE__CHECKOUTS_PER_USER_BURST".to_owned(),
            "1000000".to_owned(),
        ),
    ];
    // The service and the provider are built beside this binary (one workspace).
    let bench = std::env::current_exe()?;
    let exe = bench.with_file_name("checkout");
    let psp_listen = format!("127.0.0.1:{psp_port}");
    let http = reqwest::Client::new();
    wait_nats(nats_port).await?;
    let mut roles = vec![Proc::spawn(
        SANDBOX_PSP,
        &bench.with_file_name("sandbox-psp"),
        &["--listen", &psp_listen],
        &env,
        &dir.join("psp.log"),
    )?];
    roles.push(Proc::spawn(
        "edge",
        &exe,
        &["run", "edge"],
        &env,
        &dir.join("edge.log"),
    )?);
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{http_port}/readyz"),
        Duration::from_secs(30),
    )
    .await?;
    for role in ["reserve", "authorize", "order", "compensate"] {
        for p in 0..processes {
            roles.push(Proc::spawn(
                role,
                &exe,
                &["run", role],
                &env,
                &dir.join(format!("{role}-{p}.log")),
            )?);
        }
    }
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{psp_port}/healthz"),
        Duration::from_secs(30),
    )
    .await?;

    let (mut js_rate, mut pg_rate, mut ceiling_per_s) = (0.0, 0.0, 0.0);
    if measure_ceiling {
        let payload = sample_payload_size();
        js_rate = ceiling::jetstream_publish_rate(
            &nats_url,
            &settings.nats,
            payload,
            opts.users,
            opts.ceiling_duration,
        )
        .await?;
        pg_rate =
            ceiling::postgres_commit_rate(&pool, opts.users.min(64), opts.ceiling_duration).await?;
        ceiling_per_s = (js_rate / PUBLISHES_PER_CHECKOUT).min(pg_rate / COMMITS_PER_CHECKOUT);
        eprintln!(
            "   ceiling: JetStream {js_rate:.0} publishes/s ({payload} B, {} in flight), PostgreSQL {pg_rate:.0} commits/s -> {ceiling_per_s:.0} checkouts/s",
            opts.users
        );
    }
    // A role that refused to start (an old nats-server, a bad setting) would leave every
    // checkout unsettled for the whole run: say which one and why instead.
    if let Some(dead) = roles.iter_mut().find_map(|p| (!p.alive()).then_some(&*p)) {
        return Err(BenchError::Setup(format!(
            "{} exited before the load started: {}",
            dead.name,
            dead.last_words()
        )));
    }

    let admin = checkout::auth::mint(
        settings.auth.jwt_secret.expose(),
        "bench-admin",
        true,
        Duration::from_secs(3600),
    )
    .map_err(|e| BenchError::Setup(e.to_string()))?;
    let receivers = if opts.webhooks {
        let receivers = crate::receivers::Receivers::start().await?;
        receivers
            .register(&http, &format!("http://127.0.0.1:{http_port}"), &admin)
            .await?;
        Some(receivers)
    } else {
        None
    };
    if !opts.warmup.is_zero() {
        let warm = load::LoadOptions {
            base: format!("http://127.0.0.1:{http_port}"),
            nats_url: nats_url.clone(),
            jwt_secret: settings.auth.jwt_secret.expose().to_owned(),
            scenario: Scenario::Spread,
            users: opts.users,
            duration: opts.warmup,
            rate: None,
            seed: opts.seed.wrapping_add(1),
            skus: opts.skus,
            hot_units: opts.hot_units,
            hot_buyers: opts.hot_buyers,
            quiet: true,
            prepare: true,
        };
        load::drive(&warm).await?;
        sqlx::query("ANALYZE")
            .execute(&pool)
            .await
            .map_err(|e| BenchError::Setup(format!("analyze: {e}")))?;
    }
    if let Some(r) = &receivers {
        r.reset();
    }
    let cpu_before: Vec<f64> = roles.iter().map(|p| cpu_seconds(p.pid())).collect();
    let me_before = cpu_seconds(std::process::id());
    let nats_before = cpu_seconds(nats.pid());
    let pg_before = cpu_seconds_of_command("postgres");
    let work_before = PgWork::read(&pool).await;
    let load = load::LoadOptions {
        base: format!("http://127.0.0.1:{http_port}"),
        nats_url: nats_url.clone(),
        jwt_secret: settings.auth.jwt_secret.expose().to_owned(),
        scenario,
        users: opts.users,
        duration: opts.duration,
        rate: opts.rate,
        seed: opts.seed,
        skus: opts.skus,
        hot_units: opts.hot_units,
        hot_buyers: opts.hot_buyers,
        quiet: false,
        prepare: true,
    };
    let mut alternation = String::new();
    let stats = match (&receivers, opts.alternate) {
        (Some(r), Some(phase)) => {
            let (stats, said) = alternate(&load, r, &http, &admin, phase).await?;
            alternation = said;
            stats
        }
        _ => load::drive(&load).await?,
    };
    let pg_work = PgWork::read(&pool)
        .await
        .since(&work_before, stats.completed.max(1) as f64);
    let mut cpu: Vec<(String, f64)> = Vec::new();
    for (p, before) in roles.iter().zip(&cpu_before) {
        let used = cpu_seconds(p.pid()) - before;
        match cpu.iter_mut().find(|(n, _)| *n == p.name) {
            Some((_, total)) => *total += used,
            None => cpu.push((p.name.clone(), used)),
        }
    }
    cpu.push(("nats-server".into(), cpu_seconds(nats.pid()) - nats_before));
    cpu.push((
        LOAD_GENERATOR.into(),
        cpu_seconds(std::process::id()) - me_before,
    ));
    cpu.push((
        "postgres".into(),
        cpu_seconds_of_command("postgres") - pg_before,
    ));
    let per = stats.completed.max(1) as f64;
    let cpu_ms_per_checkout = cpu
        .into_iter()
        .map(|(n, s)| (n, s * 1000.0 / per))
        .collect();

    let mut peak_rss: Vec<(String, f64)> = Vec::new();
    for p in &roles {
        let rss = peak_rss_mib(p.pid());
        match peak_rss.iter_mut().find(|(n, _)| *n == p.name) {
            Some((_, peak)) => *peak = peak.max(rss),
            None => peak_rss.push((p.name.clone(), rss)),
        }
    }
    peak_rss.push(("nats-server".into(), peak_rss_mib(nats.pid())));
    let mut note = String::new();
    if let Some(r) = &receivers {
        // The messages of the run's last checkouts are still on their way: give them a moment.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (heard, p50, p99) = r.summary();
        let _ = write!(
            note,
            " webhooks (3 endpoints: healthy, 2 s slow, dead): the healthy one heard {heard} \
             messages, p50 {p50:.0} ms, p99 {p99:.0} ms from the checkout's acceptance;{alternation}"
        );
    }
    if scenario == Scenario::Hot {
        note = hot_check(&pool, opts, &stats).await?;
    }
    let dead: Vec<String> = roles
        .iter_mut()
        .filter_map(|p| (!p.alive()).then(|| p.name.clone()))
        .collect();
    if !dead.is_empty() {
        let _ = write!(note, " processes that died: {dead:?}");
    }
    drop(roles);
    drop(nats);
    pool.close().await;
    drop_database(&base_url, &db_name).await;
    Ok(RunReport {
        label,
        stats,
        ceiling_per_s,
        js_rate,
        pg_rate,
        cpu_ms_per_checkout,
        pg_work,
        peak_rss_mib: peak_rss,
        note,
    })
}

/// The payment rate limit the benchmark runs with: far above anything it can reach.
const BENCH_RATE_LIMIT: f64 = 1_000_000.0;

async fn wait_nats(port: u16) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err(BenchError::Setup("nats-server did not start".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs `load` in phases of `phase`, the endpoints on in the first and then every other pair
/// (on, off, off, on, on, off, ...: a drift of the host over the run falls on both sides
/// alike). Answers the whole run's numbers and what each side did.
async fn alternate(
    load: &load::LoadOptions,
    receivers: &crate::receivers::Receivers,
    http: &reqwest::Client,
    admin: &str,
    phase: Duration,
) -> Result<(crate::stats::RunStats, String), BenchError> {
    let phases = (load.duration.as_secs_f64() / phase.as_secs_f64().max(0.1)).round() as usize;
    // Whole blocks of four, so each side has as many early phases as late ones.
    let phases = (phases / 4).max(1) * 4;
    let mut all = crate::stats::RunStats::default();
    let (mut on, mut off) = ((0u64, 0.0f64), (0u64, 0.0f64));
    let mut rates = Vec::new();
    let mut registered = true;
    for i in 0..phases {
        let wanted = matches!(i % 4, 0 | 3);
        if wanted != registered {
            receivers.switch(wanted, http, &load.base, admin).await?;
            registered = wanted;
        }
        let one = load::LoadOptions {
            duration: phase,
            // Buyers of their own (the warm-up's are seed + 1: theirs would repeat its
            // idempotency keys, and wait for settlements that came long ago).
            seed: load.seed.wrapping_add(0x1_0000 + i as u64),
            quiet: true,
            prepare: false,
            ..load.clone()
        };
        let stats = load::drive(&one).await?;
        let side = if wanted { &mut on } else { &mut off };
        side.0 += stats.completed;
        side.1 += stats.elapsed.as_secs_f64();
        rates.push(stats.per_second());
        all.elapsed += stats.elapsed;
        all.merge(stats);
    }
    let rate = |(n, secs): (u64, f64)| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let (with, without) = (rate(on), rate(off));
    let phases_said: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    let said = format!(
        " alternating every {phase:?} (on, off, off, on, ...): with the endpoints {with:.1}/s, \
         without {without:.1}/s, with/without {:.3} (phases: {});",
        with / without.max(0.001),
        phases_said.join(" ")
    );
    Ok((all, said))
}

/// After a flash sale: nothing oversold, nothing left reserved, every buyer settled.
async fn hot_check(
    pool: &sqlx::PgPool,
    opts: &BenchOptions,
    stats: &RunStats,
) -> Result<String, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (on_hand, reserved) = loop {
        let (on_hand, reserved): (i32, i32) =
            sqlx::query_as("SELECT on_hand, reserved FROM inventory.stock WHERE sku = 'HOT-1'")
                .fetch_one(pool)
                .await?;
        if reserved == 0 || Instant::now() > deadline {
            break (on_hand, reserved);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sold = opts.hot_units - i64::from(on_hand);
    let expected = opts.hot_units.min(opts.hot_buyers as i64);
    let ok = sold == expected
        && stats.confirmed as i64 == expected
        && reserved == 0
        && stats.completed as usize == opts.hot_buyers;
    let ok = ok && stats.errors == 0;
    Ok(format!(
        "flash sale {}: {} confirmed, {} failed in the saga, {} answered out_of_stock at the edge, {} of {} buyers settled in {:.1} s, {} retries after Retry-After, {} errors, on_hand {on_hand}, reserved {reserved}",
        if ok { "correct" } else { "WRONG" },
        stats.confirmed,
        stats.failed,
        stats.refused,
        stats.completed,
        opts.hot_buyers,
        stats.elapsed.as_secs_f64(),
        stats.retries,
        stats.errors
    ))
}

async fn drop_database(base_url: &str, name: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(&with_database(base_url, "postgres")).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

/// The bench's own process, as named in the CPU figures.
const LOAD_GENERATOR: &str = "load generator";
/// The sandbox payment provider's process, as named in the CPU figures.
const SANDBOX_PSP: &str = "psp";

/// The CPU per checkout of the pipeline's own processes, and of the two that stand in for
/// the world around it (the buyers and the payment provider).
fn cpu_totals(per_process: &[(String, f64)]) -> (f64, f64) {
    per_process
        .iter()
        .fold((0.0, 0.0), |(pipeline, around), (name, ms)| {
            if name == LOAD_GENERATOR || name == SANDBOX_PSP {
                (pipeline, around + ms)
            } else {
                (pipeline + ms, around)
            }
        })
}

/// `url` naming database `name` instead, keeping its query (`?host=/run/postgresql` for a
/// Unix socket, say).
fn with_database(url: &str, name: &str) -> String {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let server = match path.rsplit_once('/') {
        // `postgres://host:port/db`: the last slash is the database's, not the scheme's.
        Some((server, _)) if !server.ends_with('/') => server,
        _ => path,
    };
    if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    }
}

/// The size of a typical `checkout.requested` payload (one line).
fn sample_payload_size() -> usize {
    let (Ok(sku), Ok(qty), Ok(currency)) = (
        checkout::domain::Sku::parse("BENCH-00001"),
        checkout::domain::Quantity::new(1),
        checkout::domain::Currency::parse("USD"),
    ) else {
        return 700;
    };
    let checkout = Checkout {
        order_id: uuid::Uuid::now_v7(),
        user_id: "bench-42-1".into(),
        cart_id: uuid::Uuid::now_v7(),
        items: vec![Line {
            sku,
            qty,
            unit_price: rust_decimal::Decimal::new(1650, 2),
            line_total: rust_decimal::Decimal::new(1650, 2),
            discount: rust_decimal::Decimal::ZERO,
            tax: rust_decimal::Decimal::new(314, 2),
        }],
        subtotal: rust_decimal::Decimal::new(1650, 2),
        discount: rust_decimal::Decimal::ZERO,
        tax: rust_decimal::Decimal::ZERO,
        shipping: rust_decimal::Decimal::ZERO,
        total: rust_decimal::Decimal::new(1650, 2),
        currency,
        payment_token: "tok_visa".into(),
        // Events on the bus carry no address (it stays in the edge's stored request).
        address: None,
        requested_at: chrono::Utc::now(),
        promo_code: None,
        shipping_method: Some("standard".into()),
        return_url: None,
    };
    Event::Requested { checkout }
        .encode()
        .map_or(700, |b| b.len())
}

/// Names what limited a run: the machine's CPU (and who used it), or waiting.
fn binding(r: &mut RunReport) -> String {
    let rate = r.stats.per_second();
    let cores_used: f64 = r
        .cpu_ms_per_checkout
        .iter()
        .map(|(_, ms)| ms * rate / 1000.0)
        .sum();
    let cores = cores();
    let mut users: Vec<&(String, f64)> = r.cpu_ms_per_checkout.iter().collect();
    users.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = users
        .iter()
        .take(3)
        .map(|(n, ms)| format!("{n} {:.0}%", ms * rate / 10.0 / cores))
        .collect();
    if cores_used >= cores * 0.85 {
        format!(
            "CPU: {cores_used:.2} of {cores:.0} cores busy (of the machine: {})",
            top.join(", ")
        )
    } else {
        format!(
            "not CPU ({cores_used:.2} of {cores:.0} cores busy): latency and waiting (locks, round trips, the closed loop's think time)"
        )
    }
}

fn print_report(opts: &BenchOptions, reports: &mut [RunReport]) {
    println!();
    let settings = checkout::config::Settings::load().ok();
    if let Some(s) = settings {
        println!(
            "settings that could bind: payments.rate_limit_per_s={BENCH_RATE_LIMIT} (bench), breaker_min_calls=1000000 (bench), per-user limits 1000000 (bench), edge.max_in_flight={}, edge.admission_wait={:?}, database.max_connections={} per process, consumer.concurrency={}, consumer.batch={}, consumer.linger={:?}, nats.partitions={}, users={}",
            s.edge.max_in_flight, s.edge.admission_wait, s.database.max_connections, s.consumer.concurrency, s.consumer.batch, s.consumer.linger, opts.partitions, opts.users
        );
    }
    println!(
        "checkout-bench: scenario={:?} users={} duration={:?} rate={} seed={}",
        opts.scenario,
        opts.users,
        opts.duration,
        opts.rate
            .map_or("closed-loop".to_owned(), |r| format!("{r}/s")),
        opts.seed
    );
    println!(
        "{:<52} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "run", "settled/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "failed", "errors"
    );
    for r in reports.iter_mut() {
        let s = &mut r.stats;
        println!(
            "{:<52} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>7}",
            r.label,
            s.per_second(),
            s.quantile_ms(0.5),
            s.quantile_ms(0.95),
            s.quantile_ms(0.99),
            s.quantile_ms(1.0),
            s.failed,
            s.errors
        );
        if r.ceiling_per_s > 0.0 {
            println!(
                "    ceiling {:.0}/s (JetStream {:.0} pub/s / {PUBLISHES_PER_CHECKOUT}, PostgreSQL {:.0} commits/s / {COMMITS_PER_CHECKOUT}); ratio {:.3}",
                r.ceiling_per_s,
                r.js_rate,
                r.pg_rate,
                s.per_second() / r.ceiling_per_s
            );
        }
        let cpu: Vec<String> = r
            .cpu_ms_per_checkout
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.2}"))
            .collect();
        println!("    CPU ms per checkout: {}", cpu.join(", "));
        let (pipeline, around) = cpu_totals(&r.cpu_ms_per_checkout);
        println!(
            "    CPU ms per checkout in all: {:.2}, of which the pipeline (edge, roles, nats-server, postgres) {pipeline:.2}, the load generator and sandbox PSP {around:.2}",
            pipeline + around
        );
        println!(
            "    PostgreSQL per checkout: {:.2} transactions, {:.2} rows written, {:.1} KB of WAL",
            r.pg_work.transactions, r.pg_work.rows_written, r.pg_work.wal_kb
        );
        println!("    bound by: {}", binding(r));
        let rss: Vec<String> = r
            .peak_rss_mib
            .iter()
            .map(|(n, mib)| format!("{n} {mib:.0}"))
            .collect();
        println!("    peak RSS MiB: {}", rss.join(", "));
        if !r.note.is_empty() {
            println!("    {}", r.note.trim());
        }
    }
    // Issue #12: a flash sale is never slower than spread traffic. Its buyers all start at
    // once, so its latency is the line; the rates are what compare.
    if let (true, [spread, .., hot]) = (opts.with_hot(), &reports[..]) {
        let (spread, hot) = (spread.stats.per_second(), hot.stats.per_second());
        if spread > 0.0 {
            println!(
                "flash sale against spread: {hot:.1}/s is {:.0} % of {spread:.1}/s",
                100.0 * hot / spread
            );
        }
    }
    if let Some(first) = reports.first_mut() {
        let rate = first.stats.per_second();
        let ratio = if first.ceiling_per_s > 0.0 {
            rate / first.ceiling_per_s
        } else {
            0.0
        };
        let (pipeline, around) = cpu_totals(&first.cpu_ms_per_checkout);
        println!(
            "RESULT checkouts_per_s={:.1} p50_ms={:.1} p99_ms={:.1} ceiling_per_s={:.1} ratio={:.3} cpu_ms={:.2} pipeline_cpu_ms={pipeline:.2}",
            rate,
            first.stats.quantile_ms(0.5),
            first.stats.quantile_ms(0.99),
            first.ceiling_per_s,
            ratio,
            pipeline + around
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_totals, partition_mapping, with_database};

    #[test]
    fn the_bench_maps_partitions_as_the_cluster_does() {
        assert_eq!(partition_mapping(1), "");
        let cluster = include_str!("../../../nats/cluster/partitions.conf");
        let mapping = partition_mapping(3);
        let line = mapping
            .lines()
            .find(|l| l.contains("partition("))
            .expect("a mapping line");
        assert!(
            cluster.lines().any(|l| l == line),
            "{line:?} is not in nats/cluster/partitions.conf"
        );
    }

    #[test]
    fn the_pipelines_cpu_leaves_out_the_buyers_and_the_provider() {
        let per_process = [
            ("psp".to_owned(), 0.25),
            ("edge".to_owned(), 0.5),
            ("nats-server".to_owned(), 0.25),
            ("load generator".to_owned(), 0.5),
            ("postgres".to_owned(), 1.0),
        ];
        assert_eq!(cpu_totals(&per_process), (1.75, 0.75));
    }

    #[test]
    fn a_bench_database_keeps_the_servers_address_and_options() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/checkout", "b1"),
            "postgres://u@127.0.0.1:5432/b1"
        );
        assert_eq!(
            with_database("postgres://u@localhost/checkout?host=/run/postgresql", "b1"),
            "postgres://u@localhost/b1?host=/run/postgresql"
        );
        assert_eq!(
            with_database("postgres://u@localhost:5432", "b1"),
            "postgres://u@localhost:5432/b1"
        );
    }
}
