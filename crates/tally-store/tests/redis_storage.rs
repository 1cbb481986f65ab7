//! The Redis Cluster backend against a real cluster: compare-and-set, pipelined batches
//! across masters, records with their limiter state, journal paging, idempotency records
//! and their expiry, both indexes, blocking from another runtime, and an unreachable
//! cluster.
//!
//! Needs `TALLY_REDIS_CLUSTER` (comma-separated `host:port`); without it every test says
//! so and passes. Start a local cluster with `scripts/redis-cluster.sh up`:
//!
//! ```sh
//! TALLY_REDIS_CLUSTER=$(scripts/redis-cluster.sh up | tail -n1) \
//!     cargo test -p tally-store --test redis_storage
//! ```
//!
//! Agent ids start with a random prefix per run, so runs on one cluster never meet.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tally_core::{
    AgentId, AgentState, Command, CommandKind, Event, IdempotencyKey, Plan, PlanBook, PlanName,
    RateBucket, RateState, Status,
};
use tally_store::{AgentWrite, RedisOptions, RedisStorage, Storage, StoreError, WriteResult};

const ENV: &str = "TALLY_REDIS_CLUSTER";

fn nodes() -> Option<Vec<String>> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => Some(v.split(',').map(|s| s.trim().to_owned()).collect()),
        _ => {
            eprintln!("skipped: {ENV} not set");
            None
        }
    }
}

fn options(nodes: Vec<String>) -> RedisOptions {
    RedisOptions {
        nodes,
        ..RedisOptions::default()
    }
}

fn connect() -> Option<RedisStorage> {
    Some(RedisStorage::connect(&options(nodes()?)).expect("connects to the cluster"))
}

/// A prefix of this run's agent ids: `r<random hex>-`.
fn prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| format!("r{:08x}-", rand::random::<u32>()))
}

