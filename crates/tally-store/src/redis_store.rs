//! The shared storage backend on a Redis Cluster: several `tally serve` nodes write to one
//! cluster, and a Lua compare-and-set on each agent's version keeps their writes of one
//! agent from ever interleaving.
//!
//! Keys, every key of one agent under one hash tag (so in one slot, on one master), agent
//! ids being `[A-Za-z0-9._:-]` (no braces):
//! - `tally:{A}:r`, a hash: `v` the version (the agent's `last_seq`, decimal), `s` the
//!   record (`codec::encode_agent`), `t` the limiter state (`codec::encode_rate`);
//! - `tally:{A}:j`, a list of `codec::encode_event`: element i is the entry with seq i+1
//!   (journals are dense from 1), so a page of the journal is one `LRANGE`;
//! - `tally:{A}:k:<slot as 32 hex digits>`, a string: `codec::encode_key_record`, set with
//!   `PX` = the idempotency retention, so Redis forgets keys by itself;
//! - `tally:agents:{<b>}`, 16 sorted sets (b = FNV-1a of the id mod 16), score 0, member the
//!   agent id: the index of agents, for paging through them by id;
//! - `tally:due:{<b>}`, 16 sorted sets, member = due_ms as 8 bytes big-endian followed by
//!   the agent id, score = due_ms: the agents with a hold or grant expiring then (shared
//!   mode keeps no agent in memory, so hold expiries are indexed here too).
//!
//! One write of one agent is one `EVALSHA` of [`APPLY_SCRIPT`], atomic on its master: it
//! checks that the stored version and the journal's length both equal `expected_seq` and
//! the stored limiter state equals `rate_before` (else it writes nothing and answers 0, a
//! conflict; a version that matches a journal of another length answers 2, a corrupt
//! agent), then sets the record, appends the entries
//! and sets the idempotency records. The scripts of one `apply_each` are grouped by master
//! and sent as one pipeline per master, all masters at once: one round trip per master per
//! group commit, not one per agent. (The `redis` crate's cluster pipeline does not split by
//! master itself: it sends a whole pipeline to the node of its first key, so the grouping
//! is done here from `CLUSTER SLOTS`; a stale map costs an `Unavailable`, never a misplaced
//! write, since Redis refuses a key of a slot it does not serve.)
//!
//! The two indexes live in other slots than the agent, so they cannot be written by the
//! agent's script: their `ZADD`s go out *before* the scripts, and a write whose index
//! update failed is not sent. A crash between the two leaves only an extra member (an id
//! whose create conflicted or failed, which reads skip because it has no record; a due time
//! at which nothing is due, which the sweep looks at once and removes). The other order
//! could leave an agent that exists but is missing from an index: never listed, or a hold
//! that never expires.
//!
//! What a failover can lose: Redis replicates asynchronously. A master killed after it
//! answered a script but before its replica received the write loses that write when the
//! replica takes over, although tally answered it. With `wait_replicas` ≥ 1, `sync` runs
//! `WAIT` on every master written since the last sync and fails (`Unavailable`, so nothing
//! is answered as done) unless enough replicas acknowledged. Without it, durability is that
//! of the master alone (`appendfsync always`: fsynced before it answered).
//!
//! The `redis` client is async; [`Storage`] is synchronous and is called from plain threads
//! and from `spawn_blocking` threads of the server's runtime. Every call therefore runs as a
//! task on a small runtime owned here and waits for it on a std channel, which works from
//! any thread (`Runtime::block_on` would panic inside another runtime's context), bounded by
//! `op_timeout_ms`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};
use tally_core::{AgentId, AgentState, Event, IdempotencyKey, RateState, TimestampMs};

use crate::codec::{self, CodecError};
use crate::error::StoreError;
use crate::keyindex;
use crate::storage::{
    AgentWrite, FeedCursor, FeedPage, GrantExpiry, KeyEntry, KeyIndexStatus, Storage, WriteResult,
};

/// How long an idempotency record is kept by default: the 24 h window of the key index.
pub const REDIS_IDEMPOTENCY_RETENTION_MS_DEFAULT: u64 = 24 * 60 * 60 * 1_000;
/// `WAIT`'s bound on waiting for replicas, by default.
pub const REDIS_WAIT_TIMEOUT_MS_DEFAULT: u64 = 1_000;
/// Every call to the cluster (a read, a whole `apply_each`, a `sync`) is bounded by this,
/// by default; past it the call is `Unavailable`.
pub const REDIS_OP_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Buckets of each index (`tally:agents:{b}`, `tally:due:{b}`): spread over the masters,
/// few enough that a merged read asks each once.
pub const INDEX_BUCKETS: u32 = 16;
/// Worker threads of the runtime that drives the connections (they only do I/O).
const RUNTIME_WORKER_THREADS: usize = 2;
/// Entries read by one `LRANGE` (a longer journal page is read in several).
const JOURNAL_RANGE_MAX: usize = 1_000;
/// Members read from one index set at a time.
const INDEX_PAGE_MAX: usize = 1_000;
/// Agents read by `load_agents` at a time.
const LOAD_AGENTS_PAGE_MAX: usize = 1_000;
/// Entries pushed by one `RPUSH` in the script: Lua's `unpack` is bounded by its C stack
/// (LUAI_MAXCSTACK, 8,000 slots).
const SCRIPT_RPUSH_CHUNK_MAX: usize = 1_000;
/// Number of hash slots of a Redis Cluster.
const CLUSTER_SLOTS: u16 = 16_384;

/// The compare-and-set of one agent write. KEYS: record, journal, then one idempotency
/// record key per key record. ARGV: expected version, new version, record, limiter state,
/// retention in ms, the number n of entries, the n entries, the key records, and last the
/// limiter state the node read (empty for an agent it created).
/// Answers 1 (applied), 0 (the version or the limiter state is not the expected one:
/// nothing written) or 2 (the version matches but the journal's length does not: a corrupt
/// agent, nothing written). The limiter is compared too because a denial for funds takes a
/// cell and journals nothing: such a write changes the limiter alone, which the version
/// cannot tell apart from another node's doing the same.
pub const APPLY_SCRIPT: &str = r#"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then v = '0' end
if v ~= ARGV[1] then return 0 end
local t = redis.call('HGET', KEYS[1], 't')
if not t then t = '' end
if t ~= ARGV[#ARGV] then return 0 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[1]) then return 2 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 's', ARGV[3], 't', ARGV[4])
local n = tonumber(ARGV[6])
local chunk = tonumber(ARGV[7])
local i = 1
while i <= n do
  local last = math.min(n, i + chunk - 1)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 7 + i, 7 + last))
  i = last + 1
