//! `tally loadtest`: mock agents against a running tally (loopback only), then the
//! overspend invariant checked from the server's journal.
//!
//! Three kinds of mock agent share the load: normal ones (debits, checks, holds with
//! capture or void, top-ups), broke ones (zero or low balance, never top up: 402s) and
//! rate-limited ones (a plan with a tight bucket: 429s). `--spawn` starts a temporary
//! `tally serve` so that one command shows the whole system. `--batch N` sends the debits
//! as `POST /v1/batch` requests of N debits each, every one with its own key.

mod invariants;
mod report;
mod spawn;
mod stats;
mod worker;

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;

pub use invariants::{Check, InvariantReport};
pub use report::Report;
pub use stats::LatencySummary;

use crate::{Client, Credit, NewAgent, RetryPolicy};
use invariants::{AgentLog, Applied};
use spawn::{Spawned, TightPlan};
use stats::{Live, Outcome, Stats};
use worker::{Kind, MockAgent, Run};

/// Most mock agents of all kinds together.
pub const AGENTS_MAX: u32 = 10_000;
/// Most concurrent workers.
pub const CONCURRENCY_MAX: u32 = 1_024;
/// Longest run.
pub const DURATION_S_MAX: u64 = 3_600;
/// Most requests in one run (the key logs grow with it).
pub const REQUESTS_MAX: u64 = 20_000_000;
/// Most debits in one `--batch` request: the server's default `limits.batch_items_max`.
pub const BATCH_ITEMS_MAX: u32 = 1_000;

/// Arguments of `tally loadtest`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// Base URL of a running tally (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8402")]
    pub url: String,
    /// Start a temporary `tally serve` on 127.0.0.1:0 instead of using --url.
    #[arg(long)]
    pub spawn: bool,
    /// Bearer token (admin: the run creates agents). Not needed with --spawn.
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Normal mock agents.
    #[arg(long, default_value_t = 20)]
    pub agents: u32,
    /// Broke agents (zero or low balance, never top up): they should get 402s.
    #[arg(long, default_value_t = 4)]
    pub broke_agents: u32,
    /// Rate-limited agents (on --limited-plan): they should get 429s.
    #[arg(long, default_value_t = 4)]
    pub limited_agents: u32,
    /// Concurrent workers; each picks an agent at random per step.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u32,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Stop after about this many requests (a hold's capture or void may go past it).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Starting balance of normal and rate-limited agents.
    #[arg(long, default_value_t = 10_000_000)]
    pub balance_micros: u64,
    /// Starting balance of every other broke agent (the rest start at zero).
    #[arg(long, default_value_t = 5_000)]
    pub broke_balance_micros: u64,
    /// Plan of normal and broke agents.
    #[arg(long, default_value = "default")]
    pub plan: String,
    /// Plan of rate-limited agents; with --spawn it is written into the server's config.
    #[arg(long, default_value = "loadtest-tight")]
    pub limited_plan: String,
    /// With --spawn: requests per second the tight plan allows (burst the same).
    #[arg(long, default_value_t = 5)]
    pub limited_quota_per_s: u32,
    /// With --spawn: use this config file instead of a generated one (it must define
    /// --plan and --limited-plan).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With --spawn: the tally binary to start (default: this executable).
    #[arg(long)]
    pub tally_bin: Option<PathBuf>,
    /// Debits per request: above 1, each debit a worker makes is instead a batch of this
    /// many debits (`POST /v1/batch`) to agents picked at random, each with its own
    /// idempotency key; checks, holds and top-ups stay single requests.
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// Seed of the agents' choices (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl LoadtestArgs {
    fn validate(&self) -> anyhow::Result<()> {
        let agents =
            u64::from(self.agents) + u64::from(self.broke_agents) + u64::from(self.limited_agents);
        anyhow::ensure!(
            (1..=u64::from(AGENTS_MAX)).contains(&agents),
            "--agents + --broke-agents + --limited-agents must be 1..={AGENTS_MAX}, got {agents}"
        );
        anyhow::ensure!(
            (1..=CONCURRENCY_MAX).contains(&self.concurrency),
            "--concurrency must be 1..={CONCURRENCY_MAX}"
        );
        anyhow::ensure!(
            (1..=DURATION_S_MAX).contains(&self.duration_s),
            "--duration-s must be 1..={DURATION_S_MAX}"
        );
        if let Some(requests) = self.requests {
            anyhow::ensure!(
                (1..=REQUESTS_MAX).contains(&requests),
                "--requests must be 1..={REQUESTS_MAX}"
            );
        }
        anyhow::ensure!(
            (1..=BATCH_ITEMS_MAX).contains(&self.batch),
            "--batch must be 1..={BATCH_ITEMS_MAX}"
        );
        anyhow::ensure!(
            self.limited_quota_per_s >= 1,
            "--limited-quota-per-s must be at least 1"
        );
        Ok(())
    }
}