fn agent(name: &str) -> AgentId {
    AgentId::new(format!("{}{name}", prefix())).expect("valid agent id")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

fn plans() -> PlanBook {
    let name = PlanName::new("default").expect("valid");
    let mut plan = Plan::unlimited(name);
    plan.buckets
        .push(RateBucket::new("rps", 1_000, 1_000, 1_000).expect("valid bucket"));
    PlanBook::new([plan])
}

/// One agent as the engine would hold it between writes.
struct Sim {
    id: AgentId,
    state: Option<AgentState>,
    rate: RateState,
    plans: PlanBook,
    keys: u64,
}

impl Sim {
    fn new(id: AgentId) -> Self {
        Self {
            id,
            state: None,
            rate: RateState::default(),
            plans: plans(),
            keys: 0,
        }
    }

    /// Decides `kinds` at `at_ms`, each with a fresh idempotency key, and returns the write
    /// of their entries (from the version before them).
    fn write(&mut self, kinds: Vec<CommandKind>, at_ms: u64) -> AgentWrite {
        let expected_seq = self.state.as_ref().map_or(0, |s| s.last_seq);
        // What the store holds of the limiter, written with the version before.
        let rate_before = (expected_seq > 0).then(|| self.rate.clone());
        let mut events = Vec::new();
        for kind in kinds {
            self.keys += 1;
            let cmd = Command::new(self.id.clone(), kind).with_key(self.key(self.keys));
            let d = tally_core::decide(
                self.state.as_ref(),
                &mut self.rate,
                &cmd,
                &self.plans,
                at_ms,
            )
            .expect("valid command");
            for e in &d.events {
                self.state =
                    Some(tally_core::evolve(self.state.take(), &self.id, e).expect("evolves"));
            }
            events.extend(d.events);
        }
        AgentWrite {
            agent: self.id.clone(),
            expected_seq,
            events,
            checkpoint: self.state.clone(),
            rate: Some(self.rate.clone()),
            rate_before,
        }
    }

    fn key(&self, n: u64) -> IdempotencyKey {
        IdempotencyKey::new(format!("k{n}")).expect("valid key")
    }
}

fn create() -> CommandKind {
    CommandKind::CreateAgent {
        plan: PlanName::new("default").expect("valid"),
        status: Status::Active,
    }
}

fn credit(amount_micros: u64) -> CommandKind {
    CommandKind::Credit { amount_micros }
}

fn debit(amount_micros: u64) -> CommandKind {
    CommandKind::Debit { amount_micros }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// The index bucket of an id (FNV-1a mod 16), as the stored layout defines it.
fn bucket(id: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in id.as_bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % 16
}

#[test]
fn compare_and_set_applies_one_of_two_writes_from_the_same_version() {
    let Some(store) = connect() else { return };
    let mut a = Sim::new(agent("cas"));
    let t = now_ms();
    let created = a.write(vec![create(), credit(1_000)], t);
    assert_eq!(
        store.apply_each(vec![created]).expect("applies"),
        [WriteResult::Applied]
    );

    // Two nodes decide from the same version.
    let mut b = Sim {
        id: a.id.clone(),
        state: a.state.clone(),
        rate: a.rate.clone(),
        plans: plans(),
        keys: 100,
    };
    let first = a.write(vec![debit(10)], t + 1);
    let second = b.write(vec![debit(20), debit(30)], t + 1);
    assert_eq!(first.expected_seq, second.expected_seq);
    let results = store.apply_each(vec![first, second]).expect("answers");
    assert_eq!(results, [WriteResult::Applied, WriteResult::Conflict]);

    let journal = store.journal(&a.id, 0, 100).expect("reads");
    assert_eq!(seqs(&journal), [1, 2, 3]);
    assert_eq!(
        journal[2].balance_after_micros, 990,
        "the first write's entry"
    );
    let (state, rate) = store.record(&a.id).expect("reads").expect("exists");
    assert_eq!(Some(&state), a.state.as_ref());
    assert_eq!(rate, a.rate);

    // The loser, decided again from the new version, applies.
    let mut b = Sim {
        id: a.id.clone(),
        state: Some(state),
        rate,
        plans: plans(),
        keys: 200,
    };
    let again = b.write(vec![debit(20)], t + 2);
    assert_eq!(again.expected_seq, 3);
    assert_eq!(
        store.apply_each(vec![again]).expect("applies"),
        [WriteResult::Applied]
    );
    // A write from a stale version, alone, conflicts too, and writes nothing.
    let stale = a.write(vec![debit(1)], t + 3);
    assert_eq!(
        store.apply_each(vec![stale.clone()]).expect("answers"),
        [WriteResult::Conflict]
    );
    assert_eq!(
        seqs(&store.journal(&a.id, 0, 100).expect("reads")),
        [1, 2, 3, 4]
    );
    assert!(matches!(
        store.apply(vec![stale]),
        Err(StoreError::Unavailable(_))
    ));
}

#[test]
fn a_batch_across_many_agents_applies_in_one_pipelined_call() {
    let Some(nodes) = nodes() else { return };
    let mut opts = options(nodes);
    opts.wait_replicas = 1;
    let store = RedisStorage::connect(&opts).expect("connects");
    const AGENTS: usize = 100;
    let t = now_ms();
    let mut sims: Vec<Sim> = (0..AGENTS)
        .map(|i| Sim::new(agent(&format!("batch-{i:03}"))))
        .collect();
    let writes: Vec<AgentWrite> = sims
        .iter_mut()
        .map(|s| s.write(vec![create(), credit(500)], t))
        .collect();
    let started = Instant::now();
    let results = store.apply_each(writes).expect("applies");
    let create_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(results, vec![WriteResult::Applied; AGENTS]);

    let writes: Vec<AgentWrite> = sims
        .iter_mut()
        .map(|s| s.write(vec![debit(1), debit(2)], t + 1))
        .collect();
    let started = Instant::now();
    let results = store.apply_each(writes).expect("applies");
    let debit_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(results, vec![WriteResult::Applied; AGENTS]);
    let started = Instant::now();
    store.sync().expect("a replica acknowledges");
    let sync_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "apply_each of {AGENTS} agents: {create_ms:.1} ms (creates), {debit_ms:.1} ms (debits); \
         sync with WAIT 1: {sync_ms:.1} ms"
    );

    for s in &sims {
        let journal = store.journal(&s.id, 0, 100).expect("reads");
        assert_eq!(seqs(&journal), [1, 2, 3, 4], "agent {}", s.id);
        assert_eq!(journal[3].balance_after_micros, 497);
        assert_eq!(
            store.checkpoint(&s.id).expect("reads").as_ref(),
            s.state.as_ref()
        );
    }
}

#[test]
fn records_keep_the_limiter_state() {
    let Some(store) = connect() else { return };
    let mut a = Sim::new(agent("record"));
    assert!(store.record(&a.id).expect("reads").is_none());
    assert!(store.checkpoint(&a.id).expect("reads").is_none());
    let t = now_ms();
    let w = a.write(vec![create(), credit(100), debit(7)], t);
    store.apply(vec![w]).expect("applies");
    assert_ne!(
        a.rate,
        RateState::default(),
        "the plan's bucket counted the requests"
    );
    let (state, rate) = store.record(&a.id).expect("reads").expect("exists");
    assert_eq!(Some(&state), a.state.as_ref());
    assert_eq!(state.balance_micros, 93);
    assert_eq!(rate, a.rate);
}

#[test]
fn journal_pages_at_the_edges() {
    let Some(store) = connect() else { return };
    let mut a = Sim::new(agent("journal"));
    let t = now_ms();
    let w = a.write(vec![create(), credit(100), debit(1), debit(2)], t);
    store.apply(vec![w]).expect("applies");
    let w = a.write(vec![debit(3)], t + 1);
    store.apply(vec![w]).expect("applies");
    let id = &a.id;

    assert_eq!(
        seqs(&store.journal(id, 0, 100).expect("reads")),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(seqs(&store.journal(id, 0, 1).expect("reads")), [1]);
    assert_eq!(seqs(&store.journal(id, 4, 100).expect("reads")), [5]);
    assert_eq!(
        seqs(&store.journal(id, 5, 100).expect("reads")),
        Vec::<u64>::new()
    );
    assert_eq!(seqs(&store.journal(id, 2, 2).expect("reads")), [3, 4]);
    assert_eq!(
        seqs(&store.journal(id, 0, 0).expect("reads")),
        Vec::<u64>::new()
    );
    assert_eq!(
        seqs(&store.journal_staged(id, 3, 10).expect("reads")),
        [4, 5]
    );

    assert_eq!(
        seqs(&store.journal_rev(id, u64::MAX, 100).expect("reads")),
        [5, 4, 3, 2, 1]
    );
    assert_eq!(
        seqs(&store.journal_rev(id, u64::MAX, 2).expect("reads")),
        [5, 4]
    );
    assert_eq!(seqs(&store.journal_rev(id, 6, 1).expect("reads")), [5]);
    assert_eq!(seqs(&store.journal_rev(id, 5, 1).expect("reads")), [4]);
    assert_eq!(seqs(&store.journal_rev(id, 3, 10).expect("reads")), [2, 1]);
    assert_eq!(seqs(&store.journal_rev(id, 2, 10).expect("reads")), [1]);
    assert_eq!(
        seqs(&store.journal_rev(id, 1, 10).expect("reads")),
        Vec::<u64>::new()
    );
    assert_eq!(
        seqs(&store.journal_rev(id, 0, 10).expect("reads")),
        Vec::<u64>::new()
    );

    let nobody = agent("journal-nobody");
    assert!(store.journal(&nobody, 0, 10).expect("reads").is_empty());
    assert!(store
        .journal_rev(&nobody, u64::MAX, 10)
        .expect("reads")
        .is_empty());
}

#[test]
fn idempotency_records_are_found_then_expire() {
    let Some(nodes) = nodes() else { return };
    const RETENTION_MS: u64 = 1_500;
    let store = RedisStorage::connect(&RedisOptions {
        idempotency_retention_ms: RETENTION_MS,
        ..options(nodes)
    })
    .expect("connects");
    assert_eq!(store.key_index_status().retention_ms, RETENTION_MS);
    let mut a = Sim::new(agent("keys"));
    let t = now_ms();
    let w = a.write(vec![create(), credit(100), debit(1)], t);
    store.apply(vec![w]).expect("applies");

    // Key k3 is the debit's: seq 3, one entry.
    let key = a.key(3);
    let found = store
        .find_key(&a.id, &key, tally_store::idempotency_slot(&a.id, &key), t)
        .expect("reads")
        .expect("found");
    assert_eq!((found.first_seq, found.events, found.at_ms), (3, 1, t));
    let unknown = a.key(99);
    assert!(store
        .find_key(
            &a.id,
            &unknown,
            tally_store::idempotency_slot(&a.id, &unknown),
            t
        )
        .expect("reads")
        .is_none());
    // Past the window by the request's clock, before Redis dropped it.
    assert!(store
        .find_key(
            &a.id,
            &key,
            tally_store::idempotency_slot(&a.id, &key),
            t + RETENTION_MS + 1
        )
        .expect("reads")
        .is_none());

    // Redis drops it by itself (`PX`): gone even for a clock inside the window.
    std::thread::sleep(Duration::from_millis(RETENTION_MS + 500));
    assert!(store
        .find_key(&a.id, &key, tally_store::idempotency_slot(&a.id, &key), t)
        .expect("reads")
        .is_none());
}

#[test]
fn the_due_index_lists_hold_and_grant_expiries_in_order() {
    let Some(store) = connect() else { return };
    // A time range of this run's own, far from other runs' entries.
    let base = 3_000_000_000_000 + u64::from(rand::random::<u32>()) * 1_000_000;
    const AGENTS: u64 = 12;
    let mut due = Vec::new();
    let mut writes = Vec::new();
    for i in 0..AGENTS {
        let mut s = Sim::new(agent(&format!("due-{i:02}")));
        // Pairs of agents share a due time: ties are ordered by id.
        let ttl_ms = 1_000 * (1 + i / 2);
        writes.push(s.write(
            vec![
                create(),
                credit(100),
                CommandKind::Hold {
                    amount_micros: 10,
                    ttl_ms,
                },
            ],
            base,
        ));
        assert_eq!(
            s.state.as_ref().and_then(AgentState::next_expiry_ms),
            Some(base + ttl_ms)
        );
        due.push((base + ttl_ms, s.id.clone()));
    }
    // Different buckets, so the read really merges sets.
    let buckets: std::collections::BTreeSet<u32> =
        due.iter().map(|(_, id)| bucket(id.as_str())).collect();
    assert!(buckets.len() >= 3, "buckets {buckets:?}");
    let results = store.apply_each(writes).expect("applies");
    assert!(results.iter().all(|r| *r == WriteResult::Applied));
    due.sort();

    let through = base + 1_000_000;
    let all = store
        .grant_expiries(base, None, through, 100)
        .expect("reads");
    let listed: Vec<(u64, AgentId)> = all
        .iter()
        .map(|e| (e.expires_at_ms, e.agent.clone()))
        .collect();
    assert_eq!(listed, due);
    for e in &all {
        assert_eq!(&e.key[..8], &e.expires_at_ms.to_be_bytes());
        assert_eq!(&e.key[8..], e.agent.as_str().as_bytes());
        assert_eq!(e.grant_id, 0);
    }

    // Paging by key, 5 at a time, through ties, gives the same list.
    let mut paged = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store
            .grant_expiries(base, after.as_deref(), through, 5)
            .expect("reads");
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        paged.extend(page);
    }
    assert_eq!(paged, all);

    // The bounds: `through` is inclusive, `from` too.
    let upto = store
        .grant_expiries(base, None, due[4].0, 100)
        .expect("reads");
    assert_eq!(
        upto.len(),
        6,
        "due times 1,1,2,2,3,3 s after base, through the 5th's"
    );
    let from = store
        .grant_expiries(due[10].0, None, through, 100)
        .expect("reads");
    assert_eq!(from.len(), 2);
    assert_eq!(from[0].agent, due[10].1);
    assert!(store
        .grant_expiries(base, None, base + 999, 100)
        .expect("reads")
        .is_empty());

    // Removal, by key.
    store
        .remove_grant_expiries(&[all[0].key.clone(), all[7].key.clone()])
        .expect("removes");
    let left = store
        .grant_expiries(base, None, through, 100)
        .expect("reads");
    let mut expected = all.clone();
    expected.remove(7);
    expected.remove(0);
    assert_eq!(left, expected);
    store.remove_grant_expiries(&[]).expect("removes nothing");
    assert!(store.grant_expiries_complete().expect("answers"));
    assert_eq!(store.hold_agents().expect("answers"), Some(Vec::new()));
}

#[test]
fn agent_ids_page_in_id_order_and_skip_members_without_a_record() {
    let Some(nodes) = nodes() else { return };
    let store = RedisStorage::connect(&options(nodes.clone())).expect("connects");
    let t = now_ms();
    let mut sims: Vec<Sim> = (0..10)
        .map(|i| Sim::new(agent(&format!("ids-{i}"))))
        .collect();
    let writes: Vec<AgentWrite> = sims
        .iter_mut()
        .map(|s| s.write(vec![create()], t))
        .collect();
    assert!(store
        .apply_each(writes)
        .expect("applies")
        .iter()
        .all(|r| *r == WriteResult::Applied));

    // An index member whose create never ran (its script failed after the ZADD).
    let ghost = agent("ids-5a");
    let mut conn = raw_connection(&nodes);
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("tally:agents:{{{}}}", bucket(ghost.as_str())))
        .arg(0)
        .arg(ghost.as_str())
        .query(&mut conn)
        .expect("ZADD");

    let mut expected: Vec<AgentId> = sims.iter().map(|s| s.id.clone()).collect();
    expected.sort();
    let start = AgentId::new(prefix().to_owned() + "ids").expect("valid");
    let mut listed = Vec::new();
    let mut after = start.clone();
    loop {
        let page = store.agent_ids(Some(&after), 3).expect("reads");
        assert!(page.len() <= 3);
        let mine: Vec<AgentId> = page
            .iter()
            .filter(|id| id.as_str().starts_with(&(prefix().to_owned() + "ids-")))
            .cloned()
            .collect();
        let done = mine.len() < page.len() || page.len() < 3;
        listed.extend(mine);
        match page.last() {
            Some(last) if !done => after = last.clone(),
            _ => break,
        }
    }
    assert_eq!(listed, expected, "in id order, without the ghost");
    let loaded: Vec<AgentId> = store
        .load_agents()
        .expect("loads")
        .into_iter()
        .map(|a| a.id)
        .filter(|id| id.as_str().starts_with(&(prefix().to_owned() + "ids-")))
        .collect();
    assert_eq!(loaded, expected, "every agent once, without the ghost");
    let one = store.agent_ids(Some(&start), 1).expect("reads");
    assert_eq!(one, [expected[0].clone()]);
    assert!(store.agent_count().expect("counts") >= 10);
}

