//! Decisions per second of `decide` on one core: approved debits, 402 denials and 429
//! denials (the three answers a gateway sees most), plus variants that show what an
//! idempotency key and a rate bucket cost on the approved path.
//!
//! Run: `cargo bench -p tally-core --bench decide -- --warm-up-time 1 --measurement-time 3`.
//! `decide` only: applying the events (`evolve`) and committing them is the store's work.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tally_core::{
    decide, evolve, AgentId, AgentState, Command, CommandKind, Decision, IdempotencyKey, Outcome,
    Plan, PlanBook, PlanName, RateBucket, RateState, Status,
};

/// Decisions per criterion iteration; `now_ms` moves by 1 ms per decision.
const BATCH: u64 = 1_000;
const T0: u64 = 1_795_957_200_000;

fn plan(name: &str, buckets: Vec<RateBucket>) -> Plan {
    let mut p = Plan::unlimited(PlanName::new(name).expect("valid plan name"));
    p.buckets = buckets;
    p
}

fn plans() -> PlanBook {
    PlanBook::new([
        plan("open", vec![]),
        // A bucket that never limits at one request per ms: 10^6 per second.
        plan(
            "roomy",
            vec![RateBucket::new("default", 1_000_000, 1_000, 1_000_000).expect("bucket")],
        ),
        // One request per day: after the first, every request is a 429.
        plan(
            "tight",
            vec![RateBucket::new("default", 1, 86_400_000, 1).expect("bucket")],
        ),
    ])
}

/// An agent on `plan` with `balance_micros`, built through decide and evolve.
fn agent(plan: &str, balance_micros: u64, plans: &PlanBook) -> (AgentId, AgentState) {
    let id = AgentId::new("bench-agent").expect("valid id");
    let mut rate = RateState::default();
    let mut state: Option<AgentState> = None;
    let mut kinds = vec![CommandKind::CreateAgent {
        plan: PlanName::new(plan).expect("valid plan name"),
        status: Status::Active,
    }];
    if balance_micros > 0 {
        kinds.push(CommandKind::Credit {
            amount_micros: balance_micros,
        });
    }
    for kind in kinds {
        let cmd = Command::new(id.clone(), kind);
        let d = decide(state.as_ref(), &mut rate, &cmd, plans, T0).expect("set-up decides");
        for e in &d.events {
            state = Some(evolve(state.take(), &id, e).expect("set-up evolves"));
        }
    }
    (id, state.expect("agent exists"))
}

fn key() -> IdempotencyKey {
    IdempotencyKey::new("req-0123456789abcdef").expect("valid key")
}

fn run_batch(
    state: &AgentState,
    rate: &mut RateState,
    cmd: &Command,
    plans: &PlanBook,
    expect: fn(&Outcome) -> bool,
) {
    for i in 0..BATCH {
        let d: Decision = decide(Some(state), rate, cmd, plans, T0 + i).expect("decides");
        debug_assert!(expect(&d.outcome), "{:?}", d.outcome);
        black_box(d);
    }
}

fn bench_decide(c: &mut Criterion) {
    let plans = plans();
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(BATCH));

    let approved = |o: &Outcome| matches!(o, Outcome::Approved(_));
    let insufficient = |o: &Outcome| {
        matches!(
            o,
            Outcome::Denied(tally_core::Denial::InsufficientFunds { .. })
        )
    };
    let limited =
        |o: &Outcome| matches!(o, Outcome::Denied(tally_core::Denial::RateLimited { .. }));

    // (a) approved debits: a huge balance on a plan with no limits.
    let (id, rich) = agent("open", u64::MAX / 2, &plans);
    let debit = Command::new(id.clone(), CommandKind::Debit { amount_micros: 1 });
    group.bench_function("approved_debit", |b| {
        let mut rate = RateState::default();
        b.iter(|| run_batch(&rich, &mut rate, &debit, &plans, approved))
    });

    // (a') the same with an idempotency key (its fingerprint is hashed into the event).
    let keyed = debit.clone().with_key(key());
    group.bench_function("approved_debit_with_key", |b| {
        let mut rate = RateState::default();
        b.iter(|| run_batch(&rich, &mut rate, &keyed, &plans, approved))
    });

    // (a'') approved on a plan with a bucket that never limits.
    let (id_roomy, rich_roomy) = agent("roomy", u64::MAX / 2, &plans);
    let debit_roomy = Command::new(id_roomy, CommandKind::Debit { amount_micros: 1 });
    group.bench_function("approved_debit_with_bucket", |b| {
        b.iter_batched_ref(
            RateState::default,
            |rate| run_batch(&rich_roomy, rate, &debit_roomy, &plans, approved),
            BatchSize::SmallInput,
        )
    });

    // (b) 402: an empty balance on a plan with no limits.
    let (id_poor, poor) = agent("open", 0, &plans);
    let debit_poor = Command::new(id_poor, CommandKind::Debit { amount_micros: 1 });
    group.bench_function("denied_402", |b| {
        let mut rate = RateState::default();
        b.iter(|| run_batch(&poor, &mut rate, &debit_poor, &plans, insufficient))
    });
    // Every request over HTTP carries a key; a denial writes nothing under it.
    let debit_poor_keyed = debit_poor.clone().with_key(key());
    group.bench_function("denied_402_with_key", |b| {
        let mut rate = RateState::default();
        b.iter(|| run_batch(&poor, &mut rate, &debit_poor_keyed, &plans, insufficient))
    });

    // (c) 429: the day's one request is used, so every request is rate limited.
    let (id_tight, tight) = agent("tight", u64::MAX / 2, &plans);
    let debit_tight = Command::new(id_tight, CommandKind::Debit { amount_micros: 1 });
    let mut rate_tight = RateState::default();
    let first =
        decide(Some(&tight), &mut rate_tight, &debit_tight, &plans, T0 - 1).expect("decides");
    assert!(approved(&first.outcome), "the first request passes");
    group.bench_function("denied_429", |b| {
        b.iter(|| run_batch(&tight, &mut rate_tight, &debit_tight, &plans, limited))
    });
    let debit_tight_keyed = debit_tight.clone().with_key(key());
    group.bench_function("denied_429_with_key", |b| {
        b.iter(|| run_batch(&tight, &mut rate_tight, &debit_tight_keyed, &plans, limited))
    });

    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
