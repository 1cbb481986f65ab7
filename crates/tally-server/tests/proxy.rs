//! The metering reverse proxy against a real upstream (an axum app on port 0): a paid call
//! reaches the upstream and is charged the route's price (fixed; cost + margin, rounded up
//! and clamped; variable from a header, from units, from a trailer of a streamed body);
//! a broke agent gets 402 and a rate-limited one 429 with the upstream never called; an
//! upstream 500, a refused connection and a time-out leave the balance as it was (refund or
//! void in the journal); 10 MB stream through without being buffered whole; bad and revoked
//! keys get 401; the limits (body size, concurrency) answer at their edge.

mod common;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use common::*;
use hyper::body::{Bytes, Frame};
use tokio::sync::Notify;

/// 10 MB in 64 KiB chunks, each byte `(i % 251)` so a shifted or dropped chunk shows.
const BIG_BYTES: usize = 10 * 1024 * 1024;
const BIG_CHUNK: usize = 64 * 1024;

fn big_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    hits: HashMap<String, usize>,
    last_headers: Option<HeaderMap>,
    last_body: Vec<u8>,
}

#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Seen>>,
    /// `/big` sends its first MiB, then waits here until the client has read it.
    big_gate: Arc<Notify>,
    /// `/gate` and `/slow` wait here (a test opens it, or never).
    gate: Arc<Notify>,
}

impl Upstream {
    fn hits(&self, path: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .expect("lock")
            .last_headers
            .clone()
            .expect("a request reached the upstream")
    }
}

/// A body of frames given up front, trailers included (axum's own bodies cannot end with
/// trailers).
struct Frames(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

async fn upstream_handler(State(up): State<Upstream>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    {
        let mut seen = up.seen.lock().expect("lock");
        *seen.hits.entry(path.clone()).or_default() += 1;
        seen.last_headers = Some(headers);
        seen.last_body = body.clone();
    }
    match path.as_str() {
        "/fixed" | "/margin" | "/clamped" => "ok".into_response(),
        "/echo" => body.into_response(),
        "/missing" | "/missing/free" => (StatusCode::NOT_FOUND, "no such thing").into_response(),
        "/fail" | "/fail/variable" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "/llm/header" => ([("x-usage-cost-micros", "1234")], "generated").into_response(),
        "/llm/units" => ([("x-usage-units", "7")], "generated").into_response(),
        "/llm/over" => ([("x-usage-cost-micros", "999999")], "generated").into_response(),
        "/llm/none" => "generated, usage not reported".into_response(),
        "/llm/trailer" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-usage-cost-micros", HeaderValue::from_static("2500"));
            let frames = VecDeque::from([
                Frame::data(Bytes::from_static(b"streamed ")),
                Frame::data(Bytes::from_static(b"tokens")),
                Frame::trailers(trailers),
            ]);
            let mut resp = Response::new(Body::new(Frames(frames)));
            // hyper sends only the trailer fields the head announces.
            resp.headers_mut()
                .insert("trailer", HeaderValue::from_static("X-Usage-Cost-Micros"));
            resp
        }
        "/big" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            let gate = up.big_gate.clone();
            tokio::spawn(async move {
                let mut at = 0;
                while at < BIG_BYTES {
                    if at == 1024 * 1024 {
                        gate.notified().await;
                    }
                    let chunk: Vec<u8> = (at..at + BIG_CHUNK).map(big_byte).collect();
                    at += BIG_CHUNK;
                    if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                        return;
                    }
                }
            });
            Response::new(Body::new(ChannelFrames(rx)))
        }
        "/gate" | "/slow" => {
            up.gate.notified().await;
            "finally".into_response()
        }
        _ => (StatusCode::IM_A_TEAPOT, "unknown test path").into_response(),
    }
}

struct ChannelFrames(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl hyper::body::Body for ChannelFrames {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx)
    }
}

async fn start_upstream() -> (Upstream, String) {
    let up = Upstream::default();
    let app = Router::new()
        .fallback(any(upstream_handler))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (up, base)
}

