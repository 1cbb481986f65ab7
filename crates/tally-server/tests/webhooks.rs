//! Threshold webhooks end to end: a local receiver on port 0, a Standard Webhooks
//! verifier written here (not the server's own), one delivery per crossing, retries under
//! the same `webhook-id`, and a restart between the crossing and its delivery.
//!
//! "Nothing more arrived" is never waited for with a sleep: deliveries to one endpoint go
//! in journal order, so once a later crossing (a marker) has arrived, anything sent again
//! for an earlier one would have arrived before it.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine as _;
use common::{config, TestServer};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Notify;

/// 32 bytes of 0x2a, base64.
const SECRET: &str = "whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";
/// A second secret: during a rotation both sign.
const OLD_SECRET: &str = "whsec_ERERERERERERERERERERERERERERERERERERERERERE=";

/// Long enough for anything here to arrive on a loaded machine; a hang fails the test.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    /// What the receiver answered.
    accepted: bool,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver: answers the scripted statuses first, then 204s.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    arrived: Arc<Notify>,
}

impl Receiver {
    async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hooks",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    let status = me.script.lock().expect("lock").pop_front().unwrap_or(204);
                    let h = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    me.got.lock().expect("lock").push(Received {
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body: body.to_vec(),
                        accepted: (200..300).contains(&status),
                    });
                    me.arrived.notify_waiters();
                    StatusCode::from_u16(status).expect("a status")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}/hooks", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn fail_next(&self, statuses: &[u16]) {
        self.script.lock().expect("lock").extend(statuses);
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }

    /// Waits until a request satisfies `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                let got = self.got();
                if pred(&got) {
                    return got;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(ARRIVAL_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; got {:?}", self.got()))
    }

    async fn wait_accepted(&self, id: &str) -> Vec<Received> {
        self.wait_for(id, |got| got.iter().any(|r| r.id == id && r.accepted))
            .await
    }
}

/// The Standard Webhooks check, from the spec: HMAC-SHA256 with the base64-decoded
/// secret over `{id}.{timestamp}.{body}`, base64, compared with each `v1,` signature.
fn verifies(secret: &str, r: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("prefixed"))
        .expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{}.{}.", r.id, r.timestamp).as_bytes());
    mac.update(&r.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    r.signature
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

fn cfg(url: &str, extra: &str) -> tally_server::Config {
    config(&format!(
        r#"
[[plans]]
name = "watched"
monthly_cap_micros = 10000
[plans.thresholds]
balance_below_micros = 500
cap_spend_percent = 50
grant_expiring_within_ms = 86400000

[[webhooks]]
name = "billing"
url = "{url}"
secrets = ["{SECRET}", "{OLD_SECRET}"]
backoff_first_ms = 10
{extra}
"#
    ))
}

/// Credits 1,000 and debits 600: the balance falls below 500, one crossing.
async fn cross_low_balance(s: &TestServer, agent: &str) -> u64 {
    s.agent(agent, "watched", 1_000).await;
    let r = s.debit(agent, &format!("{agent}-d1"), 600).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let journal = s.get(&format!("/v1/agents/{agent}/journal")).await;
    let crossed = journal.body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["kind"] == "threshold_crossed")
        .unwrap_or_else(|| panic!("a crossing in {}", journal.text))
        .clone();
    assert_eq!(crossed["crossing"]["type"], "balance.low");
    assert_eq!(crossed["balance_micros"], 400);
    crossed["seq"].as_u64().expect("seq")
}

fn metric(s: &str, outcome: &str) -> u64 {
    let needle = format!("tally_webhooks_total{{endpoint=\"billing\",outcome=\"{outcome}\"}} ");
    s.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{needle} in the metrics"))
}

