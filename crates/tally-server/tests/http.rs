//! One test per status code of the API, against the real router and a real temporary
//! store on port 0, asserting status, headers and body fields.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn created_201_agent_and_idempotent_replay() {
    let s = TestServer::start().await;
    let r = s
        .post("/v1/agents", "k-create", json!({"id": "agent-1"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.content_type(), "application/json");
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_eq!(r.body["id"], "agent-1");
    assert_eq!(r.body["plan"], "default");
    assert_eq!(r.body["status"], "active");
    assert_eq!(r.body["balance_micros"], 0);
    assert_eq!(r.body["period"], "2026-11");
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.body["created_at"], "2026-11-29T13:00:00.000Z");

    let again = s
        .post("/v1/agents", "k-create", json!({"id": "agent-1"}))
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, r.body);
    s.stop().await;
}

#[tokio::test]
async fn created_201_credit_and_debit_with_exact_replay() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 0).await;
    let c = s.credit("a1", "c1", 5_000_000).await;
    assert_eq!(c.status, 201, "{}", c.text);
    assert_eq!(c.body["kind"], "credit");
    assert_eq!(c.body["seq"], 2);
    assert_eq!(c.body["balance_micros"], 5_000_000);

    let d = s
        .debit_with(
            "a1",
            "d1",
            json!({"amount_micros": 1_500, "task_type": "llm", "metadata": {"model": "m"}}),
        )
        .await;
    assert_eq!(d.status, 201, "{}", d.text);
    assert_eq!(d.content_type(), "application/json");
    assert_eq!(
        d.body,
        json!({
            "agent_id": "a1", "seq": 3, "kind": "debit", "amount_micros": 1_500,
            "balance_micros": 4_998_500, "held_micros": 0, "at": "2026-11-29T13:00:00.000Z",
            "hold_id": null, "expires_at": null,
        })
    );
    // The same key and body later: the stored answer, byte for byte, and nothing applied.
    s.clock.advance(5_000);
    let replay = s
        .debit_with(
            "a1",
            "d1",
            json!({"amount_micros": 1_500, "task_type": "llm", "metadata": {"model": "m"}}),
        )
        .await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.text, d.text);
    let a = s.get("/v1/agents/a1").await;
    assert_eq!(a.body["balance_micros"], 4_998_500);
    assert_eq!(a.body["debited_total_micros"], 1_500);
    s.stop().await;
}

