//! Hostile and broken input: each must be a 4xx problem+json, never a 5xx, a panic or a
//! hang (every request here has a client timeout).

mod common;

use std::time::Duration;

use common::*;

async fn raw(
    s: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Resp {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut req = client.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        s.url(path),
    );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    s.send(req.body(body)).await
}

fn assert_4xx_problem(r: &Resp, what: &str) {
    assert!(
        (400..500).contains(&r.status),
        "{what}: got {} {}",
        r.status,
        r.text
    );
    assert_eq!(
        r.content_type(),
        "application/problem+json",
        "{what}: {}",
        r.text
    );
    assert!(
        r.body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:tally:problem:")),
        "{what}"
    );
}

const JSON_AUTH: [(&str, &str); 3] = [
    ("authorization", "Bearer admin-token"),
    ("content-type", "application/json"),
    ("idempotency-key", "k-bad"),
];

#[tokio::test]
async fn malformed_bodies_are_400() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{\"amount_micros\":".to_vec()),
        ("not an object", b"[1,2,3]".to_vec()),
        ("null", b"null".to_vec()),
        ("empty", Vec::new()),
        ("string amount", br#"{"amount_micros":"100"}"#.to_vec()),
        ("float amount", br#"{"amount_micros":1.5}"#.to_vec()),
        ("exponent amount", br#"{"amount_micros":1e3}"#.to_vec()),
        ("negative amount", br#"{"amount_micros":-1}"#.to_vec()),
        (
            "above u64::MAX",
            br#"{"amount_micros":18446744073709551616}"#.to_vec(),
        ),
        (
            "far above u64::MAX",
            format!("{{\"amount_micros\":{}}}", "9".repeat(5_000)).into_bytes(),
        ),
        ("missing amount", br#"{}"#.to_vec()),
        (
            "unknown field",
            br#"{"amount_micros":1,"amount":2}"#.to_vec(),
        ),
        (
            "duplicate field",
            br#"{"amount_micros":1,"amount_micros":2}"#.to_vec(),
        ),
        (
            "bad priority",
            br#"{"amount_micros":1,"priority":"urgent"}"#.to_vec(),
        ),
        (
            "unicode task type",
            "{\"amount_micros\":1,\"task_type\":\"llm\u{1F600}\"}"
                .as_bytes()
                .to_vec(),
        ),
        (
            "invalid utf-8",
            b"{\"amount_micros\":1,\"task_type\":\"\xff\xfe\"}".to_vec(),
        ),
        ("trailing garbage", br#"{"amount_micros":1} x"#.to_vec()),
        (
            "deep nesting",
            format!(
                "{{\"amount_micros\":1,\"metadata\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            )
            .into_bytes(),
        ),
        (
            "33 levels",
            format!("{}{}", "[".repeat(33), "]".repeat(33)).into_bytes(),
        ),
        (
            "metadata too big",
            format!(
                "{{\"amount_micros\":1,\"metadata\":{{\"k\":\"{}\"}}}}",
                "v".repeat(300)
            )
            .into_bytes(),
        ),
    ];
    for (what, body) in bodies {
        let r = raw(&s, "POST", "/v1/agents/a1/debits", &JSON_AUTH, body).await;
        assert_4xx_problem(&r, what);
        let expected = if what == "deep nesting" {
            [400, 413]
        } else {
            [400, 400]
        };
        assert!(
            expected.contains(&r.status),
            "{what}: {} {}",
            r.status,
            r.text
        );
    }
    // Nothing above changed the balance.
    assert_eq!(s.balance("a1").await, 1_000);
    s.stop().await;
}

#[tokio::test]
async fn hostile_agent_ids_are_4xx() {
    let s = TestServer::start().await;
    // The agent the query-string checks below read: a 404 there cannot pass for validation.
    s.agent("a1", "default", 1_000).await;
    let long = "a".repeat(10 * 1024);
    // A valid id that names no agent is a lookup 404; each hostile id must instead be
    // refused by validation, before any lookup.
    let absent = s.get("/v1/agents/valid-but-absent").await;
    absent.assert_problem(404, "not-found");
    for id in [
        "ägent",
        "%F0%9F%98%80",
        "a%20b",
        "%FF%FE",
        &long,
        "a~b",
        "%00",
    ] {
        let r = raw(
            &s,
            "GET",
            &format!("/v1/agents/{id}"),
            &[("authorization", "Bearer reader-token")],
            Vec::new(),
        )
        .await;
        r.assert_problem(400, "invalid-request");
        let r = raw(
            &s,
            "POST",
            &format!("/v1/agents/{id}/debits"),
            &JSON_AUTH,
            br#"{"amount_micros":1}"#.to_vec(),
        )
        .await;
        r.assert_problem(400, "invalid-request");
    }
    // `..` is made of valid characters; the client resolves it away (to `/v1/`), so it
    // must simply not reach an agent.
    let r = raw(
        &s,
        "GET",
        "/v1/agents/..",
        &[("authorization", "Bearer reader-token")],
        Vec::new(),
    )
    .await;
    assert_4xx_problem(&r, "..");
    for id in ["ägent😀", &long, "", "a b", "a/b"] {
        let body = serde_json::to_vec(&serde_json::json!({"id": id})).expect("json");
        let r = raw(&s, "POST", "/v1/agents", &JSON_AUTH, body).await;
        assert_4xx_problem(&r, id);
        assert_eq!(r.status, 400, "{id}");
    }
    let r = s.get(&format!("/v1/agents?after={long}")).await;
    r.assert_problem(400, "invalid-request");
    let r = s.get("/v1/agents/a1/journal?after=-1").await;
    r.assert_problem(400, "invalid-request");
    let r = s
        .get("/v1/agents/a1/journal?limit=99999999999999999999")
        .await;
    r.assert_problem(400, "invalid-request");
    let r = s.get("/v1/agents/a1/usage?period=2026-13").await;
    r.assert_problem(400, "invalid-request");
    let r = s.get("/v1/agents?limit=1&limit=2").await;
    r.assert_problem(400, "invalid-request");
    s.stop().await;
}

#[tokio::test]
async fn missing_and_duplicated_headers_are_4xx() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let body = br#"{"amount_micros":1}"#.to_vec();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: Vec<Case> = vec![
        (
            "no auth",
            vec![
                ("content-type", "application/json"),
                ("idempotency-key", "k"),
            ],
            401,
        ),
        (
            "two auth",
            vec![
                ("authorization", "Bearer admin-token"),
                ("authorization", "Bearer admin-token"),
                ("content-type", "application/json"),
                ("idempotency-key", "k"),
            ],
            400,
        ),
        (
            "empty bearer",
            vec![
                ("authorization", "Bearer "),
                ("content-type", "application/json"),
                ("idempotency-key", "k"),
            ],
            401,
        ),
        (
            "no key",
            vec![
                ("authorization", "Bearer admin-token"),
                ("content-type", "application/json"),
            ],
            400,
        ),
        (
            "two keys",
            vec![
                ("authorization", "Bearer admin-token"),
                ("content-type", "application/json"),
                ("idempotency-key", "k1"),
                ("idempotency-key", "k2"),
            ],
            400,
        ),
        (
            "empty key",
            vec![
                ("authorization", "Bearer admin-token"),
                ("content-type", "application/json"),
                ("idempotency-key", ""),
            ],
            400,
        ),
        (
            "no content type",
            vec![
                ("authorization", "Bearer admin-token"),
                ("idempotency-key", "k"),
            ],
            415,
        ),
        (
            "two content types",
            vec![
                ("authorization", "Bearer admin-token"),
                ("content-type", "application/json"),
                ("content-type", "application/json"),
                ("idempotency-key", "k"),
            ],
            400,
        ),
        (
            "form content type",
            vec![
                ("authorization", "Bearer admin-token"),
                ("content-type", "application/x-www-form-urlencoded"),
                ("idempotency-key", "k"),
            ],
            415,
        ),
    ];
    for (what, headers, status) in cases {
        let r = raw(&s, "POST", "/v1/agents/a1/debits", &headers, body.clone()).await;
        assert_4xx_problem(&r, what);
        assert_eq!(r.status, status, "{what}: {}", r.text);
    }
    assert_eq!(s.balance("a1").await, 1_000);
    s.stop().await;
}

#[tokio::test]
async fn ten_megabyte_bodies_are_413_on_every_body_route() {
    let s = TestServer::start().await;
    s.agent("a1", "default", 1_000).await;
    let big = vec![b' '; 10 * 1024 * 1024];
    for path in [
        "/v1/agents",
        "/v1/agents/a1/credits",
        "/v1/agents/a1/debits",
        "/v1/agents/a1/check",
        "/v1/holds/a1~1/void",
    ] {
        let r = raw(&s, "POST", path, &JSON_AUTH, big.clone()).await;
        assert_4xx_problem(&r, path);
        assert_eq!(r.status, 413, "{path}");
    }
    s.stop().await;
}

/// A GET of `/healthz` whose header section (names and values) is exactly `header_bytes`.
fn get_with_header_bytes(header_bytes: usize) -> Vec<u8> {
    let fixed = "host".len() + "t".len() + "connection".len() + "close".len() + "x-pad".len();
    let pad = "p".repeat(header_bytes - fixed);
    format!("GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-pad: {pad}\r\n\r\n")
        .into_bytes()
}

#[tokio::test]
async fn header_sections_past_the_limit_are_431_problem_json() {
    use tally_server::serve::HEADER_BYTES_MAX;
    let s = TestServer::start().await;
    let at_max = s.raw_tcp(&get_with_header_bytes(HEADER_BYTES_MAX)).await;
    assert_eq!(at_max.status, 200, "{}", at_max.text);
    let past = s
        .raw_tcp(&get_with_header_bytes(HEADER_BYTES_MAX + 1))
        .await;
    past.assert_problem(431, "headers-too-large");
    assert_eq!(past.body["header_bytes_max"], HEADER_BYTES_MAX);
    // A 1 MiB header: the same problem, not hyper's bare 431 (or a reset connection).
    let huge = s.raw_tcp(&get_with_header_bytes(1024 * 1024)).await;
    huge.assert_problem(431, "headers-too-large");
    s.stop().await;
}