end
for k = 3, #KEYS do
  redis.call('SET', KEYS[k], ARGV[7 + n + k - 2], 'PX', ARGV[5])
end
return 1
"#;
/// What [`APPLY_SCRIPT`] answers.
const SCRIPT_APPLIED: i64 = 1;
const SCRIPT_CONFLICT: i64 = 0;
const SCRIPT_CORRUPT: i64 = 2;

/// Where the cluster is and how it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Some nodes of the cluster, `host:port`; the rest are discovered.
    pub nodes: Vec<String>,
    /// How long an idempotency record is kept (its `PX`).
    pub idempotency_retention_ms: u64,
    /// Replicas that must acknowledge every write before `sync` succeeds; 0 = no `WAIT`.
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
    /// Bound on every call to the cluster.
    pub op_timeout_ms: u64,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            idempotency_retention_ms: REDIS_IDEMPOTENCY_RETENTION_MS_DEFAULT,
            wait_replicas: 0,
            wait_timeout_ms: REDIS_WAIT_TIMEOUT_MS_DEFAULT,
            op_timeout_ms: REDIS_OP_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// A [`Storage`] on a Redis Cluster, shared by every node that connects to it.
pub struct RedisStorage {
    inner: Arc<Inner>,
    /// Taken by `drop` to shut it down without blocking (dropping a runtime blocks, which
    /// panics inside another runtime's context).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// The change feed is not offered; its position never moves.
    feed_tx: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStorage")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct Inner {
    options: RedisOptions,
    /// For scripts and `WAIT`: no retries by the client, since a pipeline resent after a
    /// lost answer would meet its own first run as a conflict.
    write_conn: ClusterConnection,
    /// For reads, which the client may retry and redirect freely.
    read_conn: ClusterConnection,
    script: redis::Script,
    /// `CLUSTER SLOTS`, ranges with their master, for grouping scripts by master.
    slots: RwLock<Vec<SlotRange>>,
    slots_stale: AtomicBool,
    /// Masters written since the last `sync`, each with a slot it serves (to route `WAIT`).
    written: Mutex<HashMap<String, u16>>,
}

#[derive(Debug, Clone)]
struct SlotRange {
    first: u16,
    last: u16,
    master: String,
}

impl RedisStorage {
    /// Connects to the cluster, checks that it is whole (`cluster_state:ok`), learns which
    /// master serves which slots and loads the script on every master.
    pub fn connect(options: &RedisOptions) -> Result<Self, StoreError> {
        if options.nodes.is_empty() {
            return Err(StoreError::Config("redis: no cluster nodes given".into()));
        }
        if options.op_timeout_ms == 0 || options.idempotency_retention_ms == 0 {
            return Err(StoreError::Config(
                "redis: op_timeout_ms and idempotency_retention_ms must be positive".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_WORKER_THREADS)
            .thread_name("tally-redis")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("starting the redis runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let op_timeout = Duration::from_millis(options.op_timeout_ms);
        let urls: Vec<String> = options
            .nodes
            .iter()
            .map(|n| format!("redis://{n}"))
            .collect();
        let client = |retries: u32| {
            redis::cluster::ClusterClientBuilder::new(urls.clone())
                .connection_timeout(op_timeout)
                .response_timeout(op_timeout)
                .retries(retries)
                .build()
                .map_err(|e| StoreError::Config(format!("redis cluster client: {e}")))
        };
        let (write_client, read_client) = (client(0)?, client(3)?);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        handle.spawn(async move {
            let connect = async {
                let w = write_client.get_async_connection().await;
                let r = read_client.get_async_connection().await;
                Ok::<_, RedisError>((w?, r?))
            };
            let result = match tokio::time::timeout(op_timeout, connect).await {
                Ok(r) => r.map_err(|e| redis_error("connecting", e)),
                Err(_) => Err(timed_out("connecting", op_timeout)),
            };
            let _ = tx.send(result);
        });
        let (write_conn, read_conn) = rx
            .recv()
            .map_err(|_| StoreError::Unavailable("redis: the connecting task ended".into()))??;
        let storage = Self {
            inner: Arc::new(Inner {
                options: options.clone(),
                write_conn,
                read_conn,
                script: redis::Script::new(APPLY_SCRIPT),
                slots: RwLock::new(Vec::new()),
                slots_stale: AtomicBool::new(true),
                written: Mutex::new(HashMap::new()),
            }),
            runtime: Some(runtime),
            handle,
            feed_tx: tokio::sync::watch::channel(0).0,
        };
        storage.run("checking the cluster", |inner| async move {
            let mut conn = inner.read_conn.clone();
            // Every master, each answer on its own (no response policy: a map by node).
            let info = conn
                .route_command(
                    redis::cmd("CLUSTER").arg("INFO").clone(),
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await
                .map_err(|e| redis_error("CLUSTER INFO", e))?;
            let mut answers = Vec::new();
            texts_of(&info, &mut answers);
            if answers.is_empty()
                || !answers
                    .iter()
                    .all(|a| a.lines().any(|l| l.trim() == "cluster_state:ok"))
            {
                return Err(StoreError::Unavailable(
                    "redis: not every master reports cluster_state:ok".into(),
                ));
            }
            inner.refresh_slots().await?;
            let mut conn = inner.write_conn.clone();
            conn.route_command(
                redis::cmd("SCRIPT").arg("LOAD").arg(APPLY_SCRIPT).clone(),
                RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                )),
            )
            .await
            .map_err(|e| redis_error("SCRIPT LOAD", e))?;
            Ok(())
        })?;
        Ok(storage)
    }

    /// Runs `op` on the runtime and waits for it, bounded by `op_timeout_ms`; callable from
    /// any thread, including another runtime's `spawn_blocking`.
    fn run<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let op_timeout = Duration::from_millis(self.inner.options.op_timeout_ms);
        let fut = op(self.inner.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let result = match tokio::time::timeout(op_timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(timed_out(what, op_timeout)),
            };
            let _ = tx.send(result);
        });
        rx.recv()
            .map_err(|_| StoreError::Unavailable(format!("redis: {what}: the task ended")))?
    }