#[tokio::test]
async fn ok_200_reads_check_capture_void() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 10_000).await;
    s.agent("a2", "default", 0).await;

    let list = s.get("/v1/agents?limit=1").await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.body["agents"].as_array().map(Vec::len), Some(1));
    assert_eq!(list.body["next_after"], "a1");
    let rest = s.get("/v1/agents?after=a1&limit=10").await;
    assert_eq!(rest.body["agents"][0]["id"], "a2");
    assert_eq!(rest.body["next_after"], Value::Null);

    let check = s.check("a1", 100).await;
    assert_eq!(check.status, 200, "{}", check.text);
    assert_eq!(
        check.body,
        json!({"allowed": true, "amount_micros": 100, "balance_micros": 10_000})
    );

    let hold = s.hold("a1", "h1", 3_000, 60_000).await;
    assert_eq!(hold.status, 201, "{}", hold.text);
    assert_eq!(hold.body["hold_id"], "a1~3");
    assert_eq!(hold.body["expires_at"], "2026-11-29T13:01:00.000Z");
    assert_eq!(hold.body["held_micros"], 3_000);
    assert_eq!(hold.body["balance_micros"], 7_000);

    let cap = s.capture("a1~3", "cap1", 1_000).await;
    assert_eq!(cap.status, 200, "{}", cap.text);
    assert_eq!(cap.body["kind"], "capture");
    assert_eq!(cap.body["amount_micros"], 1_000);
    assert_eq!(cap.body["balance_micros"], 9_000);
    assert_eq!(cap.body["held_micros"], 0);

    let h2 = s.hold("a1", "h2", 500, 1_000).await;
    let void = s.void(h2.hold_id(), "v1").await;
    assert_eq!(void.status, 200, "{}", void.text);
    assert_eq!(void.body["kind"], "void");
    assert_eq!(void.body["balance_micros"], 9_000);

    let refund = s.refund("a1", "r1", 4, 400).await;
    assert_eq!(refund.status, 201, "{}", refund.text);
    assert_eq!(refund.body["balance_micros"], 9_400);

    let journal = s.get("/v1/agents/a1/journal?after=0&limit=100").await;
    assert_eq!(journal.status, 200, "{}", journal.text);
    let kinds: Vec<&str> = journal.body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "agent_created",
            "credit",
            "hold",
            "capture",
            "hold",
            "void",
            "refund"
        ]
    );
    assert_eq!(journal.body["entries"][3]["hold_seq"], 3);
    assert_eq!(journal.body["entries"][3]["period"], "2026-11");
    assert_eq!(journal.body["entries"][1]["idempotency_key"], "credit-a1");
    assert_eq!(journal.body["next_after"], Value::Null);
    let page = s.get("/v1/agents/a1/journal?after=2&limit=2").await;
    assert_eq!(page.body["entries"][0]["seq"], 3);
    assert_eq!(page.body["next_after"], 4);

    let usage = s.get("/v1/agents/a1/usage?period=2026-11").await;
    assert_eq!(usage.status, 200, "{}", usage.text);
    assert_eq!(usage.body["spent_micros"], 1_000);
    assert_eq!(usage.body["refunded_micros"], 400);
    assert_eq!(usage.body["start_at"], "2026-11-01T00:00:00.000Z");
    assert_eq!(usage.body["end_at"], "2026-12-01T00:00:00.000Z");
    let current = s.get("/v1/agents/a1/usage").await;
    assert_eq!(current.body["period"], "2026-11");

    let plans = s.get("/v1/plans").await;
    assert_eq!(plans.status, 200);
    let limited = plans.body["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .find(|p| p["name"] == "limited")
        .cloned()
        .expect("limited");
    assert_eq!(limited["rate_limit_policy"], "\"default\";q=2;w=60");

    for path in ["/healthz", "/readyz"] {
        let r = s.send(s.http.get(s.url(path))).await;
        assert_eq!(r.status, 200, "{path}");
    }
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("tally_decisions_total{outcome=\"approved\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tally_credited_micros_total 10000"));
    assert!(metrics.contains("tally_debited_micros_total 1000"));
    assert!(metrics.contains("route=\"/v1/agents/{id}/holds\""));
    assert!(
        metrics.contains("tally_commit_seconds"),
        "engine metrics share the registry"
    );
    assert!(!metrics.contains("a1"), "no per-agent labels");
    let doc = s.send(s.http.get(s.url("/openapi.json"))).await;
    assert_eq!(doc.body["openapi"], "3.0.3");
    s.stop().await;
}

