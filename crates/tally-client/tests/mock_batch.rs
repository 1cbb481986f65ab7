//! `Client::batch` against a scripted mock of `POST /v1/batch` (axum on port 0, paused
//! time): which failures are retried and how (the whole batch when the envelope failed,
//! only the items worth it when it was answered), that every re-send carries the same
//! keys, that 402s and 413s are never retried, and that a malformed answer is an error.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tally_client::{BatchItem, BatchOutcome, Client, Debit, Denial, Error, Hold, RetryPolicy};
use tokio::time::Instant;

/// The mock's answer to a request: status, body, `Retry-After` header.
type Reply = (u16, Value, Option<&'static str>);
/// How the mock answers the n-th request (0-based), given its items.
type Script = Arc<dyn Fn(usize, &[Value]) -> Reply + Send + Sync>;
/// Arrival time and items of every request.
type Seen = Arc<Mutex<Vec<(Instant, Vec<Value>)>>>;

async fn batch(State((seen, script)): State<(Seen, Script)>, Json(body): Json<Value>) -> Response {
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let (status, body, retry_after) = {
        let mut seen = seen.lock().expect("not poisoned");
        seen.push((Instant::now(), items.clone()));
        script(seen.len() - 1, &items)
    };
    let mut response = (
        StatusCode::from_u16(status).expect("valid status"),
        Json(body),
    )
        .into_response();
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", retry_after.parse().expect("valid header"));
    }
    response
}

