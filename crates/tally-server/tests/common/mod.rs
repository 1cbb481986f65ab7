//! Shared harness for the HTTP tests: a real router and a real temporary store on port 0,
//! with a `ManualClock` so time-dependent answers are exact, and a small vocabulary of the
//! API's calls (`s.debit("a1", "k1", 500)`, `s.hold(..)`, `s.journal("a1")`) so that each
//! test is the few lines of the rule it proves.

#![allow(dead_code)]

use std::sync::Arc;

use reqwest::header::HeaderMap;
use serde_json::Value;
use tally_server::auth::{Role, TokenHash};
use tally_server::{Config, Running};
use tally_store::ManualClock;

/// 2026-11-29T13:00:00.000Z
pub const T0_MS: u64 = 1_795_957_200_000;

pub const ADMIN: &str = "admin-token";
pub const SERVICE: &str = "service-token";
pub const READER: &str = "reader-token";

/// Plans used across the tests: `default` (open), `limited` (2 per minute), `capped`
/// (1000 micros a month, soft threshold 80 %).
pub const PLANS: &str = r#"
[engine]
shards = 2
hold_sweep_interval_ms = 3600000

[[plans]]
name = "default"

[[plans]]
name = "limited"
[[plans.buckets]]
name = "default"
quota = 2
window_s = 60

[[plans]]
name = "two"
[[plans.buckets]]
name = "second"
quota = 5
window_s = 1
[[plans.buckets]]
name = "minute"
quota = 6
window_s = 60

[[plans]]
name = "capped"
monthly_cap_micros = 1000
soft_threshold_pct = 80
"#;

pub const X402: &str = r#"
[x402]
network = "eip155:84532"
asset = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
pay_to = "0x000000000000000000000000000000000000dEaD"
max_timeout_seconds = 60
extra = { name = "USDC", version = "2" }
"#;

pub struct TestServer {
    pub base: String,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub running: Option<Running>,
    _dir: tempfile::TempDir,
}

pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// The `hold_id` of a hold's receipt.
    pub fn hold_id(&self) -> &str {
        self.body["hold_id"].as_str().unwrap_or_else(|| {
            panic!("no hold_id in {} {}", self.status, self.text);
        })
    }

    /// Asserts a problem answer: status, content type and `type`.
    pub fn assert_problem(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "{}",
            self.text
        );
        assert_eq!(
            self.body["type"],
            format!("urn:tally:problem:{kind}"),
            "{}",
            self.text
        );
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
    }
}

pub fn config(extra: &str) -> Config {
    let mut cfg = Config::from_toml(&format!("{PLANS}\n{extra}"), "test").expect("test config");
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.proxy.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.tokens = vec![
        TokenHash::of_token("a", Role::Admin, ADMIN),
        TokenHash::of_token("s", Role::Service, SERVICE),
        TokenHash::of_token("r", Role::Reader, READER),
    ];
    cfg
}

