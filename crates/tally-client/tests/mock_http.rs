//! The client against a small mock of the tally contract (axum on port 0): status codes,
//! problem bodies and headers as `crates/tally-server/API.md` says, with counters the
//! real server does not expose (requests per route, charges per idempotency key).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tally_client::{Client, Debit, Denial, Error, Outcome, RetryPolicy};
use tokio::time::Instant;

/// What the mock saw.
#[derive(Default)]
struct Seen {
    /// Arrival time and idempotency key of every debit request.
    debits: Vec<(Instant, Option<String>)>,
    /// Charges made per idempotency key, and the receipt stored under it.
    charges: HashMap<String, (u32, Value)>,
}

type Shared = Arc<Mutex<Seen>>;

/// How the mock answers the n-th debit request (0-based).
type Script = Arc<dyn Fn(usize) -> Step + Send + Sync>;

#[derive(Clone)]
enum Step {
    /// Charge (once per key) and answer 201, or replay the stored receipt.
    Charge,
    /// Charge, then drop the connection before answering.
    ChargeThenDrop,
    Problem {
        status: u16,
        kind: &'static str,
        retry_after: Option<String>,
        fields: Value,
    },
}

fn problem(status: u16, kind: &'static str, retry_after: Option<&str>, fields: Value) -> Step {
    Step::Problem {
        status,
        kind,
        retry_after: retry_after.map(str::to_owned),
        fields,
    }
}

async fn debit(
    State((seen, script)): State<(Shared, Script)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let step = {
        let mut seen = seen.lock().expect("not poisoned");
        seen.debits.push((Instant::now(), key.clone()));
        script(seen.debits.len() - 1)
    };
    let charge = |seen: &Shared| -> (bool, Value) {
        let key = key.clone().expect("debits carry a key");
        let mut seen = seen.lock().expect("not poisoned");
        let seq = seen.charges.len() as u64 + 2;
        let entry = seen.charges.entry(key.clone()).or_insert_with(|| {
            let receipt = json!({"agent_id": "a1", "seq": seq, "kind": "debit",
                "amount_micros": body["amount_micros"], "balance_micros": 0, "held_micros": 0,
                "at": "2026-11-29T13:00:00.000Z", "hold_id": null, "expires_at": null});
            (0, receipt)
        });
        let replayed = entry.0 > 0;
        if !replayed {
            entry.0 += 1;
        }
        (replayed, entry.1.clone())
    };
    match step {
        Step::Charge => {
            let (replayed, receipt) = charge(&seen);
            let mut response = (StatusCode::CREATED, Json(receipt)).into_response();
            if replayed {
                response
                    .headers_mut()
                    .insert("idempotent-replayed", "true".parse().expect("valid"));
            }
            response
        }
        Step::ChargeThenDrop => {
            charge(&seen);
            // Unwinding out of the connection task closes the socket without an answer,
            // like a server or proxy dying after the commit. `resume_unwind` skips the
            // panic hook, so the test output stays quiet.
            std::panic::resume_unwind(Box::new("dropping the connection"))
        }
        Step::Problem {
            status,
            kind,
            retry_after,
            fields,
        } => {
            let mut body = json!({"type": format!("urn:tally:problem:{kind}"),
                "title": kind, "status": status, "detail": "mock"});
            if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
                body.extend(fields.clone());
            }
            let mut response = (
                StatusCode::from_u16(status).expect("valid status"),
                [("content-type", "application/problem+json")],
                body.to_string(),
            )
                .into_response();
            if let Some(retry_after) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", retry_after.parse().expect("valid header"));
            }
            response
        }
    }
}

/// Starts the mock on 127.0.0.1:0; returns its URL and what it saw.
async fn mock(script: impl Fn(usize) -> Step + Send + Sync + 'static) -> (String, Shared) {
    let seen = Shared::default();
    let script: Script = Arc::new(script);
    let app = Router::new()
        .route("/v1/agents/{id}/debits", post(debit))
        .with_state((seen.clone(), script));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// Fast, deterministic enough, and no per-attempt timeout (under a paused clock a
/// timeout could fire while a loopback request is in flight).
fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 5,
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(2),
        total_time_max: Duration::from_secs(30),
        retry_rate_limited: true,
        attempt_timeout: None,
    }
}

fn client(url: &str) -> Client {
    Client::builder(url)
        .token("t")
        .retry_policy(policy())
        .build()
        .expect("valid URL")
}

fn funds_problem(retryable: bool) -> Step {
    let mut fields = json!({"required_micros": 1500, "available_micros": 200,
        "balance_micros": 200, "held_micros": 0, "retryable": retryable,
        "top_up": "/v1/agents/a1/credits",
        "accepts": [{"scheme": "exact", "network": "base", "maxAmountRequired": "1300"}]});
    let mut retry_after = None;
    if retryable {
        fields["retry_after_ms"] = json!(1000);
        retry_after = Some("1");
    }
    problem(402, "insufficient-funds", retry_after, fields)
}

