//! The Redis queue: a Stream (`<prefix>events`) read by a consumer group
//! (`workers`), instead of the original LPUSH/BRPOP list.
//!
//! With BRPOP an event popped by a worker that dies before storing it is gone.
//! Here an entry read with XREADGROUP stays in the group's pending list until
//! the worker acknowledges it (XACK + XDEL, after the store has it). Entries a
//! worker leaves pending longer than `claim_idle` are claimed (XCLAIM) by
//! another worker; an entry handed out more than `WORKER_MAX_DELIVERIES` times, or
//! one that is not a valid event, goes to the dead-letter stream
//! (`<prefix>dead`) so that one bad entry cannot stall the queue. That
//! stream keeps the newest `DEAD_LETTER_MAX_LEN` entries.
//!
//! Besides the entry count (`QUEUE_MAX_LEN`), the payload bytes waiting are
//! bounded (`QUEUE_MAX_BYTES`): Redis holds the whole queue in memory, and
//! events differ in size by a factor of a thousand, so a count alone does not
//! bound it. `<prefix>bytes` counts them, kept in step with the stream by the
//! scripts that add and remove entries.
//!
//! Workers leave the group when they stop with nothing pending, and remove
//! consumers left behind by workers that died, once those have nothing
//! pending either: each consumer left in the group is listed by XINFO and
//! looked at by every claim pass for as long as the group lives.
//!
//! **Partitions.** A stream is one key, so on a Redis Cluster one shard. The
//! queue may be split into `QUEUE_PARTITIONS` streams ([`Layout`]), each with
//! its own group, byte counter and dead-letter stream under one hash tag
//! (the three keys a script or transaction touches together must share a
//! slot). A request goes whole to one partition, chosen round robin by each
//! API process, the next one when that one is full; each partition holds at
//! most its share of `QUEUE_MAX_LEN` and `QUEUE_MAX_BYTES`, so the limits
//! hold for the whole queue. Every worker reads, claims from and
//! dead-letters into every partition. No order between events is needed:
//! the store keeps raw events and folds visits from them in any arrival
//! order, so two workers storing one visitor's events at once, from two
//! partitions, give the same visits as one worker storing them in order.
//!
//! `REDIS_URL` names one server, or the nodes of a cluster separated by
//! commas; one node of a cluster is recognised as such (`INFO cluster`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::streams::{
    StreamClaimReply, StreamId, StreamInfoConsumersReply, StreamPendingCountReply,
    StreamRangeReply, StreamReadReply,
};
use redis::{Client, RedisError, Script, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Consumer, Delivery, Depth, Queue, QueueError};
use crate::event::{self, Event};

pub const GROUP: &str = "workers";
/// The field of a stream entry that holds the event as JSON.
pub const FIELD: &str = "e";

/// Adds the events of several requests to one partition, each request
/// whole and only if the partition stays within both its limits, atomically:
/// a check and an add in two round trips would let concurrent API processes
/// overshoot. KEYS: the stream, the byte counter. ARGV: most entries, most
/// payload bytes, then for each request the number of its events followed
/// by their JSON. Answers one number per request, in order: 1 (added), -1
/// (too many entries) or -2 (too many bytes).
///
/// An empty stream holds no bytes, whatever the counter says: a counter left
/// behind by a stream that went away without it (deleted or evicted alone)
/// would otherwise keep the queue full for ever. So the counter starts again
/// from zero then.
const ENQUEUE_SCRIPT: &str = r"
local len = redis.call('XLEN', KEYS[1])
local used = 0
if len == 0 then
  redis.call('DEL', KEYS[2])
else
  used = tonumber(redis.call('GET', KEYS[2])) or 0