async fn mock(script: impl Fn(usize, &[Value]) -> Reply + Send + Sync + 'static) -> (String, Seen) {
    let seen = Seen::default();
    let script: Script = Arc::new(script);
    let app = Router::new()
        .route("/v1/batch", post(batch))
        .with_state((seen.clone(), script));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

fn client(url: &str, retry_rate_limited: bool) -> Client {
    Client::builder(url)
        .token("t")
        .retry_policy(RetryPolicy {
            attempts_max: 4,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            total_time_max: Duration::from_secs(30),
            retry_rate_limited,
            attempt_timeout: None,
        })
        .build()
        .expect("valid URL")
}

fn applied(item: &Value) -> Value {
    json!({"status": 201, "replayed": false, "receipt": {"agent_id": item["agent_id"],
        "seq": 7, "kind": item["op"], "amount_micros": item["amount_micros"],
        "balance_micros": 0, "held_micros": 0, "at": "2026-11-29T13:00:00.000Z"}})
}

fn problem(status: u16, kind: &str, fields: Value) -> Value {
    let mut p = json!({"type": format!("urn:tally:problem:{kind}"), "title": kind,
        "status": status, "detail": "mock"});
    if let (Some(p), Some(f)) = (p.as_object_mut(), fields.as_object()) {
        p.extend(f.clone());
    }
    p
}

fn item_problem(status: u16, kind: &str, fields: Value) -> Value {
    json!({"status": status, "problem": problem(status, kind, fields)})
}

fn keys(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["idempotency_key"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn three() -> Vec<BatchItem> {
    vec![
        BatchItem::debit("a1", &Debit::new(10)),
        BatchItem::debit("a2", &Debit::new(20)),
        BatchItem::hold("a3", &Hold::new(30, 60_000)),
    ]
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_item_alone_is_resent_with_its_key_after_its_retry_after() {
    let (url, seen) = mock(|n, items| {
        let answers: Vec<Value> = items
            .iter()
            .enumerate()
            .map(|(i, item)| match (n, i) {
                (0, 1) => item_problem(503, "overloaded", json!({"retry_after_ms": 1_500})),
                _ => applied(item),
            })
            .collect();
        (200, json!({ "items": answers }), None)
    })
    .await;
    let items = three();
    let answers = client(&url, false).batch(&items).await.expect("answered");
    assert!(answers.iter().all(|a| a.status == 201), "{answers:?}");
    assert_eq!(
        answers[1].outcome.receipt().expect("applied").amount_micros,
        20
    );
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.len(), 2);
    assert_eq!(keys(&seen[0].1).len(), 3);
    assert_eq!(
        keys(&seen[1].1),
        vec![items[1].idempotency_key().expect("keyed").to_owned()],
        "only the overloaded item, with its key"
    );
    let gap = seen[1].0 - seen[0].0;
    assert!(
        gap >= Duration::from_secs(2),
        "1,500 ms rounds up to 2 s: {gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_envelope_503_resends_the_whole_batch_and_a_402_item_is_final() {
    let (url, seen) = mock(|n, items| match n {
        0 => (503, problem(503, "not-ready", json!({})), Some("1")),
        _ => {
            let funds = json!({"required_micros": 20, "available_micros": 5,
                "balance_micros": 5, "held_micros": 0, "retryable": true, "retry_after_ms": 900});
            let answers = vec![
                applied(&items[0]),
                item_problem(402, "insufficient-funds", funds),
                applied(&items[2]),
            ];
            (200, json!({ "items": answers }), None)
        }
    })
    .await;
    let answers = client(&url, true).batch(&three()).await.expect("answered");
    match &answers[1].outcome {
        BatchOutcome::Denied(Denial::InsufficientFunds {
            retryable: true,
            retry_after,
            ..
        }) => assert_eq!(*retry_after, Some(Duration::from_secs(1))),
        other => panic!("expected InsufficientFunds, got {other:?}"),
    }
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.len(), 2, "the 503 is retried, the 402 item is not");
    assert_eq!(keys(&seen[0].1), keys(&seen[1].1), "the same keys");
    assert!(seen[1].0 - seen[0].0 >= Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_rate_limited_item_is_retried_only_when_the_policy_says_so() {
    for retry_rate_limited in [false, true] {
        let (url, seen) = mock(|n, items| {
            let answers: Vec<Value> = items
                .iter()
                .map(|item| match (n, item["agent_id"].as_str()) {
                    (0, Some("a3")) => item_problem(
                        429,
                        "rate-limited",
                        json!({"retry_after_ms": 2_100, "bucket": "default"}),
                    ),
                    _ => applied(item),
                })
                .collect();
            (200, json!({ "items": answers }), None)
        })
        .await;
        let answers = client(&url, retry_rate_limited)
            .batch(&three())
            .await
            .expect("answered");
        let requests = seen.lock().expect("not poisoned").len();
        if retry_rate_limited {
            assert_eq!(requests, 2);
            assert_eq!(answers[2].status, 201);
        } else {
            assert_eq!(requests, 1);
            match &answers[2].outcome {
                BatchOutcome::Denied(Denial::RateLimited {
                    retry_after,
                    retry_after_ms: Some(2_100),
                    ..
                }) => assert_eq!(*retry_after, Duration::from_secs(3)),
                other => panic!("expected RateLimited, got {other:?}"),
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn item_retries_stop_at_the_policy_attempts_with_the_last_answer() {
    let (url, seen) = mock(|_, items| {
        let answers: Vec<Value> = items
            .iter()
            .map(|item| match item["agent_id"].as_str() {
                Some("a1") => item_problem(
                    409,
                    "idempotency-key-in-use",
                    json!({"retry_after_ms": 100}),
                ),
                _ => applied(item),
            })
            .collect();
        (200, json!({ "items": answers }), None)
    })
    .await;
    let answers = client(&url, true).batch(&three()).await.expect("answered");
    match &answers[0].outcome {
        BatchOutcome::Failed(p) => {
            assert_eq!((p.status, p.kind()), (409, "idempotency-key-in-use"))
        }
        other => panic!("expected the last 409, got {other:?}"),
    }
    assert_eq!(answers[1].status, 201);
    let seen = seen.lock().expect("not poisoned");
    assert_eq!(seen.len(), 4, "attempts_max requests in all");
    assert!(seen[1..].iter().all(|(_, items)| items.len() == 1));
}

#[tokio::test(start_paused = true)]
async fn envelope_problems_are_errors_and_are_not_retried() {
    let (url, seen) = mock(|_, _| {
        let p = problem(413, "batch-too-large", json!({"batch_items_max": 2}));
        (413, p, None)
    })
    .await;
    match client(&url, true).batch(&three()).await {
        Err(Error::Problem(p)) => {
            assert_eq!((p.status, p.kind()), (413, "batch-too-large"));
            assert_eq!(p.fields["batch_items_max"], 2);
        }
        other => panic!("expected 413, got {other:?}"),
    }
    assert_eq!(seen.lock().expect("not poisoned").len(), 1);

    // Fewer answers than items, or an answer with no receipt: the contract is broken.
    for answers in [
        json!([{"status": 201}]),
        json!([{"status": 201}, {"status": 201}, {"status": 201}]),
    ] {
        let (url, _) = mock(move |_, _| (200, json!({ "items": answers.clone() }), None)).await;
        let result = client(&url, true).batch(&three()).await;
        assert!(matches!(result, Err(Error::Decode { .. })), "{result:?}");
    }
}

#[tokio::test]
async fn an_envelope_that_never_answers_is_a_transport_error_after_the_attempts() {
    // Bound and closed: every connection is refused.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("bound")
    };
    match client(&format!("http://{addr}"), true)
        .batch(&three())
        .await
    {
        Err(Error::Transport { attempts, .. }) => assert_eq!(attempts, 4),
        other => panic!("expected a transport error, got {other:?}"),
    }
}