/// `cfg` started by `tally_server::start` on port 0, over a temporary data dir (kept as
/// long as the returned one), ready, on any clock: for the rare test whose server must
/// read another clock than a `TestServer`'s `ManualClock` (tokio's paused time, say).
pub async fn start_on_clock(
    mut cfg: Config,
    clock: Arc<dyn tally_store::Clock>,
) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.data_dir = dir.path().to_path_buf();
    let mut running = tally_server::start(cfg, clock).await.expect("start");
    running.ready().await.expect("ready");
    (running, dir)
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(config("")).await
    }

    pub async fn start_with(cfg: Config) -> Self {
        let clock = Arc::new(ManualClock::new(T0_MS));
        let (running, dir) = start_on_clock(cfg, clock.clone()).await;
        Self {
            base: format!("http://{}", running.addr),
            clock,
            http: reqwest::Client::new(),
            running: Some(running),
            _dir: dir,
        }
    }

    /// The router of `cfg` served on port 0 over an engine opened on `storage` (a test
    /// wrapper that can fail or stall). No `Running`: the returned engine is the test's to
    /// shut down.
    pub async fn start_over(
        mut cfg: Config,
        storage: impl FnOnce(&std::path::Path) -> Arc<dyn tally_store::Storage>,
    ) -> (Self, tally_store::Engine) {
        let dir = tempfile::tempdir().expect("tempdir");
        cfg.data_dir = dir.path().to_path_buf();
        let storage = storage(dir.path());
        let clock = Arc::new(ManualClock::new(T0_MS));
        let (engine_config, plans, engine_clock) =
            (cfg.engine_config(), cfg.plans.clone(), clock.clone());
        let engine = tokio::task::spawn_blocking(move || {
            tally_store::Engine::open_with(storage, engine_config, plans, engine_clock, None)
        })
        .await
        .expect("opener")
        .expect("engine opens");
        let s = Self::serve_router(&cfg, dir, clock, Some(engine.clone())).await;
        (s, engine)
    }

    /// The router of `cfg` served on port 0 with no engine: what a client sees while the
    /// engine recovers at start-up.
    pub async fn start_without_engine(mut cfg: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        cfg.data_dir = dir.path().to_path_buf();
        let clock = Arc::new(ManualClock::new(T0_MS));
        Self::serve_router(&cfg, dir, clock, None).await
    }

    async fn serve_router(
        cfg: &Config,
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        engine: Option<tally_store::Engine>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let metrics = tally_server::metrics::Metrics::new().expect("metrics");
        let state = tally_server::AppState::new(cfg, clock.clone(), metrics, base.clone());
        if let Some(engine) = engine {
            state.set_engine(engine);
        }
        let app = tally_server::router(state);
        tokio::spawn(tally_server::serve::serve(
            listener,
            app,
            std::future::pending(),
        ));
        Self {
            base,
            clock,
            http: reqwest::Client::new(),
            running: None,
            _dir: dir,
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    /// Sends `request` as the raw bytes of one HTTP/1.1 request on a new TCP connection
    /// (it should say `connection: close`) and reads the answer to the end. A failed
    /// write or read is answered as status 0 with the error as its text.
    pub async fn raw_tcp(&self, request: &[u8]) -> Resp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.running.as_ref().expect("running").addr;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let written = stream.write_all(request).await;
        let mut bytes = Vec::new();
        let read = stream.read_to_end(&mut bytes).await;
        let failed = |e: std::io::Error| Resp {
            status: 0,
            headers: HeaderMap::new(),
            body: Value::Null,
            text: format!("{e} (answer so far: {:?})", String::from_utf8_lossy(&bytes)),
        };
        if let Err(e) = read {
            return failed(e);
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return failed(written.err().unwrap_or_else(|| {
                std::io::Error::other(format!("no complete answer: {text:?}"))
            }));
        };
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut headers = HeaderMap::new();
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if let (Ok(n), Ok(v)) = (
                    reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(value.trim()),
                ) {
                    headers.append(n, v);
                }
            }
        }
        Resp {
            status,
            headers,
            body: serde_json::from_str(body).unwrap_or(Value::Null),
            text: body.to_owned(),
        }
    }

    /// `path` on the metering proxy's listener (the config must have routes).
    pub fn proxy_url(&self, path: &str) -> String {
        let addr = self
            .running
            .as_ref()
            .and_then(|r| r.proxy_addr)
            .expect("the proxy listens: the config has [[routes]]");
        format!("http://{addr}{path}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A JSON request with a token and (when `key` is set) an Idempotency-Key.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Resp {
        self.call("POST", path, ADMIN, Some(key), Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, READER, None, None).await
    }

    /// Creates an agent on `plan` and credits it with `credit_micros` (if non-zero).
    pub async fn agent(&self, id: &str, plan: &str, credit_micros: u64) {
        let r = self
            .post(
                "/v1/agents",
                &format!("create-{id}"),
                serde_json::json!({"id": id, "plan": plan}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        if credit_micros > 0 {
            let r = self
                .credit(id, &format!("credit-{id}"), credit_micros)
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
        }
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Shuts the server down cleanly, keeping its data directory for a `restart`.
    pub async fn shut_down(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }

    /// Shuts the server down cleanly (when running) and starts it again on the same data
    /// dir with `cfg`.
    pub async fn restart(&mut self, mut cfg: Config) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
        cfg.data_dir = self._dir.path().to_path_buf();
        let mut running = tally_server::start(cfg, self.clock.clone())
            .await
            .expect("restart");
        running.ready().await.expect("ready");
        self.base = format!("http://{}", running.addr);
        self.running = Some(running);
    }

    /// Issues an API key for `agent`; returns the whole key and its prefix.
    pub async fn issue_key(&self, agent: &str, idem: &str) -> (String, String) {
        let r = self
            .call(
                "POST",
                &format!("/v1/agents/{agent}/keys"),
                SERVICE,
                Some(idem),
                Some(serde_json::json!({"name": idem})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let key = r.body["key"]
            .as_str()
            .expect("the key, shown once")
            .to_owned();
        let prefix = r.body["prefix"].as_str().expect("prefix").to_owned();
        (key, prefix)
    }

    /// Forward-auth as a gateway calls it: the agent key, the original method and URI,
    /// and (when set) an Idempotency-Key; `query` is appended to `/v1/authorize`.
    pub async fn authorize(
        &self,
        agent_key: &str,
        method: &str,
        uri: &str,
        idem: Option<&str>,
        query: &str,
    ) -> Resp {
        let mut req = self
            .http
            .get(self.url(&format!("/v1/authorize{query}")))
            .bearer_auth(agent_key)
            .header("X-Forwarded-Method", method)
            .header("X-Forwarded-Uri", uri);
        if let Some(k) = idem {
            req = req.header("Idempotency-Key", k);
        }
        self.send(req).await
    }

    /// The agent's balance.
    pub async fn balance(&self, agent: &str) -> u64 {
        self.agent_state(agent).await["balance_micros"]
            .as_u64()
            .expect("balance")
    }

    // ---- the API's vocabulary: one call a route, made with the role that route asks for
    // (credits and refunds: admin; spends: service), so that a test reads as the rule it
    // proves. A test about roles, headers or raw bodies uses `call` or `send` instead.

    /// `POST /v1/agents/{agent}/debits` of `amount_micros`, as the service.
    pub async fn debit(&self, agent: &str, key: &str, amount_micros: u64) -> Resp {
        self.send(self.debit_request(agent, key, amount_micros))
            .await
    }

    /// The request of [`Self::debit`], for a test that adds to it (a timeout, say).
    pub fn debit_request(
        &self,
        agent: &str,
        key: &str,
        amount_micros: u64,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(&format!("/v1/agents/{agent}/debits")))
            .bearer_auth(SERVICE)
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({ "amount_micros": amount_micros }))
    }

    /// A debit of `amount_micros` sent with `token` and, if given, `key`: for the tests
    /// of roles and of the Idempotency-Key.
    pub async fn debit_as(
        &self,
        token: &str,
        agent: &str,
        key: Option<&str>,
        amount_micros: u64,
    ) -> Resp {
        let path = format!("/v1/agents/{agent}/debits");
        let body = serde_json::json!({ "amount_micros": amount_micros });
        self.call("POST", &path, token, key, Some(body)).await
    }

    /// A debit with any body (`task_type`, `priority`, `metadata`), as the service.
    pub async fn debit_with(&self, agent: &str, key: &str, body: Value) -> Resp {
        let path = format!("/v1/agents/{agent}/debits");
        self.call("POST", &path, SERVICE, Some(key), Some(body))
            .await
    }

    /// `POST /v1/agents/{agent}/credits` of `amount_micros`, as an admin.
    pub async fn credit(&self, agent: &str, key: &str, amount_micros: u64) -> Resp {
        let body = serde_json::json!({ "amount_micros": amount_micros });
        self.post(&format!("/v1/agents/{agent}/credits"), key, body)
            .await
    }

    /// `PATCH /v1/agents/{agent}` with `body` (`plan`, `status`), as an admin.
    pub async fn patch_agent(&self, agent: &str, key: &str, body: Value) -> Resp {
        let path = format!("/v1/agents/{agent}");
        self.call("PATCH", &path, ADMIN, Some(key), Some(body))
            .await
    }

    /// `POST /v1/agents/{agent}/check` of `amount_micros` (no key: it changes nothing).
    pub async fn check(&self, agent: &str, amount_micros: u64) -> Resp {
        let path = format!("/v1/agents/{agent}/check");
        let body = serde_json::json!({ "amount_micros": amount_micros });
        self.call("POST", &path, SERVICE, None, Some(body)).await
    }

    /// `POST /v1/agents/{agent}/holds` of `amount_micros` for `ttl_ms`, as the service.
    pub async fn hold(&self, agent: &str, key: &str, amount_micros: u64, ttl_ms: u64) -> Resp {
        let path = format!("/v1/agents/{agent}/holds");
        let body = serde_json::json!({ "amount_micros": amount_micros, "ttl_ms": ttl_ms });
        self.call("POST", &path, SERVICE, Some(key), Some(body))
            .await
    }

    /// `POST /v1/holds/{hold_id}/capture` of `amount_micros`, as the service.
    pub async fn capture(&self, hold_id: &str, key: &str, amount_micros: u64) -> Resp {
        let path = format!("/v1/holds/{hold_id}/capture");
        let body = serde_json::json!({ "amount_micros": amount_micros });
        self.call("POST", &path, SERVICE, Some(key), Some(body))
            .await
    }

    /// `POST /v1/holds/{hold_id}/void` (no body), as the service.
    pub async fn void(&self, hold_id: &str, key: &str) -> Resp {
        let path = format!("/v1/holds/{hold_id}/void");
        self.call("POST", &path, SERVICE, Some(key), None).await
    }

    /// `POST /v1/agents/{agent}/refunds` of `amount_micros` of the debit at `debit_seq`,
    /// as an admin.
    pub async fn refund(&self, agent: &str, key: &str, debit_seq: u64, amount_micros: u64) -> Resp {
        let body = serde_json::json!({ "debit_seq": debit_seq, "amount_micros": amount_micros });
        self.post(&format!("/v1/agents/{agent}/refunds"), key, body)
            .await
    }

    /// `POST /v1/receipts/{receipt}/refund` of `amount_micros`, or with no body (all of
    /// the debit), as the service.
    pub async fn refund_receipt(
        &self,
        receipt: &str,
        key: &str,
        amount_micros: Option<u64>,
    ) -> Resp {
        let path = format!("/v1/receipts/{receipt}/refund");
        let body = amount_micros.map(|a| serde_json::json!({ "amount_micros": a }));
        self.call("POST", &path, SERVICE, Some(key), body).await
    }

    /// `DELETE /v1/agents/{agent}/keys/{prefix}`: revokes an agent key, as the service.
    pub async fn revoke_key(&self, agent: &str, prefix: &str, key: &str) -> Resp {
        let path = format!("/v1/agents/{agent}/keys/{prefix}");
        self.call("DELETE", &path, SERVICE, Some(key), None).await
    }

    /// The agent as `GET /v1/agents/{agent}` shows it (a 200, or the test fails).
    pub async fn agent_state(&self, agent: &str) -> Value {
        let r = self.get(&format!("/v1/agents/{agent}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body
    }

    /// Every journal entry of the agent, oldest first: one page of at most 1,000 (the
    /// test fails if there are more).
    pub async fn journal(&self, agent: &str) -> Vec<Value> {
        let r = self
            .get(&format!("/v1/agents/{agent}/journal?after=0&limit=1000"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.body["next_after"].is_null(), "one page holds every entry");
        r.body["entries"].as_array().expect("entries").clone()
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let r = self.send(self.http.get(self.url("/metrics"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.text
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }
}
pub mod process;
pub mod x402;