end
local max_len, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, added, i = {}, 0, 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local size = 0
  for k = i + 1, i + n do size = size + #ARGV[k] end
  if len + n > max_len then
    out[#out + 1] = -1
  elseif used + size > max_bytes then
    out[#out + 1] = -2
  else
    for k = i + 1, i + n do redis.call('XADD', KEYS[1], '*', 'e', ARGV[k]) end
    len, used, added = len + n, used + size, added + size
    out[#out + 1] = 1
  end
  i = i + n + 1
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
return out
";

/// Acknowledges and deletes entries, and takes their payload bytes off the
/// counter. KEYS: the stream, the byte counter. ARGV: the group, then the id
/// and payload size of each entry. Answers the bytes freed.
///
/// Only the bytes of entries this call deletes are taken off: when two
/// workers settle the same entry (one claimed it from the other, thought
/// dead), the second frees nothing. Entries are settled in slices of 1,000
/// (`unpack` fails beyond ~8,000 values), each with one XACK and one XDEL:
/// an XACK that acknowledges the whole slice means none of it was settled
/// before (the scripts always acknowledge and delete together), so the whole
/// slice is deleted now and all its bytes are freed. Otherwise, rarely, the
/// slice is deleted entry by entry and only what XDEL finds is counted.
/// The counter stops at zero: entries it never counted (written by hand, or
/// queued by a version without it) may be deleted too; it is exact again
/// once the stream has been empty (see ENQUEUE_SCRIPT).
const SETTLE_SCRIPT: &str = r"
local freed = 0
local i = 2
while i <= #ARGV do
  local ids, sizes, total = {}, {}, 0
  while i <= #ARGV and #ids < 1000 do
    ids[#ids + 1] = ARGV[i]
    sizes[#sizes + 1] = tonumber(ARGV[i + 1])
    total = total + sizes[#sizes]
    i = i + 2
  end
  if redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)) == #ids then
    redis.call('XDEL', KEYS[1], unpack(ids))
    freed = freed + total
  else
    for k = 1, #ids do
      if redis.call('XDEL', KEYS[1], ids[k]) == 1 then freed = freed + sizes[k] end
    end
  end
end
if freed > 0 then
  local left = (tonumber(redis.call('GET', KEYS[2])) or 0) - freed
  if left > 0 then
    redis.call('SET', KEYS[2], string.format('%d', left))
  else
    redis.call('DEL', KEYS[2])
  end
end
return freed
";

/// Removes a consumer from the group, unless entries are pending with it.
/// KEYS: the stream. ARGV: the group, the consumer. Answers 1 when the
/// consumer is gone (or was never there), 0 when it stays.
///
/// XGROUP DELCONSUMER drops the consumer's pending entries from the group:
/// they would stay in the stream but never be delivered or claimed again, so
/// never stored. Checking first in a separate round trip would race with a
/// read handing the consumer new entries in between; in one script it cannot.
const LEAVE_SCRIPT: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// Resets the idle time of the entries still pending with this consumer,
/// without counting a delivery, and leaves alone those another worker has
/// claimed meanwhile (a plain XCLAIM would take them back). KEYS: the
/// stream. ARGV: the group, the consumer, then the entry ids. Answers how
/// many were refreshed.
const KEEP_ALIVE_SCRIPT: &str = r"
local kept = 0
for i = 3, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
";

/// Shared by every consumer: a script's hash is computed once.
static KEEP_ALIVE: LazyLock<Script> = LazyLock::new(|| Script::new(KEEP_ALIVE_SCRIPT));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE_SCRIPT));
static LEAVE: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE_SCRIPT));

/// The API must answer within a second even when Redis does not.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a worker's read blocks waiting for entries; bounds how long a
/// worker takes to notice shutdown.
const BLOCK: Duration = Duration::from_millis(1000);
/// How long a stopping worker waits to leave the consumer group.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Names of the keys of one partition, all under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub stream: String,
    pub dead: String,
    /// Payload bytes of the entries in `stream` (a string holding a number).
    pub bytes: String,
}

impl Keys {
    /// The keys of a queue of one partition on one server, as they have
    /// always been named.
    pub fn new(prefix: &str) -> Self {
        Self::with_tag(prefix, "")
    }

    fn with_tag(prefix: &str, tag: &str) -> Self {
        Self {
            stream: format!("{prefix}{tag}events"),
            dead: format!("{prefix}{tag}dead"),
            bytes: format!("{prefix}{tag}bytes"),
        }
    }
}

/// Slots of a Redis Cluster: a key's slot is the CRC16 of its hash tag
/// (the text between its first `{` and the next `}`), modulo this.
const SLOTS: u16 = 16_384;

fn slot_of(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS
}

/// How the queue is split: the keys of each partition.
#[derive(Debug, Clone)]
pub struct Layout {
    pub partitions: Vec<Keys>,
    /// Before a UTC day number: that day's visitor salt ([`crate::visitor`]).
    pub salt: String,
    /// The number of partitions the streams in Redis were made with.
    pub marker: String,
}

impl Layout {
    /// `n` partitions under `prefix`. One partition on one server keeps the
    /// names of a queue that was never split (`<prefix>events`, …). Else
    /// partition `i` is tagged `{q<i>.<k>}`, `k` the first number that puts
    /// the tag in the middle of the `i`-th of `n` equal shares of the slots:
    /// a cluster whose masters hold equal shares (what `redis-cli --cluster
    /// create` makes) then holds `n / masters` partitions each. The names
    /// depend on `n`: see [`Self::check`] for a change of `n`.
    pub fn new(prefix: &str, n: usize, cluster: bool) -> Self {
        let n = n.max(1);
        let salt_tag = if cluster { "{salt}:" } else { "salt:" };
        let partitions = if n == 1 && !cluster {
            vec![Keys::new(prefix)]
        } else {
            (0..n)
                .map(|i| Keys::with_tag(prefix, &Self::tag(i, n)))
                .collect()
        };
        Self {
            partitions,
            salt: format!("{prefix}{salt_tag}"),
            marker: format!("{prefix}partitions"),
        }
    }

