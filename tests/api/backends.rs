//! Real, per-test backends for the integration tests.
//!
//! Every server is a child process on its own free loopback port, with its own
//! `TempDir` as working directory, data directory and log location, so tests
//! can run in parallel without sharing state. The API is synchronous
//! (`std::process`): redis is ready in ~50 ms and SecantusDB in ~1 s (a few
//! seconds when many start at once), and such a short blocking wait inside a
//! `#[tokio::test]` is harmless. Each child's stdout+stderr is appended to
//! `server.log` in its `TempDir`, and startup failures panic with that log's
//! tail. `Drop` SIGKILLs and reaps the child, so servers die with the test even
//! when it panics (a server kept in a `static` is never dropped: don't).
#![allow(dead_code)] // not every test uses every helper

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Asks the kernel for a currently free port on 127.0.0.1. Another process may
/// take it before our server binds it; `start()` retries on a new port then.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A `redis-server` child: plain TCP (`start`) or TLS-only with a password (`start_tls`).
pub struct RedisServer {
    pub port: u16,
    pub url: String,
    ca: Option<PathBuf>,
    proc: Proc,
}

impl RedisServer {
    /// Plain server on `redis://127.0.0.1:PORT`.
    pub fn start() -> RedisServer {
        Self::launch(tempdir("redis"), "--port {port}", None)
    }

    /// TLS-only server (`--port 0`) on `rediss://:PASSWORD@localhost:PORT`, with
    /// a random password and a server cert for `localhost` and `127.0.0.1`
    /// signed by a fresh test CA ([`Self::ca_cert_path`]). No client certs.
    pub fn start_tls() -> RedisServer {
        let dir = tempdir("redis-tls");
        write_test_certs(dir.path());
        let password = random_hex(16);
        let tls = format!(
            "--port 0 --tls-port {{port}} --tls-cert-file server.pem --tls-key-file server.key \
             --tls-ca-cert-file ca.pem --tls-auth-clients no --requirepass {password}"
        );
        Self::launch(dir, &tls, Some(password))
    }

    /// Loopback only, no config file, no RDB/AOF: nothing is loaded at startup
    /// (no LOADING phase: answering PING means ready), nothing written on stop.
    fn launch(dir: TempDir, extra: &str, password: Option<String>) -> Self {
        let args = format!("--bind 127.0.0.1 --dir . --save '' --appendonly no {extra}");
        let ca = password.as_ref().map(|_| dir.path().join("ca.pem"));
        // The TLS listener is opened after the TLS context is configured, and
        // there is no data to load, so an accepted TCP connection is enough.
        let probe = match password {
            None => redis_ping,
            Some(_) => |port| tcp_connect(port).is_some(),
        };
        let proc = Proc::start("redis-server", dir, &args, probe);
        let port = proc.port;
        let url = match password {
            None => format!("redis://127.0.0.1:{port}"),
            Some(password) => format!("rediss://:{password}@localhost:{port}"),
        };
        RedisServer {
            port,
            url,
            ca,
            proc,
        }
    }

    /// PEM file of the CA that signed the server cert (`start_tls` servers only).
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// Clean stop: SIGTERM, then wait. Idempotent.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts again on the same port, dir and password; returns once ready.
    /// Without persistence the restarted server is empty.
    pub fn restart(&mut self) {
        self.proc.restart();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// A Redis Cluster of `masters` nodes (no replicas), each a
/// `redis-server --cluster-enabled yes` on a loopback port whose bus port
/// (port + 10000) is free too, joined by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// Every node's `redis://` URL, separated by commas (as `REDIS_URL`).
    pub url: String,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                let dir = tempdir("redis-cluster");
                let args = "--bind 127.0.0.1 --dir . --save '' --appendonly no --port {port} \
                            --cluster-enabled yes --cluster-config-file nodes.conf \
                            --cluster-node-timeout 5000";
                let proc = Proc::start_on("redis-server", dir, args, redis_ping, cluster_port);
                let port = proc.port;
                RedisServer {
                    port,
                    url: format!("redis://127.0.0.1:{port}"),
                    ca: None,
                    proc,
                }
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every node must know the whole map before a client asks.
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster is not ready after 30 s"
                );
                sleep(Duration::from_millis(100));
            }
        }
        let url = nodes
            .iter()
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",");
        RedisCluster { nodes, url }
    }

    /// The port of the node that holds `key` (its master).
    pub fn node_of(&self, key: &str) -> u16 {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &self.nodes[0].port.to_string(),
                "cluster",
                "keyslot",
                key,
            ])
            .output()
            .expect("redis-cli cluster keyslot");
        let slot: u16 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a slot");
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[0].port.to_string(), "cluster", "shards"])
            .output()
            .expect("redis-cli cluster shards");
        // `slots` then pairs of bounds, … `port` then the port, per shard.
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            match lines[i] {
                "slots" => {
                    ranges.clear();
                    i += 1;
                    while i + 1 < lines.len() {
                        match (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                            (Ok(a), Ok(b)) => {
                                ranges.push((a, b));
                                i += 2;
                            }
                            _ => break,
                        }
                    }
                }
                "port" if ranges.iter().any(|&(a, b)| a <= slot && slot <= b) => {
                    return lines[i + 1].parse().expect("a port");
                }
                _ => i += 1,
            }
        }
        panic!("no node holds slot {slot}:\n{text}");
    }
}

