//! The Redis queue: a Stream (`<prefix>events`) read by a consumer group
//! (`workers`), instead of the original LPUSH/BRPOP list.
//!
//! With BRPOP an event popped by a worker that dies before storing it is gone.
//! Here an entry read with XREADGROUP stays in the group's pending list until
//! the worker acknowledges it (XACK + XDEL, after the store has it). Entries a
//! worker leaves pending longer than `claim_idle` are claimed (XCLAIM) by
//! another worker; an entry handed out more than `WORKER_MAX_DELIVERIES` times, or
//! one that is not a valid event, goes to the dead-letter stream
//! (`<prefix>dead`) so that one bad entry cannot stall the queue.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamClaimReply, StreamId, StreamPendingCountReply, StreamRangeReply, StreamReadReply,
};
use redis::{Client, RedisError, Script, Value};

use super::{Consumer, Delivery, Depth, Queue, QueueError};
use crate::event::{self, Event};

pub const GROUP: &str = "workers";
/// The field of a stream entry that holds the event as JSON.
pub const FIELD: &str = "e";

/// Adds events only if the stream stays within its limit, atomically: a check
/// and an add in two round trips would let concurrent API processes overshoot.
const ENQUEUE_SCRIPT: &str = r"
local len = redis.call('XLEN', KEYS[1])
if len + #ARGV - 1 > tonumber(ARGV[1]) then return -1 end
for i = 2, #ARGV do redis.call('XADD', KEYS[1], '*', 'e', ARGV[i]) end
return len
";

/// The API must answer within a second even when Redis does not.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a worker's read blocks waiting for entries; bounds how long a
/// worker takes to notice shutdown.
const BLOCK: Duration = Duration::from_millis(1000);

/// Names of the keys, all under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub stream: String,
    pub dead: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            stream: format!("{prefix}events"),
            dead: format!("{prefix}dead"),
        }
    }
}

/// Connection settings shared by the API and worker sides.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// PEM file of the CA that signed the server's certificate (`rediss://`
    /// with a private CA); `None` uses the usual public roots.
    pub ca_cert: Option<std::path::PathBuf>,
    pub prefix: String,
    pub max_len: u64,
}

pub fn client(config: &RedisConfig) -> Result<Client, String> {
    match &config.ca_cert {
        None => Client::open(config.url.as_str()).map_err(|e| e.to_string()),
        Some(path) => {
            let pem = read_ca(path)?;
            Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(|e| e.to_string())
        }
    }
}

fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read CA certificate {}: {e}", path.display()))
}

async fn manager(
    client: &Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    client.get_connection_manager_with_config(config).await
}