#[tokio::test(start_paused = true)]
async fn insufficient_funds_comes_back_after_exactly_one_request() {
    for retryable in [false, true] {
        let (url, seen) = mock(move |_| funds_problem(retryable)).await;
        let outcome = client(&url)
            .debit("a1", &Debit::new(1500))
            .await
            .expect("a denial is not an error");
        match outcome {
            Outcome::Denied(Denial::InsufficientFunds {
                required_micros,
                available_micros,
                retryable: said_retryable,
                accepts,
                top_up,
                ..
            }) => {
                assert_eq!((required_micros, available_micros), (1500, 200));
                assert_eq!(said_retryable, retryable);
                assert_eq!(accepts.len(), 1);
                assert_eq!(top_up.as_deref(), Some("/v1/agents/a1/credits"));
            }
            other => panic!("expected InsufficientFunds, got {other:?}"),
        }
        // Even when the server says a retry could succeed, the client does not loop.
        assert_eq!(seen.lock().expect("not poisoned").debits.len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_is_honoured_with_the_same_key() {
    let (url, seen) = mock(|n| match n {
        0 | 1 => problem(
            429,
            "rate-limited",
            Some("3"),
            json!({"retry_after_ms": 2400, "bucket": "default"}),
        ),
        _ => Step::Charge,
    })
    .await;
    let receipt = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect("answered")
        .into_result()
        .expect("approved on the third attempt");
    assert!(!receipt.replayed);
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.debits.len(), 3);
    for pair in seen.debits.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_secs(3), "waited only {gap:?}");
        assert_eq!(pair[0].1, pair[1].1, "one key for the whole call");
    }
    assert_eq!(seen.charges.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_is_honoured() {
    let (url, seen) = mock(|n| match n {
        0 => {
            let at = SystemTime::now() + Duration::from_secs(5);
            let date: &'static str = Box::leak(httpdate::fmt_http_date(at).into_boxed_str());
            problem(503, "overloaded", Some(date), json!({}))
        }
        _ => Step::Charge,
    })
    .await;
    let outcome = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect("answered");
    assert!(outcome.is_approved());
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.debits.len(), 2);
    // HTTP dates have whole seconds: the wait is 4-5 s, never the 100 ms backoff.
    let gap = seen.debits[1].0 - seen.debits[0].0;
    assert!(gap >= Duration::from_secs(4), "waited only {gap:?}");
}

#[tokio::test(start_paused = true)]
async fn rate_limit_past_the_budget_is_returned_not_waited_for() {
    let (url, seen) = mock(|_| {
        problem(
            429,
            "rate-limited",
            Some("120"),
            json!({"retry_after_ms": 119_500}),
        )
    })
    .await;
    let started = Instant::now();
    let outcome = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect("answered");
    match outcome {
        Outcome::Denied(Denial::RateLimited {
            retry_after,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(retry_after, Duration::from_secs(120));
            assert_eq!(retry_after_ms, Some(119_500));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(seen.lock().expect("not poisoned").debits.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn monthly_cap_resetting_past_the_budget_is_not_retried() {
    let (url, seen) = mock(|_| {
        problem(
            429,
            "monthly-cap-reached",
            Some("86400"),
            json!({"resets_at": "2026-12-01T00:00:00.000Z", "cap_micros": 100,
                   "limit_micros": 100, "spent_micros": 100, "held_micros": 0, "soft": false}),
        )
    })
    .await;
    let outcome = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect("answered");
    match outcome {
        Outcome::Denied(Denial::MonthlyCapReached {
            resets_at,
            cap_micros,
            retry_after,
            ..
        }) => {
            assert_eq!(resets_at, "2026-12-01T00:00:00.000Z");
            assert_eq!(cap_micros, 100);
            assert_eq!(retry_after, Some(Duration::from_secs(86_400)));
        }
        other => panic!("expected MonthlyCapReached, got {other:?}"),
    }
    assert_eq!(seen.lock().expect("not poisoned").debits.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_is_returned_at_once_when_the_policy_says_so() {
    let (url, seen) = mock(|_| problem(429, "rate-limited", Some("1"), json!({}))).await;
    let client = client(&url).with_retry_policy(RetryPolicy {
        retry_rate_limited: false,
        ..policy()
    });
    let outcome = client.debit("a1", &Debit::new(10)).await.expect("answered");
    assert!(matches!(
        outcome,
        Outcome::Denied(Denial::RateLimited { .. })
    ));
    assert_eq!(seen.lock().expect("not poisoned").debits.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_connection_is_retried_and_charged_once() {
    let (url, seen) = mock(|n| match n {
        0 => Step::ChargeThenDrop,
        _ => Step::Charge,
    })
    .await;
    let receipt = client(&url)
        .debit("a1", &Debit::new(700))
        .await
        .expect("answered")
        .into_result()
        .expect("approved");
    // The second attempt found the first one's charge under the same key.
    assert!(receipt.replayed);
    assert_eq!(receipt.amount_micros, 700);
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.debits.len(), 2);
    assert_eq!(seen.debits[0].1, seen.debits[1].1);
    assert_eq!(seen.charges.len(), 1);
    assert!(seen.charges.values().all(|(count, _)| *count == 1));
}

#[tokio::test(start_paused = true)]
async fn caller_key_is_used_for_every_attempt() {
    let (url, seen) = mock(|n| match n {
        0 => problem(503, "overloaded", Some("1"), json!({})),
        1 => Step::ChargeThenDrop,
        _ => Step::Charge,
    })
    .await;
    let client = client(&url);
    let first = client
        .debit("a1", &Debit::new(5).idempotency_key("order-42"))
        .await
        .expect("answered")
        .into_result()
        .expect("approved");
    // A later call with the same key (say, after our process restarted) is a replay too.
    let again = client
        .debit("a1", &Debit::new(5).idempotency_key("order-42"))
        .await
        .expect("answered")
        .into_result()
        .expect("approved");
    assert_eq!(first.seq, again.seq);
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.debits.len(), 4);
    assert!(seen
        .debits
        .iter()
        .all(|(_, key)| key.as_deref() == Some("order-42")));
    assert_eq!(seen.charges["order-42"].0, 1);
}

#[tokio::test(start_paused = true)]
async fn overload_without_retry_after_backs_off_within_bounds_then_gives_up() {
    let (url, seen) = mock(|_| problem(503, "overloaded", None, json!({}))).await;
    let policy = policy();
    let err = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect_err("503 after all attempts");
    assert_eq!(err.status(), Some(503));
    assert_eq!(err.kind(), Some("overloaded"));
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.debits.len(), policy.attempts_max as usize);
    for (retry, pair) in seen.debits.windows(2).enumerate() {
        let gap = pair[1].0 - pair[0].0;
        // Full jitter: anywhere in [0, min(cap, base·2^n)] (plus the mock's own time).
        let ceiling = policy.backoff_ceiling(retry as u32);
        assert!(
            gap <= ceiling + Duration::from_millis(50),
            "retry {retry}: {gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn total_budget_bounds_the_call() {
    let (url, seen) = mock(|_| problem(503, "overloaded", Some("4"), json!({}))).await;
    let client = client(&url).with_retry_policy(RetryPolicy {
        attempts_max: 50,
        total_time_max: Duration::from_secs(10),
        ..policy()
    });
    let started = Instant::now();
    let err = client
        .debit("a1", &Debit::new(10))
        .await
        .expect_err("gives up");
    assert_eq!(err.status(), Some(503));
    // Waits of 4 s fit twice in 10 s: three requests, and no sleep past the budget.
    assert_eq!(seen.lock().expect("not poisoned").debits.len(), 3);
    assert!(started.elapsed() <= Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn suspended_and_other_problems_are_not_retried() {
    let (url, seen) = mock(|_| problem(403, "agent-suspended", None, json!({}))).await;
    let outcome = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect("answered");
    assert!(matches!(outcome, Outcome::Denied(Denial::Suspended { .. })));
    assert_eq!(seen.lock().expect("not poisoned").debits.len(), 1);

    let (url, seen) = mock(|_| problem(422, "idempotency-key-reused", None, json!({}))).await;
    let err = client(&url)
        .debit("a1", &Debit::new(10))
        .await
        .expect_err("422");
    assert!(matches!(&err, Error::Problem(p) if p.status == 422));
    assert_eq!(err.kind(), Some("idempotency-key-reused"));
    assert_eq!(seen.lock().expect("not poisoned").debits.len(), 1);
}

#[tokio::test]
async fn connection_refused_is_a_transport_error_after_the_attempts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("bound");
    drop(listener);
    let client = Client::builder(format!("http://{addr}"))
        .retry_policy(RetryPolicy {
            attempts_max: 3,
            backoff_base: Duration::from_millis(1),
            ..policy()
        })
        .build()
        .expect("valid URL");
    let err = client
        .debit("a1", &Debit::new(10).idempotency_key("k-1"))
        .await
        .expect_err("nobody listens");
    match err {
        Error::Transport {
            attempts,
            idempotency_key,
            ..
        } => {
            assert_eq!(attempts, 3);
            assert_eq!(idempotency_key.as_deref(), Some("k-1"));
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn slow_answers_time_out_within_the_total_budget() {
    // A server that never answers in time: every attempt times out, and the last one is
    // cut short so that the whole call ends at the budget.
    let app = Router::new().route(
        "/v1/agents/{id}/debits",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            StatusCode::CREATED
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::builder(format!("http://{addr}"))
        .pool_idle_timeout(None)
        .retry_policy(RetryPolicy {
            attempts_max: 10,
            total_time_max: Duration::from_secs(15),
            attempt_timeout: Some(Duration::from_secs(10)),
            ..policy()
        })
        .build()
        .expect("valid URL");
    let started = Instant::now();
    let err = client
        .debit("a1", &Debit::new(10))
        .await
        .expect_err("times out");
    let elapsed = started.elapsed();
    assert!(
        matches!(err, Error::Transport { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(elapsed >= Duration::from_secs(10), "{elapsed:?}");
    assert!(
        elapsed <= Duration::from_secs(15) + Duration::from_millis(50),
        "{elapsed:?}"
    );
}