/// A free port whose cluster bus port (port + 10000) is free too: below
/// the kernel's ephemeral range (from 32768), so that both fit.
fn cluster_port() -> u16 {
    use rand::RngExt;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..30_000);
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// A MongoDB wire-protocol server: SecantusDB (`secantusd-py`) as a child, or
/// the external server named by `EVTRACK_TEST_MONGO_URI` (nothing is spawned
/// then, so tests must isolate themselves with unique database names).
pub struct MongoServer {
    /// `mongodb://127.0.0.1:PORT/` (no database name).
    pub uri: String,
    proc: Option<Proc>, // None for an external server
}

impl MongoServer {
    pub fn start() -> MongoServer {
        if let Ok(uri) = std::env::var("EVTRACK_TEST_MONGO_URI") {
            return MongoServer { uri, proc: None };
        }
        Self::spawn("")
    }

    /// A server that presents itself as a standalone `mongod` (no replica
    /// set, hence no transactions); always spawned.
    pub fn start_standalone() -> MongoServer {
        Self::spawn("--standalone")
    }

    fn spawn(extra: &str) -> MongoServer {
        let bin = std::env::var_os("EVTRACK_SECANTUSD").map(PathBuf::from);
        let bin = bin.unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/secantusd-py")
        });
        assert!(
            bin.exists(),
            "SecantusDB not found at {} (set EVTRACK_SECANTUSD or EVTRACK_TEST_MONGO_URI); \
             run the tests with scripts/test.sh, which installs it into .venv-test",
            bin.display()
        );
        let dir = tempdir("mongo");
        // An explicit (empty) config disables secantusd's auto-discovery of
        // ./secantusd.toml, ~/.secantus/ and /etc/secantus/.
        fs::write(dir.path().join("secantusd.toml"), "").expect("write secantusd.toml");
        // A single-node replica set (SecantusDB's default): the MongoDB
        // store's rollups need transactions, which standalone servers lack.
        // Its cache (default 1G; allocated as used) must hold a fold's
        // transaction: with 64M, a transaction of a few thousand writes
        // stalled its commit for good.
        let args = "--config secantusd.toml --host 127.0.0.1 --port {port} \
                    --storage-path data --cache-size 256M";
        let args = format!("{args} {extra}");
        // It listens only once storage is open, but we still demand a real
        // `hello` reply (see mongo_hello). Stopping it takes ~2 s.
        let proc = Proc::start(bin, dir, &args, mongo_hello);
        let uri = format!("mongodb://127.0.0.1:{}/", proc.port);
        MongoServer {
            uri,
            proc: Some(proc),
        }
    }

    /// Clean stop: SIGTERM, then wait. Idempotent.
    pub fn stop(&mut self) {
        self.proc.as_mut().expect(EXTERNAL).stop();
    }

    /// Starts again on the same port and storage dir: data is preserved.
    pub fn restart(&mut self) {
        self.proc.as_mut().expect(EXTERNAL).restart();
    }
}

const EXTERNAL: &str = "MongoServer::stop/restart are not possible with \
                        EVTRACK_TEST_MONGO_URI set (external server)";

impl Drop for MongoServer {
    fn drop(&mut self) {
        if let Some(proc) = &mut self.proc {
            proc.kill();
        }
    }
}

/// Returns true once the server on that port is ready.
type Probe = fn(u16) -> bool;

/// One server process: how to spawn it, how to tell it is ready, its child if
/// running. `args` is split on whitespace, `{port}` is substituted, and `''`
/// stands for an empty argument.
struct Proc {
    program: PathBuf,
    args: String,
    port: u16,
    probe: Probe,
    child: Option<Child>,
    dir: TempDir,
}

impl Proc {
    fn start(program: impl Into<PathBuf>, dir: TempDir, args: &str, probe: Probe) -> Proc {
        Self::start_on(program, dir, args, probe, free_port)
    }

