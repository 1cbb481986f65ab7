//! tally-client against the real server on 127.0.0.1:0 (the shared `TestServer`): a 402
//! after exactly one request, `Retry-After` honoured under `tokio::time::pause`, and a
//! debit whose answer is lost (connection dropped after the commit) retried with its key
//! and charged once; `client.batch`: typed answers item by item, replays by key, the
//! envelope's 413 as an error, and a lost batch answer resent whole and applied once.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use tally_client::{
    BatchItem, BatchOutcome, Capture, Client, Credit, Debit, Denial, Error, Hold, NewAgent,
    Outcome, Refund, RetryPolicy,
};
use tally_store::Clock;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// A plan whose bucket allows one debit per 2 s: the second one in a row gets a 429 with
/// `Retry-After: 2`.
const TIGHT: &str = "[[plans]]\nname = \"tight\"\n\
                     [[plans.buckets]]\nname = \"default\"\nquota = 1\nwindow_s = 2\nburst = 1\n";

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts_max: 5,
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(200),
        total_time_max: Duration::from_secs(30),
        retry_rate_limited: true,
        attempt_timeout: None,
    }
}

fn client(url: &str) -> Client {
    Client::builder(url)
        .token(ADMIN)
        .retry_policy(policy())
        .pool_idle_timeout(None)
        .build()
        .expect("valid URL")
}

