//! Selling an existing API over HTTP on port 0: agent API keys (issued once, listed,
//! revoked, kept across a restart, never a tally token), forward-auth (`/v1/authorize`:
//! the route's computed price, 200 with the `X-Tally-*` headers, the debit route's own
//! 402/429, charged once per idempotency key, nginx mode) and refunds by receipt.

mod common;

use common::*;
use serde_json::json;

const ROUTES: &str = r#"
[forward_auth]
envoy_path_prefix = "/ext-authz"

[[routes]]
name = "search"
methods = ["GET"]
path = "/v1/search"
upstream = "http://127.0.0.1:9"
cost_micros = 1001
margin_pct = 20
task_type = "search"

[[routes]]
name = "item"
path = "/items/{id}"
upstream = "http://127.0.0.1:9"
price_micros = 500

[[routes]]
name = "files"
path = "/files/*"
upstream = "http://127.0.0.1:9"
cost_micros = 10
margin_pct = 50
min_micros = 100

[[routes]]
name = "llm"
path = "/llm"
upstream = "http://127.0.0.1:9"
variable = { max_micros = 5000 }
"#;

async fn server(extra: &str) -> TestServer {
    TestServer::start_with(config(&format!("{ROUTES}\n{extra}"))).await
}

#[tokio::test]
async fn agent_keys_are_shown_once_listed_revoked_and_kept_across_a_restart() {
    let mut s = server("").await;
    s.agent("a1", "default", 10_000).await;
    let (key, prefix) = s.issue_key("a1", "k-ci").await;
    assert!(key.starts_with(&format!("tk_{prefix}_")), "{key}");
    assert_eq!(prefix.len(), 8);

    // A retry with the same Idempotency-Key replays: same prefix, the key not shown again.
    let again = s
        .call(
            "POST",
            "/v1/agents/a1/keys",
            SERVICE,
            Some("k-ci"),
            Some(json!({"name": "k-ci"})),
        )
        .await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["prefix"], prefix.as_str());
    assert!(again.body["key"].is_null());
    let (_, second) = s.issue_key("a1", "k-two").await;

    let list = s.get("/v1/agents/a1/keys").await;
    assert_eq!(list.status, 200, "{}", list.text);
    let keys = list.body["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|k| k.get("key").is_none()),
        "never the key again"
    );
    assert!(keys
        .iter()
        .all(|k| k["created_at"].is_string() && k["last_used_at"].is_null()));

    // Used once: last_used_at appears.
    let r = s.authorize(&key, "GET", "/items/1", Some("u1"), "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = s.get("/v1/agents/a1/keys").await;
    let used = list.body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["prefix"] == prefix.as_str())
        .expect("listed");
    assert!(used["last_used_at"].is_string(), "{}", list.text);

    // A restart keeps both keys (they are in the ledger) and the index is rebuilt.
    s.restart(config(ROUTES)).await;
    let r = s.authorize(&key, "GET", "/items/1", Some("u2"), "").await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Revoke: 204, a replay 204 again, a new request 404; the key stops working at once.
    let r = s.revoke_key("a1", &second, "rv-1").await;
    assert_eq!(r.status, 204, "{}", r.text);
    let again = s.revoke_key("a1", &second, "rv-1").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    s.revoke_key("a1", &second, "rv-2")
        .await
        .assert_problem(404, "not-found");
    s.call(
        "DELETE",
        &format!("/v1/agents/a1/keys/{prefix}"),
        SERVICE,
        None,
        None,
    )
    .await
    .assert_problem(400, "idempotency-key-missing");
    let r = s.revoke_key("a1", &prefix, "rv-3").await;
    assert_eq!(r.status, 204, "{}", r.text);
    s.authorize(&key, "GET", "/items/1", Some("u3"), "")
        .await
        .assert_problem(401, "unauthorized");
    s.restart(config(ROUTES)).await;
    s.authorize(&key, "GET", "/items/1", Some("u4"), "")
        .await
        .assert_problem(401, "unauthorized");
    assert_eq!(s.get("/v1/agents/a1/keys").await.body["keys"], json!([]));

    // The journal says who did what.
    let kinds: Vec<_> = s
        .journal("a1")
        .await
        .iter()
        .filter(|e| e["api_key_prefix"].is_string())
        .map(|e| e["kind"].as_str().expect("kind").to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "api_key_issued",
            "api_key_issued",
            "api_key_revoked",
            "api_key_revoked"
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn an_agent_key_is_refused_by_tallys_own_routes_and_keys_are_bounded() {
    let s = server("").await;
    s.agent("a1", "default", 0).await;
    let (key, _) = s.issue_key("a1", "k1").await;
    for (method, path) in [
        ("GET", "/v1/agents"),
        ("GET", "/v1/agents/a1"),
        ("POST", "/v1/agents/a1/debits"),
    ] {
        let r = s
            .call(
                method,
                path,
                &key,
                Some("x"),
                Some(json!({"amount_micros": 1})),
            )
            .await;
        r.assert_problem(401, "unauthorized");
    }
    // A reader may list keys but not issue them.
    s.call("POST", "/v1/agents/a1/keys", READER, Some("k2"), None)
        .await
        .assert_problem(403, "forbidden");
    for i in 1..tally_core::API_KEYS_PER_AGENT_MAX {
        s.issue_key("a1", &format!("more-{i}")).await;
    }
    let r = s
        .call(
            "POST",
            "/v1/agents/a1/keys",
            SERVICE,
            Some("one-too-many"),
            None,
        )
        .await;
    r.assert_problem(422, "too-many-api-keys");
    assert_eq!(r.body["api_keys_max"], tally_core::API_KEYS_PER_AGENT_MAX);
    s.call("POST", "/v1/agents/nobody/keys", SERVICE, Some("k"), None)
        .await
        .assert_problem(404, "not-found");
    s.stop().await;
}

#[tokio::test]
async fn forward_auth_charges_the_route_price_once_per_key_and_answers_200() {
    let s = server("").await;
    s.agent("a1", "default", 10_000).await;
    let (key, _) = s.issue_key("a1", "k1").await;

    // 1001 × 1.2 = 1201.2, rounded up.
    let r = s
        .authorize(&key, "GET", "/v1/search?q=rust", Some("c1"), "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-tally-agent"), Some("a1"));
    assert_eq!(r.header("x-tally-charged-micros"), Some("1202"));
    assert_eq!(r.header("x-tally-balance-micros"), Some("8798"));
    let receipt = r.header("x-tally-receipt").expect("receipt").to_owned();
    assert!(receipt.starts_with("a1~"), "{receipt}");
    assert_eq!(s.balance("a1").await, 8_798);

    // The same Idempotency-Key again: replayed, charged once.
    let again = s
        .authorize(&key, "GET", "/v1/search?q=rust", Some("c1"), "")
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.header("x-tally-receipt"), Some(receipt.as_str()));
    assert_eq!(s.balance("a1").await, 8_798);

    // Clamped up to min_micros (10 × 1.5 = 15 → 100), on a prefix route.
    let r = s
        .authorize(&key, "GET", "/files/a/b.txt", Some("c2"), "")
        .await;
    assert_eq!(
        r.header("x-tally-charged-micros"),
        Some("100"),
        "{}",
        r.text
    );

    // Without Idempotency-Key the request id is the key: once per distinct request id.
    let by_id = |id: &'static str| {
        s.send(
            s.http
                .post(s.url("/v1/authorize"))
                .header("X-Api-Key", "unused")
                .bearer_auth(&key)
                .header("X-Forwarded-Method", "DELETE")
                .header("X-Forwarded-Uri", "/items/42")
                .header("X-Request-Id", id),
        )
    };
    assert_eq!(
        by_id("req-1").await.header("x-tally-charged-micros"),
        Some("500")
    );
    assert_eq!(
        by_id("req-1").await.header("idempotent-replayed"),
        Some("true")
    );
    assert_eq!(by_id("req-2").await.status, 200);
    assert_eq!(s.balance("a1").await, 8_798 - 100 - 500 - 500);

    // Envoy: the original method and path after the configured prefix.
    let envoy = s
        .send(
            s.http
                .put(s.url("/ext-authz/items/9"))
                .bearer_auth(&key)
                .header("Idempotency-Key", "envoy-1"),
        )
        .await;
    assert_eq!(envoy.status, 200, "{}", envoy.text);
    assert_eq!(envoy.header("x-tally-charged-micros"), Some("500"));

    // No key → 400; unknown route → 404; method not priced → 404; variable price → 404;
    // no or a wrong agent key → 401. None of them charges.
    let before = s.balance("a1").await;
    s.authorize(&key, "GET", "/items/1", None, "")
        .await
        .assert_problem(400, "idempotency-key-missing");
    s.authorize(&key, "GET", "/nope", Some("n1"), "")
        .await
        .assert_problem(404, "not-found");
    s.authorize(&key, "POST", "/v1/search", Some("n2"), "")
        .await
        .assert_problem(404, "not-found");
    s.authorize(&key, "POST", "/llm", Some("n3"), "")
        .await
        .assert_problem(404, "not-found");
    s.authorize("tk_abcdefgh_00", "GET", "/items/1", Some("n4"), "")
        .await
        .assert_problem(401, "unauthorized");
    s.authorize(ADMIN, "GET", "/items/1", Some("n5"), "")
        .await
        .assert_problem(401, "unauthorized");
    let none = s
        .send(
            s.http
                .get(s.url("/v1/authorize"))
                .header("X-Forwarded-Method", "GET")
                .header("X-Forwarded-Uri", "/items/1"),
        )
        .await;
    none.assert_problem(401, "unauthorized");
    s.send(
        s.http
            .get(s.url("/v1/authorize"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "n6"),
    )
    .await
    .assert_problem(400, "invalid-request");
    assert_eq!(s.balance("a1").await, before);
    s.stop().await;
}