/// Runs the load test; `Ok(false)` when an invariant failed.
pub async fn run(args: LoadtestArgs) -> anyhow::Result<bool> {
    args.validate()?;
    let spawned = if args.spawn {
        let bin = match &args.tally_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe().context("finding this executable")?,
        };
        let tight = TightPlan {
            name: args.limited_plan.clone(),
            quota: args.limited_quota_per_s,
            window_s: 1,
            burst: args.limited_quota_per_s,
        };
        let spawned = Spawned::start(&bin, args.config.as_deref(), &tight).await?;
        if !args.quiet {
            eprintln!("spawned {} serve at {}", bin.display(), spawned.url);
        }
        Some(spawned)
    } else {
        None
    };
    let (url, token) = match &spawned {
        Some(s) => (s.url.clone(), Some(s.token.clone())),
        None => (args.url.clone(), args.token.clone()),
    };
    // Ctrl-C still stops a spawned server (and removes its temporary directory).
    let result = tokio::select! {
        result = drive(&args, &url, token, spawned.is_some()) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Some(spawned) = spawned {
        if let Err(e) = spawned.stop().await {
            eprintln!("warning: {e:#}");
        }
    }
    let report = result?;
    print!("{}", report::render(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.invariants.ok)
}

/// Loopback only: a load test must never be pointed at someone else's server by accident.
fn check_loopback(url: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url:?}"))?;
    let host = parsed.host_str().unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let loopback = match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    };
    anyhow::ensure!(
        loopback,
        "refusing to load-test {url}: only loopback addresses (127.0.0.0/8, ::1, localhost)"
    );
    Ok(())
}