/// Requests the server has answered on one route (from its own metrics).
async fn requests_on(url: &str, route: &str) -> u64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics body");
    let route = format!("route=\"{route}\"");
    text.lines()
        .filter(|l| {
            l.starts_with("tally_http_request_duration_seconds_count{") && l.contains(&route)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

const DEBITS: &str = "/v1/agents/{id}/debits";

#[tokio::test]
async fn insufficient_funds_after_exactly_one_request() {
    let server = TestServer::start().await;
    let client = client(&server.base);
    client
        .create_agent(&NewAgent::new("poor").plan("default"))
        .await
        .expect("created");
    client
        .credit("poor", &Credit::new(1_000))
        .await
        .expect("credited");

    let outcome = client
        .debit("poor", &Debit::new(5_000).idempotency_key("too-much"))
        .await
        .expect("answered");
    match outcome {
        Outcome::Denied(Denial::InsufficientFunds {
            required_micros,
            available_micros,
            retryable,
            top_up,
            ..
        }) => {
            assert_eq!((required_micros, available_micros), (5_000, 1_000));
            assert!(!retryable);
            assert!(top_up.is_some_and(|t| t.contains("/v1/agents/poor/credits")));
        }
        other => panic!("expected InsufficientFunds, got {other:?}"),
    }
    assert_eq!(requests_on(&server.base, DEBITS).await, 1);
    // Nothing was charged, and the denied key is not in the journal.
    let journal = client.journal_all("poor").await.expect("journal");
    assert!(journal
        .iter()
        .all(|e| e.idempotency_key.as_deref() != Some("too-much")));
    assert_eq!(
        client
            .get_agent("poor")
            .await
            .expect("agent")
            .balance_micros,
        1_000
    );

    // After a top-up, the same key goes through: denials are not stored under the key.
    client
        .credit("poor", &Credit::new(10_000))
        .await
        .expect("credited");
    let receipt = client
        .debit("poor", &Debit::new(5_000).idempotency_key("too-much"))
        .await
        .expect("answered")
        .into_result()
        .expect("approved after the top-up");
    assert_eq!(receipt.balance_micros, 6_000);
    server.stop().await;
}

/// The server's clock is the paused clock of the test's runtime, read through its handle
/// from the engine's shard threads; the server itself runs on another runtime so that
/// its own timers run in real time. (A `TestServer`'s `ManualClock` would not move while
/// the client sleeps out a `Retry-After`, hence `start_on_clock`.)
#[derive(Debug)]
struct PausedClock {
    handle: tokio::runtime::Handle,
    start: tokio::time::Instant,
    base_ms: u64,
}

impl Clock for PausedClock {
    fn now_ms(&self) -> u64 {
        let _entered = self.handle.enter();
        self.base_ms + (tokio::time::Instant::now() - self.start).as_millis() as u64
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_against_the_real_server() {
    let clock = Arc::new(PausedClock {
        handle: tokio::runtime::Handle::current(),
        start: tokio::time::Instant::now(),
        base_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64,
    });
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let (running, _dir) = server_rt
        .spawn(async move { start_on_clock(config(TIGHT), clock).await })
        .await
        .expect("server started");
    let url = format!("http://{}", running.addr);
    let client = client(&url);
    let plans = client.plans().await.expect("plans");
    assert_eq!(plans.default_plan.as_deref(), Some("default"));
    let tight = plans
        .plans
        .iter()
        .find(|p| p.name == "tight")
        .expect("tight plan");
    assert_eq!(
        (tight.buckets[0].quota, tight.buckets[0].window_ms),
        (1, 2_000)
    );
    client
        .create_agent(&NewAgent::new("busy").plan("tight"))
        .await
        .expect("created");
    client
        .credit("busy", &Credit::new(1_000_000))
        .await
        .expect("credited");

    let first = client
        .debit("busy", &Debit::new(10))
        .await
        .expect("answered");
    assert!(first.is_approved(), "{first:?}");

    // The bucket is empty: 429, Retry-After: 2, and the client waits exactly that long.
    let started = tokio::time::Instant::now();
    let second = client
        .debit("busy", &Debit::new(10).idempotency_key("second"))
        .await
        .expect("answered")
        .into_result()
        .expect("approved after waiting");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "waited only {waited:?}");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    assert_eq!(requests_on(&url, DEBITS).await, 3);

    // With 429 retries off, the typed denial comes back after one request.
    let no_retry = client.with_retry_policy(RetryPolicy {
        retry_rate_limited: false,
        ..policy()
    });
    match no_retry
        .debit("busy", &Debit::new(10))
        .await
        .expect("answered")
    {
        Outcome::Denied(Denial::RateLimited {
            retry_after,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(retry_after, Duration::from_secs(2));
            assert!(retry_after_ms.is_some_and(|ms| ms > 1_000 && ms <= 2_000));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(requests_on(&url, DEBITS).await, 4);

    let journal = client.journal_all("busy").await.expect("journal");
    let debits: Vec<_> = journal.iter().filter(|e| e.kind == "debit").collect();
    assert_eq!(debits.len(), 2);
    assert_eq!(debits[1].seq, second.seq);
    assert_eq!(debits[1].idempotency_key.as_deref(), Some("second"));

    server_rt
        .spawn(async move { running.shutdown().await })
        .await
        .expect("joined")
        .expect("clean shutdown");
    server_rt.shutdown_background();
}

/// A TCP proxy that forwards the first connection's request, waits for the server's
/// answer, and then drops the connection without passing it on; later connections are
/// forwarded both ways. Returns the proxy's address.
async fn lossy_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut outbound = TcpStream::connect(upstream).await.expect("upstream");
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let (mut from_client, _to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    // Forward the whole request, however many segments it arrives in.
                    let forward = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                    });
                    // The server answers (it has committed); the client never hears it.
                    let mut buf = [0u8; 1];
                    let _ = from_server.read(&mut buf).await;
                    forward.abort();
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_lost_answer_is_retried_with_its_key_and_charged_once() {
    let server = TestServer::start().await;
    let direct = client(&server.base);
    direct
        .create_agent(&NewAgent::new("net").plan("default"))
        .await
        .expect("created");
    direct
        .credit("net", &Credit::new(10_000))
        .await
        .expect("credited");

    let proxy = lossy_proxy(server.running.as_ref().expect("running").addr).await;
    let via_proxy = client(&format!("http://{proxy}"));
    let receipt = via_proxy
        .debit("net", &Debit::new(2_500))
        .await
        .expect("answered")
        .into_result()
        .expect("approved");
    // The second attempt got the first one's stored answer.
    assert!(receipt.replayed, "{receipt:?}");
    assert_eq!(receipt.balance_micros, 7_500);
    assert_eq!(requests_on(&server.base, DEBITS).await, 2);

    let journal = direct.journal_all("net").await.expect("journal");
    let debits: Vec<_> = journal.iter().filter(|e| e.kind == "debit").collect();
    assert_eq!(debits.len(), 1, "{journal:?}");
    assert_eq!(debits[0].seq, receipt.seq);
    assert_eq!(
        direct.get_agent("net").await.expect("agent").balance_micros,
        7_500
    );
    server.stop().await;
}

const BATCH: &str = "/v1/batch";

/// `client.batch` answers each item as its single call would: receipts, a check's result,
/// typed denials, and problems of one item alone; sending the same items again replays
/// them item by item, and a changed item alone gets 422.
#[tokio::test]
async fn a_batch_answers_item_by_item_and_replays_by_key() {
    let server = TestServer::start().await;
    let client = client(&server.base);
    client
        .create_agent(&NewAgent::new("b1").plan("default"))
        .await
        .expect("created");
    client
        .credit("b1", &Credit::new(1_000))
        .await
        .expect("credited");

    let items = [
        BatchItem::debit("b1", &Debit::new(100).task_type("llm")),
        BatchItem::hold("b1", &Hold::new(300, 60_000)),
        BatchItem::check("b1", &Debit::new(500)),
        BatchItem::debit("b1", &Debit::new(5_000)),
        BatchItem::debit("nobody", &Debit::new(1)),
    ];
    assert_eq!(items[2].idempotency_key(), None, "a check carries no key");
    let answers = client.batch(&items).await.expect("answered");
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [201, 201, 200, 402, 404]);
    let debit = answers[0].outcome.receipt().expect("debited").clone();
    assert_eq!((debit.kind.as_str(), debit.balance_micros), ("debit", 900));
    assert!(!debit.replayed);
    let hold_id = answers[1].outcome.receipt().expect("held").hold_id.clone();
    let hold_id = hold_id.expect("a hold receipt names its hold");
    match &answers[2].outcome {
        BatchOutcome::Checked(r) => assert!(r.allowed && r.balance_micros == 600, "{r:?}"),
        other => panic!("expected a check result, got {other:?}"),
    }
    match &answers[3].outcome {
        BatchOutcome::Denied(Denial::InsufficientFunds {
            required_micros: 5_000,
            available_micros: 600,
            retryable: false,
            ..
        }) => {}
        other => panic!("expected InsufficientFunds, got {other:?}"),
    }
    match &answers[4].outcome {
        BatchOutcome::Failed(p) => assert_eq!((p.status, p.kind()), (404, "not-found")),
        other => panic!("expected a 404 problem, got {other:?}"),
    }
    assert_eq!(
        requests_on(&server.base, BATCH).await,
        1,
        "a 402 is not retried"
    );

    // The same items again: the debit and the hold replay; nothing is charged twice.
    let again = client.batch(&items).await.expect("answered");
    let replayed = |i: usize| again[i].outcome.receipt().map(|r| (r.replayed, r.seq));
    assert_eq!(replayed(0), Some((true, debit.seq)));
    assert!(replayed(1).is_some_and(|(replayed, _)| replayed));
    assert_eq!(again[3].status, 402);

    // Capture and refund by batch; a changed debit under a used key is 422 for it alone.
    let debit_key = items[0].idempotency_key().expect("keyed");
    let settle = [
        BatchItem::capture(&hold_id, &Capture::new(200)),
        BatchItem::refund(
            "b1",
            &Refund {
                debit_seq: debit.seq,
                amount_micros: 40,
                idempotency_key: None,
            },
        ),
        BatchItem::debit("b1", &Debit::new(101).idempotency_key(debit_key)),
    ];
    let answers = client.batch(&settle).await.expect("answered");
    assert_eq!(answers[0].status, 200);
    assert_eq!(answers[1].status, 201);
    match &answers[2].outcome {
        BatchOutcome::Failed(p) => {
            assert_eq!((p.status, p.kind()), (422, "idempotency-key-reused"))
        }
        other => panic!("expected 422, got {other:?}"),
    }
    let agent = client.get_agent("b1").await.expect("agent");
    // 1,000 − 100 (debit) − 200 (capture; the rest of the hold released) + 40 (refund).
    assert_eq!((agent.balance_micros, agent.held_micros), (740, 0));
    server.stop().await;
}

/// The envelope's own problems are the client's `Error`: 413 past `batch_items_max` (at
/// exactly the maximum it passes), not retried; no items is refused before any request.
#[tokio::test]
async fn a_batch_over_the_limit_is_an_error_of_the_whole_call() {
    let server = TestServer::start_with(config("[limits]\nbatch_items_max = 3\n")).await;
    let client = client(&server.base);
    client
        .create_agent(&NewAgent::new("b2").plan("default"))
        .await
        .expect("created");
    let checks = |n: usize| -> Vec<BatchItem> {
        (0..n)
            .map(|_| BatchItem::check("b2", &Debit::new(1)))
            .collect()
    };
    let at_max = client.batch(&checks(3)).await.expect("3 items pass");
    assert_eq!(at_max.len(), 3);
    match client.batch(&checks(4)).await {
        Err(Error::Problem(p)) => {
            assert_eq!((p.status, p.kind()), (413, "batch-too-large"));
            assert_eq!(p.fields["batch_items_max"], 3);
        }
        other => panic!("expected 413 batch-too-large, got {other:?}"),
    }
    assert_eq!(
        requests_on(&server.base, BATCH).await,
        2,
        "a 413 is not retried"
    );
    assert!(matches!(
        client.batch(&[]).await,
        Err(Error::InvalidArgument(_))
    ));
    let bad_key = BatchItem::debit("b2", &Debit::new(1).idempotency_key("a b"));
    assert!(matches!(
        client.batch(&[bad_key]).await,
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(requests_on(&server.base, BATCH).await, 2);
    server.stop().await;
}

/// A batch whose answer is lost after the commit is sent again whole by the client's retry
/// policy with the same keys: every item is answered as a replay and charged once.
#[tokio::test]
async fn a_batch_whose_answer_is_lost_is_resent_and_applied_once() {
    let server = TestServer::start().await;
    let direct = client(&server.base);
    for id in ["n1", "n2"] {
        direct
            .create_agent(&NewAgent::new(id).plan("default"))
            .await
            .expect("created");
        direct
            .credit(id, &Credit::new(10_000))
            .await
            .expect("credited");
    }
    let proxy = lossy_proxy(server.running.as_ref().expect("running").addr).await;
    let via_proxy = client(&format!("http://{proxy}"));
    let items = [
        BatchItem::debit("n1", &Debit::new(1_000)),
        BatchItem::debit("n2", &Debit::new(2_000)),
        BatchItem::hold("n1", &Hold::new(500, 60_000)),
    ];
    let answers = via_proxy.batch(&items).await.expect("answered");
    assert_eq!(requests_on(&server.base, BATCH).await, 2);
    for answer in &answers {
        let receipt = answer.outcome.receipt().expect("applied");
        assert!(receipt.replayed, "the second attempt replays: {receipt:?}");
    }
    let n1 = direct.get_agent("n1").await.expect("agent");
    assert_eq!((n1.balance_micros, n1.held_micros), (8_500, 500));
    let n2 = direct.get_agent("n2").await.expect("agent");
    assert_eq!(n2.balance_micros, 8_000);
    let debits = direct.journal_all("n1").await.expect("journal");
    assert_eq!(debits.iter().filter(|e| e.kind == "debit").count(), 1);
    server.stop().await;
}
