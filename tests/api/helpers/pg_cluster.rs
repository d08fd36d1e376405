//! PostgreSQL high availability (#31): `PgCluster`, a pg_auto_failover monitor and two data
//! nodes (one primary, one synchronous standby) on free ports in a temporary directory, tuned
//! as scripts/pg-cluster.sh is (failover in seconds; docs/operations.md). Every process runs
//! as the `postgres` user when the tests run as root, in a process group of its own, so a node
//! can be SIGKILLed for real: pg_autoctl, its postgres and every backend.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor, PgConnection, Row};

use super::app::eventually;
use super::servers::port;

/// How fast the monitor declares a primary dead and promotes its standby (defaults in the
/// comments); the same as scripts/pg-cluster.sh.
const MONITOR_SETTINGS: &[(&str, &str)] = &[
    ("pgautofailover.health_check_period", "1000"), // 5000 ms
    ("pgautofailover.health_check_timeout", "1000"), // 5000 ms
    ("pgautofailover.health_check_max_retries", "1"), // 2
    ("pgautofailover.health_check_retry_delay", "500"), // 2000 ms
    ("pgautofailover.node_considered_unhealthy_timeout", "2000"), // 20000 ms
    ("pgautofailover.primary_demote_timeout", "5000"), // 30000 ms
    ("pgautofailover.startup_grace_period", "1000"), // 10000 ms
];

/// One `pg_autoctl` node: the monitor or a data node.
struct Node {
    name: String,
    port: u16,
    pgdata: PathBuf,
    /// `pg_autoctl run`, the leader of its process group.
    child: Option<Child>,
}

/// A monitor and two data nodes, formed: one primary, one synchronous standby.
pub struct PgCluster {
    monitor: Node,
    nodes: Vec<Node>,
    /// The postgres user's uid and gid when the tests run as root.
    ids: Option<(u32, u32)>,
    bin: PathBuf,
    /// When each node was last started again (seconds since the epoch): the monitor's view
    /// from before does not count.
    restarted: [f64; 2],
    dir: tempfile::TempDir,
}

/// The newest installed PostgreSQL's bin directory.
fn pg_bindir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .last()
        .map(|v| v.join("bin"))
        .expect("PostgreSQL under /usr/lib/postgresql")
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("id runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a numeric id")
}

/// pg_autoctl, installed by scripts/ensure-pg-auto-failover.sh when missing (Debian, root).
fn ensure_pg_autoctl() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let found = Command::new("pg_autoctl")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ensure-pg-auto-failover.sh");
            let ok = Command::new(script).status().is_ok_and(|s| s.success());
            assert!(
                ok,
                "pg_autoctl (pg_auto_failover) is not installed and could not be"
            );
        }
    });
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The first line of a pid file, as a pid.
fn pid_in(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A process's state letter and parent, from /proc.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Running, and not a zombie: a killed node's orphans may wait a while for PID 1 to reap them.
fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// PostgreSQL's children make themselves process-group leaders: the group kill misses them.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent))
                .collect()
        })
        .unwrap_or_default()
}

async fn connect(port: u16, db: &str) -> Option<PgConnection> {
    let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/{db}");
    tokio::time::timeout(Duration::from_secs(2), PgConnection::connect(&url))
        .await
        .ok()?
        .ok()
}

impl Node {
    /// SIGKILL the process group and the postmaster's children in one kill(1): nothing flushed.
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut targets = vec![format!("-{}", child.id())];
        if let Some(postmaster) = pid_in(&self.pgdata.join("postmaster.pid")) {
            targets.extend(children_of(postmaster).iter().map(u32::to_string));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--"])
            .args(&targets)
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    }
}