    fn ids_page(&self, after: Option<&AgentId>, limit: usize) -> Result<Vec<AgentId>, StoreError> {
        let after = after.map(|a| a.as_str().to_owned());
        self.run("listing agents", move |inner| async move {
            inner.agent_ids(after, limit).await
        })
    }
}

impl Drop for RedisStorage {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Inner {
    async fn refresh_slots(&self) -> Result<(), StoreError> {
        let mut conn = self.read_conn.clone();
        let v = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(|e| redis_error("CLUSTER SLOTS", e))?;
        let mut ranges = Vec::new();
        let Value::Array(entries) = v else {
            return Err(StoreError::Unavailable(
                "CLUSTER SLOTS: not an array".into(),
            ));
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(node))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let host = node.first().and_then(value_string);
            let port = match node.get(1) {
                Some(Value::Int(p)) => Some(*p),
                _ => None,
            };
            if let (Some(host), Some(port), Ok(first), Ok(last)) =
                (host, port, u16::try_from(*first), u16::try_from(*last))
            {
                ranges.push(SlotRange {
                    first,
                    last,
                    master: format!("{host}:{port}"),
                });
            }
        }
        ranges.sort_by_key(|r| r.first);
        *self.slots.write() = ranges;
        self.slots_stale.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Sends every `(key, command)` at once on the read connection (its multiplexed
    /// connections pipeline them: about one round trip per master) and answers in order.
    async fn read_each(
        &self,
        what: &'static str,
        cmds: Vec<(String, Cmd)>,
    ) -> Result<Vec<Value>, StoreError> {
        let mut tasks = Vec::with_capacity(cmds.len());
        for (key, cmd) in cmds {
            let mut conn = self.read_conn.clone();
            tasks.push(tokio::spawn(async move {
                conn.route_command(cmd, routing_of(&key)).await
            }));
        }
        let mut values = Vec::with_capacity(tasks.len());
        for task in tasks {
            values.push(join(task).await?.map_err(|e| redis_error(what, e))?);
        }
        Ok(values)
    }

    /// The master serving `slot` as last learned; a name of its own when unknown, so that
    /// the slot still gets a pipeline (routed by the client's map).
    fn master_of(&self, slot: u16) -> String {
        let slots = self.slots.read();
        let i = slots.partition_point(|r| r.last < slot);
        match slots.get(i) {
            Some(r) if r.first <= slot => r.master.clone(),
            _ => format!("slot {slot}"),
        }
    }

    async fn apply_each(
        self: Arc<Self>,
        writes: Vec<PreparedWrite>,
        index_adds: BTreeMap<String, Vec<IndexAdd>>,
    ) -> Result<Vec<WriteResult>, StoreError> {
        if self.slots_stale.load(Ordering::Relaxed) {
            // Best effort: a stale map only costs Unavailable answers, never a misplaced write.
            let _ = self.refresh_slots().await;
        }
        let mut results: Vec<Option<WriteResult>> = vec![None; writes.len()];

        // The indexes first (see the module doc): a write whose index update failed is
        // not sent.
        let mut tasks = Vec::new();
        for (key, adds) in index_adds {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&key);
            for add in &adds {
                cmd.arg(add.score).arg(add.member.as_slice());
            }
            let mut conn = self.read_conn.clone();
            let task = tokio::spawn(async move { conn.route_command(cmd, routing_of(&key)).await });
            tasks.push((adds, task));
        }
        for (adds, task) in tasks {
            if let Err(e) = join(task)
                .await
                .and_then(|r| r.map_err(|e| redis_error("ZADD", e)))
            {
                for add in adds {
                    results[add.write] = Some(WriteResult::Unavailable(format!(
                        "updating the index before the write: {e}"
                    )));
                }
            }
        }

        // One pipeline per master, all at once; then, for the scripts that did not run
        // (NOSCRIPT: a master that never loaded it, e.g. a promoted replica), once more with
        // the source. A pipeline keeps the order of one agent's writes.
        let writes = Arc::new(writes);
        let mut pending: Vec<usize> = (0..writes.len())
            .filter(|&i| results[i].is_none())
            .collect();
        let mut corrupt = None;
        for with_source in [false, true] {
            if pending.is_empty() {
                break;
            }
            if with_source && self.slots_stale.load(Ordering::Relaxed) {
                let _ = self.refresh_slots().await;
            }
            let mut not_run = Vec::new();
            for (i, answer) in self.send_scripts(&writes, &pending, with_source).await {
                match answer {
                    Answer::Done(r) => results[i] = Some(r),
                    Answer::Corrupt => corrupt = Some(writes[i].agent.clone()),
                    Answer::NotRun(why) if !with_source => {
                        not_run.push(i);
                        results[i] = Some(WriteResult::Unavailable(why));
                    }
                    Answer::NotRun(why) => results[i] = Some(WriteResult::Unavailable(why)),
                }
            }
            pending = not_run;
        }
        if let Some(agent) = corrupt {
            return Err(StoreError::Corrupt(format!(
                "agent {agent}: its stored version does not match its journal's length"
            )));
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| WriteResult::Unavailable("no answer".into())))
            .collect())
    }

    /// Sends the scripts of `which` writes as one pipeline per master, all masters at
    /// once, and says what each answered.
    async fn send_scripts(
        &self,
        writes: &Arc<Vec<PreparedWrite>>,
        which: &[usize],
        with_source: bool,
    ) -> Vec<(usize, Answer)> {
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        for &i in which {
            groups
                .entry(self.master_of(writes[i].slot))
                .or_default()
                .push(i);
        }
        let mut tasks = Vec::new();
        for (master, members) in groups {
            let mut pipe = redis::pipe();
            for &i in &members {
                pipe.add_command(if with_source {
                    writes[i].command_with_source()
                } else {
                    writes[i].command(self.script.get_hash())
                });
            }
            // Routed by the client's map to the master of the first slot; the others are
            // on that master too unless a slot moved (then Redis refuses them: MOVED).
            let route = Route::new(writes[members[0]].slot, SlotAddr::Master);
            let mut conn = self.write_conn.clone();
            let n = members.len();
            let task = tokio::spawn(async move {
                conn.route_pipeline(pipe, 0, n, SingleNodeRoutingInfo::SpecificNode(route))
                    .await
            });
            tasks.push((master, members, task));
        }
        let mut answers = Vec::with_capacity(which.len());
        for (master, members, task) in tasks {
            self.written.lock().insert(master, writes[members[0]].slot);
            match join(task)
                .await
                .and_then(|r| r.map_err(|e| redis_error("EVALSHA", e)))
            {
                Err(e) => {
                    // The outcome of every script of this pipeline is unknown. (The client
                    // turns a MOVED in a pipeline into an error of the whole pipeline.)
                    self.slots_stale.store(true, Ordering::Relaxed);
                    for i in members {
                        answers.push((i, Answer::Done(WriteResult::Unavailable(e.to_string()))));
                    }
                }
                Ok(values) => {
                    if values.len() != members.len() {
                        for i in members {
                            answers.push((
                                i,
                                Answer::Done(WriteResult::Unavailable(
                                    "redis: a pipeline answered a different number of replies"
                                        .into(),
                                )),
                            ));
                        }
                        continue;
                    }
                    for (i, value) in members.into_iter().zip(values) {
                        let answer = script_answer(value);
                        if matches!(answer, Answer::NotRun(_)) {
                            self.slots_stale.store(true, Ordering::Relaxed);
                        }
                        answers.push((i, answer));
                    }
                }
            }
        }
        answers
    }

    async fn agent_ids(
        self: Arc<Self>,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<AgentId>, StoreError> {
        let mut out = Vec::new();
        let mut cursor = after;
        while out.len() < limit {
            let want = (limit - out.len()).min(INDEX_PAGE_MAX);
            // The first `want` ids past the cursor are among each bucket's first `want`.
            let mut tasks = Vec::new();
            for b in 0..INDEX_BUCKETS {
                let key = agents_index_key(b);
                let min = match &cursor {
                    Some(c) => format!("({c}"),
                    None => "-".to_owned(),
                };
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(&key)
                    .arg(min)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(want);
                let mut conn = self.read_conn.clone();
                tasks.push(tokio::spawn(async move {
                    conn.route_command(cmd, routing_of(&key)).await
                }));
            }
            let mut candidates: Vec<String> = Vec::new();
            for task in tasks {
                let v = join(task).await?.map_err(|e| redis_error("ZRANGE", e))?;
                let members: Vec<String> = parsed("ZRANGE", v)?;
                candidates.extend(members);
            }
            if candidates.is_empty() {
                break;
            }
            candidates.sort();
            candidates.truncate(want);
            // Skip members whose create conflicted or failed (no record).
            let mut tasks = Vec::new();
            for id in &candidates {
                let key = record_key(id);
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(&key);
                let mut conn = self.read_conn.clone();
                tasks.push(tokio::spawn(async move {
                    conn.route_command(cmd, routing_of(&key)).await
                }));
            }
            for (id, task) in candidates.iter().zip(tasks) {
                let v = join(task).await?.map_err(|e| redis_error("EXISTS", e))?;
                if matches!(v, Value::Int(n) if n > 0) {
                    out.push(agent_id(id.as_bytes())?);
                }
            }
            let exhausted = candidates.len() < want;
            cursor = candidates.pop();
            if exhausted {
                break;
            }
        }
        Ok(out)
    }

    async fn due_entries(
        self: Arc<Self>,
        from_ms: TimestampMs,
        after: Option<Vec<u8>>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        // Each bucket's first `limit` (read in pages of INDEX_PAGE_MAX), merged: the caller's
        // `limit` bounds the memory (the grant sweep asks for GRANT_SWEEP_PAGE_MAX).
        if limit == 0 || from_ms > through_ms {
            return Ok(Vec::new());
        }
        let min_score = match after.as_deref().and_then(member_due_ms) {
            Some(due) => due.max(from_ms),
            None => from_ms,
        };
        let mut tasks = Vec::new();
        for b in 0..INDEX_BUCKETS {
            let this = self.clone();
            let after = after.clone();
            tasks.push(tokio::spawn(async move {
                this.due_bucket(b, min_score, after, through_ms, limit)
                    .await
            }));
        }
        let mut members = Vec::new();
        for task in tasks {
            members.extend(join(task).await??);
        }
        // Members start with the due time big-endian: their byte order is (due, agent).
        members.sort();
        members.truncate(limit);
        members
            .into_iter()
            .map(|key| {
                let expires_at_ms = member_due_ms(&key).ok_or_else(|| {
                    StoreError::Codec(CodecError::Decode(
                        "a due index member under 8 bytes".into(),
                    ))
                })?;
                Ok(GrantExpiry {
                    agent: agent_id(&key[8..])?,
                    key,
                    grant_id: 0,
                    expires_at_ms,
                })
            })
            .collect()
    }

    /// The first `limit` members of one due bucket with `min_score ≤ due ≤ through_ms`
    /// past `after`, paging over ties at the cursor's due time.
    async fn due_bucket(
        self: Arc<Self>,
        b: u32,
        min_score: TimestampMs,
        after: Option<Vec<u8>>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let key = due_index_key(b);
        let mut conn = self.read_conn.clone();
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&key)
                .arg(min_score)
                .arg(through_ms)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(offset)
                .arg(INDEX_PAGE_MAX);
            let v = conn
                .route_command(cmd, routing_of(&key))
                .await
                .map_err(|e| redis_error("ZRANGE", e))?;
            let page: Vec<Vec<u8>> = parsed("ZRANGE", v)?;
            let full = page.len() == INDEX_PAGE_MAX;
            offset += page.len();
            out.extend(
                page.into_iter()
                    .filter(|m| after.as_ref().is_none_or(|a| m > a)),
            );
            if out.len() >= limit || !full {
                out.truncate(limit);
                return Ok(out);
            }
        }
    }
}