#[test]
fn writes_go_on_after_the_script_cache_is_flushed() {
    let Some(nodes) = nodes() else { return };
    let store = RedisStorage::connect(&options(nodes.clone())).expect("connects");
    // As after a failover to a replica that never loaded the script, or a restart.
    for node in &nodes {
        let client = redis::Client::open(format!("redis://{node}")).expect("client");
        let mut conn = client.get_connection().expect("connects");
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut conn)
            .expect("SCRIPT FLUSH");
    }
    let t = now_ms();
    let mut sims: Vec<Sim> = (0..20)
        .map(|i| Sim::new(agent(&format!("flush-{i}"))))
        .collect();
    let writes: Vec<AgentWrite> = sims
        .iter_mut()
        .map(|s| s.write(vec![create(), credit(3)], t))
        .collect();
    assert_eq!(
        store.apply_each(writes).expect("applies"),
        vec![WriteResult::Applied; 20]
    );
    let writes: Vec<AgentWrite> = sims
        .iter_mut()
        .map(|s| s.write(vec![debit(1)], t))
        .collect();
    assert_eq!(
        store.apply_each(writes).expect("applies"),
        vec![WriteResult::Applied; 20]
    );
    for s in &sims {
        assert_eq!(
            seqs(&store.journal(&s.id, 0, 10).expect("reads")),
            [1, 2, 3]
        );
    }
}