impl PgCluster {
    /// Monitor + two data nodes, formed: one primary, one synchronous standby.
    pub async fn start() -> Self {
        ensure_pg_autoctl();
        let dir = tempfile::tempdir().expect("temp dir");
        let ids = (id(&["-u"]) == 0).then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])));
        for sub in ["config", "share", "run"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("xdg dir");
        }
        if ids.is_some() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let node = |name: &str| Node {
            name: name.to_owned(),
            port: port(),
            pgdata: dir.path().join(name),
            child: None,
        };
        let mut cluster = Self {
            monitor: node("monitor"),
            nodes: vec![node("node1"), node("node2")],
            ids,
            bin: pg_bindir(),
            restarted: [0.0; 2],
            dir,
        };
        cluster.start_monitor().await;
        for i in 0..2 {
            // The second node clones the first, so the first must be running by then.
            cluster.create_node(i);
            cluster.restart(i);
        }
        cluster.wait_formed(Duration::from_secs(90)).await;
        // A primary cut off from monitor and standby stops itself once it has seen neither for
        // network_partition_timeout; it sees a dead standby for wal_sender_timeout (30 s as
        // pg_autoctl sets it). Not under ~8 s: see scripts/pg-cluster.sh.
        for i in 0..2 {
            let mut conn = connect(cluster.port(i), "postgres").await.expect("node up");
            conn.execute("ALTER SYSTEM SET wal_sender_timeout = '8s'")
                .await
                .expect("wal_sender_timeout set");
            conn.execute("SELECT pg_reload_conf()")
                .await
                .expect("reload");
        }
        cluster
    }

    /// A `pg_autoctl` (or other) command as postgres, with this cluster's XDG directories (where
    /// pg_autoctl keeps its configuration, state and pid files), in a process group of its own.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let root = self.dir.path();
        cmd.env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_DATA_HOME", root.join("share"))
            .env("XDG_RUNTIME_DIR", root.join("run"))
            .env("HOME", root)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGDATA")
            .env_remove("PGDATABASE")
            .env_remove("PGUSER")
            .stdin(Stdio::null())
            .process_group(0);
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Output appended to `<name>.log` in the cluster's directory.
    fn log_to(&self, cmd: &mut Command, name: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file");
        cmd.stdout(log.try_clone().expect("log file")).stderr(log);
    }

    /// Runs a foreground pg_autoctl command to its end (at most `within`), logged under `name`.
    fn run_to_end(&self, name: &str, args: &[&str], within: Duration) {
        let mut cmd = self.command("pg_autoctl");
        cmd.args(args);
        self.log_to(&mut cmd, name);
        let mut child = cmd.spawn().expect("pg_autoctl runs");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("pg_autoctl waited for") {
                assert!(
                    status.success(),
                    "pg_autoctl {args:?} failed; see {}/{name}.log",
                    self.dir.path().display()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.wait();
                panic!("pg_autoctl {args:?} did not finish in {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `pg_autoctl create <what>` on 127.0.0.1 (trust, no TLS, the newest pg_ctl), in the
    /// foreground.
    fn create(
        &self,
        log: &str,
        what: &str,
        pgdata: &std::path::Path,
        port: u16,
        extra: &[&str],
        within: Duration,
    ) {
        let pgdata = pgdata.display().to_string();
        let pgctl = self.bin.join("pg_ctl").display().to_string();
        let port = port.to_string();
        let mut args = vec![
            "create",
            what,
            "--pgdata",
            &pgdata,
            "--pgport",
            &port,
            "--hostname",
            "127.0.0.1",
            "--listen",
            "127.0.0.1",
            "--auth",
            "trust",
            "--no-ssl",
            "--pgctl",
            &pgctl,
        ];
        args.extend_from_slice(extra);
        self.run_to_end(log, &args, within);
    }

    fn monitor_uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.monitor.port
        )
    }

    async fn start_monitor(&mut self) {
        let pgdata = self.monitor.pgdata.display().to_string();
        self.create(
            "monitor",
            "monitor",
            &self.monitor.pgdata,
            self.monitor.port,
            &[],
            Duration::from_secs(60),
        );
        let mut cmd = self.command("pg_autoctl");
        cmd.args(["run", "--pgdata", &pgdata]);
        self.log_to(&mut cmd, "monitor");
        self.monitor.child = Some(cmd.spawn().expect("pg_autoctl run (monitor)"));
        let port = self.monitor.port;
        eventually(
            "the monitor to come up",
            Duration::from_secs(30),
            || async move {
                let Some(mut conn) = connect(port, "pg_auto_failover").await else {
                    return false;
                };
                sqlx::query("SELECT 1 FROM pg_extension WHERE extname = 'pgautofailover'")
                    .fetch_optional(&mut conn)
                    .await
                    .is_ok_and(|r| r.is_some())
            },
        )
        .await;
        let mut conn = connect(port, "pg_auto_failover").await.expect("monitor");
        for (name, value) in MONITOR_SETTINGS {
            // One statement per simple query: ALTER SYSTEM refuses a transaction block.
            conn.execute(format!("ALTER SYSTEM SET {name} = {value}").as_str())
                .await
                .expect("monitor setting");
        }
        conn.execute("SELECT pg_reload_conf()")
            .await
            .expect("reload");
    }

    /// `pg_autoctl create postgres` in the foreground, then the keeper's side of failover: a
    /// primary that reaches neither the monitor nor a standby for 2 s [20 s] stops itself.
    fn create_node(&self, i: usize) {
        let node = &self.nodes[i];
        let pgdata = node.pgdata.display().to_string();
        let monitor = self.monitor_uri();
        self.create(
            &node.name,
            "postgres",
            &node.pgdata,
            node.port,
            &["--name", &node.name, "--monitor", &monitor],
            Duration::from_secs(120),
        );
        self.run_to_end(
            &node.name,
            &[
                "config",
                "set",
                "--pgdata",
                &pgdata,
                "timeout.network_partition_timeout",
                "2",
            ],
            Duration::from_secs(30),
        );
    }

    /// Each node as the monitor sees it: (port, reported state, goal state, last report).
    async fn monitor_rows(&self) -> Vec<(u16, String, String, f64)> {
        let Some(mut conn) = connect(self.monitor.port, "pg_auto_failover").await else {
            return Vec::new();
        };
        sqlx::query(
            "SELECT nodeport, reportedstate::text, goalstate::text, \
             extract(epoch FROM reporttime)::float8 FROM pgautofailover.node ORDER BY nodeid",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                u16::try_from(r.get::<i32, _>(0)).unwrap_or(0),
                r.get(1),
                r.get(2),
                r.get(3),
            )
        })
        .collect()
    }

    /// libpq-style multi-host URL for database `db`, user postgres, target_session_attrs=read-write.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// Port of node i.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Creates database `db` on the current primary.
    pub async fn create_database(&self, db: &str) {
        let primary = self.primary().await.expect("a primary");
        let mut conn = connect(self.port(primary), "postgres")
            .await
            .expect("the primary answers");
        conn.execute(format!("CREATE DATABASE \"{db}\" OWNER postgres").as_str())
            .await
            .expect("database created");
        // Our URLs carry postgres/postgres; harmless where local auth is trust.
        conn.execute("ALTER USER postgres PASSWORD 'postgres'")
            .await
            .expect("password set");
    }

    /// Index (0 or 1) of the node the monitor says is primary, if any: `primary`, or
    /// `wait_primary` (taking writes without a standby to wait for), reported and assigned.
    pub async fn primary(&self) -> Option<usize> {
        let writable = |state: &str| state == "primary" || state == "wait_primary";
        let rows = self.monitor_rows().await;
        let (port, ..) = rows
            .iter()
            .find(|(_, reported, goal, _)| writable(reported) && writable(goal))?;
        self.nodes.iter().position(|n| n.port == *port)
    }

    /// Each node's state as the monitor reports it: `reported/assigned` (e.g.
    /// `secondary/secondary`, `primary/draining`), or `unknown`.
    pub async fn states(&self) -> Vec<String> {
        let rows = self.monitor_rows().await;
        self.nodes
            .iter()
            .map(|n| {
                rows.iter()
                    .find(|(port, ..)| *port == n.port)
                    .map_or_else(|| "unknown".into(), |(_, r, g, _)| format!("{r}/{g}"))
            })
            .collect()
    }

    /// SIGKILL node i: pg_autoctl and its postgres, nothing flushed. Returns when its port is
    /// closed.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        let port = self.nodes[i].port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while listening(port) {
            assert!(
                Instant::now() < deadline,
                "node {i} still listens after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts node i again; returns at once (use wait_secondary to wait for rejoin).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        self.clear_stale(i);
        let pgdata = self.nodes[i].pgdata.display().to_string();
        let mut cmd = self.command("pg_autoctl");
        cmd.args(["run", "--pgdata", &pgdata]);
        self.log_to(&mut cmd, &self.nodes[i].name);
        self.restarted[i] = epoch_secs();
        self.nodes[i].child = Some(cmd.spawn().expect("pg_autoctl run"));
    }

    /// After a SIGKILL the killed pg_autoctl and postmaster may linger as zombies, and neither
    /// starts while its pid file (or postgres's socket lock file) names a pid that exists.
    fn clear_stale(&self, i: usize) {
        let node = &self.nodes[i];
        let relative = node.pgdata.strip_prefix("/").unwrap_or(&node.pgdata);
        let files = [
            self.dir
                .path()
                .join("run/pg_autoctl")
                .join(relative)
                .join("pg_autoctl.pid"),
            node.pgdata.join("postmaster.pid"),
            PathBuf::from(format!("/var/run/postgresql/.s.PGSQL.{}.lock", node.port)),
            PathBuf::from(format!("/tmp/.s.PGSQL.{}.lock", node.port)),
        ];
        for file in files {
            if pid_in(&file).is_some_and(|pid| !running(pid)) {
                let _ = std::fs::remove_file(&file);
            }
        }
    }

    /// Waits (deadline) until node i is a secondary again and replication is synchronous.
    pub async fn wait_secondary(&self, i: usize, within: Duration) {
        let port = self.port(i);
        let since = self.restarted[i];
        eventually(
            &format!("node {i} to rejoin as the synchronous standby"),
            within,
            || async move {
                let rejoined = self.monitor_rows().await.iter().any(|(p, r, g, at)| {
                    *p == port && r == "secondary" && g == "secondary" && *at > since
                });
                rejoined && self.formed().await
            },
        )
        .await;
    }

    /// One primary and one secondary where the monitor wants them, and the primary waiting for
    /// the standby's commits: synchronous_standby_names set, the standby streaming as sync.
    async fn formed(&self) -> bool {
        let mut states: Vec<String> = self
            .monitor_rows()
            .await
            .into_iter()
            .filter(|(_, r, g, _)| r == g)
            .map(|(_, r, _, _)| r)
            .collect();
        states.sort();
        if states != ["primary", "secondary"] {
            return false;
        }
        let Some(primary) = self.primary().await else {
            return false;
        };
        let Some(mut conn) = connect(self.port(primary), "postgres").await else {
            return false;
        };
        let names: String = sqlx::query_scalar("SHOW synchronous_standby_names")
            .fetch_one(&mut conn)
            .await
            .unwrap_or_default();
        let sync: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
        !names.is_empty() && sync == 1
    }

    async fn wait_formed(&self, within: Duration) {
        eventually("a primary and a synchronous standby", within, || {
            self.formed()
        })
        .await;
    }

    /// Planned switchover with pg_autoctl perform switchover; returns when a new primary is up
    /// (and the old one is its synchronous standby again).
    pub async fn switchover(&self) {
        let before = self
            .primary()
            .await
            .expect("a primary before the switchover");
        let pgdata = self.monitor.pgdata.display().to_string();
        let mut cmd = self.command("pg_autoctl");
        cmd.args([
            "perform",
            "switchover",
            "--pgdata",
            &pgdata,
            "--formation",
            "default",
            "--group",
            "0",
        ]);
        self.log_to(&mut cmd, "switchover");
        let status = tokio::process::Command::from(cmd)
            .status()
            .await
            .expect("pg_autoctl perform switchover runs");
        assert!(status.success(), "pg_autoctl perform switchover failed");
        eventually(
            "the switchover to finish",
            Duration::from_secs(60),
            || async move { self.primary().await.is_some_and(|p| p != before) && self.formed().await },
        )
        .await;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        self.monitor.kill();
    }
}