/// One agent write, encoded, ready to be sent as a script.
struct PreparedWrite {
    agent: String,
    slot: u16,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl PreparedWrite {
    fn command(&self, sha: &str) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha);
        self.keys_and_args(&mut cmd);
        cmd
    }

    fn command_with_source(&self) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPLY_SCRIPT);
        self.keys_and_args(&mut cmd);
        cmd
    }

    fn keys_and_args(&self, cmd: &mut Cmd) {
        cmd.arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k);
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
    }
}

/// A member to add to an index set before the scripts, for write `write`.
struct IndexAdd {
    write: usize,
    score: u64,
    member: Vec<u8>,
}

enum Answer {
    Done(WriteResult),
    Corrupt,
    /// Refused before it ran (NOSCRIPT, MOVED, ASK): safe to send again.
    NotRun(String),
}

fn script_answer(value: Value) -> Answer {
    match value {
        Value::Int(SCRIPT_APPLIED) => Answer::Done(WriteResult::Applied),
        Value::Int(SCRIPT_CONFLICT) => Answer::Done(WriteResult::Conflict),
        Value::Int(SCRIPT_CORRUPT) => Answer::Corrupt,
        Value::ServerError(e) => match e.kind() {
            Some(ServerErrorKind::NoScript | ServerErrorKind::Moved | ServerErrorKind::Ask) => {
                Answer::NotRun(format!("redis: {e}"))
            }
            _ => Answer::Done(WriteResult::Unavailable(format!("redis: {e}"))),
        },
        other => Answer::Done(WriteResult::Unavailable(format!(
            "redis: the script answered {other:?}"
        ))),
    }
}