/// Creates the stream and the group if missing. The group starts at `0`, not
/// `$`: events queued before any worker existed must still be delivered.
async fn ensure_group(conn: &mut ConnectionManager, keys: &Keys) -> Result<(), RedisError> {
    let created: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

fn unavailable(e: RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// The API's side.
#[derive(Clone)]
pub struct RedisQueue {
    conn: ConnectionManager,
    keys: Keys,
    max_len: u64,
    script: Script,
}

impl RedisQueue {
    pub async fn connect(config: &RedisConfig) -> Result<Self, String> {
        let client = client(config)?;
        let mut conn = manager(&client, Duration::from_millis(900))
            .await
            .map_err(|e| e.to_string())?;
        let keys = Keys::new(&config.prefix);
        ensure_group(&mut conn, &keys)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            conn,
            keys,
            max_len: config.max_len,
            script: Script::new(ENQUEUE_SCRIPT),
        })
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, events: Vec<Event>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut invocation = self.script.key(&self.keys.stream);
        invocation.arg(self.max_len);
        for e in &events {
            let json =
                serde_json::to_vec(e).map_err(|err| QueueError::Unavailable(err.to_string()))?;
            invocation.arg(json);
        }
        let mut conn = self.conn.clone();
        let call = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(ENQUEUE_TIMEOUT, call).await {
            Err(_) => Err(QueueError::Unavailable(
                "redis did not answer within 1 s".into(),
            )),
            Ok(Err(e)) => Err(unavailable(e)),
            Ok(Ok(n)) if n < 0 => Err(QueueError::Full),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn check(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(ENQUEUE_TIMEOUT, ping).await {
            Err(_) => Err(QueueError::Unavailable(
                "redis did not answer within 1 s".into(),
            )),
            Ok(r) => r.map(|_| ()).map_err(unavailable),
        }
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        // Acknowledged entries are deleted (XACK + XDEL), so the stream holds
        // exactly the events not yet stored, and its first entry is the
        // oldest; its id starts with the millisecond Redis added it.
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN")
            .arg(&self.keys.stream)
            .cmd("XRANGE")
            .arg(&self.keys.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        let call = pipe.query_async::<(u64, StreamRangeReply)>(&mut conn);
        let (events, first) = match tokio::time::timeout(ENQUEUE_TIMEOUT, call).await {
            Err(_) => {
                return Err(QueueError::Unavailable(
                    "redis did not answer within 1 s".into(),
                ));
            }
            Ok(r) => r.map_err(unavailable)?,
        };
        let oldest_age = first
            .ids
            .first()
            .and_then(|e| e.id.split('-').next()?.parse::<i64>().ok())
            .map(|ms| Duration::from_millis((event::now_ms() - ms).max(0) as u64));
        Ok(Depth { events, oldest_age })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// What the worker needs to acknowledge or dead-letter an entry.
#[derive(Debug)]
pub struct EntryTag {
    pub id: String,
    /// The entry's fields as read, kept only when they are not a valid event
    /// (they go to the dead-letter stream unchanged).
    raw: Option<Vec<(String, Vec<u8>)>>,
}

/// Settings of the worker's side.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long an entry may stay pending with a worker before another claims it.
    pub claim_idle: Duration,
}

/// The worker's side. It owns a connection of its own: its reads block for up
/// to a second, and on a shared multiplexed connection they would hold up the
/// commands queued behind them.
pub struct RedisConsumer {
    conn: ConnectionManager,
    keys: Keys,
    name: String,
    config: ConsumerConfig,
    next_claim: Instant,
}

impl RedisConsumer {
    pub async fn connect(redis: &RedisConfig, config: ConsumerConfig) -> Result<Self, String> {
        let client = client(redis)?;
        // Responses may take as long as the blocking read, plus slack.
        let mut conn = manager(&client, BLOCK + Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        let keys = Keys::new(&redis.prefix);
        ensure_group(&mut conn, &keys)
            .await
            .map_err(|e| e.to_string())?;
        let name = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple());
        Ok(Self {
            conn,
            keys,
            name,
            config,
            next_claim: Instant::now(),
        })
    }

    /// This consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Claims entries left pending by other (presumably dead) workers.
    async fn claim_stale(&mut self, max: usize) -> Result<Vec<Delivery<EntryTag>>, RedisError> {
        let idle_ms = self.config.claim_idle.as_millis() as u64;
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("-")
            .arg("+")
            .arg(max)
            .query_async(&mut self.conn)
            .await?;
        if pending.ids.is_empty() {
            return Ok(Vec::new());
        }
        let deliveries: HashMap<String, usize> = pending
            .ids
            .iter()
            .map(|p| (p.id.clone(), p.times_delivered))
            .collect();
        // XCLAIM re-checks the idle time, so of two workers claiming at once
        // only one gets each entry.
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.keys.stream)
            .arg(GROUP)
            .arg(&self.name)
            .arg(idle_ms);
        for p in &pending.ids {
            cmd.arg(&p.id);
        }
        let claimed: StreamClaimReply = cmd.query_async(&mut self.conn).await?;
        Ok(claimed
            .ids
            .into_iter()
            .map(|entry| {
                let attempts = deliveries.get(&entry.id).copied().unwrap_or(0) + 1;
                to_delivery(entry, attempts as u32)
            })
            .collect())
    }

    async fn claim_or_read(&mut self, max: usize) -> Result<Vec<Delivery<EntryTag>>, RedisError> {
        if Instant::now() >= self.next_claim {
            // Looking for stale entries every quarter of the idle time keeps a
            // dead worker's entries waiting at most 1.25 × claim_idle.
            self.next_claim = Instant::now() + self.config.claim_idle / 4;
            let claimed = self.claim_stale(max).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        self.read_new(max).await
    }

    async fn read_new(&mut self, max: usize) -> Result<Vec<Delivery<EntryTag>>, RedisError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| to_delivery(entry, 1))
            .collect())
    }
}

/// Reads an entry as an event, keeping the raw fields when that fails.
fn to_delivery(entry: StreamId, attempts: u32) -> Delivery<EntryTag> {
    let parsed = match entry.map.get(FIELD) {
        Some(Value::BulkString(bytes)) => serde_json::from_slice::<Event>(bytes)
            .map_err(|e| format!("not a valid event: {e}"))
            .and_then(|ev| {
                event::revalidate(&ev)
                    .map(|()| ev)
                    .map_err(|e| format!("invalid event: {e}"))
            }),
        _ => Err(format!("entry has no `{FIELD}` field")),
    };
    let raw = parsed.is_err().then(|| {
        entry
            .map
            .iter()
            .map(|(k, v)| {
                let bytes = match v {
                    Value::BulkString(b) => b.clone(),
                    other => format!("{other:?}").into_bytes(),
                };
                (k.clone(), bytes)
            })
            .collect()
    });
    Delivery {
        event: parsed,
        attempts,
        tag: EntryTag { id: entry.id, raw },
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    type Tag = EntryTag;

    async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery<EntryTag>>, QueueError> {
        match self.claim_or_read(max.max(1)).await {
            // The stream was deleted under us (a Redis restart without
            // persistence, FLUSHDB, eviction): make the group again rather
            // than fail forever.
            Err(e) if e.code() == Some("NOGROUP") => {
                tracing::warn!("consumer group missing; creating it again");
                ensure_group(&mut self.conn, &self.keys)
                    .await
                    .map_err(unavailable)?;
                Ok(Vec::new())
            }
            other => other.map_err(unavailable),
        }
    }

    async fn ack(&mut self, deliveries: Vec<Delivery<EntryTag>>) -> Result<(), QueueError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = deliveries.iter().map(|d| d.tag.id.as_str()).collect();
        redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg(&ids)
            .ignore()
            .cmd("XDEL")
            .arg(&self.keys.stream)
            .arg(&ids)
            .ignore()
            .exec_async(&mut self.conn)
            .await
            .map_err(unavailable)
    }

    async fn dead_letter(
        &mut self,
        deliveries: Vec<(Delivery<EntryTag>, String)>,
    ) -> Result<(), QueueError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (d, reason) in &deliveries {
            let cmd = pipe
                .cmd("XADD")
                .arg(&self.keys.dead)
                .arg("*")
                .arg("source_id")
                .arg(&d.tag.id)
                .arg("reason")
                .arg(reason)
                .arg("attempts")
                .arg(d.attempts);
            match (&d.event, &d.tag.raw) {
                (Ok(e), _) => {
                    let json = serde_json::to_vec(e)
                        .map_err(|err| QueueError::Unavailable(err.to_string()))?;
                    cmd.arg(FIELD).arg(json);
                }
                (Err(_), Some(fields)) => {
                    for (k, v) in fields {
                        cmd.arg(format!("raw.{k}")).arg(v.as_slice());
                    }
                }
                (Err(_), None) => {}
            }
            cmd.ignore();
            pipe.cmd("XACK")
                .arg(&self.keys.stream)
                .arg(GROUP)
                .arg(&d.tag.id)
                .ignore();
            pipe.cmd("XDEL")
                .arg(&self.keys.stream)
                .arg(&d.tag.id)
                .ignore();
        }
        pipe.exec_async(&mut self.conn).await.map_err(unavailable)
    }

    async fn release(
        &mut self,
        deliveries: Vec<Delivery<EntryTag>>,
        _reason: &str,
    ) -> Vec<Delivery<EntryTag>> {
        // Keep them: they stay pending in Redis (safe if this worker dies) and
        // this worker retries them itself, so an outage of the store does not
        // count as failed deliveries and dead-letter good events.
        self.keep_alive(&deliveries).await;
        deliveries
    }

    fn keep_alive_every(&self) -> Option<Duration> {
        // Three refreshes per claim period: one late or lost refresh still
        // leaves the entries well inside it.
        Some(self.config.claim_idle / 3)
    }

    async fn keep_alive(&mut self, deliveries: &[Delivery<EntryTag>]) {
        // XCLAIM by the owner, with JUSTID, resets the entries' idle time
        // without counting a delivery: other workers, which claim only
        // entries idle for `claim_idle`, leave them alone while this worker
        // is alive and busy with them (a store write slower than the claim
        // timeout, or retries through a store outage).
        if deliveries.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.keys.stream).arg(GROUP).arg(&self.name).arg(0);
        for d in deliveries {
            cmd.arg(&d.tag.id);
        }
        cmd.arg("JUSTID");
        if let Err(e) = cmd.query_async::<Vec<String>>(&mut self.conn).await {
            // Not fatal: at worst another worker claims them, and the store
            // absorbs the duplicate.
            tracing::warn!(error = %e, "cannot refresh pending entries");
        }
    }
}