#[tokio::test]
async fn one_crossing_is_one_signed_delivery() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let s = TestServer::start_with(cfg(&url, "")).await;
    let seq = cross_low_balance(&s, "w1").await;
    let id = format!("w1:{seq}");
    let got = receiver.wait_accepted(&id).await;
    let r = &got[0];
    assert_eq!(r.id, id);
    assert!(verifies(SECRET, r), "signed with the current secret: {r:?}");
    assert!(verifies(OLD_SECRET, r), "and with the old one");
    let mut tampered = r.clone();
    tampered.body.push(b' ');
    assert!(
        !verifies(SECRET, &tampered),
        "the verifier is not a yes-machine"
    );
    let now_s = chrono::Utc::now().timestamp();
    let ts: i64 = r.timestamp.parse().expect("seconds");
    assert!(
        (now_s - ts).abs() < 300,
        "a fresh timestamp: {ts} vs {now_s}"
    );
    let body = r.json();
    assert_eq!(body["type"], "balance.low");
    assert_eq!(
        body["data"],
        json!({
            "type": "balance.low",
            "agent_id": "w1",
            "seq": seq,
            "threshold_micros": 500,
            "balance_micros": 400,
            "held_micros": 0,
            "at": body["timestamp"],
            "idempotency_key": "w1-d1",
        })
    );
    // The server's own verifier (`tally webhooks verify`) agrees.
    let secret = tally_server::webhooks::Secret::parse(SECRET).expect("valid");
    assert_eq!(
        tally_server::webhooks::verify(
            &secret,
            &r.id,
            &r.timestamp,
            &r.body,
            &r.signature,
            now_s,
            300
        ),
        Ok(())
    );

    // More debits below the threshold are the same episode; the next crossing (the spend
    // reaching 50 % of the cap on another agent) arrives, and nothing before it.
    assert_eq!(s.debit("w1", "w1-d2", 100).await.status, 201);
    s.agent("w2", "watched", 20_000).await;
    assert_eq!(s.debit("w2", "w2-d1", 5_000).await.status, 201);
    let got = receiver
        .wait_for("the cap crossing", |got| {
            got.iter()
                .any(|r| r.json()["type"] == "cap.threshold_reached")
        })
        .await;
    let ids: Vec<_> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "one per crossing: {ids:?}");
    assert_eq!(ids[0], id);
    let cap = got[1].json();
    assert_eq!(cap["data"]["spent_micros"], 5_000);
    assert_eq!(cap["data"]["cap_micros"], 10_000);
    assert_eq!(cap["data"]["percent"], 50);
    let m = s.get("/metrics").await.text;
    assert_eq!(metric(&m, "delivered"), 2);
    assert_eq!(metric(&m, "retried"), 0);
}

#[tokio::test]
async fn a_grant_about_to_expire_is_one_webhook() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let s = TestServer::start_with(cfg(&url, "")).await;
    s.agent("w1", "watched", 1_000).await;
    // The server's clock is 2026-11-29T13:00:00Z: an hour to go, inside the day's window.
    let body = json!({"amount_micros": 300, "expires_at": "2026-11-29T14:00:00Z",
                      "category": "promotional"});
    let g = s.post("/v1/agents/w1/grants", "g-1", body).await;
    assert_eq!(g.status, 201, "{}", g.text);
    let grant_id = g.body["seq"].as_u64().expect("seq");
    let got = receiver
        .wait_for("the warning", |got| !got.is_empty())
        .await;
    let hook = got[0].json();
    assert!(verifies(SECRET, &got[0]));
    assert_eq!(hook["type"], "grant.expiring");
    assert_eq!(hook["data"]["grant_id"], grant_id);
    assert_eq!(hook["data"]["expires_at"], "2026-11-29T14:00:00.000Z");
    assert_eq!(hook["data"]["remaining_micros"], 300);
    assert_eq!(hook["data"]["within_ms"], 86_400_000);
    assert_eq!(hook["data"]["balance_micros"], 1_300);
    // Once: the marker (a low balance) is the next and last thing the receiver gets.
    assert_eq!(s.debit("w1", "w1-d1", 900).await.status, 201);
    let got = receiver.wait_for("the marker", |got| got.len() >= 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].json()["type"], "balance.low");
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_it_the_third_time_under_the_same_id() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let s = TestServer::start_with(cfg(&url, "")).await;
    receiver.fail_next(&[500, 503]);
    let seq = cross_low_balance(&s, "w1").await;
    let id = format!("w1:{seq}");
    let got = receiver.wait_accepted(&id).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|r| r.id == id && verifies(SECRET, r)));
    assert_eq!(
        got.iter().map(|r| r.accepted).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert!(got.iter().all(|r| r.body == got[0].body), "the same body");
    let m = s.get("/metrics").await.text;
    assert_eq!(metric(&m, "retried"), 2);
    assert_eq!(metric(&m, "delivered"), 1);
    assert_eq!(metric(&m, "failed"), 0);
}