fn prepare(
    write: &AgentWrite,
    retention_ms: u64,
) -> Result<(PreparedWrite, Option<TimestampMs>), StoreError> {
    let shared_only = |what: &str| {
        StoreError::Config(format!(
            "the redis backend needs every write's {what}: the engine must run in shared mode"
        ))
    };
    let state = write
        .checkpoint
        .as_ref()
        .ok_or_else(|| shared_only("checkpoint"))?;
    let rate = write
        .rate
        .as_ref()
        .ok_or_else(|| shared_only("limiter state"))?;
    let n = write.events.len() as u64;
    for (i, e) in write.events.iter().enumerate() {
        if e.seq != write.expected_seq + 1 + i as u64 {
            return Err(StoreError::Corrupt(format!(
                "agent {}: entry {} of a write after seq {} has seq {}",
                write.agent, i, write.expected_seq, e.seq
            )));
        }
    }
    let new_seq = write.expected_seq + n;
    if state.id != write.agent || state.last_seq != new_seq {
        return Err(StoreError::Corrupt(format!(
            "agent {}: the checkpoint (agent {}, seq {}) is not the state after seq {new_seq}",
            write.agent, state.id, state.last_seq
        )));
    }
    debug_assert_eq!(state.check_invariants(), Ok(()));
    let agent = write.agent.as_str();
    let mut key_records = Vec::new();
    keyindex::keys_of(&write.agent, &write.events, &mut key_records);
    let mut keys = vec![record_key(agent), journal_key(agent)];
    let mut args: Vec<Vec<u8>> = vec![
        write.expected_seq.to_string().into_bytes(),
        new_seq.to_string().into_bytes(),
        codec::encode_agent(state)?,
        codec::encode_rate(rate)?,
        retention_ms.to_string().into_bytes(),
        n.to_string().into_bytes(),
        SCRIPT_RPUSH_CHUNK_MAX.to_string().into_bytes(),
    ];
    for e in &write.events {
        args.push(codec::encode_event(e)?);
    }
    for (slot, entry) in &key_records {
        keys.push(idem_key(agent, *slot));
        args.push(codec::encode_key_record(*slot, entry).to_vec());
    }
    args.push(match &write.rate_before {
        Some(before) => codec::encode_rate(before)?,
        None => Vec::new(),
    });
    Ok((
        PreparedWrite {
            agent: agent.to_owned(),
            slot: key_slot(keys[0].as_bytes()),
            keys,
            args,
        },
        state.next_expiry_ms(),
    ))
}

impl Storage for RedisStorage {
    fn apply(&self, writes: Vec<AgentWrite>) -> Result<(), StoreError> {
        for (i, r) in self.apply_each(writes)?.into_iter().enumerate() {
            match r {
                WriteResult::Applied => {}
                WriteResult::Conflict => {
                    return Err(StoreError::Unavailable(format!(
                        "write {i} met a newer version of its agent"
                    )))
                }
                WriteResult::Unavailable(why) => return Err(StoreError::Unavailable(why)),
            }
        }
        Ok(())
    }

