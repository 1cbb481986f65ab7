//! tally-client against the real server on 127.0.0.1:0 (the shared `TestServer`): a 402
//! after exactly one request, `Retry-After` honoured under `tokio::time::pause`, and a
//! debit whose answer is lost (connection dropped after the commit) retried with its key
//! and charged once.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use tally_client::{Client, Credit, Debit, Denial, NewAgent, Outcome, RetryPolicy};
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