    fn tag(i: usize, n: usize) -> String {
        let share = f64::from(SLOTS) / n as f64;
        let middle = (i as f64 + 0.5) * share;
        // Within a quarter of a share of the middle (at least one slot):
        // found within a few thousand tries for any `n` allowed.
        let reach = (share / 4.0).max(1.0);
        let near = |slot: u16| (f64::from(slot) - middle).abs() <= reach;
        (0u32..)
            .map(|k| format!("{{q{i}.{k}}}"))
            .find(|tag| near(slot_of(&tag[1..tag.len() - 1])))
            .unwrap_or_default()
    }
}

/// Connection settings shared by the API and worker sides.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One URL, or a cluster's nodes separated by commas.
    pub url: String,
    /// PEM file of the CA that signed the server's certificate (`rediss://`
    /// with a private CA); `None` uses the usual public roots.
    pub ca_cert: Option<std::path::PathBuf>,
    pub prefix: String,
    /// Streams the queue is split into (`QUEUE_PARTITIONS`).
    pub partitions: usize,
    /// Most entries in the queue (all partitions).
    pub max_len: u64,
    /// Most payload bytes (the events' JSON) in the queue (all partitions).
    pub max_bytes: u64,
}

impl RedisConfig {
    fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
}

pub fn client(config: &RedisConfig) -> Result<Client, String> {
    let url = config.urls().first().copied().unwrap_or_default();
    match &config.ca_cert {
        None => Client::open(url).map_err(|e| e.to_string()),
        Some(path) => Client::build_with_tls(url, certificates(path)?).map_err(|e| e.to_string()),
    }
}

fn certificates(path: &Path) -> Result<redis::TlsCertificates, String> {
    Ok(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(read_ca(path)?),
    })
}

fn read_ca(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read CA certificate {}: {e}", path.display()))
}

/// A connection to one server, or to a cluster (commands routed to the
/// master of their keys' slot).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
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

/// Connects to the server or cluster `config` names: a cluster when it
/// lists several nodes, or when its one server says it is a cluster node.
pub async fn connect(config: &RedisConfig, response_timeout: Duration) -> Result<Conn, String> {
    let urls = config.urls();
    if urls.is_empty() {
        return Err("no Redis URL".into());
    }
    if urls.len() == 1 {
        // One server: a cluster only if it says it is one.
        let mut single = manager(&client(config)?, response_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut single)
            .await
            .map_err(|e| e.to_string())?;
        if !info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Ok(Conn::Single(single));
        }
    }
    let mut builder = ClusterClientBuilder::new(urls)
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(response_timeout)
        .retries(2);
    if let Some(path) = &config.ca_cert {
        builder = builder.certs(certificates(path)?);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    client
        .get_async_connection()
        .await
        .map(Conn::Cluster)
        .map_err(|e| e.to_string())
}

