//! `loadtest::run` end to end against an in-memory mock of the tally contract: an honest
//! mock passes every invariant and shows 402s and 429s; mocks with planted bugs (charging
//! on a 402, applying a debit twice) are caught and make `run` answer `Ok(false)`; the
//! same with `--batch` (the mock's `POST /v1/batch` runs each debit item as the debit
//! route would).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};
use tally_client::loadtest::{self, LoadtestArgs};
use tokio::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Bug {
    None,
    ChargeOn402,
    DoubleDebit,
    /// Forgets idempotency keys: a duplicate request is applied again.
    NoIdempotency,
    /// `DoubleDebit` in batch items only; single debits are honest.
    BatchDoubleDebit,
}

#[derive(Default)]
struct Agent {
    plan: String,
    balance: u64,
    held: u64,
    holds: HashMap<u64, u64>,
    journal: Vec<Value>,
    replies: HashMap<String, (u16, Value)>,
    window: Option<(Instant, u32)>,
}

impl Agent {
    fn push(&mut self, kind: &str, amount: u64, key: &str) -> Value {
        let seq = self.journal.len() as u64 + 1;
        let entry = json!({"seq": seq, "kind": kind, "amount_micros": amount,
            "balance_micros": self.balance, "held_micros": self.held,
            "at": "2026-11-29T13:00:00.000Z", "idempotency_key": key});
        self.journal.push(entry);
        json!({"agent_id": "", "seq": seq, "kind": kind, "amount_micros": amount,
            "balance_micros": self.balance, "held_micros": self.held,
            "at": "2026-11-29T13:00:00.000Z",
            "hold_id": null, "expires_at": null})
    }

    /// The tight plan allows 5 requests per second.
    fn rate_limited(&mut self) -> bool {
        if self.plan != "loadtest-tight" {
            return false;
        }
        let now = Instant::now();
        match &mut self.window {
            Some((start, n)) if now - *start < Duration::from_secs(1) => {
                *n += 1;
                *n > 5
            }
            window => {
                *window = Some((now, 1));
                false
            }
        }
    }
}

#[derive(Clone)]
struct Mock {
    agents: Arc<Mutex<HashMap<String, Agent>>>,
    bug: Bug,
}

fn problem(status: u16, kind: &str, fields: Value) -> (u16, Value) {
    let mut body = json!({"type": format!("urn:tally:problem:{kind}"), "title": kind,
        "status": status, "detail": "mock"});
    if let (Some(b), Some(f)) = (body.as_object_mut(), fields.as_object()) {
        b.extend(f.clone());
    }
    (status, body)
}

fn reply((status, body): (u16, Value)) -> Response {
    let mut response = (
        StatusCode::from_u16(status).expect("valid status"),
        Json(body),
    )
        .into_response();
    if status == 429 {
        response
            .headers_mut()
            .insert("retry-after", "1".parse().expect("valid"));
    }
    response
}