/// A loopback port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    l.local_addr().expect("addr").port()
}

/// The test routes; `[proxy]` gets `proxy_extra`, and a 500 ms upstream time-out (the
/// time-out test waits that long) unless `proxy_extra` sets its own.
fn routes(upstream: &str, refused: u16, proxy_extra: &str) -> String {
    let timeout = if proxy_extra.contains("upstream_timeout_ms") {
        ""
    } else {
        "upstream_timeout_ms = 500"
    };
    format!(
        r#"
[proxy]
{timeout}
body_bytes_max = 1000
{proxy_extra}

[[routes]]
name = "fixed"
path = "/fixed"
upstream = "{upstream}"
price_micros = 300

[[routes]]
name = "margin"
path = "/margin"
upstream = "{upstream}"
cost_micros = 1001
margin_pct = 20

[[routes]]
name = "clamped"
path = "/clamped"
upstream = "{upstream}"
cost_micros = 10
margin_pct = 50
min_micros = 100

[[routes]]
name = "echo"
methods = ["POST"]
path = "/echo"
upstream = "{upstream}"
price_micros = 10

[[routes]]
name = "missing"
path = "/missing"
upstream = "{upstream}"
price_micros = 40

[[routes]]
name = "missing-free"
path = "/missing/free"
upstream = "{upstream}"
price_micros = 40
charge_client_errors = false

[[routes]]
name = "llm"
path = "/llm/*"
upstream = "{upstream}"
variable = {{ max_micros = 5000 }}

[[routes]]
name = "llm-units"
path = "/llm/units"
upstream = "{upstream}"
variable = {{ max_micros = 5000, usage_header = "X-Usage-Units", unit_price_micros = 100 }}

[[routes]]
name = "fail"
path = "/fail"
upstream = "{upstream}"
price_micros = 70

[[routes]]
name = "fail-variable"
path = "/fail/variable"
upstream = "{upstream}"
variable = {{ max_micros = 900 }}

[[routes]]
name = "slow"
path = "/slow"
upstream = "{upstream}"
price_micros = 80

[[routes]]
name = "gone"
path = "/gone"
upstream = "http://127.0.0.1:{refused}"
price_micros = 90

[[routes]]
name = "big"
path = "/big"
upstream = "{upstream}"
price_micros = 5

[[routes]]
name = "gate"
path = "/gate"
upstream = "{upstream}"
price_micros = 1
"#
    )
}

struct Fixture {
    s: TestServer,
    up: Upstream,
    key: String,
}

/// A server with the test routes in front of a fresh upstream; `proxy_extra` goes into
/// `[proxy]`, `extra` after the routes.
async fn fixture(proxy_extra: &str, extra: &str) -> Fixture {
    let (up, base) = start_upstream().await;
    let refused = closed_port().await;
    let text = format!("{extra}\n{}", routes(&base, refused, proxy_extra));
    let s = TestServer::start_with(config(&text)).await;
    s.agent("a1", "default", 100_000).await;
    let (key, _) = s.issue_key("a1", "proxy-key").await;
    Fixture { s, up, key }
}

impl Fixture {
    async fn get(&self, path: &str) -> Resp {
        self.get_as(&self.key, path).await
    }

    async fn get_as(&self, key: &str, path: &str) -> Resp {
        let req = self.s.http.get(self.s.proxy_url(path)).bearer_auth(key);
        self.s.send(req).await
    }