    /// [`Proc::start`] on ports chosen by `pick`.
    fn start_on(
        program: impl Into<PathBuf>,
        dir: TempDir,
        args: &str,
        probe: Probe,
        pick: fn() -> u16,
    ) -> Proc {
        let (program, args, port, child) = (program.into(), args.to_string(), 0, None);
        let mut proc = Proc {
            program,
            args,
            port,
            probe,
            child,
            dir,
        };
        for attempt in 1..=3 {
            proc.port = pick();
            match proc.launch() {
                Ok(()) => return proc,
                Err(e) if attempt == 3 => panic!("{e}"),
                Err(_) => {} // most likely lost the free-port race: try another port
            }
        }
        unreachable!()
    }

    /// Spawns the child and polls the probe for up to 30 s (then panics, with
    /// the log tail). Err if the child exits first, e.g. port already in use.
    fn launch(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        let out = File::options().create(true).append(true).open(&log);
        let out = out.expect("open server.log");
        let port = self.port.to_string();
        let args = self.args.replace("{port}", &port);
        let child = Command::new(&self.program)
            .args(args.split_whitespace().map(|a| a.replace("''", "")))
            .current_dir(self.dir.path())
            .env("PYTHONUNBUFFERED", "1") // secantusd is Python: keep the log current
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn();
        let name = format!("{} on port {port}", self.program.display());
        self.child = Some(child.unwrap_or_else(|e| panic!("cannot spawn {name}: {e}")));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(self.probe)(self.port) {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                return Err(format!("{name} exited with {status}; log:\n{}", tail(&log)));
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("{name} not ready after 30 s; log:\n{}", tail(&log));
            }
            sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn restart(&mut self) {
        self.stop();
        let result = self.launch();
        result.unwrap_or_else(|e| panic!("restart failed: {e}"));
    }

    /// SIGTERM via kill(1) (std can only SIGKILL), wait up to 20 s, else SIGKILL.
    fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        if sent.is_ok_and(|s| s.success()) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return;
                }
                sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// SIGKILL and reap; never panics (runs in `Drop`, maybe while unwinding).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tail(log: &Path) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(3000)..]).into_owned()
}

fn tcp_connect(port: u16) -> Option<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(stream)
}

fn redis_ping(port: u16) -> bool {
    let mut buf = [0u8; 7];
    tcp_connect(port).is_some_and(|mut s| {
        s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            && &buf == b"+PONG\r\n"
    })
}

/// Sends an OP_MSG `{hello: 1, $db: "admin"}` (hand-encoded BSON) and waits
/// for a reply containing `ok: 1.0`, i.e. the command layer is serving.
fn mongo_hello(port: u16) -> bool {
    let Some(mut s) = tcp_connect(port) else {
        return false;
    };
    let doc = b"\x1f\0\0\0\x10hello\0\x01\0\0\0\x02$db\0\x06\0\0\0admin\0\0";
    let mut msg = Vec::new();
    for field in [16 + 5 + doc.len() as i32, 1, 0, 2013] {
        msg.extend(field.to_le_bytes()); // length, requestID, responseTo, opCode OP_MSG
    }
    msg.extend([0, 0, 0, 0, 0]); // flagBits, section kind 0 (body)
    msg.extend(doc);
    let mut header = [0u8; 16];
    if s.write_all(&msg).is_err() || s.read_exact(&mut header).is_err() {
        return false;
    }
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.saturating_sub(16).min(1 << 24)];
    let ok = [&b"\x01ok\0"[..], &1.0f64.to_le_bytes()].concat();
    s.read_exact(&mut body).is_ok() && body.windows(ok.len()).any(|w| w == ok)
}

/// Writes `ca.pem`, `server.pem`, `server.key` into `dir`: a fresh CA, and a
/// server cert for `localhost` and `127.0.0.1` signed by it (rcgen's default
/// validity, 1975-4096; key pairs are ECDSA P-256).
fn write_test_certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // The default CN is the same for every cert; issuer and subject must differ.
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);

    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let mut leaf = CertificateParams::new(names).unwrap(); // IP strings become IP SANs
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_pem = leaf.signed_by(&leaf_key, &issuer).unwrap().pem();
    let write = |name: &str, pem: String| fs::write(dir.join(name), pem).expect("write PEM");
    write("ca.pem", ca_pem);
    write("server.pem", leaf_pem);
    write("server.key", leaf_key.serialize_pem());
}

fn tempdir(what: &str) -> TempDir {
    TempDir::with_prefix(format!("evtrack-{what}-")).expect("create TempDir")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let mut urandom = File::open("/dev/urandom").expect("open /dev/urandom");
    urandom.read_exact(&mut buf).expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