async fn drive(
    args: &LoadtestArgs,
    url: &str,
    token: Option<String>,
    spawned: bool,
) -> anyhow::Result<Report> {
    check_loopback(url)?;
    // Denials come back at once (429s are what the rate-limited agents are for); 503s and
    // dropped connections are retried with the same key, as a real agent would.
    let policy = RetryPolicy {
        attempts_max: 3,
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(500),
        total_time_max: Duration::from_secs(10),
        retry_rate_limited: false,
        attempt_timeout: Some(Duration::from_secs(10)),
    };
    let mut builder = Client::builder(url)
        .retry_policy(policy)
        .pool_idle_per_host_max(args.concurrency as usize);
    if let Some(token) = token {
        builder = builder.token(token);
    }
    let client = builder.build()?;

    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("lt-{run_id}");
    let (agents, mut logs, setup_keys) = set_up(args, &client, &prefix).await?;

    let duration = Duration::from_secs(args.duration_s);
    let run = Arc::new(Run {
        client: client.clone(),
        agents,
        deadline: Instant::now() + duration,
        requests_max: args.requests.unwrap_or(REQUESTS_MAX),
        issued: AtomicU64::new(0),
        live: Live::default(),
        key_prefix: prefix,
        batch_items: args.batch as usize,
    });
    let started = Instant::now();
    let bar = progress_bar(args, duration);
    let ticker = tokio::spawn(tick(run.clone(), bar.clone(), args.requests.is_some()));
    let mut workers = tokio::task::JoinSet::new();
    for id in 0..args.concurrency as usize {
        let rng = match args.seed {
            Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(id as u64)),
            None => StdRng::from_entropy(),
        };
        workers.spawn(worker::work(run.clone(), id, rng));
    }
    let mut stats = Stats::default();
    while let Some(result) = workers.join_next().await {
        let result = result.context("a load worker panicked")?;
        stats.merge(result.stats);
        for (log, theirs) in logs.iter_mut().zip(result.logs) {
            log.merge(theirs);
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();

    if !args.quiet {
        eprintln!(
            "checking invariants against the journals of {} agents",
            logs.len()
        );
    }
    let agent_logs: Vec<(String, AgentLog)> =
        run.agents.iter().map(|a| a.id.clone()).zip(logs).collect();
    let invariants = invariants::check(&client, &agent_logs, &setup_keys).await?;

    let requests = stats.total();
    let debits: u64 = stats.debits_by_status.values().sum();
    let elapsed_s = elapsed.as_secs_f64().max(1e-9);
    let mut counts_by_outcome = BTreeMap::new();
    let mut latency_ms_by_outcome = BTreeMap::new();
    for (outcome, histogram) in &stats.latency {
        counts_by_outcome.insert(outcome.name().to_owned(), histogram.count());
        latency_ms_by_outcome.insert(outcome.name().to_owned(), histogram.summary());
    }
    Ok(Report {
        url: url.to_owned(),
        spawned,
        duration_s: elapsed_s,
        concurrency: args.concurrency,
        agents_normal: args.agents,
        agents_broke: args.broke_agents,
        agents_rate_limited: args.limited_agents,
        requests,
        requests_per_s: requests as f64 / elapsed_s,
        batch_items: args.batch,
        debits,
        debits_per_s: debits as f64 / elapsed_s,
        debit_counts_by_status: stats.debits_by_status,
        latency_ms_batch: stats.batch_latency.as_ref().map(|h| h.summary()),
        counts_by_outcome,
        counts_by_status: stats.by_status,
        counts_by_operation: stats
            .by_operation
            .into_iter()
            .map(|(op, counts)| {
                let counts = counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                (op.to_owned(), counts)
            })
            .collect(),
        latency_ms_by_outcome,
        replayed_receipts: stats.replayed,
        invariants,
    })
}

/// Creates the agents and gives them their starting balances.
async fn set_up(
    args: &LoadtestArgs,
    client: &Client,
    prefix: &str,
) -> anyhow::Result<(Vec<MockAgent>, Vec<AgentLog>, HashSet<String>)> {
    let plans = client.plans().await.context("GET /v1/plans")?;
    let names: HashSet<&str> = plans.plans.iter().map(|p| p.name.as_str()).collect();
    for (plan, needed) in [
        (&args.plan, args.agents + args.broke_agents > 0),
        (&args.limited_plan, args.limited_agents > 0),
    ] {
        anyhow::ensure!(
            !needed || names.contains(plan.as_str()),
            "the server has no plan {plan:?} (it has {names:?}); name another one, or use --spawn"
        );
    }

    let limited = plans.plans.iter().find(|p| p.name == args.limited_plan);
    if args.limited_agents > 0 && limited.is_some_and(|p| p.buckets.is_empty()) && !args.quiet {
        eprintln!(
            "warning: plan {:?} has no rate-limit bucket: the rate-limited agents will see no 429",
            args.limited_plan
        );
    }

    let mut agents = Vec::new();
    let mut balances = Vec::new();
    for i in 0..args.agents {
        agents.push((format!("{prefix}-n{i}"), Kind::Normal, &args.plan));
        balances.push(args.balance_micros);
    }
    for i in 0..args.broke_agents {
        agents.push((format!("{prefix}-broke{i}"), Kind::Broke, &args.plan));
        balances.push(if i % 2 == 0 {
            0
        } else {
            args.broke_balance_micros
        });
    }
    for i in 0..args.limited_agents {
        agents.push((
            format!("{prefix}-rl{i}"),
            Kind::RateLimited,
            &args.limited_plan,
        ));
        balances.push(args.balance_micros);
    }

    let mut tasks = tokio::task::JoinSet::new();
    let concurrency = args.concurrency as usize;
    let mut done = Vec::with_capacity(agents.len());
    for (index, ((id, _, plan), balance)) in agents.iter().zip(&balances).enumerate() {
        if tasks.len() >= concurrency {
            if let Some(r) = tasks.join_next().await {
                done.push(r.context("set-up task panicked")??);
            }
        }
        let client = client.clone();
        let (id, plan, balance) = (id.clone(), (*plan).clone(), *balance);
        tasks.spawn(async move {
            let create_key = format!("{id}-create");
            let credit_key = format!("{id}-credit");
            client
                .create_agent(&NewAgent::new(&id).plan(plan).idempotency_key(&create_key))
                .await
                .with_context(|| format!("creating agent {id}"))?;
            let mut applied = None;
            if balance > 0 {
                let receipt = client
                    .credit(&id, &Credit::new(balance).idempotency_key(&credit_key))
                    .await
                    .with_context(|| format!("crediting agent {id}"))?;
                applied = Some(Applied {
                    seq: receipt.seq,
                    kind: "credit",
                    amount_micros: balance,
                    key: credit_key.clone(),
                });
            }
            anyhow::Ok((index, [create_key, credit_key], applied))
        });
    }
    while let Some(r) = tasks.join_next().await {
        done.push(r.context("set-up task panicked")??);
    }
    let mut logs: Vec<AgentLog> = agents.iter().map(|_| AgentLog::default()).collect();
    let mut setup_keys = HashSet::new();
    for (index, keys, applied) in done {
        setup_keys.extend(keys);
        logs[index].applied.extend(applied);
    }
    let agents = agents
        .into_iter()
        .map(|(id, kind, _)| MockAgent { id, kind })
        .collect();
    Ok((agents, logs, setup_keys))
}

fn progress_bar(args: &LoadtestArgs, duration: Duration) -> ProgressBar {
    if args.quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, unit) = match args.requests {
        Some(requests) => (requests, "req"),
        None => (duration.as_secs(), "s"),
    };
    let bar = ProgressBar::new(len);
    // `wide_msg` is cut to the terminal's width, so the bar stays on one line.
    let template = format!("[{{bar:20}}] {{pos}}/{{len}} {unit} {{wide_msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Updates the bar: live throughput over the last tick and counts by outcome.
async fn tick(run: Arc<Run>, bar: ProgressBar, by_requests: bool) {
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    loop {
        interval.tick().await;
        let total = run.live.total();
        let now = Instant::now();
        let rate = (total - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        last = (now, total);
        bar.set_position(if by_requests {
            total
        } else {
            started.elapsed().as_secs()
        });
        let live = &run.live;
        bar.set_message(format!(
            "{total} req, {rate:.0}/s | ok {} 402 {} 429 {} other {}",
            live.get(Outcome::Approved),
            live.get(Outcome::InsufficientFunds),
            live.get(Outcome::RateLimited) + live.get(Outcome::MonthlyCap),
            live.get(Outcome::Suspended) + live.get(Outcome::Error) + live.get(Outcome::Transport),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_is_checked_at_its_edges() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadtestArgs,
        }
        let with_batch = |n: u32| {
            Cli::parse_from(["loadtest", "--batch", &n.to_string()])
                .args
                .validate()
        };
        assert!(with_batch(1).is_ok());
        assert!(with_batch(BATCH_ITEMS_MAX).is_ok());
        assert!(with_batch(BATCH_ITEMS_MAX + 1).is_err());
        assert!(with_batch(0).is_err());
    }

    #[test]
    fn only_loopback_is_accepted() {
        for ok in [
            "http://127.0.0.1:8402",
            "http://127.1.2.3:1",
            "http://[::1]:8402/",
            "http://localhost:8402",
            "http://LOCALHOST",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8402",
            "http://example.com",
            "http://localhost.example.com",
            "http://[::2]:1",
            "http://0.0.0.0:8402",
            "not a url",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }
}