    /// The kinds of `agent`'s journal entries.
    async fn journal_kinds(&self, agent: &str) -> Vec<String> {
        let j = self
            .s
            .get(&format!("/v1/agents/{agent}/journal?limit=1000"))
            .await;
        assert_eq!(j.status, 200, "{}", j.text);
        j.body["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

#[tokio::test]
async fn paid_calls_reach_the_upstream_and_are_charged_the_routes_price() {
    let f = fixture("", "").await;
    let mut balance = f.s.balance("a1").await;
    for (path, price) in [("/fixed", 300), ("/margin", 1_202), ("/clamped", 100)] {
        let r = f.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(r.text, "ok");
        assert_eq!(f.up.hits(path), 1, "{path}");
        assert_eq!(
            r.header("x-tally-charged-micros"),
            Some(price.to_string().as_str())
        );
        balance -= price;
        assert_eq!(
            r.header("x-tally-balance-micros"),
            Some(balance.to_string().as_str())
        );
        assert_eq!(f.s.balance("a1").await, balance, "{path} charged {price}");
    }
    // The upstream is told who paid and for what, and never sees the agent's key.
    let h = f.up.last_headers();
    assert_eq!(
        h.get("x-tally-agent").map(|v| v.as_bytes()),
        Some(&b"a1"[..])
    );
    assert_eq!(
        h.get("x-tally-route").map(|v| v.as_bytes()),
        Some(&b"clamped"[..])
    );
    assert!(
        h.get("authorization").is_none(),
        "the agent key is stripped"
    );
    assert!(h.get("x-tally-receipt").is_some());
}

#[tokio::test]
async fn the_request_body_and_query_reach_the_upstream_and_spoofed_headers_do_not() {
    let f = fixture("", "").await;
    let req =
        f.s.http
            .post(f.s.proxy_url("/echo?q=1"))
            .bearer_auth(&f.key)
            .header("x-tally-agent", "someone-else")
            .header("x-tally-charged-micros", "0")
            .header("x-tally-hold", "a1~1")
            .header("x-forwarded-for", "10.0.0.1")
            .header("connection", "x-secret-hop")
            .header("x-secret-hop", "1")
            .body("hello upstream");
    let r = f.s.send(req).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.text, "hello upstream");
    let h = f.up.last_headers();
    assert_eq!(
        h.get("x-tally-agent").map(|v| v.as_bytes()),
        Some(&b"a1"[..])
    );
    assert_eq!(
        h.get("x-tally-charged-micros").map(|v| v.as_bytes()),
        Some(&b"10"[..])
    );
    assert!(h.get("x-tally-hold").is_none(), "only tally sets X-Tally-*");
    assert_eq!(
        h.get("x-forwarded-for").map(|v| v.as_bytes()),
        Some(&b"10.0.0.1, 127.0.0.1"[..]),
        "the client's address appended"
    );
    assert!(
        h.get("authorization").is_none(),
        "the agent key is stripped"
    );
    assert!(
        h.get("x-secret-hop").is_none(),
        "hop-by-hop named in Connection"
    );
}

#[tokio::test]
async fn variable_prices_are_captured_from_the_usage_header_units_or_trailer() {
    let f = fixture("", "").await;
    let cases = [
        ("/llm/header", 1_234, "generated"),
        ("/llm/units", 700, "generated"),
        ("/llm/trailer", 2_500, "streamed tokens"),
        ("/llm/over", 5_000, "generated"),
        ("/llm/none", 5_000, "generated, usage not reported"),
    ];
    for (path, charged, body) in cases {
        let before = f.s.balance("a1").await;
        let r = f.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(r.text, body, "{path}");
        assert_eq!(r.header("x-tally-hold-micros"), Some("5000"), "{path}");
        // The capture lands after the body ends: wait for it (bounded).
        let mut after = f.s.balance("a1").await;
        for _ in 0..200 {
            let held = f.s.get("/v1/agents/a1").await.body["held_micros"].clone();
            if held == 0 {
                after = f.s.balance("a1").await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(before - after, charged, "{path}");
    }
    let kinds = f.journal_kinds("a1").await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "capture").count(),
        5,
        "{kinds:?}"
    );
}

#[tokio::test]
async fn a_broke_agent_gets_402_and_a_rate_limited_one_429_and_the_upstream_sees_neither() {
    let f = fixture("", X402).await;
    f.s.agent("broke", "default", 0).await;
    let (broke_key, _) = f.s.issue_key("broke", "broke-key").await;
    let r = f.get_as(&broke_key, "/fixed").await;
    r.assert_problem(402, "insufficient-funds");
    assert!(r.header("payment-required").is_some(), "x402 configured");
    assert_eq!(f.up.hits("/fixed"), 0);

    f.s.agent("slowpoke", "limited", 10_000).await;
    let (limited_key, _) = f.s.issue_key("slowpoke", "limited-key").await;
    for _ in 0..2 {
        assert_eq!(f.get_as(&limited_key, "/fixed").await.status, 200);
    }
    let r = f.get_as(&limited_key, "/fixed").await;
    r.assert_problem(429, "rate-limited");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(
        f.up.hits("/fixed"),
        2,
        "the third call never left the proxy"
    );
    assert_eq!(f.s.balance("slowpoke").await, 10_000 - 600);
}

#[tokio::test]
async fn upstream_failures_leave_the_balance_unchanged() {
    let f = fixture("", "").await;
    let before = f.s.balance("a1").await;
    let r = f.get("/fail").await;
    r.assert_problem(502, "upstream-error");
    assert_eq!(r.body["upstream_status"], 500);
    assert_eq!(f.up.hits("/fail"), 1);
    let r = f.get("/fail/variable").await;
    r.assert_problem(502, "upstream-error");
    let r = f.get("/gone").await;
    r.assert_problem(502, "upstream-unreachable");
    let r = f.get("/slow").await;
    r.assert_problem(504, "upstream-timeout");
    assert_eq!(f.s.balance("a1").await, before, "every charge undone");
    let held = f.s.get("/v1/agents/a1").await.body["held_micros"].clone();
    assert_eq!(held, 0);
    let kinds = f.journal_kinds("a1").await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "refund").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "void").count(),
        1,
        "{kinds:?}"
    );
}