#[tokio::test]
async fn a_restart_between_the_crossing_and_its_delivery_still_delivers_it_once() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let mut s = TestServer::start_with(cfg(&url, "")).await;
    // Refused until the restart.
    receiver.fail_next(&[503; 1_000]);
    let seq = cross_low_balance(&s, "w1").await;
    let id = format!("w1:{seq}");
    receiver
        .wait_for("a first attempt", |got| got.iter().any(|r| r.id == id))
        .await;
    s.shut_down().await;
    receiver.script.lock().expect("lock").clear();
    s.restart(cfg(&url, "")).await;
    receiver.wait_accepted(&id).await;
    // A marker crossing after the restart: once it is in, nothing else is coming.
    let marker = cross_low_balance(&s, "w2").await;
    let got = receiver.wait_accepted(&format!("w2:{marker}")).await;
    let accepted: Vec<_> = got
        .iter()
        .filter(|r| r.accepted)
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(accepted, [id, format!("w2:{marker}")]);
    // And a clean restart after delivery sends nothing again.
    s.restart(cfg(&url, "")).await;
    let last = cross_low_balance(&s, "w3").await;
    let got = receiver.wait_accepted(&format!("w3:{last}")).await;
    assert_eq!(got.iter().filter(|r| r.accepted).count(), 3, "{got:?}");
}

#[tokio::test]
async fn a_receiver_that_never_answers_is_given_up_after_retry_for_ms() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let extra = "retry_for_ms = 200\ntypes = [\"balance.low\"]";
    let s = TestServer::start_with(cfg(&url, extra)).await;
    receiver.fail_next(&[500; 1_000]);
    let seq = cross_low_balance(&s, "w1").await;
    let id = format!("w1:{seq}");
    receiver
        .wait_for("an attempt", |got| got.iter().any(|r| r.id == id))
        .await;
    // Given up (counted) after 200 ms of refusals; then the sender moves on to the next
    // crossing. (The cap crossing of w2 is not a type this endpoint wants, so w3's low
    // balance is the marker.)
    let gave_up = async {
        while metric(&s.get("/metrics").await.text, "failed") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(ARRIVAL_TIMEOUT, gave_up)
        .await
        .expect("given up");
    s.agent("w2", "watched", 20_000).await;
    assert_eq!(s.debit("w2", "w2-d1", 5_000).await.status, 201);
    receiver.script.lock().expect("lock").clear();
    let marker = cross_low_balance(&s, "w3").await;
    let got = receiver.wait_accepted(&format!("w3:{marker}")).await;
    assert!(got.iter().all(|r| r.json()["type"] == "balance.low"));
    assert!(got.iter().filter(|r| r.id == id).all(|r| !r.accepted));
    let m = s.get("/metrics").await.text;
    assert_eq!(metric(&m, "failed"), 1);
    assert_eq!(metric(&m, "delivered"), 1);
}