#[tokio::test]
async fn bad_request_400() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let missing = s.debit_as(SERVICE, "a1", None, 1).await;
    missing.assert_problem(400, "idempotency-key-missing");
    let bad_key = s.debit("a1", "has space", 1).await;
    bad_key.assert_problem(400, "invalid-idempotency-key");
    let long_key = "k".repeat(256);
    let long = s.debit("a1", &long_key, 1).await;
    long.assert_problem(400, "invalid-idempotency-key");
    let max_key = "k".repeat(255);
    let ok = s.debit("a1", &max_key, 1).await;
    assert_eq!(ok.status, 201, "a 255-byte key is fine: {}", ok.text);
    let wrong_type = s
        .debit_with("a1", "k2", json!({"amount_micros": "1"}))
        .await;
    wrong_type.assert_problem(400, "invalid-request");
    let page = s.get("/v1/agents?limit=1001").await;
    page.assert_problem(400, "invalid-request");
    assert_eq!(page.body["page_limit_max"], 1_000);
    assert_eq!(s.get("/v1/agents?limit=1000").await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn unauthorized_401() {
    let s = TestServer::start().await;
    // No credentials: a plain challenge, no error code (RFC 6750 §3.1).
    let none = s.send(s.http.get(s.url("/v1/agents"))).await;
    none.assert_problem(401, "unauthorized");
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"tally\"")
    );
    // A bearer token that is not one of ours: error="invalid_token" (RFC 6750 §3).
    let bad = s.call("GET", "/v1/agents", "wrong", None, None).await;
    bad.assert_problem(401, "unauthorized");
    assert_eq!(
        bad.header("www-authenticate"),
        Some("Bearer realm=\"tally\", error=\"invalid_token\"")
    );
    // Auth comes before the body is even read.
    let r = s
        .send(s.http.post(s.url("/v1/agents/a1/debits")).body("not json"))
        .await;
    r.assert_problem(401, "unauthorized");
    s.stop().await;
}

#[tokio::test]
async fn forbidden_403_wrong_role_and_suspended() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let reader = s.debit_as(READER, "a1", Some("k"), 1).await;
    reader.assert_problem(403, "forbidden");
    let service_credit = s
        .call(
            "POST",
            "/v1/agents/a1/credits",
            SERVICE,
            Some("k"),
            Some(json!({"amount_micros": 1})),
        )
        .await;
    service_credit.assert_problem(403, "forbidden");

    let p = s
        .patch_agent("a1", "suspend", json!({"status": "suspended"}))
        .await;
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.body["status"], "suspended");
    let d = s.debit("a1", "k", 1).await;
    d.assert_problem(403, "agent-suspended");
    assert_eq!(d.header("retry-after"), None);
    s.stop().await;
}

#[tokio::test]
async fn payment_required_402_not_retryable() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let d = s.debit("a1", "big", 5_000).await;
    d.assert_problem(402, "insufficient-funds");
    assert_eq!(d.header("retry-after"), None);
    assert_eq!(d.header("payment-required"), None, "no x402 configured");
    assert_eq!(d.body["required_micros"], 5_000);
    assert_eq!(d.body["available_micros"], 1_000);
    assert_eq!(d.body["balance_micros"], 1_000);
    assert_eq!(d.body["held_micros"], 0);
    assert_eq!(d.body["retryable"], false);
    assert_eq!(d.body["top_up"], "/v1/agents/a1/credits");
    assert!(d.body.get("accepts").is_none());
    assert!(d.body.get("retry_after_ms").is_none());
    // Denials are not stored: the same key succeeds after a top-up.
    s.credit("a1", "topup", 10_000).await;
    let again = s.debit("a1", "big", 5_000).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), None);
    s.stop().await;
}

#[tokio::test]
async fn payment_required_402_retryable_when_a_hold_expires_and_x402() {
    let s = TestServer::start_with(config(X402)).await;
    s.agent("a1", "default", 1_000).await;
    let h = s.hold("a1", "h", 800, 4_500).await;
    assert_eq!(h.status, 201, "{}", h.text);
    let d = s.debit("a1", "d", 500).await;
    d.assert_problem(402, "insufficient-funds");
    assert_eq!(d.body["retryable"], true);
    assert_eq!(d.body["retry_after_ms"], 4_500);
    assert_eq!(d.header("retry-after"), Some("5"));
    assert_eq!(d.body["available_micros"], 200);
    assert_eq!(d.body["held_micros"], 800);
    let accepts = &d.body["accepts"][0];
    assert_eq!(accepts["amount"], "300");
    assert_eq!(accepts["scheme"], "exact");
    assert_eq!(
        accepts["payTo"],
        "0x000000000000000000000000000000000000dEaD"
    );
    assert_eq!(accepts["maxTimeoutSeconds"], 60);
    assert_eq!(accepts["extra"]["name"], "USDC");
    let header = d.header("payment-required").expect("PAYMENT-REQUIRED");
    let decoded: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(header)
            .expect("base64"),
    )
    .expect("json");
    assert_eq!(decoded["x402Version"], 2);
    assert_eq!(decoded["accepts"][0], *accepts);
    assert!(decoded["resource"]["url"]
        .as_str()
        .is_some_and(|u| u.ends_with("/v1/agents/a1/debits")));
    assert!(decoded["error"].is_string());
    s.stop().await;
}