fn key(headers: &HeaderMap) -> String {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

async fn plans() -> Json<Value> {
    Json(json!({"plans": [{"name": "default"}, {"name": "loadtest-tight"}]}))
}

async fn create(State(m): State<Mock>, Json(body): Json<Value>) -> Response {
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let mut agents = m.agents.lock().expect("not poisoned");
    let agent = agents.entry(id.clone()).or_default();
    agent.plan = body["plan"].as_str().unwrap_or("default").to_owned();
    if agent.journal.is_empty() {
        agent.push("agent_created", 0, "");
        agent.journal[0]["idempotency_key"] = Value::Null;
    }
    reply((
        201,
        json!({"id": id, "plan": agent.plan, "status": "active"}),
    ))
}

async fn get_agent(State(m): State<Mock>, Path(id): Path<String>) -> Response {
    let agents = m.agents.lock().expect("not poisoned");
    match agents.get(&id) {
        Some(a) => reply((
            200,
            json!({"id": id, "plan": a.plan, "status": "active",
            "balance_micros": a.balance, "held_micros": a.held}),
        )),
        None => reply(problem(404, "not-found", json!({}))),
    }
}

#[derive(serde::Deserialize)]
struct Page {
    after: u64,
    limit: u64,
}

async fn journal(
    State(m): State<Mock>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let agents = m.agents.lock().expect("not poisoned");
    let Some(agent) = agents.get(&id) else {
        return reply(problem(404, "not-found", json!({})));
    };
    // Small pages so that paging is exercised.
    let limit = page.limit.min(7) as usize;
    let entries: Vec<Value> = agent
        .journal
        .iter()
        .skip(page.after as usize)
        .take(limit)
        .cloned()
        .collect();
    let last = page.after + entries.len() as u64;
    let next = (last < agent.journal.len() as u64).then_some(last);
    reply((200, json!({"entries": entries, "next_after": next})))
}

/// Runs one keyed change on an agent, replaying a stored answer for a known key.
fn keyed(
    m: &Mock,
    id: &str,
    key: &str,
    change: impl FnOnce(&mut Agent) -> (u16, Value),
) -> Response {
    let (answer, replayed) = keyed_answer(m, id, key, change);
    let mut response = reply(answer);
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", "true".parse().expect("valid"));
    }
    response
}

/// [`keyed`]'s answer and whether it was replayed.
fn keyed_answer(
    m: &Mock,
    id: &str,
    key: &str,
    change: impl FnOnce(&mut Agent) -> (u16, Value),
) -> ((u16, Value), bool) {
    let mut agents = m.agents.lock().expect("not poisoned");
    let Some(agent) = agents.get_mut(id) else {
        return (problem(404, "not-found", json!({})), false);
    };
    if m.bug == Bug::NoIdempotency {
        return (change(agent), false);
    }
    if let Some(stored) = agent.replies.get(key) {
        return (stored.clone(), true);
    }
    let (status, body) = change(agent);
    if status < 300 {
        agent.replies.insert(key.to_owned(), (status, body.clone()));
    }
    ((status, body), false)
}

async fn credit(
    State(m): State<Mock>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = key(&headers);
    let amount = body["amount_micros"].as_u64().unwrap_or(0);
    keyed(&m, &id, &key, |a| {
        a.balance += amount;
        (201, a.push("credit", amount, &key))
    })
}

fn funds(a: &Agent, amount: u64) -> (u16, Value) {
    problem(
        402,
        "insufficient-funds",
        json!({"required_micros": amount,
        "available_micros": a.balance, "balance_micros": a.balance,
        "held_micros": a.held, "retryable": false}),
    )
}

async fn debit(
    State(m): State<Mock>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = key(&headers);
    let amount = body["amount_micros"].as_u64().unwrap_or(0);
    keyed(&m, &id, &key, debit_change(m.bug, &key, amount))
}

/// `POST /v1/batch` of debits: each item as the debit route would answer it.
async fn batch(State(m): State<Mock>, Json(body): Json<Value>) -> Response {
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let answers: Vec<Value> = items
        .iter()
        .map(|item| {
            let id = item["agent_id"].as_str().unwrap_or_default();
            let key = item["idempotency_key"].as_str().unwrap_or_default();
            let amount = item["amount_micros"].as_u64().unwrap_or(0);
            assert_eq!(item["op"], "debit", "the load test batches only debits");
            let bug = match m.bug {
                Bug::BatchDoubleDebit => Bug::DoubleDebit,
                bug => bug,
            };
            let ((status, body), replayed) =
                keyed_answer(&m, id, key, debit_change(bug, key, amount));
            if status < 300 {
                json!({"status": status, "replayed": replayed, "receipt": body})
            } else {
                json!({"status": status, "problem": body})
            }
        })
        .collect();
    reply((200, json!({ "items": answers })))
}