#[test]
fn a_version_that_does_not_match_the_journal_is_corrupt() {
    let Some(nodes) = nodes() else { return };
    let store = RedisStorage::connect(&options(nodes.clone())).expect("connects");
    let mut a = Sim::new(agent("corrupt"));
    let t = now_ms();
    store
        .apply(vec![a.write(vec![create(), credit(10)], t)])
        .expect("applies");
    // Lose the journal's newest entry behind the store's back.
    let mut conn = raw_connection(&nodes);
    let _: Option<Vec<u8>> = redis::cmd("RPOP")
        .arg(format!("tally:{{{}}}:j", a.id.as_str()))
        .query(&mut conn)
        .expect("RPOP");
    let w = a.write(vec![debit(1)], t + 1);
    assert!(
        matches!(store.apply_each(vec![w]), Err(StoreError::Corrupt(_))),
        "version 2 with a journal of 1 entry"
    );
    assert_eq!(
        seqs(&store.journal(&a.id, 0, 10).expect("reads")),
        [1],
        "nothing written"
    );
}

#[test]
fn sync_fails_until_enough_replicas_acknowledge() {
    let Some(nodes) = nodes() else { return };
    // Each master of the test cluster has one replica: two never acknowledge.
    let store = RedisStorage::connect(&RedisOptions {
        wait_replicas: 2,
        wait_timeout_ms: 100,
        ..options(nodes)
    })
    .expect("connects");
    store.sync().expect("nothing written, nothing to wait for");
    let mut a = Sim::new(agent("wait"));
    store
        .apply(vec![a.write(vec![create()], now_ms())])
        .expect("applies");
    for _ in 0..2 {
        // Still not replicated enough: a failed sync is not forgotten.
        assert!(matches!(store.sync(), Err(StoreError::Unavailable(_))));
    }
}