#[tokio::test]
async fn not_found_404() {
    let s = TestServer::start().await;
    s.get("/v1/agents/nobody")
        .await
        .assert_problem(404, "not-found");
    s.get("/v1/agents/nobody/journal")
        .await
        .assert_problem(404, "not-found");
    s.get("/v1/agents/nobody/usage")
        .await
        .assert_problem(404, "not-found");
    s.get("/v1/nothing-here")
        .await
        .assert_problem(404, "not-found");
    let d = s.debit("nobody", "k", 1).await;
    d.assert_problem(404, "not-found");
    s.agent("a1", "default", 100).await;
    let h = s.capture("a1~99", "k", 1).await;
    h.assert_problem(404, "not-found");
    let garbage = s.void("not-a-hold", "k").await;
    garbage.assert_problem(404, "not-found");
    let m = s.call("DELETE", "/v1/agents/a1", ADMIN, None, None).await;
    m.assert_problem(405, "method-not-allowed");
    s.stop().await;
}

#[tokio::test]
async fn conflict_409_agent_exists_and_hold_expired() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let dup = s
        .post("/v1/agents", "another-key", json!({"id": "a1"}))
        .await;
    dup.assert_problem(409, "agent-exists");
    let h = s.hold("a1", "h", 100, 1_000).await;
    assert_eq!(h.status, 201, "{}", h.text);
    s.clock.advance(1_000);
    let c = s.capture(h.hold_id(), "c", 50).await;
    c.assert_problem(409, "hold-expired");
    assert_eq!(c.body["expires_at"], "2026-11-29T13:00:01.000Z");
    s.stop().await;
}

#[tokio::test]
async fn payload_too_large_413() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let big = format!(
        "{{\"amount_micros\":1,\"metadata\":{{\"k\":\"{}\"}}}}",
        "x".repeat(10 * 1024 * 1024)
    );
    let r = s
        .send(
            s.http
                .post(s.url("/v1/agents/a1/debits"))
                .bearer_auth(SERVICE)
                .header("Idempotency-Key", "k")
                .header("content-type", "application/json")
                .body(big),
        )
        .await;
    r.assert_problem(413, "body-too-large");
    assert_eq!(r.body["body_bytes_max"], 65_536);
    s.stop().await;
}

#[tokio::test]
async fn unsupported_media_type_415() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let r = s
        .send(
            s.http
                .post(s.url("/v1/agents/a1/debits"))
                .bearer_auth(SERVICE)
                .header("Idempotency-Key", "k")
                .header("content-type", "text/plain")
                .body("{\"amount_micros\":1}"),
        )
        .await;
    r.assert_problem(415, "unsupported-media-type");
    let none = s
        .send(
            s.http
                .post(s.url("/v1/agents/a1/debits"))
                .bearer_auth(SERVICE)
                .header("Idempotency-Key", "k")
                .body("{\"amount_micros\":1}"),
        )
        .await;
    none.assert_problem(415, "unsupported-media-type");
    s.stop().await;
}