fn debit_change(bug: Bug, key: &str, amount: u64) -> impl FnOnce(&mut Agent) -> (u16, Value) {
    let key = key.to_owned();
    move |a| {
        if a.rate_limited() {
            return problem(429, "rate-limited", json!({"retry_after_ms": 1000}));
        }
        if a.balance < amount {
            if bug == Bug::ChargeOn402 && a.balance > 0 {
                let taken = a.balance;
                a.balance = 0;
                a.push("debit", taken, &key);
            }
            return funds(a, amount);
        }
        a.balance -= amount;
        let receipt = a.push("debit", amount, &key);
        if bug == Bug::DoubleDebit && a.balance >= amount {
            a.balance -= amount;
            a.push("debit", amount, &key);
        }
        (201, receipt)
    }
}

async fn check(State(m): State<Mock>, Path(id): Path<String>, Json(body): Json<Value>) -> Response {
    let amount = body["amount_micros"].as_u64().unwrap_or(0);
    let agents = m.agents.lock().expect("not poisoned");
    match agents.get(&id) {
        Some(a) if a.balance < amount => reply(funds(a, amount)),
        Some(a) => reply((
            200,
            json!({"allowed": true, "amount_micros": amount,
            "balance_micros": a.balance}),
        )),
        None => reply(problem(404, "not-found", json!({}))),
    }
}

async fn hold(
    State(m): State<Mock>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = key(&headers);
    let amount = body["amount_micros"].as_u64().unwrap_or(0);
    let agent_id = id.clone();
    keyed(&m, &id, &key, |a| {
        if a.balance < amount {
            return funds(a, amount);
        }
        a.balance -= amount;
        a.held += amount;
        let mut receipt = a.push("hold", amount, &key);
        let seq = receipt["seq"].as_u64().unwrap_or(0);
        a.holds.insert(seq, amount);
        receipt["hold_id"] = json!(format!("{agent_id}~{seq}"));
        (201, receipt)
    })
}