    fn apply_each(&self, writes: Vec<AgentWrite>) -> Result<Vec<WriteResult>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let retention_ms = self.inner.options.idempotency_retention_ms;
        let mut prepared = Vec::with_capacity(writes.len());
        let mut index_adds: BTreeMap<String, Vec<IndexAdd>> = BTreeMap::new();
        for (i, w) in writes.iter().enumerate() {
            let (p, due_ms) = prepare(w, retention_ms)?;
            let b = bucket(w.agent.as_str());
            if w.expected_seq == 0 {
                index_adds
                    .entry(agents_index_key(b))
                    .or_default()
                    .push(IndexAdd {
                        write: i,
                        score: 0,
                        member: w.agent.as_str().as_bytes().to_vec(),
                    });
            }
            if let Some(due_ms) = due_ms {
                index_adds
                    .entry(due_index_key(b))
                    .or_default()
                    .push(IndexAdd {
                        write: i,
                        score: due_ms,
                        member: due_member(due_ms, w.agent.as_str()),
                    });
            }
            prepared.push(p);
        }
        self.run("applying writes", move |inner| {
            inner.apply_each(prepared, index_adds)
        })
    }

    fn sync(&self) -> Result<(), StoreError> {
        let replicas = self.inner.options.wait_replicas;
        if replicas == 0 {
            self.inner.written.lock().clear();
            return Ok(());
        }
        let masters: Vec<(String, u16)> = self.inner.written.lock().drain().collect();
        let wait_timeout_ms = self.inner.options.wait_timeout_ms;
        let asked = masters.clone();
        let result = self.run("waiting for replicas", move |inner| async move {
            let mut tasks = Vec::new();
            for (master, slot) in asked {
                let mut conn = inner.write_conn.clone();
                let mut cmd = redis::cmd("WAIT");
                cmd.arg(replicas).arg(wait_timeout_ms);
                let route = Route::new(slot, SlotAddr::Master);
                tasks.push((
                    master,
                    tokio::spawn(async move {
                        conn.route_command(
                            cmd,
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                        )
                        .await
                    }),
                ));
            }
            for (master, task) in tasks {
                let v = join(task).await?.map_err(|e| redis_error("WAIT", e))?;
                let acked = match v {
                    Value::Int(n) => n,
                    other => {
                        return Err(StoreError::Unavailable(format!(
                            "WAIT on {master} answered {other:?}"
                        )))
                    }
                };
                if acked < i64::from(replicas) {
                    return Err(StoreError::Unavailable(format!(
                        "{master}: {acked} of {replicas} replicas acknowledged within {wait_timeout_ms} ms"
                    )));
                }
            }
            Ok(())
        });
        if result.is_err() {
            // Ask every one again next time: these writes are not known to be replicated.
            let mut written = self.inner.written.lock();
            for (m, s) in masters {
                written.entry(m).or_insert(s);
            }
        }
        result
    }

    fn shared(&self) -> bool {
        true
    }

    fn record(&self, agent: &AgentId) -> Result<Option<(AgentState, RateState)>, StoreError> {
        Ok(self.records(std::slice::from_ref(agent))?.pop().flatten())
    }

    /// One `HMGET` per agent, all sent at once: the multiplexed connections pipeline them,
    /// so a run's agents cost about one round trip per master.
    fn records(
        &self,
        agents: &[AgentId],
    ) -> Result<Vec<Option<(AgentState, RateState)>>, StoreError> {
        let keys: Vec<String> = agents.iter().map(|a| record_key(a.as_str())).collect();
        let cmds = keys
            .into_iter()
            .map(|key| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(&key).arg("s").arg("t");
                (key, cmd)
            })
            .collect();
        let values = self.run("reading records", move |inner| async move {
            inner.read_each("HMGET", cmds).await
        })?;
        agents
            .iter()
            .zip(values)
            .map(|(agent, v)| {
                let (s, t): (Option<Vec<u8>>, Option<Vec<u8>>) = parsed("HMGET", v)?;
                match (s, t) {
                    (None, None) => Ok(None),
                    (Some(s), Some(t)) => {
                        let state = codec::decode_agent(&s)?;
                        check_id(&state, agent)?;
                        Ok(Some((state, codec::decode_rate(&t)?)))
                    }
                    _ => Err(StoreError::Corrupt(format!(
                        "agent {agent}: a record without its state or its limiter state"
                    ))),
                }
            })
            .collect()
    }

    fn checkpoint(&self, agent: &AgentId) -> Result<Option<AgentState>, StoreError> {
        let key = record_key(agent.as_str());
        let v = self.run("reading a record", move |inner| async move {
            let mut conn = inner.read_conn.clone();
            let mut cmd = redis::cmd("HGET");
            cmd.arg(&key).arg("s");
            conn.route_command(cmd, routing_of(&key))
                .await
                .map_err(|e| redis_error("HGET", e))
        })?;
        let s: Option<Vec<u8>> = parsed("HGET", v)?;
        let Some(s) = s else { return Ok(None) };
        let state = codec::decode_agent(&s)?;
        check_id(&state, agent)?;
        Ok(Some(state))
    }

    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        let mut out = Vec::new();
        let mut after: Option<AgentId> = None;
        loop {
            let ids = self.ids_page(after.as_ref(), LOAD_AGENTS_PAGE_MAX)?;
            let keys: Vec<String> = ids.iter().map(|id| record_key(id.as_str())).collect();
            let cmds = keys
                .into_iter()
                .map(|key| {
                    let mut cmd = redis::cmd("HGET");
                    cmd.arg(&key).arg("s");
                    (key, cmd)
                })
                .collect();
            let records = self
                .run("reading records", |inner| async move {
                    inner.read_each("HGET", cmds).await
                })?
                .into_iter()
                .map(|v| parsed::<Option<Vec<u8>>>("HGET", v))
                .collect::<Result<Vec<_>, _>>()?;
            // Listed ids have a record (records are never removed): `None` cannot happen.
            for (id, record) in ids.iter().zip(records) {
                if let Some(bytes) = record {
                    let state = codec::decode_agent(&bytes)?;
                    check_id(&state, id)?;
                    out.push(state);
                }
            }
            if ids.len() < LOAD_AGENTS_PAGE_MAX {
                return Ok(out);
            }
            after = ids.last().cloned();
        }
    }

    fn agent_ids(&self, after: Option<&AgentId>, limit: usize) -> Result<Vec<AgentId>, StoreError> {
        self.ids_page(after, limit)
    }

    /// The members of the agent index: may count, besides the agents, ids whose create
    /// conflicted or failed after its index update (rare, never removed since a create of
    /// the same id may be on its way).
    fn agent_count(&self) -> Result<u64, StoreError> {
        self.run("counting agents", |inner| async move {
            let mut total = 0u64;
            let mut tasks = Vec::new();
            for b in 0..INDEX_BUCKETS {
                let key = agents_index_key(b);
                let mut conn = inner.read_conn.clone();
                let mut cmd = redis::cmd("ZCARD");
                cmd.arg(&key);
                tasks.push(tokio::spawn(async move {
                    conn.route_command(cmd, routing_of(&key)).await
                }));
            }
            for task in tasks {
                let v = join(task).await?.map_err(|e| redis_error("ZCARD", e))?;
                let n: u64 = parsed("ZCARD", v)?;
                total += n;
            }
            Ok(total)
        })
    }

    /// Hold expiries are in the due index ([`Storage::grant_expiries`]) instead.
    fn hold_agents(&self) -> Result<Option<Vec<AgentId>>, StoreError> {
        Ok(Some(Vec::new()))
    }

    fn grant_expiries(
        &self,
        from_ms: TimestampMs,
        after: Option<&[u8]>,
        through_ms: TimestampMs,
        limit: usize,
    ) -> Result<Vec<GrantExpiry>, StoreError> {
        let after = after.map(<[u8]>::to_vec);
        self.run("reading the due index", move |inner| {
            inner.due_entries(from_ms, after, through_ms, limit)
        })
    }

    fn remove_grant_expiries(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut by_set: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for key in keys {
            let id = key.get(8..).ok_or_else(|| {
                StoreError::Codec(CodecError::Decode(
                    "a due index member under 8 bytes".into(),
                ))
            })?;
            let id = std::str::from_utf8(id)
                .map_err(|_| StoreError::Codec(CodecError::Decode("a due index member".into())))?;
            by_set
                .entry(due_index_key(bucket(id)))
                .or_default()
                .push(key.clone());
        }
        if by_set.is_empty() {
            return Ok(());
        }
        self.run("removing due index entries", |inner| async move {
            let mut tasks = Vec::new();
            for (key, members) in by_set {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&key).arg(members);
                let mut conn = inner.read_conn.clone();
                tasks.push(tokio::spawn(async move {
                    conn.route_command(cmd, routing_of(&key)).await
                }));
            }
            for task in tasks {
                join(task).await?.map_err(|e| redis_error("ZREM", e))?;
            }
            Ok(())
        })
    }

    fn grant_expiries_complete(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Entries with seq > after_seq: list indexes after_seq.. (index i holds seq i+1).
        let last = after_seq.saturating_add(limit as u64 - 1);
        let events = self.journal_range(agent, after_seq, last)?;
        check_seqs(agent, &events, after_seq + 1)?;
        Ok(events)
    }

    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        if limit == 0 || before_seq <= 1 {
            return Ok(Vec::new());
        }
        let key = journal_key(agent.as_str());
        let len = self.run("reading a journal's length", move |inner| async move {
            let mut conn = inner.read_conn.clone();
            let mut cmd = redis::cmd("LLEN");
            cmd.arg(&key);
            let v = conn
                .route_command(cmd, routing_of(&key))
                .await
                .map_err(|e| redis_error("LLEN", e))?;
            parsed::<u64>("LLEN", v)
        })?;
        // Entries with seq < before_seq, newest first: seq top down to top - limit + 1.
        let top = (before_seq - 1).min(len);
        if top == 0 {
            return Ok(Vec::new());
        }
        let bottom = top.saturating_sub(limit as u64 - 1).max(1);
        let mut events = self.journal_range(agent, bottom - 1, top - 1)?;
        check_seqs(agent, &events, bottom)?;
        events.reverse();
        Ok(events)
    }

    fn feed(&self, _from: FeedCursor, _limit: usize) -> Result<FeedPage, StoreError> {
        Err(StoreError::Unsupported(
            "the change feed (webhooks, export, GET /v1/events)",
        ))
    }

    fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feed_tx.subscribe()
    }

    /// Redis keeps its own files; the operator watches them there.
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn find_key(
        &self,
        agent: &AgentId,
        key: &IdempotencyKey,
        slot: u128,
        now_ms: TimestampMs,
    ) -> Result<Option<KeyEntry>, StoreError> {
        let lookup = [(agent.clone(), key.clone(), slot)];
        Ok(self.find_keys(&lookup, now_ms)?.pop().flatten())
    }

    /// One `GET` per key, all sent at once (pipelined by the multiplexed connections).
    fn find_keys(
        &self,
        lookups: &[(AgentId, IdempotencyKey, u128)],
        now_ms: TimestampMs,
    ) -> Result<Vec<Option<KeyEntry>>, StoreError> {
        let keys: Vec<String> = lookups
            .iter()
            .map(|(agent, _, slot)| idem_key(agent.as_str(), *slot))
            .collect();
        let cmds = keys
            .into_iter()
            .map(|key| {
                let mut cmd = redis::cmd("GET");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        let values = self.run("reading idempotency records", move |inner| async move {
            inner.read_each("GET", cmds).await
        })?;
        let retention_ms = self.inner.options.idempotency_retention_ms;
        lookups
            .iter()
            .zip(values)
            .map(|((agent, _, slot), v)| {
                let bytes: Option<Vec<u8>> = parsed("GET", v)?;
                let Some(bytes) = bytes else { return Ok(None) };
                let (stored_slot, entry) = codec::decode_key_record(&bytes)?;
                if stored_slot != *slot {
                    return Err(StoreError::Corrupt(format!(
                        "agent {agent}: idempotency record of slot {slot:032x} holds slot {stored_slot:032x}"
                    )));
                }
                // `PX` drops it at about the same time; the clock of the request decides.
                if entry.at_ms.saturating_add(retention_ms) < now_ms {
                    return Ok(None);
                }
                Ok(Some(entry))
            })
            .collect()
    }

    /// Records are in Redis as soon as the script ran: nothing to note.
    fn note_key(&self, _slot: u128, _at_ms: TimestampMs) {}

    fn key_index_status(&self) -> KeyIndexStatus {
        let retention_ms = self.inner.options.idempotency_retention_ms;
        KeyIndexStatus {
            retention_ms,
            window_ms: retention_ms,
            ..KeyIndexStatus::default()
        }
    }
}

impl RedisStorage {
    /// Journal entries at list indexes `first..=last` (seq `first + 1..=last + 1`).
    fn journal_range(
        &self,
        agent: &AgentId,
        first: u64,
        last: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let key = journal_key(agent.as_str());
        let raw = self.run("reading a journal", move |inner| async move {
            let mut conn = inner.read_conn.clone();
            let mut out: Vec<Vec<u8>> = Vec::new();
            let mut start = first;
            while start <= last {
                let end = last.min(start + JOURNAL_RANGE_MAX as u64 - 1);
                let (Ok(s), Ok(e)) = (i64::try_from(start), i64::try_from(end)) else {
                    break;
                };
                let mut cmd = redis::cmd("LRANGE");
                cmd.arg(&key).arg(s).arg(e);
                let v = conn
                    .route_command(cmd, routing_of(&key))
                    .await
                    .map_err(|e| redis_error("LRANGE", e))?;
                let page: Vec<Vec<u8>> = parsed("LRANGE", v)?;
                let short = (page.len() as u64) < end - start + 1;
                out.extend(page);
                if short {
                    break;
                }
                start = end + 1;
            }
            Ok(out)
        })?;
        raw.iter()
            .map(|b| codec::decode_event(b).map_err(StoreError::from))
            .collect()
    }
}

/// Journals are dense from 1: a page starting at `first_seq` holds consecutive seqs.
fn check_seqs(agent: &AgentId, events: &[Event], first_seq: u64) -> Result<(), StoreError> {
    for (i, e) in events.iter().enumerate() {
        if e.seq != first_seq + i as u64 {
            return Err(StoreError::Corrupt(format!(
                "agent {agent}: journal entry at seq {} holds seq {}",
                first_seq + i as u64,
                e.seq
            )));
        }
    }
    Ok(())
}

/// A record read back is of the agent asked for and holds the ledger's invariants (checked
/// on write by the engine, and again here after decoding).
fn check_id(state: &AgentState, agent: &AgentId) -> Result<(), StoreError> {
    if state.id != *agent {
        return Err(StoreError::Corrupt(format!(
            "the record of agent {agent} is of agent {}",
            state.id
        )));
    }
    state.check_invariants()?;
    Ok(())
}

fn record_key(agent: &str) -> String {
    format!("tally:{{{agent}}}:r")
}

fn journal_key(agent: &str) -> String {
    format!("tally:{{{agent}}}:j")
}

fn idem_key(agent: &str, slot: u128) -> String {
    format!("tally:{{{agent}}}:k:{slot:032x}")
}

fn agents_index_key(bucket: u32) -> String {
    format!("tally:agents:{{{bucket}}}")
}

fn due_index_key(bucket: u32) -> String {
    format!("tally:due:{{{bucket}}}")
}

/// The index bucket of an agent: FNV-1a (32 bits) of its id, mod [`INDEX_BUCKETS`]. Stable
/// across builds and processes: the buckets are part of the stored layout.
pub fn bucket(agent: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in agent.as_bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % INDEX_BUCKETS
}

fn due_member(due_ms: TimestampMs, agent: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + agent.len());
    m.extend_from_slice(&due_ms.to_be_bytes());
    m.extend_from_slice(agent.as_bytes());
    m
}