#[tokio::test]
async fn unprocessable_422() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let d = s.debit("a1", "k1", 10).await;
    assert_eq!(d.status, 201);
    let reused = s.debit("a1", "k1", 11).await;
    reused.assert_problem(422, "idempotency-key-reused");
    let zero = s.debit("a1", "k0", 0).await;
    zero.assert_problem(422, "invalid-amount");
    let overflow = s.credit("a1", "k-of", u64::MAX).await;
    overflow.assert_problem(422, "amount-overflow");
    let refund = s.refund("a1", "k-r", 3, 11).await;
    refund.assert_problem(422, "refund-exceeds-debit");
    assert_eq!(refund.body["refundable_micros"], 10);
    let unknown = s.refund("a1", "k-u", 2, 1).await;
    unknown.assert_problem(422, "unknown-debit");
    let ttl = s.hold("a1", "k-t", 1, 0).await;
    ttl.assert_problem(422, "invalid-ttl");
    let h = s.hold("a1", "k-h", 5, 1_000).await;
    let over = s.capture(h.hold_id(), "k-c", 6).await;
    over.assert_problem(422, "capture-exceeds-hold");
    let plan = s
        .post("/v1/agents", "k-p", json!({"id": "a2", "plan": "gold"}))
        .await;
    plan.assert_problem(422, "unknown-plan");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("tally_decisions_total{outcome=\"key_reused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_decisions_total{outcome=\"rejected\"} 7"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn too_many_requests_429_rate_limit_with_headers() {
    let s = TestServer::start().await;
    s.agent("a1", "limited", 1_000_000).await;
    let debit = |key: &'static str| {
        s.debit_with("a1", key, json!({"amount_micros": 1, "task_type": "llm"}))
    };
    let first = debit("k1").await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"default\";q=2;w=60")
    );
    assert_eq!(first.header("ratelimit"), Some("\"default\";r=1;t=30"));
    assert_eq!(debit("k2").await.status, 201);
    let limited = debit("k3").await;
    limited.assert_problem(429, "rate-limited");
    assert_eq!(limited.body["retry_after_ms"], 30_000);
    assert_eq!(limited.body["bucket"], "default");
    assert_eq!(limited.header("retry-after"), Some("30"));
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"default\";q=2;w=60")
    );
    assert_eq!(limited.header("ratelimit"), Some("\"default\";r=0;t=30"));
    // 1 ms before the cell frees: still limited, and Retry-After rounds up to 1, never 0.
    s.clock.advance(29_999);
    let almost = debit("k3").await;
    assert_eq!(almost.body["retry_after_ms"], 1);
    assert_eq!(almost.header("retry-after"), Some("1"));
    s.clock.advance(1);
    let after = debit("k3").await;
    assert_eq!(
        after.status, 201,
        "the same key succeeds once the wait is over: {}",
        after.text
    );
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("tally_decisions_total{outcome=\"rate_limited\"} 2"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn too_many_requests_429_monthly_cap() {
    let s = TestServer::start().await;
    s.agent("a1", "capped", 1_000_000).await;
    let d = s.debit("a1", "k1", 700).await;
    assert_eq!(d.status, 201, "{}", d.text);
    // Past the soft threshold (800) low priority pauses; normal goes on to the cap.
    let low = s
        .debit_with("a1", "k2", json!({"amount_micros": 200, "priority": "low"}))
        .await;
    low.assert_problem(429, "monthly-cap-reached");
    assert_eq!(low.body["soft"], true);
    assert_eq!(low.body["limit_micros"], 800);
    let normal = s.debit("a1", "k2", 200).await;
    assert_eq!(normal.status, 201, "{}", normal.text);
    let cap = s.debit("a1", "k3", 101).await;
    cap.assert_problem(429, "monthly-cap-reached");
    assert_eq!(cap.body["cap_micros"], 1_000);
    assert_eq!(cap.body["limit_micros"], 1_000);
    assert_eq!(cap.body["spent_micros"], 900);
    assert_eq!(cap.body["held_micros"], 0);
    assert_eq!(cap.body["soft"], false);
    assert_eq!(cap.body["resets_at"], "2026-12-01T00:00:00.000Z");
    // From 2026-11-29T13:00Z to 2026-12-01T00:00Z: 35 h.
    assert_eq!(cap.header("retry-after"), Some("126000"));
    assert_eq!(cap.header("ratelimit"), None);
    s.clock.set(T0_MS + 126_000_000);
    let next_month = s.debit("a1", "k3", 101).await;
    assert_eq!(next_month.status, 201, "{}", next_month.text);
    s.stop().await;
}

#[tokio::test]
async fn unavailable_503_until_the_engine_is_open() {
    // The router without an engine: what a client sees while recovery runs.
    let s = TestServer::start_without_engine(config("")).await;
    let ready = s.send(s.http.get(s.url("/readyz"))).await;
    ready.assert_problem(503, "not-ready");
    assert_eq!(ready.header("retry-after"), Some("1"));
    let health = s.send(s.http.get(s.url("/healthz"))).await;
    assert_eq!(health.status, 200);
    let debit = s.debit("a1", "k", 1).await;
    assert_eq!(debit.status, 503, "{}", debit.text);
    assert_eq!(debit.content_type(), "application/problem+json");
}

#[tokio::test]
async fn concurrent_duplicates_apply_once() {
    let s = std::sync::Arc::new(TestServer::start().await);
    s.agent("a1", "default", 1_000_000).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { s.debit("a1", "same", 1_000).await },
        ));
    }
    let mut bodies = Vec::new();
    let mut replayed = 0;
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 201, "{}", r.text);
        replayed += usize::from(r.header("idempotent-replayed") == Some("true"));
        bodies.push(r.text);
    }
    assert_eq!(replayed, 15);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.balance("a1").await, 999_000);
}