/// Connects, checks that the streams in Redis were made with the same
/// number of partitions (see [`Layout::new`]), and makes every group.
async fn open(config: &RedisConfig, response_timeout: Duration) -> Result<(Conn, Layout), String> {
    let mut conn = connect(config, response_timeout).await?;
    let layout = Layout::new(&config.prefix, config.partitions, conn.is_cluster());
    check_layout(&mut conn, config, &layout)
        .await
        .map_err(|e| match e {
            LayoutError::Redis(e) => e.to_string(),
            LayoutError::Changed(message) => message,
        })?;
    for keys in &layout.partitions {
        ensure_group(&mut conn, keys)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((conn, layout))
}

enum LayoutError {
    Redis(RedisError),
    Changed(String),
}

impl From<RedisError> for LayoutError {
    fn from(e: RedisError) -> Self {
        LayoutError::Redis(e)
    }
}

/// Renaming the streams (another number of partitions) while the old ones
/// hold events would leave those events where no worker reads: refused.
/// Once they are empty, the new number is recorded and used. A queue made
/// before partitions existed has no record: one partition.
async fn check_layout(
    conn: &mut Conn,
    config: &RedisConfig,
    layout: &Layout,
) -> Result<(), LayoutError> {
    let recorded: Option<usize> = redis::cmd("GET")
        .arg(&layout.marker)
        .query_async(conn)
        .await?;
    let before = recorded.unwrap_or(1);
    if before != layout.partitions.len() {
        let old = Layout::new(&config.prefix, before, conn.is_cluster());
        let mut waiting = 0u64;
        for keys in &old.partitions {
            let n: u64 = redis::cmd("XLEN")
                .arg(&keys.stream)
                .query_async(conn)
                .await?;
            waiting += n;
        }
        if waiting > 0 {
            return Err(LayoutError::Changed(format!(
                "QUEUE_PARTITIONS is {} but the queue in Redis was made with {before} and still \
                 holds {waiting} events: let workers with QUEUE_PARTITIONS={before} empty it first",
                layout.partitions.len()
            )));
        }
    }
    if recorded != Some(layout.partitions.len()) {
        let () = redis::cmd("SET")
            .arg(&layout.marker)
            .arg(layout.partitions.len())
            .query_async(conn)
            .await?;
    }
    Ok(())
}

/// Creates the stream and the group if missing. The group starts at `0`, not
/// `$`: events queued before any worker existed must still be delivered.
async fn ensure_group(conn: &mut Conn, keys: &Keys) -> Result<(), RedisError> {
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

/// Most requests one round trip to Redis carries.
const MAX_GROUP: usize = 512;
/// Most payload bytes one round trip carries (a request is never split).
const MAX_GROUP_BYTES: usize = 4 << 20;
/// Round trips to Redis under way at once; requests arriving meanwhile
/// wait and go together in the next.
const GROUPS_IN_FLIGHT: usize = 4;
/// Requests waiting to be sent; beyond it `enqueue` waits (within its 1 s).
const WAITING_REQUESTS: usize = 8_192;

/// The API's side.
///
/// Requests are not sent one by one: a task of the queue takes every
/// request waiting when a round trip can start and sends them in one
/// script call (each still whole or not at all), so that under load one
/// round trip, one script run and one reply carry many requests, as the
/// embedded queue's group commit does. Alone, a request goes at once.
#[derive(Clone)]
pub struct RedisQueue {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Pending>,
}

struct Shared {
    conn: Conn,
    layout: Layout,
    /// Each partition's share of the limits.
    max_len: u64,
    max_bytes: u64,
    script: Script,
    /// The partition the next group tries first.
    next: AtomicUsize,
}

/// A request waiting to be sent, and where its answer goes.
struct Pending {
    payloads: Vec<Vec<u8>>,
    answer: oneshot::Sender<Result<(), QueueError>>,
}

impl RedisQueue {
    pub async fn connect(config: &RedisConfig) -> Result<Self, String> {
        let (conn, layout) = open(config, Duration::from_millis(900)).await?;
        let n = layout.partitions.len() as u64;
        let shared = Arc::new(Shared {
            conn,
            layout,
            max_len: (config.max_len / n).max(1),
            max_bytes: (config.max_bytes / n).max(1),
            script: Script::new(ENQUEUE_SCRIPT),
            next: AtomicUsize::new(0),
        });
        let (requests, waiting) = mpsc::channel(WAITING_REQUESTS);
        // Ends when the last handle of this queue is dropped.
        tokio::spawn(send_groups(Arc::clone(&shared), waiting));
        Ok(Self { shared, requests })
    }

    /// The keys of each partition.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }
}

/// Takes the waiting requests a group at a time and sends each group.
async fn send_groups(shared: Arc<Shared>, mut waiting: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        // Waiting for a free slot lets the requests arriving meanwhile
        // join this group.
        let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let mut bytes: usize = first.payloads.iter().map(Vec::len).sum();
        let mut group = vec![first];
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            let Ok(next) = waiting.try_recv() else { break };
            bytes += next.payloads.iter().map(Vec::len).sum::<usize>();
            group.push(next);
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            shared.send(group).await;
            drop(slot);
        });
    }
}

