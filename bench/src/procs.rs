//! Child processes: spawning, readiness, stopping, and never leaving one behind.
//!
//! Every child is registered by pid the moment it is spawned. [`Proc`]'s `Drop`
//! kills and reaps it (errors and panics unwind through it), [`kill_all`] runs
//! once `run` returns whatever the outcome, and a SIGINT/SIGTERM handler
//! ([`install_signal_handler`]) kills every registered child and removes the
//! scratch directory before exiting.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

fn register(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

fn unregister(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&p| p != pid);
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is one of
    // our own children, registered until it has been reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGKILLs every child still registered (they are reaped by their `Proc`
/// or, on exit, by init).
pub fn kill_all() {
    let pids = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    for pid in pids {
        signal(pid, libc::SIGKILL);
    }
}

/// Remembers the scratch directory so the signal handler can remove it.
pub fn set_scratch(dir: &Path) {
    let _ = SCRATCH.set(dir.to_path_buf());
}

/// On SIGINT or SIGTERM: kill the children, remove the scratch directory, exit.
pub fn install_signal_handler() {
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("\nevtrack-bench: interrupted; stopping children");
        kill_all();
        if let Some(dir) = SCRATCH.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
}

/// A currently free port on 127.0.0.1 (another process could take it before
/// our child binds it; readiness checks catch that).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One child process, its output appended to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pid: u32,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout+stderr to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        register(pid);
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            pid,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Err (with the log's tail) if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            unregister(self.pid);
            bail!(
                "{} exited with {status}; log tail:\n{}",
                self.name,
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// Exit status once the process has ended by itself (for one-shot tools).
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                unregister(self.pid);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful stop: SIGTERM, wait up to `grace`, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        signal(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                unregister(self.pid);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister(self.pid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last 3,000 bytes of a log file.
pub fn tail(log: &Path) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(3000)..]).into_owned()
}

/// Peak and current resident set of a process, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// The anonymous part of a process's resident set (its heap and stacks,
/// not the file pages it maps), in KiB (`RssAnon`).
pub fn anon_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_s > 0).then(|| ticks as f64 / per_s as f64)
}

/// Memory and CPU of one process, read after its load.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    pub process: String,
    /// VmHWM: the peak resident set over the process's life, MiB.
    pub peak_rss_mib: f64,
    /// VmRSS when read, MiB.
    pub rss_mib: f64,
    /// CPU seconds (user + system) over the process's life until read.
    pub cpu_s: f64,
}

pub fn usage(proc: &Proc, process: &str) -> Usage {
    let (hwm, rss) = memory_kib(proc.pid()).unwrap_or((0, 0));
    Usage {
        process: process.to_owned(),
        peak_rss_mib: hwm as f64 / 1024.0,
        rss_mib: rss as f64 / 1024.0,
        cpu_s: cpu_seconds(proc.pid()).unwrap_or(0.0),
    }
}

fn tcp(port: u16) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(s)
}

fn redis_ping(port: u16) -> bool {
    let mut buf = [0u8; 7];
    tcp(port).is_some_and(|mut s| {
        s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            && &buf == b"+PONG\r\n"
    })
}

/// Polls until `ready` or the process dies or `timeout` passes.
async fn wait_ready<F, Fut>(proc: &mut Proc, timeout: Duration, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if ready().await {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} not ready after {timeout:?}; log tail:\n{}",
                proc.name,
                tail(&proc.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Our own redis-server: loopback, a free port, no persistence.
pub struct Redis {
    pub proc: Proc,
    pub url: String,
}

impl Redis {
    pub async fn start(dir: &Path) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir);
        let mut proc = Proc::spawn("redis-server", &mut cmd, &dir.join("redis.log")).context(
            "redis-server is needed (apt-get install redis-server; scripts/bench.sh installs it)",
        )?;
        wait_ready(&mut proc, Duration::from_secs(20), || async move {
            redis_ping(port)
        })
        .await?;
        Ok(Redis {
            proc,
            url: format!("redis://127.0.0.1:{port}"),
        })
    }

    pub async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }
}

/// Our own SecantusDB (a MongoDB wire-protocol server), fresh storage.
pub struct Mongo {
    pub proc: Proc,
    pub uri: String,
}

impl Mongo {
    pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Mongo> {
        std::fs::create_dir_all(dir.join("data"))?;
        // An explicit empty config: no auto-discovery of config files elsewhere.
        let config = dir.join("secantusd.toml");
        std::fs::write(&config, "")?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(dir.join("data"))
            // A single-node replica set (the default): evtrack's MongoDB
            // rollups need transactions.
            .args(["--cache-size", "256M", "--config"])
            .arg(&config)
            .current_dir(dir)
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Proc::spawn("secantusd", &mut cmd, &dir.join("secantusd.log"))?;
        wait_ready(&mut proc, Duration::from_secs(60), || async move {
            tcp(port).is_some()
        })
        .await?;
        let uri = format!("mongodb://127.0.0.1:{port}/");
        // Listening is not serving yet: wait for a ping to answer.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = async {
                let client = mongodb::Client::with_uri_str(&uri).await?;
                client
                    .database("admin")
                    .run_command(mongodb::bson::doc! {"ping": 1})
                    .await?;
                anyhow::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(5), ok).await {
                Ok(Ok(())) => break,
                _ if Instant::now() > deadline => {
                    bail!("secantusd does not answer; log tail:\n{}", tail(&proc.log))
                }
                _ => proc.check_alive()?,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Mongo { proc, uri })
    }
}

/// Polls `GET /health` until 200.
pub async fn wait_http(proc: &mut Proc, http: &reqwest::Client, port: u16) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/health");
    wait_ready(proc, Duration::from_secs(60), || {
        let req = http.get(&url).timeout(Duration::from_secs(2)).send();
        async move { req.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await
}

/// Runs a command to completion and returns its trimmed stdout ("" on failure).
pub fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