#[tokio::test]
async fn rate_limit_policy_lists_every_bucket_of_the_plan() {
    let s = TestServer::start().await;
    s.agent("a1", "two", 1_000_000).await;
    let both = "\"second\";q=5;w=1, \"minute\";q=6;w=60";
    for i in 0..5 {
        let r = s.debit("a1", &format!("k{i}"), 1).await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.header("ratelimit-policy"), Some(both));
    }
    let limited = s.debit("a1", "k5", 1).await;
    limited.assert_problem(429, "rate-limited");
    assert_eq!(limited.body["bucket"], "second");
    assert_eq!(limited.body["retry_after_ms"], 200);
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(limited.header("ratelimit-policy"), Some(both));
    assert_eq!(limited.header("ratelimit"), Some("\"second\";r=0;t=1"));
    s.clock.advance(200);
    let sixth = s.debit("a1", "k5", 1).await;
    assert_eq!(sixth.status, 201, "{}", sixth.text);
    s.clock.advance(200);
    let minute = s.debit("a1", "k6", 1).await;
    minute.assert_problem(429, "rate-limited");
    assert_eq!(minute.body["bucket"], "minute");
    assert_eq!(minute.body["retry_after_ms"], 9_600);
    assert_eq!(minute.header("retry-after"), Some("10"));
    s.stop().await;
}

#[tokio::test]
async fn unavailable_503_overloaded_when_a_shard_queue_is_full() {
    let mut cfg = config("");
    cfg.engine.shards = 1;
    cfg.engine.shard_queue_len_max = 1;
    cfg.engine.batch_size_max = 1;
    let s = std::sync::Arc::new(TestServer::start_with(cfg).await);
    s.agent("a1", "default", 1_000_000_000).await;
    let mut overloaded = None;
    // The test's own count: the keys answered 201.
    let mut created_keys = std::collections::BTreeSet::new();
    for round in 0..10 {
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.debit("a1", &format!("r{round}-{i}"), 1).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.expect("task");
            assert!(
                r.status == 201 || r.status == 503,
                "{} {}",
                r.status,
                r.text
            );
            if r.status == 201 {
                created_keys.insert(format!("r{round}-{i}"));
            } else {
                overloaded = Some(r);
            }
        }
        if overloaded.is_some() {
            break;
        }
    }
    let r = overloaded.expect("a queue of one overflows under 64 concurrent debits");
    r.assert_problem(503, "overloaded");
    assert!(r
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)));
    assert!(r.body["retry_after_ms"].is_u64());
    // Whatever was answered 201 was debited; nothing else was (each debit is 1 micro).
    assert_eq!(
        s.agent_state("a1").await["debited_total_micros"],
        created_keys.len() as u64,
        "debited total = the test's count of 201s"
    );
    let debited_keys: std::collections::BTreeSet<String> = s
        .journal("a1")
        .await
        .iter()
        .filter(|e| e["kind"] == "debit")
        .map(|e| e["idempotency_key"].as_str().expect("keyed").to_owned())
        .collect();
    assert_eq!(
        debited_keys, created_keys,
        "the journal's debits are the 201s"
    );
}