impl Shared {
    /// Sends a group to one partition, chosen round robin; the requests it
    /// has no room for go on to the next partition, and are refused only
    /// when no partition has room.
    async fn send(&self, mut group: Vec<Pending>) {
        let n = self.layout.partitions.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            let keys = &self.layout.partitions[(first + i) % n];
            let call = self.add(keys, &group);
            let results = match tokio::time::timeout(ENQUEUE_TIMEOUT, call).await {
                Err(_) => Err(QueueError::Unavailable(
                    "redis did not answer within 1 s".into(),
                )),
                Ok(Err(e)) => Err(unavailable(e)),
                Ok(Ok(r)) if r.len() == group.len() => Ok(r),
                Ok(Ok(r)) => Err(QueueError::Unavailable(format!(
                    "redis answered {} results for {} requests",
                    r.len(),
                    group.len()
                ))),
            };
            let results = match results {
                Ok(r) => r,
                Err(e) => {
                    for p in group {
                        let _ = p.answer.send(Err(e.clone()));
                    }
                    return;
                }
            };
            let mut full = Vec::new();
            for (p, added) in group.into_iter().zip(results) {
                if added > 0 {
                    let _ = p.answer.send(Ok(()));
                } else {
                    full.push(p);
                }
            }
            if full.is_empty() {
                return;
            }
            group = full;
        }
        for p in group {
            let _ = p.answer.send(Err(QueueError::Full));
        }
    }

    async fn add(&self, keys: &Keys, group: &[Pending]) -> Result<Vec<i64>, RedisError> {
        let mut invocation = self.script.key(&keys.stream);
        invocation
            .key(&keys.bytes)
            .arg(self.max_len)
            .arg(self.max_bytes);
        for p in group {
            invocation.arg(p.payloads.len());
            for json in &p.payloads {
                invocation.arg(json.as_slice());
            }
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, events: Vec<Event>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let payloads = events
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| QueueError::Unavailable(err.to_string()))?;
        let (answer, answered) = oneshot::channel();
        let closed = || QueueError::Unavailable("the queue is closed".into());
        // One bound for the wait to be sent and the round trip: the API
        // answers within a second whatever Redis does.
        let sent = async {
            self.requests
                .send(Pending { payloads, answer })
                .await
                .map_err(|_| closed())?;
            answered.await.map_err(|_| closed())?
        };
        match tokio::time::timeout(ENQUEUE_TIMEOUT, sent).await {
            Err(_) => Err(QueueError::Unavailable(
                "redis did not answer within 1 s".into(),
            )),
            Ok(r) => r,
        }
    }

    async fn check(&self) -> Result<(), QueueError> {
        let mut conn = self.shared.conn.clone();
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
        let mut total = Depth {
            events: 0,
            bytes: Some(0),
            oldest_age: None,
        };
        for keys in &self.shared.layout.partitions {
            let d = self.partition_depth(keys).await?;
            total.events += d.events;
            total.bytes = Some(total.bytes.unwrap_or(0) + d.bytes.unwrap_or(0));
            total.oldest_age = total.oldest_age.max(d.oldest_age);
        }
        Ok(total)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

impl RedisQueue {
    async fn partition_depth(&self, keys: &Keys) -> Result<Depth, QueueError> {
        // Acknowledged entries are deleted (XACK + XDEL), so the stream holds
        // exactly the events not yet stored, and its first entry is the
        // oldest; its id starts with the millisecond Redis added it.
        let mut conn = self.shared.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN")
            .arg(&keys.stream)
            .cmd("XRANGE")
            .arg(&keys.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("GET")
            .arg(&keys.bytes);
        let call = pipe.query_async::<(u64, StreamRangeReply, Option<u64>)>(&mut conn);
        let (events, first, bytes) = match tokio::time::timeout(ENQUEUE_TIMEOUT, call).await {
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
        // An empty stream holds no bytes, even before the next enqueue has
        // reset a counter left behind (see ENQUEUE_SCRIPT).
        let bytes = if events == 0 { 0 } else { bytes.unwrap_or(0) };
        Ok(Depth {
            events,
            bytes: Some(bytes),
            oldest_age,
        })
    }
}

/// What the worker needs to acknowledge or dead-letter an entry.
#[derive(Debug)]
pub struct EntryTag {
    /// The partition the entry is in.
    pub partition: usize,
    pub id: String,
    /// Bytes of the entry's event field, as counted in `<prefix>bytes` when
    /// it was queued: what settling it frees.
    size: usize,
    /// The entry's fields as read, kept only when they are not a valid event
    /// (they go to the dead-letter stream unchanged).
    raw: Option<Vec<(String, Vec<u8>)>>,
}

/// Settings of the worker's side.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long an entry may stay pending with a worker before another claims it.
    pub claim_idle: Duration,
    /// Most entries kept in the dead-letter stream (of each partition).
    pub dead_letter_max_len: u64,
}

/// How long a read waits for entries on one partition when the queue has
/// several and all were empty: the others are looked at again after it.
const PARTITION_BLOCK: Duration = Duration::from_millis(100);

/// The worker's side. It owns a connection of its own: its reads block for up
/// to a second, and on a shared multiplexed connection they would hold up the
/// commands queued behind them.
pub struct RedisConsumer {
    conn: Conn,
    layout: Layout,
    name: String,
    config: ConsumerConfig,
    next_claim: Instant,
    /// The partition the next read looks at first.
    next_read: usize,
}

impl RedisConsumer {
    pub async fn connect(redis: &RedisConfig, config: ConsumerConfig) -> Result<Self, String> {
        // Responses may take as long as the blocking read, plus slack.
        let (mut conn, layout) = open(redis, BLOCK + Duration::from_secs(2)).await?;
        // Loaded now rather than on first use (EVALSHA, NOSCRIPT, load, and
        // again): the first acknowledgement takes one round trip like the
        // others. After a Redis restart empties its script cache, the
        // invocations load them again themselves.
        for script in [&*SETTLE, &*LEAVE, &*KEEP_ALIVE] {
            script
                .load_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
        }
        let name = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple());
        Ok(Self {
            conn,
            layout,
            name,
            config,
            next_claim: Instant::now(),
            next_read: 0,
        })
    }

    /// This consumer's name in the groups.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Claims entries of one partition left pending by other (presumably
    /// dead) workers.
    async fn claim_stale(
        &mut self,
        partition: usize,
        max: usize,
    ) -> Result<Vec<Delivery<EntryTag>>, RedisError> {
        let keys = &self.layout.partitions[partition];
        let idle_ms = self.config.claim_idle.as_millis() as u64;
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&keys.stream)
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
        cmd.arg(&keys.stream)
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
                to_delivery(partition, entry, attempts as u32)
            })
            .collect())
    }

    async fn claim_or_read(&mut self, max: usize) -> Result<Vec<Delivery<EntryTag>>, RedisError> {
        if Instant::now() >= self.next_claim {
            // Looking for stale entries every quarter of the idle time keeps a
            // dead worker's entries waiting at most 1.25 × claim_idle.
            self.next_claim = Instant::now() + self.config.claim_idle / 4;
            for partition in 0..self.layout.partitions.len() {
                // Before claiming: a consumer whose entries this pass is
                // about to take over still has them pending now, so it
                // stays; it goes on a later pass, once everything it held
                // has been taken over (which may take several passes, `max`
                // entries each).
                if let Err(e) = self.forget_idle_consumers(partition).await {
                    // Tidying only; the claim below meets a missing group
                    // too and handles it.
                    if e.code() != Some("NOGROUP") {
                        tracing::warn!(error = %e, "cannot remove idle consumers from the group");
                    }
                }
                let claimed = self.claim_stale(partition, max).await?;
                if !claimed.is_empty() {
                    // The other partitions' turn comes with the next pass:
                    // make it the next fetch.
                    self.next_claim = Instant::now();
                    return Ok(claimed);
                }
            }
        }
        let n = self.layout.partitions.len();
        if n == 1 {
            return self.read_new(0, max, Some(BLOCK)).await;
        }
        // Each partition in turn without waiting, starting after the one
        // read last, so that a busy partition does not starve the others;
        // when all are empty, a short wait on one.
        for i in 0..n {
            let partition = (self.next_read + i) % n;
            let got = self.read_new(partition, max, None).await?;
            if !got.is_empty() {
                self.next_read = (partition + 1) % n;
                return Ok(got);
            }
        }
        let partition = self.next_read;
        self.next_read = (partition + 1) % n;
        self.read_new(partition, max, Some(PARTITION_BLOCK)).await
    }

    /// How long a consumer with nothing pending may go unheard of before
    /// another worker removes it from the group: twice the time after which
    /// its entries would have been taken from it as from a dead worker (a
    /// minute with the default `WORKER_CLAIM_IDLE_MS`).
    ///
    /// A live worker may be removed too: Redis 7.0 resets a consumer's idle
    /// time when it is handed entries or claims some, not when a read finds
    /// nothing, so a worker on an empty queue looks idle. That is harmless:
    /// it has nothing pending (checked in the same step as the removal, see
    /// LEAVE_SCRIPT), and its next read that gets entries makes it a consumer
    /// again. Tying the bound to the claim timeout keeps the two in
    /// proportion, and lets tests with a short claim timeout see it.
    fn forget_after(&self) -> Duration {
        self.config.claim_idle * 2
    }

    /// Removes `consumer` from one partition's group if it has nothing
    /// pending there; true when it is no longer in the group.
    async fn leave_group(&mut self, partition: usize, consumer: &str) -> Result<bool, RedisError> {
        let left: i64 = LEAVE
            .key(&self.layout.partitions[partition].stream)
            .arg(GROUP)
            .arg(consumer)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(left == 1)
    }

    /// Removes consumers left behind by workers that stopped without leaving
    /// (killed, crashed, lost their connection): those with nothing pending
    /// that have been idle longer than [`Self::forget_after`].
    async fn forget_idle_consumers(&mut self, partition: usize) -> Result<(), RedisError> {
        let bound = self.forget_after().as_millis();
        let info: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.layout.partitions[partition].stream)
            .arg(GROUP)
            .query_async(&mut self.conn)
            .await?;
        for c in info.consumers {
            // The pending count here only saves a round trip: it may be
            // stale by now, and LEAVE_SCRIPT checks again.
            if c.pending > 0 || (c.idle as u128) <= bound || c.name == self.name {
                continue;
            }
            if self.leave_group(partition, &c.name).await? {
                tracing::info!(
                    consumer = %c.name,
                    idle_ms = c.idle,
                    partition,
                    "removed an idle consumer with nothing pending from the group"
                );
            }
        }
        Ok(())
    }

    async fn read_new(
        &mut self,
        partition: usize,
        max: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Delivery<EntryTag>>, RedisError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        let reply: Option<StreamReadReply> = cmd
            .arg("STREAMS")
            .arg(&self.layout.partitions[partition].stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| to_delivery(partition, entry, 1))
            .collect())
    }

    /// The deliveries of each partition, in partition order.
    fn by_partition<T>(
        &self,
        items: Vec<T>,
        partition: impl Fn(&T) -> usize,
    ) -> Vec<(usize, Vec<T>)> {
        let mut parts: Vec<Vec<T>> = (0..self.layout.partitions.len())
            .map(|_| Vec::new())
            .collect();
        for item in items {
            let p = partition(&item);
            if let Some(part) = parts.get_mut(p) {
                part.push(item);
            }
        }
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }
}

