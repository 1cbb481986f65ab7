//! `POST /v1/batch` over HTTP on port 0: mixed kinds answered item by item as their single
//! routes answer, per-item idempotency (a replayed batch replays item by item; a changed
//! item alone gets 422), denials and bad items that touch no other item, the order of one
//! agent's items, roles per item, and the envelope's limits at their edges.

mod common;

use common::*;
use serde_json::{json, Value};

async fn batch(s: &TestServer, token: &str, items: Value) -> Resp {
    s.call(
        "POST",
        "/v1/batch",
        token,
        None,
        Some(json!({ "items": items })),
    )
    .await
}

/// A batch whose body is `text` as it is, for JSON that `json!` cannot write.
async fn batch_text(s: &TestServer, text: impl Into<reqwest::Body>) -> Resp {
    s.send(
        s.http
            .post(s.url("/v1/batch"))
            .bearer_auth(SERVICE)
            .header("content-type", "application/json")
            .body(text),
    )
    .await
}

fn item(r: &Resp, i: usize) -> &Value {
    &r.body["items"][i]
}

#[tokio::test]
async fn mixed_kinds_are_answered_item_by_item_like_their_single_routes() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 0).await;
    let r = batch(
        &s,
        ADMIN,
        json!([
            {"op": "credit", "agent_id": "a1", "idempotency_key": "c1", "amount_micros": 1000},
            {"op": "debit", "agent_id": "a1", "idempotency_key": "d1", "amount_micros": 100, "task_type": "llm"},
            {"op": "hold", "agent_id": "a1", "idempotency_key": "h1", "amount_micros": 300, "ttl_ms": 60000},
            {"op": "check", "agent_id": "a1", "amount_micros": 500},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<u64> = (0..4)
        .map(|i| item(&r, i)["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, vec![201, 201, 201, 200], "{}", r.text);
    assert_eq!(item(&r, 0)["receipt"]["kind"], "credit");
    assert_eq!(item(&r, 1)["receipt"]["balance_micros"], 900);
    assert_eq!(item(&r, 1)["replayed"], false);
    assert_eq!(item(&r, 3)["result"]["allowed"], true);
    assert_eq!(item(&r, 3)["result"]["balance_micros"], 600);
    let hold_id = item(&r, 2)["receipt"]["hold_id"]
        .as_str()
        .expect("hold id")
        .to_owned();
    let debit_seq = item(&r, 1)["receipt"]["seq"].as_u64().expect("seq");

    let r = batch(
        &s,
        ADMIN,
        json!([
            {"op": "capture", "hold_id": hold_id, "idempotency_key": "cap1", "amount_micros": 200},
            {"op": "refund", "agent_id": "a1", "idempotency_key": "r1", "debit_seq": debit_seq, "amount_micros": 40},
            {"op": "void", "hold_id": hold_id, "idempotency_key": "v1"},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(item(&r, 0)["status"], 200, "{}", r.text);
    assert_eq!(item(&r, 0)["receipt"]["kind"], "capture");
    assert_eq!(item(&r, 1)["status"], 201, "{}", r.text);
    // The hold is captured already: the void is the single route's 404, alone.
    assert_eq!(item(&r, 2)["status"], 404, "{}", r.text);
    assert_eq!(
        item(&r, 2)["problem"]["type"],
        "urn:tally:problem:not-found"
    );
    // 1000 − 100 − 200 captured + 40 refunded.
    assert_eq!(s.balance("a1").await, 740);
}

#[tokio::test]
async fn a_replayed_batch_replays_item_by_item_and_a_changed_item_alone_is_refused() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let items = json!([
        {"op": "debit", "agent_id": "a1", "idempotency_key": "k1", "amount_micros": 10},
        {"op": "debit", "agent_id": "a1", "idempotency_key": "k2", "amount_micros": 20},
    ]);
    let first = batch(&s, SERVICE, items.clone()).await;
    let again = batch(&s, SERVICE, items).await;
    for i in 0..2 {
        assert_eq!(item(&again, i)["status"], 201);
        assert_eq!(item(&again, i)["replayed"], true, "{}", again.text);
        assert_eq!(item(&again, i)["receipt"], item(&first, i)["receipt"]);
    }
    let changed = batch(
        &s,
        SERVICE,
        json!([
            {"op": "debit", "agent_id": "a1", "idempotency_key": "k1", "amount_micros": 10},
            {"op": "debit", "agent_id": "a1", "idempotency_key": "k2", "amount_micros": 25},
            {"op": "debit", "agent_id": "a1", "idempotency_key": "k3", "amount_micros": 30},
        ]),
    )
    .await;
    assert_eq!(item(&changed, 0)["replayed"], true);
    assert_eq!(item(&changed, 1)["status"], 422, "{}", changed.text);
    assert_eq!(
        item(&changed, 1)["problem"]["type"],
        "urn:tally:problem:idempotency-key-reused"
    );
    assert_eq!(item(&changed, 2)["status"], 201);
    assert_eq!(s.balance("a1").await, 1_000 - 10 - 20 - 30);
}

#[tokio::test]
async fn one_agents_items_apply_in_order_and_denials_touch_no_other_item() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 0).await;
    s.agent("rich", "default", 1_000).await;
    let r = batch(
        &s,
        ADMIN,
        json!([
            {"op": "debit", "agent_id": "a1", "idempotency_key": "early", "amount_micros": 100},
            {"op": "debit", "agent_id": "rich", "idempotency_key": "r1", "amount_micros": 1},
            {"op": "credit", "agent_id": "a1", "idempotency_key": "top-up", "amount_micros": 100},
            {"op": "debit", "agent_id": "a1", "idempotency_key": "late", "amount_micros": 100},
            {"op": "debit", "agent_id": "a1", "idempotency_key": "broke", "amount_micros": 1},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<u64> = (0..5)
        .map(|i| item(&r, i)["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, vec![402, 201, 201, 201, 402], "{}", r.text);
    assert_eq!(
        item(&r, 0)["problem"]["type"],
        "urn:tally:problem:insufficient-funds"
    );
    assert_eq!(s.balance("a1").await, 0);
    assert_eq!(s.balance("rich").await, 999);
}

#[tokio::test]
async fn bad_items_and_roles_are_answered_per_item() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let r = batch(
        &s,
        SERVICE,
        json!([
            {"op": "debit", "agent_id": "a1", "amount_micros": 1},
            {"op": "teleport", "agent_id": "a1", "idempotency_key": "t"},
            {"op": "credit", "agent_id": "a1", "idempotency_key": "c", "amount_micros": 5},
            {"op": "debit", "agent_id": "a1", "idempotency_key": "x", "amount_micros": 1, "colour": "red"},
            {"op": "debit", "agent_id": "no such agent!", "idempotency_key": "y", "amount_micros": 1},
            {"op": "debit", "agent_id": "ghost", "idempotency_key": "z", "amount_micros": 1},
            "not an object",
            {"op": "debit", "agent_id": "a1", "idempotency_key": "ok", "amount_micros": 7},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let kinds: Vec<(u64, String)> = (0..8)
        .map(|i| {
            let it = item(&r, i);
            (
                it["status"].as_u64().expect("status"),
                it["problem"]["type"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let p = |s: &str| format!("urn:tally:problem:{s}");
    assert_eq!(
        kinds,
        vec![
            (400, p("idempotency-key-missing")),
            (400, p("invalid-request")),
            (403, p("forbidden")),
            (400, p("invalid-request")),
            (400, p("invalid-request")),
            (404, p("not-found")),
            (400, p("invalid-request")),
            (201, String::new()),
        ],
        "{}",
        r.text
    );
    assert_eq!(s.balance("a1").await, 993, "only the last item moved money");
    // A reader may not batch at all.
    batch(&s, READER, json!([]))
        .await
        .assert_problem(403, "forbidden");
}

#[tokio::test]
async fn the_envelope_limits_answer_at_their_edges() {
    let s = TestServer::start_with(config(
        "[limits]\nbatch_items_max = 3\nbatch_bytes_max = 2048",
    ))
    .await;
    s.agent("a1", "default", 1_000).await;
    let debits = |n: usize| -> Value {
        (0..n)
            .map(|i| json!({"op": "debit", "agent_id": "a1", "idempotency_key": format!("e{i}"), "amount_micros": 1}))
            .collect()
    };
    let r = batch(&s, SERVICE, debits(3)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = batch(&s, SERVICE, debits(4)).await;
    r.assert_problem(413, "batch-too-large");
    assert_eq!(r.body["batch_items_max"], 3);
    batch(&s, SERVICE, json!([]))
        .await
        .assert_problem(400, "invalid-request");
    // Bytes: a body one past batch_bytes_max is 413, whatever it holds.
    let pad = "x".repeat(2048);
    let r = s
        .call(
            "POST",
            "/v1/batch",
            SERVICE,
            None,
            Some(json!({"items": [{"op": "check", "agent_id": "a1", "amount_micros": 1, "metadata": {"pad": pad}}]})),
        )
        .await;
    r.assert_problem(413, "body-too-large");
    for bad in ["{\"items\": [}", "{\"things\": []}", "[]"] {
        batch_text(&s, bad)
            .await
            .assert_problem(400, "invalid-request");
    }
    assert_eq!(
        s.balance("a1").await,
        997,
        "only the 3-item batch moved money"
    );
}

#[tokio::test]
async fn a_debit_item_is_the_same_debit_whichever_parse_takes_it() {
    // Plain debit items are parsed straight into their fields; any other item (here: an
    // extra envelope field, a repeated field) goes through the general parse. Both must
    // make the same debit, with the same fields journaled.
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let fields = r#""op": "debit", "agent_id": "a1", "amount_micros": 5, "task_type": "llm.chat", "priority": "low", "metadata": {"model": "m\u00e9", "run": "7"}"#;
    let body = format!(
        r#"{{"items": [
            {{{fields}, "idempotency_key": "direct"}},
            {{{fields}, "idempotency_key": "general", "hold_id": "ignored by a debit"}},
            {{{fields}, "idempotency_key": "esc\u0061ped"}},
            {{{fields}, "idempotency_key": "repeated", "amount_micros": 5}},
            {{"op": "debit", "agent_id": "a1", "idempotency_key": "huge", "amount_micros": 1e400}}
        ]}}"#
    );
    let r = batch_text(&s, body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<&Value> = (0..4).map(|i| &item(&r, i)["status"]).collect();
    assert_eq!(statuses, [&json!(201); 4], "{}", r.text);
    // A number no parse can hold is that item's 400, not the batch's.
    assert_eq!(item(&r, 4)["status"], 400, "{}", r.text);
    assert_eq!(
        item(&r, 4)["problem"]["type"],
        "urn:tally:problem:invalid-request"
    );
    assert_eq!(s.balance("a1").await, 980);
    let debits: Vec<Value> = s
        .journal("a1")
        .await
        .into_iter()
        .filter(|e| e["kind"] == "debit")
        .collect();
    assert_eq!(debits.len(), 4, "{debits:?}");
    let keys: Vec<&Value> = debits.iter().map(|e| &e["idempotency_key"]).collect();
    assert_eq!(
        keys,
        ["direct", "general", "escaped", "repeated"],
        "{debits:?}"
    );
    let same = |e: &Value| {
        let mut e = e.clone();
        let map = e.as_object_mut().expect("an entry is an object");
        map.retain(|k, _| !matches!(k.as_str(), "seq" | "idempotency_key" | "balance_micros"));
        e
    };
    for d in &debits[1..] {
        assert_eq!(same(d), same(&debits[0]));
    }
    assert_eq!(debits[0]["task_type"], "llm.chat", "{:?}", debits[0]);
    assert_eq!(debits[0]["metadata"]["model"], "mé", "{:?}", debits[0]);
}