#[tokio::test]
async fn payment_required_402_omits_x402_extra_when_none_is_configured() {
    let no_extra = X402.replace("extra = { name = \"USDC\", version = \"2\" }\n", "");
    assert_ne!(no_extra, X402);
    let s = TestServer::start_with(config(&no_extra)).await;
    s.agent("a1", "default", 100).await;
    let d = s.debit("a1", "d", 500).await;
    d.assert_problem(402, "insufficient-funds");
    // x402 v2: `extra` is an optional object, absent when unset (never null).
    let accepts = &d.body["accepts"][0];
    assert_eq!(accepts["amount"], "400");
    assert!(accepts.get("extra").is_none(), "{accepts}");
    let header = d.header("payment-required").expect("PAYMENT-REQUIRED");
    let decoded: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(header)
            .expect("base64"),
    )
    .expect("json");
    assert!(decoded["accepts"][0].get("extra").is_none(), "{decoded}");
    assert_eq!(decoded["accepts"][0], *accepts);
    s.stop().await;
}

#[tokio::test]
async fn ratelimit_t_is_the_wait_for_the_next_request_on_a_201_and_on_the_429_after_it() {
    let s = TestServer::start().await;
    // `limited`: 2 per 60 s, so one more request every 30 s.
    s.agent("a1", "limited", 1_000_000).await;
    let first = s.debit("a1", "k1", 1).await;
    assert_eq!(first.header("ratelimit"), Some("\"default\";r=1;t=30"));
    let emptied = s.debit("a1", "k2", 1).await;
    assert_eq!(emptied.status, 201, "{}", emptied.text);
    let limited = s.debit("a1", "k3", 1).await;
    limited.assert_problem(429, "rate-limited");
    // The same bucket at the same instant: the same answer, and t is when the next
    // request will be admitted (not when the bucket is full again, 60 s away).
    assert_eq!(limited.header("ratelimit"), Some("\"default\";r=0;t=30"));
    assert_eq!(emptied.header("ratelimit"), limited.header("ratelimit"));
    s.stop().await;
}