#[test]
fn blocking_calls_work_from_another_runtime_s_spawn_blocking() {
    let Some(store) = connect() else { return };
    let store = std::sync::Arc::new(store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut a = Sim::new(agent("blocking"));
    let w = a.write(vec![create(), credit(5)], now_ms());
    let id = a.id.clone();
    let s = store.clone();
    let state = runtime.block_on(async move {
        let blocking = tokio::task::spawn_blocking(move || {
            assert_eq!(
                s.apply_each(vec![w]).expect("applies"),
                [WriteResult::Applied]
            );
            s.sync().expect("syncs");
            s.checkpoint(&id).expect("reads")
        });
        tokio::time::timeout(Duration::from_secs(10), blocking)
            .await
            .expect("answers in time")
            .expect("does not panic")
    });
    assert_eq!(state, a.state);
    // Dropped inside another runtime's context: must neither block nor panic.
    runtime.block_on(async move { drop(store) });
}

#[test]
fn an_unreachable_cluster_is_unavailable_not_a_hang() {
    if nodes().is_none() {
        return;
    }
    let started = Instant::now();
    let result = RedisStorage::connect(&RedisOptions {
        nodes: vec!["127.0.0.1:1".into()],
        op_timeout_ms: 1_000,
        ..RedisOptions::default()
    });
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn writes_without_shared_mode_state_are_refused() {
    let Some(store) = connect() else { return };
    let mut a = Sim::new(agent("not-shared"));
    let mut w = a.write(vec![create()], now_ms());
    w.rate = None;
    assert!(matches!(
        store.apply_each(vec![w]),
        Err(StoreError::Config(_))
    ));
    assert!(store.checkpoint(&a.id).expect("reads").is_none());
    assert!(store.shared());
    assert!(matches!(
        store.feed(Default::default(), 10),
        Err(StoreError::Unsupported(_))
    ));
}

/// A plain connection to the cluster, to change what the store keeps behind its back.
fn raw_connection(nodes: &[String]) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(
        nodes
            .iter()
            .map(|n| format!("redis://{n}"))
            .collect::<Vec<_>>(),
    )
    .expect("client")
    .get_connection()
    .expect("connects")
}