#[tokio::test]
async fn an_upstream_4xx_is_passed_through_and_charged_unless_the_route_refunds_it() {
    let f = fixture("", "").await;
    let before = f.s.balance("a1").await;
    let r = f.get("/missing").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text, "no such thing");
    assert_eq!(f.s.balance("a1").await, before - 40);
    let r = f.get("/missing/free").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-tally-charged-micros"), Some("0"));
    // The refund follows the end of the body.
    let mut after = 0;
    for _ in 0..200 {
        after = f.s.balance("a1").await;
        if after == before - 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(after, before - 40, "the free route's 404 refunded");
}

#[tokio::test]
async fn ten_megabytes_stream_through_intact_without_being_buffered_whole() {
    // 10 MB must not race the fixture's 500 ms time-out on a loaded machine.
    let f = fixture("upstream_timeout_ms = 30000", "").await;
    let mut resp =
        f.s.http
            .get(f.s.proxy_url("/big"))
            .bearer_auth(&f.key)
            .send()
            .await
            .expect("response head");
    assert_eq!(resp.status(), 200);
    let mut got: Vec<u8> = Vec::with_capacity(BIG_BYTES);
    let mut opened = false;
    // The upstream holds back the last 9 MiB until the client has the first one: a
    // proxy that buffered the whole body would never pass it on, and this would time out.
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
        .await
        .expect("the body keeps coming")
        .expect("body chunk")
    {
        got.extend_from_slice(&chunk);
        if !opened && got.len() >= 1024 * 1024 {
            opened = true;
            f.up.big_gate.notify_one();
        }
    }
    assert_eq!(got.len(), BIG_BYTES);
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == big_byte(i)),
        "every byte in place"
    );
}

#[tokio::test]
async fn bad_missing_and_revoked_keys_get_401_and_unpriced_paths_404() {
    let f = fixture("", "").await;
    let r = f.get_as("tk_nope1234_notakey", "/fixed").await;
    r.assert_problem(401, "unauthorized");
    let r = f.s.send(f.s.http.get(f.s.proxy_url("/fixed"))).await;
    r.assert_problem(401, "unauthorized");
    // A tally token is not an agent key.
    r.assert_problem(401, "unauthorized");
    f.get_as(SERVICE, "/fixed")
        .await
        .assert_problem(401, "unauthorized");
    let prefix = f.key.split('_').nth(1).expect("prefix").to_owned();
    let revoked =
        f.s.call(
            "DELETE",
            &format!("/v1/agents/a1/keys/{prefix}"),
            SERVICE,
            Some("revoke-1"),
            None,
        )
        .await;
    assert!(revoked.status < 300, "{}", revoked.text);
    f.get("/fixed").await.assert_problem(401, "unauthorized");
    assert_eq!(f.up.hits("/fixed"), 0);

    let (key, _) = f.s.issue_key("a1", "second").await;
    f.get_as(&key, "/not-priced")
        .await
        .assert_problem(404, "not-found");
}