#[tokio::test]
async fn grants_201_draw_first_expire_at_their_time_and_show_on_the_agent() {
    let s = TestServer::start().await;
    s.agent("g1", "default", 1_000).await; // a plain credit: grant 2
    let body = json!({
        "amount_micros": 500, "expires_at": "2026-11-29T13:00:10Z", "priority": 10,
        "category": "promotional", "metadata": {"campaign": "launch"},
    });
    let g = s.post("/v1/agents/g1/grants", "g-1", body.clone()).await;
    assert_eq!(g.status, 201, "{}", g.text);
    assert_eq!(
        (g.body["kind"].clone(), g.body["seq"].clone()),
        (json!("grant"), json!(3))
    );
    assert_eq!(g.body["balance_micros"], 1_500);
    let replay = s.post("/v1/agents/g1/grants", "g-1", body).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.text, g.text);

    // Shown in draw order: the promotional grant (priority 10) first.
    let a = s.agent_state("g1").await;
    assert_eq!(
        a["grants"],
        json!([
            {"grant_id": 3, "amount_micros": 500, "remaining_micros": 500,
             "expires_at": "2026-11-29T13:00:10.000Z", "priority": 10, "category": "promotional"},
            {"grant_id": 2, "amount_micros": 1_000, "remaining_micros": 1_000,
             "expires_at": null, "priority": 100, "category": "paid"},
        ])
    );
    assert_eq!(s.debit("g1", "d-1", 200).await.status, 201);
    assert_eq!(
        s.agent_state("g1").await["grants"][0]["remaining_micros"],
        300
    );

    // At exactly expires_at the rest leaves the balance, journaled before the next spend.
    s.clock.advance(10_000);
    let d = s.debit("g1", "d-2", 100).await;
    assert_eq!(d.status, 201, "{}", d.text);
    assert_eq!(d.body["balance_micros"], 900);
    let journal = s.journal("g1").await;
    let expired = &journal[journal.len() - 2];
    assert_eq!(expired["kind"], "grant_expired");
    assert_eq!(
        (
            expired["grant_id"].clone(),
            expired["amount_micros"].clone()
        ),
        (json!(3), json!(300))
    );
    assert_eq!(journal[journal.len() - 1]["seq"], d.body["seq"]);
    let a = s.agent_state("g1").await;
    assert_eq!(a["expired_total_micros"], 300);
    assert_eq!(a["debited_paid_total_micros"], 100);
    let u = s.get("/v1/agents/g1/usage?period=2026-11").await;
    assert_eq!(
        u.body["credited_micros"], 1_500,
        "grants count as credits: {}",
        u.text
    );
    // The first debit drew from the promotional grant, the second (after it expired)
    // from the paid one; each journal entry says its promotional part.
    assert_eq!(
        u.body["by_category"],
        json!({
            "paid": {"spent_micros": 100, "refunded_micros": 0, "credited_micros": 1_000},
            "promotional": {"spent_micros": 200, "refunded_micros": 0, "credited_micros": 500},
        })
    );
    assert_eq!(u.body["expired_micros"], 300);
    let promotional: Vec<_> = journal
        .iter()
        .filter(|e| e["kind"] == "debit")
        .map(|e| e["promotional_micros"].clone())
        .collect();
    assert_eq!(promotional, [json!(200), json!(0)]);
    assert_eq!(journal[0]["promotional_micros"], json!(null));
    assert_eq!(a["grants"].as_array().map(Vec::len), Some(1));

    // Bad input is a 4xx problem, never a 500; the reader role may not issue grants.
    let past = json!({"amount_micros": 1, "expires_at": "2026-11-29T13:00:10Z"});
    s.post("/v1/agents/g1/grants", "g-2", past)
        .await
        .assert_problem(422, "grant-expires-in-past");
    let garbage = json!({"amount_micros": 1, "expires_at": "tomorrow"});
    s.post("/v1/agents/g1/grants", "g-3", garbage)
        .await
        .assert_problem(400, "invalid-request");
    for bad in [
        json!({"amount_micros": 1, "category": "gift"}),
        json!({"amount_micros": 1, "priority": -1}),
        json!({"amount_micros": 1, "priority": 4_294_967_296u64}),
        json!({"amount_micros": 1, "expires_at": "+999999-01-01T00:00:00Z"}),
        json!({"amount_micros": 0}),
        json!({"amount_micros": 1, "extra": true}),
    ] {
        let r = s.post("/v1/agents/g1/grants", "g-4", bad.clone()).await;
        assert!(
            (400..500).contains(&r.status),
            "{bad}: {} {}",
            r.status,
            r.text
        );
    }
    let r = s
        .call(
            "POST",
            "/v1/agents/g1/grants",
            common::READER,
            Some("g-5"),
            Some(json!({"amount_micros": 1})),
        )
        .await;
    assert_eq!(r.status, 403);
    s.stop().await;
}