#[tokio::test]
async fn an_agents_own_thresholds_over_http() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let s = TestServer::start_with(cfg(&url, "")).await;
    s.agent("w1", "watched", 1_000).await;
    let put = |key: &'static str, body: Value| {
        s.call(
            "PUT",
            "/v1/agents/w1/thresholds",
            common::ADMIN,
            Some(key),
            Some(body),
        )
    };
    let r = put("t1", json!({"balance_below_micros": 100})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["thresholds"],
        json!({"balance_below_micros": 100, "cap_spend_percent": null, "grant_expiring_within_ms": null})
    );
    // Replayed under its key; a different body under it is refused.
    let again = put("t1", json!({"balance_below_micros": 100})).await;
    assert_eq!(again.status, 200);
    put("t1", json!({"balance_below_micros": 7}))
        .await
        .assert_problem(422, "idempotency-key-reused");
    put("t2", json!({"cap_spend_percent": 101}))
        .await
        .assert_problem(400, "invalid-request");
    put("t3", json!({"balance_below_micros": -1}))
        .await
        .assert_problem(400, "invalid-request");
    put("t4", json!({"surprise": 1}))
        .await
        .assert_problem(400, "invalid-request");
    // The plan's 500 no longer applies: 1,000 → 400 crosses nothing, → 50 crosses 100.
    assert_eq!(s.debit("w1", "d1", 600).await.status, 201);
    assert_eq!(s.debit("w1", "d2", 350).await.status, 201);
    let got = receiver
        .wait_for("the crossing of 100", |got| !got.is_empty())
        .await;
    assert_eq!(got[0].json()["data"]["threshold_micros"], 100);
    // Reader tokens may not set them; DELETE goes back to the plan's.
    let r = s
        .call(
            "PUT",
            "/v1/agents/w1/thresholds",
            common::READER,
            Some("t5"),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .call(
            "DELETE",
            "/v1/agents/w1/thresholds",
            common::ADMIN,
            Some("t6"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["thresholds"], Value::Null);
    let plans = s.get("/v1/plans").await;
    let watched = plans.body["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .find(|p| p["name"] == "watched")
        .expect("watched")
        .clone();
    assert_eq!(
        watched["thresholds"],
        json!({"balance_below_micros": 500, "cap_spend_percent": 50, "grant_expiring_within_ms": 86_400_000})
    );
}

#[test]
fn webhook_config_is_checked() {
    let base = |extra: &str| {
        tally_server::Config::from_toml(
            &format!("{}\n[[webhooks]]\n{extra}", common::PLANS),
            "test",
        )
    };
    let ok = format!("name = \"b\"\nurl = \"http://127.0.0.1:1/h\"\nsecrets = [\"{SECRET}\"]");
    assert!(base(&ok).is_ok());
    for (bad, why) in [
        ("name = \"b\"\nurl = \"http://127.0.0.1:1/h\"", "secrets"),
        (
            "name = \"b c\"\nurl = \"http://127.0.0.1:1/h\"\nsecrets = [\"whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=\"]",
            "name",
        ),
        (
            "name = \"b\"\nurl = \"ftp://127.0.0.1:1/h\"\nsecrets = [\"whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=\"]",
            "url",
        ),
        (
            "name = \"b\"\nurl = \"http://127.0.0.1:1/h\"\nsecrets = [\"hunter2\"]",
            "whsec_",
        ),
        (
            "name = \"b\"\nurl = \"http://127.0.0.1:1/h\"\nsecrets = [\"whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=\"]\ntypes = [\"balance.high\"]",
            "types",
        ),
        (
            "name = \"b\"\nurl = \"http://127.0.0.1:1/h\"\nsecrets = [\"whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=\"]\ntimeout_ms = 0",
            "timeout_ms",
        ),
    ] {
        let e = base(bad).expect_err(bad).to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let e = tally_server::Config::from_toml(
        &format!(
            "{}\n[[plans]]\nname = \"x\"\n[plans.thresholds]\ncap_spend_percent = 50\n",
            common::PLANS
        ),
        "test",
    )
    .expect_err("a cap share without a cap");
    assert!(e.to_string().contains("cap_spend_percent"), "{e}");
}