/// Everything of a problem answer a client sees except what names the request.
fn shape(r: &Resp) -> (u16, serde_json::Value, Vec<(String, String)>) {
    let mut headers: Vec<(String, String)> = [
        "retry-after",
        "ratelimit-policy",
        "ratelimit",
        "payment-required",
        "content-type",
    ]
    .iter()
    .filter_map(|h| r.header(h).map(|v| ((*h).to_owned(), v.to_owned())))
    .collect();
    headers.sort();
    (r.status, r.body.clone(), headers)
}

#[tokio::test]
async fn forward_auth_denials_are_the_debit_routes_own_402_and_429() {
    let s = server(X402).await;
    // Broke: the 402 of forward-auth and of the debit route for the same amount.
    s.agent("poor", "default", 100).await;
    let (key, _) = s.issue_key("poor", "k1").await;
    let fa = s.authorize(&key, "GET", "/items/1", Some("p1"), "").await;
    fa.assert_problem(402, "insufficient-funds");
    assert!(fa.header("payment-required").is_some());
    assert_eq!(fa.body["required_micros"], 500);
    let debit = s.debit("poor", "d1", 500).await;
    assert_eq!(shape(&fa), shape(&debit));
    assert_eq!(s.balance("poor").await, 100, "a 402 charges nothing");

    // Rate-limited (2 a minute): the third call is the debit route's own 429.
    s.agent("busy", "limited", 1_000_000).await;
    let (key, _) = s.issue_key("busy", "k1").await;
    for i in 0..2 {
        let r = s
            .authorize(&key, "GET", "/items/1", Some(&format!("b{i}")), "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.header("ratelimit").is_some());
    }
    let fa = s.authorize(&key, "GET", "/items/1", Some("b2"), "").await;
    fa.assert_problem(429, "rate-limited");
    assert!(fa.header("retry-after").is_some());
    let debit = s.debit("busy", "d1", 500).await;
    assert_eq!(shape(&fa), shape(&debit));
    s.stop().await;
}

#[tokio::test]
async fn nginx_mode_answers_401_and_403_with_the_real_problem_in_headers() {
    let s = server(X402).await;
    s.agent("poor", "default", 100).await;
    let (key, _) = s.issue_key("poor", "k1").await;
    let r = s
        .authorize(&key, "GET", "/items/1", Some("p1"), "?mode=nginx")
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.header("x-tally-status"), Some("402"));
    let problem: serde_json::Value =
        serde_json::from_str(r.header("x-tally-problem").expect("problem header")).expect("json");
    assert_eq!(problem["type"], "urn:tally:problem:insufficient-funds");
    assert_eq!(problem, r.body, "the header carries the body");
    assert!(r.header("payment-required").is_some());

    s.agent("busy", "limited", 1_000_000).await;
    let (key, _) = s.issue_key("busy", "k1").await;
    for i in 0..2 {
        let r = s
            .authorize(
                &key,
                "GET",
                "/items/1",
                Some(&format!("b{i}")),
                "?mode=nginx",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = s
        .authorize(&key, "GET", "/items/1", Some("b2"), "?mode=nginx")
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.header("x-tally-status"), Some("429"));
    assert!(r.header("retry-after").is_some());
    // Any other refusal is a 403 too (nginx makes every other status a 500).
    let r = s
        .authorize(&key, "GET", "/nope", Some("b3"), "?mode=nginx")
        .await;
    assert_eq!((r.status, r.header("x-tally-status")), (403, Some("404")));
    let r = s
        .authorize(
            "tk_abcdefgh_00",
            "GET",
            "/items/1",
            Some("b4"),
            "?mode=nginx",
        )
        .await;
    assert_eq!((r.status, r.header("x-tally-status")), (401, Some("401")));
    s.authorize(&key, "GET", "/items/1", Some("b5"), "?mode=ngnix")
        .await
        .assert_problem(400, "invalid-request");
    s.stop().await;

    // Or for every request, from the config.
    let cfg = config(&ROUTES.replace("[forward_auth]", "[forward_auth]\nmode = \"nginx\""));
    let s = TestServer::start_with(cfg).await;
    s.agent("poor", "default", 100).await;
    let (key, _) = s.issue_key("poor", "k1").await;
    let r = s.authorize(&key, "GET", "/items/1", Some("p1"), "").await;
    assert_eq!((r.status, r.header("x-tally-status")), (401, Some("402")));
    s.stop().await;
}

#[tokio::test]
async fn a_receipt_refunds_its_debit_in_full_or_in_part() {
    let s = server("").await;
    s.agent("a1", "default", 10_000).await;
    let (key, _) = s.issue_key("a1", "k1").await;
    let r = s.authorize(&key, "GET", "/items/1", Some("c1"), "").await;
    let receipt = r.header("x-tally-receipt").expect("receipt").to_owned();
    assert_eq!(s.balance("a1").await, 9_500);

    let r = s.refund_receipt(&receipt, "r1", Some(200)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        (r.body["kind"].as_str(), r.body["amount_micros"].as_u64()),
        (Some("refund"), Some(200))
    );
    assert_eq!(s.balance("a1").await, 9_700);
    // "All of it" is the debit's amount: more than what is left now.
    s.refund_receipt(&receipt, "r2", None)
        .await
        .assert_problem(422, "refund-exceeds-debit");
    let r = s.refund_receipt(&receipt, "r3", Some(300)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s.balance("a1").await, 10_000);
    assert_eq!(
        s.refund_receipt(&receipt, "r3", Some(300))
            .await
            .header("idempotent-replayed"),
        Some("true")
    );

    // A whole refund of a fresh charge, replayed after it emptied the debit.
    let r = s.authorize(&key, "GET", "/items/2", Some("c2"), "").await;
    let receipt2 = r.header("x-tally-receipt").expect("receipt").to_owned();
    for _ in 0..2 {
        let r = s.refund_receipt(&receipt2, "all", None).await;
        assert_eq!(
            (r.status, r.body["amount_micros"].as_u64()),
            (201, Some(500)),
            "{}",
            r.text
        );
    }
    assert_eq!(s.balance("a1").await, 10_000);

    s.refund_receipt("a1~1", "x1", None)
        .await
        .assert_problem(422, "unknown-debit");
    s.refund_receipt("garbage", "x2", None)
        .await
        .assert_problem(404, "not-found");
    s.call(
        "POST",
        &format!("/v1/receipts/{receipt}/refund"),
        READER,
        Some("x3"),
        None,
    )
    .await
    .assert_problem(403, "forbidden");
    s.stop().await;
}