#[tokio::test]
async fn body_and_concurrency_limits_answer_at_their_edge_without_charging() {
    let f = fixture("concurrency_max = 1", "").await;
    let before = f.s.balance("a1").await;
    let post = |body: Vec<u8>| {
        f.s.http
            .post(f.s.proxy_url("/echo"))
            .bearer_auth(&f.key)
            .body(body)
    };
    // Exactly body_bytes_max passes; one byte more is 413, announced or streamed.
    let r = f.s.send(post(vec![b'x'; 1000])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = f.s.send(post(vec![b'x'; 1001])).await;
    r.assert_problem(413, "body-too-large");
    assert_eq!(r.body["body_bytes_max"], 1000);
    assert_eq!(
        f.s.balance("a1").await,
        before - 10,
        "only the first charged"
    );

    // Streamed (chunked, no Content-Length): cut off past the limit, the charge undone.
    let addr = f.s.proxy_url("").trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connects");
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        f.key
    );
    let mut raw = head.into_bytes();
    for _ in 0..11 {
        raw.extend_from_slice(b"64\r\n");
        raw.extend_from_slice(&[b'y'; 100]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &raw)
        .await
        .expect("sends");
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut answer)
        .await
        .expect("reads");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("urn:tally:problem:body-too-large"),
        "{answer}"
    );
    assert_eq!(
        f.s.balance("a1").await,
        before - 10,
        "the streamed one refunded"
    );

    // One call in flight (held at the upstream's gate): the next is 503, not charged.
    let first = {
        let req = f.s.http.get(f.s.proxy_url("/gate")).bearer_auth(&f.key);
        tokio::spawn(req.send())
    };
    for _ in 0..400 {
        if f.up.hits("/gate") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(f.up.hits("/gate"), 1, "the first call reached the upstream");
    let busy = f.get("/fixed").await;
    busy.assert_problem(503, "proxy-busy");
    assert_eq!(busy.header("retry-after"), Some("1"));
    f.up.gate.notify_one();
    let first = first.await.expect("task").expect("response");
    assert_eq!(first.status(), 200);
    assert_eq!(f.s.balance("a1").await, before - 10 - 1);
}

#[tokio::test]
async fn https_upstreams_need_the_proxy_off_and_variable_holds_must_fit_the_plans() {
    let https = "[[routes]]\nname = \"r\"\npath = \"/a\"\nupstream = \"https://api.example.com\"\nprice_micros = 1\n";
    let msg = tally_server::Config::from_toml(https, "t")
        .expect_err("https with the proxy on")
        .to_string();
    assert!(
        msg.contains("routes.r.upstream") && msg.contains("proxy.enabled"),
        "{msg}"
    );
    tally_server::Config::from_toml(&format!("{https}[proxy]\nenabled = false\n"), "t")
        .expect("forward-auth only");
    let variable = "[server]\ndefault_plan = \"short\"\n[[plans]]\nname = \"short\"\nhold_ttl_max_ms = 60000\n[[routes]]\nname = \"v\"\npath = \"/v\"\nupstream = \"http://x\"\nvariable = { max_micros = 5 }\n";
    let msg = tally_server::Config::from_toml(variable, "t")
        .expect_err("hold longer than the plan allows")
        .to_string();
    assert!(
        msg.contains("proxy.upstream_timeout_ms") && msg.contains("short"),
        "{msg}"
    );
    tally_server::Config::from_toml(
        &format!("{variable}[proxy]\nupstream_timeout_ms = 0\n"),
        "t",
    )
    .expect_err("a zero time-out");
}