async fn settle(
    State(m): State<Mock>,
    Path((hold_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let key = key(&headers);
    let Some((id, seq)) = hold_id.rsplit_once('~') else {
        return reply(problem(404, "not-found", json!({})));
    };
    let seq: u64 = seq.parse().unwrap_or(0);
    let captured = body.and_then(|b| b["amount_micros"].as_u64()).unwrap_or(0);
    keyed(&m, id, &key, |a| {
        let Some(amount) = a.holds.remove(&seq) else {
            return problem(404, "not-found", json!({}));
        };
        a.held -= amount;
        if action == "capture" {
            a.balance += amount - captured.min(amount);
            (200, a.push("capture", captured, &key))
        } else {
            a.balance += amount;
            (200, a.push("void", amount, &key))
        }
    })
}

async fn start(bug: Bug) -> String {
    let mock = Mock {
        agents: Arc::default(),
        bug,
    };
    let app = Router::new()
        .route("/v1/plans", get(plans))
        .route("/v1/agents", post(create))
        .route("/v1/agents/{id}", get(get_agent))
        .route("/v1/agents/{id}/journal", get(journal))
        .route("/v1/agents/{id}/credits", post(credit))
        .route("/v1/agents/{id}/debits", post(debit))
        .route("/v1/agents/{id}/check", post(check))
        .route("/v1/agents/{id}/holds", post(hold))
        .route("/v1/holds/{hold_id}/{action}", post(settle))
        .route("/v1/batch", post(batch))
        .with_state(mock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: LoadtestArgs,
}

fn args(url: &str, json: &std::path::Path) -> LoadtestArgs {
    args_with(url, json, &[])
}

fn args_with(url: &str, json: &std::path::Path, more: &[&str]) -> LoadtestArgs {
    let json = json.to_str().expect("utf-8 temp path");
    let base = [
        "loadtest",
        "--url",
        url,
        "--token",
        "t",
        "--agents",
        "6",
        "--broke-agents",
        "2",
        "--limited-agents",
        "2",
        "--concurrency",
        "4",
        "--duration-s",
        "1",
        "--quiet",
        "--seed",
        "7",
        "--json",
        json,
    ];
    Cli::parse_from(base.iter().chain(more)).args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_server_passes_with_402s_and_429s() {
    let url = start(Bug::None).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.json");
    let ok = loadtest::run(args(&url, &path)).await.expect("runs");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    assert!(ok, "{report:#}");
    assert_eq!(report["invariants"]["ok"], true);
    let status = &report["counts_by_status"];
    for code in ["200", "201", "402", "429"] {
        assert!(
            status[code].as_u64().unwrap_or(0) > 0,
            "no {code}: {report:#}"
        );
    }
    assert!(report["requests"].as_u64().unwrap_or(0) > 0);
    assert!(
        report["replayed_receipts"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert!(report["latency_ms_by_outcome"]["approved"]["p99_ms"]
        .as_f64()
        .is_some());
    assert!(
        report["invariants"]["denied_402_checked"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_on_402_is_caught() {
    let url = start(Bug::ChargeOn402).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.json");
    let ok = loadtest::run(args(&url, &path)).await.expect("runs");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    assert!(!ok);
    let failed: Vec<&str> = report["invariants"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(failed, ["no_charge_after_402"], "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_debit_is_caught() {
    let url = start(Bug::DoubleDebit).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.json");
    let ok = loadtest::run(args(&url, &path)).await.expect("runs");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    assert!(!ok);
    let failed: Vec<&str> = report["invariants"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(failed.contains(&"approved_exactly_once"), "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_applied_twice_is_caught() {
    let url = start(Bug::NoIdempotency).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.json");
    let ok = loadtest::run(args(&url, &path)).await.expect("runs");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    assert!(!ok);
    let failed: Vec<&str> = report["invariants"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(failed.contains(&"approved_exactly_once"), "{report:#}");
}

/// Runs against a mock with `bug` in batches of 5; the report and `run`'s verdict.
async fn run_batched(bug: Bug) -> (bool, Value) {
    let url = start(bug).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("report.json");
    let ok = loadtest::run(args_with(&url, &path, &["--batch", "5"]))
        .await
        .expect("runs");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("report written")).expect("JSON");
    (ok, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_debits_pass_and_count_debits_by_their_own_status() {
    let (ok, report) = run_batched(Bug::None).await;
    assert!(ok, "{report:#}");
    assert_eq!(report["batch_items"], 5);
    let batches = report["counts_by_operation"]["batch"]["approved"]
        .as_u64()
        .unwrap_or(0);
    assert!(batches > 0, "{report:#}");
    let items: u64 = report["counts_by_operation"]["batch_debit"]
        .as_object()
        .expect("batch items counted")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(items, 5 * batches, "every item of every batch: {report:#}");
    let debits = &report["debit_counts_by_status"];
    for code in ["201", "402", "429"] {
        assert!(
            debits[code].as_u64().unwrap_or(0) > 0,
            "no {code}: {report:#}"
        );
    }
    let total: u64 = debits
        .as_object()
        .expect("map")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(report["debits"].as_u64(), Some(total));
    assert!(
        report["debits"].as_u64() > report["requests"].as_u64(),
        "{report:#}"
    );
    assert_eq!(report["latency_ms_batch"]["count"].as_u64(), Some(batches));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_debit_in_a_batch_item_is_caught() {
    let (ok, report) = run_batched(Bug::BatchDoubleDebit).await;
    assert!(!ok, "{report:#}");
    let failed: Vec<&str> = report["invariants"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(failed.contains(&"approved_exactly_once"), "{report:#}");
}

#[tokio::test]
async fn non_loopback_urls_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = loadtest::run(args("http://192.0.2.1:8402", &dir.path().join("r.json")))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("loopback"), "{err:#}");
}