fn member_due_ms(member: &[u8]) -> Option<TimestampMs> {
    let head: [u8; 8] = member.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

fn agent_id(bytes: &[u8]) -> Result<AgentId, StoreError> {
    let s = std::str::from_utf8(bytes)
        .map_err(|_| StoreError::Codec(CodecError::Decode("an agent id in an index".into())))?;
    AgentId::new(s)
        .map_err(|e| StoreError::Codec(CodecError::Decode(format!("an agent id in an index: {e}"))))
}

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of the hash tag
/// (the first non-empty `{...}`), else of the whole key, mod 16,384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(tagged) % CLUSTER_SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn routing_of(key: &str) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
        key_slot(key.as_bytes()),
        SlotAddr::Master,
    )))
}

/// Every text in an answer (a map of answers by node, an array, a string).
fn texts_of(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| texts_of(v, out)),
        Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| texts_of(v, out)),
        Value::VerbatimString { text, .. } => out.push(text.clone()),
        other => out.extend(value_string(other)),
    }
}

fn value_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

async fn join<T>(task: tokio::task::JoinHandle<T>) -> Result<T, StoreError> {
    task.await
        .map_err(|e| StoreError::Unavailable(format!("redis: a request task failed: {e}")))
}

/// A value of another shape than this build writes: the store holds something else.
fn parsed<T: redis::FromRedisValue>(what: &str, v: Value) -> Result<T, StoreError> {
    redis::from_redis_value(v)
        .map_err(|e| StoreError::Corrupt(format!("redis: {what}: an unexpected answer: {e}")))
}

