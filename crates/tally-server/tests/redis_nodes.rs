//! Two `tally serve` processes on one Redis Cluster (`--storage redis://...`, issue 13):
//! concurrent debits over HTTP through both never overdraw nor charge twice, each node
//! reads what the other wrote, and what the shared backend does not offer (the change feed)
//! is a 501 problem, not a 500. Needs the cluster of `scripts/redis-cluster.sh up`
//! (`TALLY_REDIS_CLUSTER`); skipped, saying so, without it (`TALLY_REDIS_REQUIRED` makes
//! that a failure, as in CI).

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::process::spawn_with;
use serde_json::{json, Value};

const TOKEN: &str = "redis-nodes-admin-token";
const CREDIT_MICROS: u64 = 40_000;
const WORKERS: usize = 8;
/// Requests one worker sends at most (the balance runs out long before).
const REQUESTS_PER_WORKER_MAX: usize = 2_000;

fn cluster() -> Option<String> {
    match std::env::var("TALLY_REDIS_CLUSTER") {
        Ok(nodes) => Some(nodes),
        Err(_) => {
            assert!(
                std::env::var_os("TALLY_REDIS_REQUIRED").is_none(),
                "TALLY_REDIS_REQUIRED is set but TALLY_REDIS_CLUSTER is not"
            );
            eprintln!(
                "skipped: TALLY_REDIS_CLUSTER not set (scripts/redis-cluster.sh up prints it)"
            );
            None
        }
    }
}

async fn post(http: &reqwest::Client, url: String, key: &str, body: Value) -> reqwest::Response {
    http.post(url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_cluster_share_every_agent() {
    let Some(nodes) = cluster() else {
        return;
    };
    let storage = format!("redis://{nodes}");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = spawn_with(dir_a.path(), Some(TOKEN), &[("TALLY_STORAGE", &storage)]);
    let b = spawn_with(dir_b.path(), Some(TOKEN), &[("TALLY_STORAGE", &storage)]);
    let bases = Arc::new([a.base.clone(), b.base.clone()]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let agent = format!("nodes-{nanos:x}");

    let r = post(
        &http,
        format!("{}/v1/agents", bases[0]),
        "c",
        json!({"id": agent}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let credit = json!({"amount_micros": CREDIT_MICROS});
    let r = post(
        &http,
        format!("{}/v1/agents/{agent}/credits", bases[1]),
        "t",
        credit,
    )
    .await;
    assert_eq!(r.status(), 201, "node B knows the agent node A made");

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (http, bases, agent) = (http.clone(), bases.clone(), agent.clone());
        workers.push(tokio::spawn(async move {
            let mut approved = 0u64;
            // After a 402, what was still available: asked for exactly, so the balance
            // reaches 0 rather than a rest smaller than every amount.
            let mut rest: Option<u64> = None;
            for i in 0..REQUESTS_PER_WORKER_MAX {
                let base = &bases[(w + i) % 2];
                let amount = rest
                    .take()
                    .unwrap_or(100 + (w as u64 * 13 + i as u64) % 400);
                let key = format!("w{w}-{i}");
                let url = format!("{base}/v1/agents/{agent}/debits");
                let r = post(&http, url, &key, json!({"amount_micros": amount})).await;
                match r.status().as_u16() {
                    201 => approved += amount,
                    402 => {
                        let p: Value = r.json().await.expect("problem");
                        let available = p["available_micros"].as_u64().expect("available");
                        assert!(
                            available < amount,
                            "denied although {available} covers {amount}"
                        );
                        if available == 0 {
                            return approved;
                        }
                        rest = Some(available);
                    }
                    503 => assert!(r.headers().contains_key("retry-after"), "a 503 says when"),
                    other => panic!("{key}: {other} {:?}", r.text().await),
                }
            }
            panic!("worker {w} never saw the balance reach 0");
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker");
    }
    assert_eq!(
        total, CREDIT_MICROS,
        "every micro spent exactly once, across both nodes"
    );

    for base in bases.iter() {
        let got: Value = http
            .get(format!("{base}/v1/agents/{agent}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("read")
            .json()
            .await
            .expect("json");
        assert_eq!(got["balance_micros"], 0, "{base}");
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 200, "{base} ready");
    }
    let journal: Value = http
        .get(format!("{}/v1/agents/{agent}/journal?limit=1000", bases[1]))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("journal")
        .json()
        .await
        .expect("json");
    let entries = journal["entries"].as_array().expect("entries");
    let debited: u64 = entries
        .iter()
        .filter(|e| e["kind"] == "debit")
        .map(|e| e["amount_micros"].as_u64().expect("amount"))
        .sum();
    assert_eq!(debited, CREDIT_MICROS, "the journal agrees");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "dense journal");
    }

    let feed = http
        .get(format!("{}/v1/events", bases[0]))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("events");
    assert_eq!(
        feed.status(),
        501,
        "the change feed is not offered on redis"
    );
    let problem: Value = feed.json().await.expect("problem json");
    assert_eq!(problem["type"], "urn:tally:problem:not-supported");
    a.kill();
    b.kill();
}

/// Webhooks are sent from the change feed, which the redis backend does not offer: the
/// server says so at start instead of starting without them. No cluster needed: it refuses
/// before connecting.
#[tokio::test]
async fn webhooks_on_redis_are_refused_at_start() {
    let secret = format!("whsec_{}", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk=");
    let text = format!(
        "[storage]\nurl = \"redis://127.0.0.1:1\"\n\n[[webhooks]]\nname = \"billing\"\nurl = \"http://127.0.0.1:9/h\"\nsecrets = [\"{secret}\"]\n"
    );
    let mut config = tally_server::Config::from_toml(&text, "t").expect("valid config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let e = match tally_server::start(config, Arc::new(tally_store::SystemClock)).await {
        Ok(_) => panic!("a redis server with webhooks started"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("change feed"), "{e}");
}