/// Reads an entry as an event, keeping the raw fields when that fails.
fn to_delivery(partition: usize, entry: StreamId, attempts: u32) -> Delivery<EntryTag> {
    let size = match entry.map.get(FIELD) {
        Some(Value::BulkString(bytes)) => bytes.len(),
        _ => 0,
    };
    let parsed = match entry.map.get(FIELD) {
        // Parsing checks every rule a client's event is held to.
        Some(Value::BulkString(bytes)) => {
            serde_json::from_slice::<Event>(bytes).map_err(|e| format!("not a valid event: {e}"))
        }
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
        tag: EntryTag {
            partition,
            id: entry.id,
            size,
            raw,
        },
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
                for keys in &self.layout.partitions {
                    ensure_group(&mut self.conn, keys)
                        .await
                        .map_err(unavailable)?;
                }
                Ok(Vec::new())
            }
            other => other.map_err(unavailable),
        }
    }

    async fn ack(&mut self, deliveries: Vec<Delivery<EntryTag>>) -> Result<(), QueueError> {
        for (partition, deliveries) in self.by_partition(deliveries, |d| d.tag.partition) {
            let keys = &self.layout.partitions[partition];
            let mut invocation = SETTLE.key(&keys.stream);
            invocation.key(&keys.bytes).arg(GROUP);
            for d in &deliveries {
                invocation.arg(&d.tag.id).arg(d.tag.size);
            }
            invocation
                .invoke_async::<u64>(&mut self.conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        deliveries: Vec<(Delivery<EntryTag>, String)>,
    ) -> Result<u64, QueueError> {
        let mut trimmed_total = 0;
        for (partition, deliveries) in self.by_partition(deliveries, |(d, _)| d.tag.partition) {
            let keys = &self.layout.partitions[partition];
            // One transaction (MULTI/EXEC): no other client runs between the
            // copies to the dead-letter stream, its trim, and the removal
            // from the queue (all keys of one partition: one slot).
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (d, reason) in &deliveries {
                let cmd = pipe
                    .cmd("XADD")
                    .arg(&keys.dead)
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
            }
            // Exact (`=`, not `~`), after the adds: the newest entries are
            // kept, and the answer is the number dropped, which the metric
            // counts.
            pipe.cmd("XTRIM")
                .arg(&keys.dead)
                .arg("MAXLEN")
                .arg("=")
                .arg(self.config.dead_letter_max_len);
            // EVAL, not EVALSHA: inside a transaction a script missing from
            // the server's cache (after a restart) could not be loaded and
            // retried without the adds above running twice.
            let cmd = pipe
                .cmd("EVAL")
                .arg(SETTLE_SCRIPT)
                .arg(2)
                .arg(&keys.stream)
                .arg(&keys.bytes)
                .arg(GROUP);
            for (d, _) in &deliveries {
                cmd.arg(&d.tag.id).arg(d.tag.size);
            }
            cmd.ignore();
            let (trimmed,): (u64,) = pipe
                .query_async(&mut self.conn)
                .await
                .map_err(unavailable)?;
            trimmed_total += trimmed;
        }
        Ok(trimmed_total)
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
        // timeout, or retries through a store outage). Only entries still
        // this worker's: see KEEP_ALIVE_SCRIPT.
        for (partition, ids) in self.by_partition(
            deliveries
                .iter()
                .map(|d| (d.tag.partition, &d.tag.id))
                .collect(),
            |(p, _)| *p,
        ) {
            let mut invocation = KEEP_ALIVE.key(&self.layout.partitions[partition].stream);
            invocation.arg(GROUP).arg(&self.name);
            for (_, id) in ids {
                invocation.arg(id);
            }
            if let Err(e) = invocation.invoke_async::<u64>(&mut self.conn).await {
                // Not fatal: at worst another worker claims them, and the
                // store absorbs the duplicate.
                tracing::warn!(error = %e, "cannot refresh pending entries");
            }
        }
    }

    async fn close(&mut self) {
        // Leave each group, unless entries are still pending with this
        // consumer there (the worker stopped while retrying a store outage):
        // then it stays, so that another worker can claim them, and goes
        // later (see `forget_idle_consumers`). Bounded: shutdown must not
        // wait on a Redis that does not answer.
        let name = self.name.clone();
        for partition in 0..self.layout.partitions.len() {
            match tokio::time::timeout(LEAVE_TIMEOUT, self.leave_group(partition, &name)).await {
                Ok(Ok(true)) => {
                    tracing::debug!(consumer = %name, partition, "left the consumer group")
                }
                Ok(Ok(false)) => tracing::info!(
                    consumer = %name,
                    partition,
                    "entries are pending with this worker: it stays in the group for another worker to claim them"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot leave the consumer group"),
                Err(_) => {
                    tracing::warn!("cannot leave the consumer group: redis did not answer");
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl crate::visitor::SaltSource for RedisQueue {
    /// One key per day, made with `SET NX` (the first process's salt is
    /// everyone's) and expiring by itself at the end of the next day's
    /// grace period: Redis deletes it, no process has to.
    async fn salts(&self, now_ms: i64) -> Result<crate::visitor::Salts, crate::visitor::SaltError> {
        use crate::visitor::{GRACE, Salt, SaltError, Salts, day_of};
        let (day, grace) = day_of(now_ms);
        let key = |d: i64| format!("{}{d}", self.shared.layout.salt);
        let expires = (day + 1) * crate::query::time::DAY_MS + GRACE.as_millis() as i64;
        let fresh = Salt::random()?;
        let mut conn = self.shared.conn.clone();
        let (today, yesterday): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::pipe()
            .cmd("SET")
            .arg(key(day))
            .arg(fresh.0.as_slice())
            .arg("NX")
            .arg("PXAT")
            .arg(expires)
            .ignore()
            .get(key(day))
            .get(key(day - 1))
            .query_async(&mut conn)
            .await
            .map_err(|e| SaltError(e.to_string()))?;
        Ok(Salts {
            day,
            current: today
                .as_deref()
                .and_then(Salt::from_slice)
                .ok_or_else(|| SaltError("the day's salt is missing".into()))?,
            previous: if grace {
                yesterday.as_deref().and_then(Salt::from_slice)
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_on_one_server_keeps_the_names_of_an_unsplit_queue() {
        let layout = Layout::new("p:", 1, false);
        assert_eq!(layout.partitions.len(), 1);
        assert_eq!(layout.partitions[0].stream, "p:events");
        assert_eq!(layout.partitions[0].bytes, "p:bytes");
        assert_eq!(layout.partitions[0].dead, "p:dead");
        assert_eq!(layout.salt, "p:salt:");
    }

    #[test]
    fn partitions_take_equal_shares_of_the_slots_and_share_a_tag_per_partition() {
        for n in [1, 2, 3, 6, 7, 64, 256] {
            let layout = Layout::new("p:", n, true);
            assert_eq!(layout.partitions.len(), n);
            let share = f64::from(SLOTS) / n as f64;
            for (i, keys) in layout.partitions.iter().enumerate() {
                let tag = keys.stream["p:".len()..].strip_suffix("events").unwrap();
                assert!(tag.starts_with('{') && tag.ends_with('}'), "{tag}");
                assert_eq!(keys.bytes, format!("p:{tag}bytes"));
                assert_eq!(keys.dead, format!("p:{tag}dead"));
                let slot = f64::from(slot_of(&tag[1..tag.len() - 1]));
                assert!(
                    slot >= i as f64 * share && slot < (i + 1) as f64 * share,
                    "partition {i} of {n}: slot {slot}"
                );
            }
        }
    }

    #[test]
    fn slots_are_those_redis_computes() {
        // From `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("123456789"), 12739);
    }
}