fn timed_out(what: &str, op_timeout: Duration) -> StoreError {
    StoreError::Unavailable(format!(
        "redis: {what}: no answer within {} ms",
        op_timeout.as_millis()
    ))
}

/// Connection loss, timeouts and a cluster failing over (CLUSTERDOWN, TRYAGAIN, MASTERDOWN,
/// LOADING, READONLY, redirections) are passing: `Unavailable`. A value of an unexpected
/// type is a store that holds what this build never wrote: `Corrupt`.
fn redis_error(what: &str, e: RedisError) -> StoreError {
    if e.kind() == ErrorKind::UnexpectedReturnType || e.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt(format!("redis: {what}: {e}"));
    }
    StoreError::Unavailable(format!("redis: {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"tally:{a}:r"), key_slot(b"a"));
    }

    #[test]
    fn buckets_are_stable() {
        // FNV-1a of "" is the offset basis; these pin the stored layout.
        assert_eq!(bucket(""), 0x811c_9dc5 % INDEX_BUCKETS);
        assert_eq!(bucket("a"), 0xe40c_292c % INDEX_BUCKETS);
        assert!((0..1_000).all(|i| bucket(&format!("agent-{i}")) < INDEX_BUCKETS));
    }

    #[test]
    fn due_members_sort_by_due_time_then_id() {
        let a = due_member(5, "zz");
        let b = due_member(6, "aa");
        assert!(a < b);
        assert_eq!(member_due_ms(&b), Some(6));
        assert!(due_member(6, "aa") < due_member(6, "ab"));
    }
}
