//! End to end through real gateways: a real Caddy (`forward_auth`) and a real nginx
//! (`auth_request`), each started from the config shipped in `config/gateways/` (its
//! example addresses replaced by this test's ports), in front of a small axum upstream on
//! port 0, with tally on port 0. Paid → 200 from the upstream; broke → 402 with the JSON
//! body (and `PAYMENT-REQUIRED`, x402 being configured); rate-limited → 429 with
//! `Retry-After`; the upstream never sees a refused call.
//!
//! Needs the `caddy` and `nginx` binaries (Debian packages; `.ci/run` and
//! `scripts/gateways-e2e.sh` install them). Without them each test prints SKIPPED and
//! passes, unless `CI=true`: then it fails. Everything binds 127.0.0.1 only, lives in a
//! temporary directory, and is killed by PID when the test ends, also on a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use common::*;
use serde_json::json;

const GATEWAY_EXAMPLE: &str = "127.0.0.1:8000";
const TALLY_EXAMPLE: &str = "127.0.0.1:8402";
const UPSTREAM_EXAMPLE: &str = "127.0.0.1:8080";

fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../config/gateways")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The binary, or a skip (a failure when `CI=true`).
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let reason = format!("no `{name}` binary (apt-get install -y {name})");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the {name} end-to-end test cannot run, and CI=true: {reason}");
        }
        eprintln!("SKIPPED {name} end-to-end test (it fails instead when CI=true): {reason}");
    }
    found
}

/// A gateway process; killed by its PID when dropped (also when a test panics).
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A free loopback port (bound, then released for the gateway to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn wait_for_port(port: u16, gw: &mut Gateway) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = gw.child.try_wait() {
            panic!("the gateway exited with {status}:\n{}", gw.log());
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never listened:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The API being sold: answers 200 with what it saw, and counts calls.
async fn upstream() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, uri: axum::http::Uri| {
        let hits = counted.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            axum::Json(json!({
                "upstream": "ok", "path": uri.path(),
                "agent": h("x-tally-agent"), "charged": h("x-tally-charged-micros"),
                "receipt": h("x-tally-receipt"),
            }))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits)
}

const ROUTES: &str = r#"
[[routes]]
name = "item"
methods = ["GET"]
path = "/items/{id}"
upstream = "http://127.0.0.1:9"
cost_micros = 400
margin_pct = 25
"#;

/// Paid, broke and rate-limited calls through the gateway at `port`.
async fn exercise(s: &TestServer, name: &str, port: u16, hits: &AtomicUsize) {
    let gw = format!("http://127.0.0.1:{port}");
    let call = |key: &str, idem: &str| {
        s.send(
            s.http
                .get(format!("{gw}/items/7"))
                .bearer_auth(key)
                .header("Idempotency-Key", idem),
        )
    };

    // Paid: the upstream answers, told who paid what.
    let paid = format!("{name}-paid");
    s.agent(&paid, "default", 1_000_000).await;
    let (key, _) = s.issue_key(&paid, "k").await;
    let r = call(&key, "p1").await;
    assert_eq!(r.status, 200, "{name}: {}", r.text);
    assert_eq!(r.body["upstream"], "ok", "{name}: {}", r.text);
    assert_eq!(r.body["agent"], paid.as_str());
    assert_eq!(r.body["charged"], "500", "400 × 1.25");
    assert!(r.body["receipt"]
        .as_str()
        .is_some_and(|x| x.starts_with(&paid)));
    // A retry with the same Idempotency-Key reaches the upstream but is charged once.
    assert_eq!(call(&key, "p1").await.status, 200);
    assert_eq!(s.balance(&paid).await, 1_000_000 - 500);

    // Broke: the 402 problem with its body and the x402 header; the upstream sees nothing.
    let before = hits.load(Ordering::SeqCst);
    let broke = format!("{name}-broke");
    s.agent(&broke, "default", 100).await;
    let (key, _) = s.issue_key(&broke, "k").await;
    let r = call(&key, "b1").await;
    assert_eq!(r.status, 402, "{name}: {}", r.text);
    assert_eq!(r.content_type(), "application/problem+json", "{name}");
    assert_eq!(
        r.body["type"], "urn:tally:problem:insufficient-funds",
        "{name}: {}",
        r.text
    );
    assert_eq!(r.body["required_micros"], 500);
    assert!(
        r.header("payment-required").is_some(),
        "{name}: {:?}",
        r.headers
    );

    // Rate-limited (2 a minute): the third call is a 429 with Retry-After.
    let busy = format!("{name}-busy");
    s.agent(&busy, "limited", 1_000_000).await;
    let (key, _) = s.issue_key(&busy, "k").await;
    for i in 0..2 {
        assert_eq!(call(&key, &format!("r{i}")).await.status, 200, "{name}");
    }
    let r = call(&key, "r2").await;
    assert_eq!(r.status, 429, "{name}: {}", r.text);
    assert_eq!(
        r.body["type"], "urn:tally:problem:rate-limited",
        "{name}: {}",
        r.text
    );
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(retry_after >= 1);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before + 2,
        "{name}: refused calls never reach the upstream"
    );

    // A bad key: 401, never a 5xx.
    let r = call("tk_abcdefgh_00", "x1").await;
    assert_eq!(r.status, 401, "{name}: {}", r.text);
}

async fn tally() -> TestServer {
    TestServer::start_with(config(&format!("{ROUTES}\n{X402}"))).await
}

fn ports(text: &str, gateway: u16, tally: &TestServer, upstream: u16) -> String {
    let tally_addr = tally.running.as_ref().expect("running").addr.to_string();
    text.replace(GATEWAY_EXAMPLE, &format!("127.0.0.1:{gateway}"))
        .replace(TALLY_EXAMPLE, &tally_addr)
        .replace(UPSTREAM_EXAMPLE, &format!("127.0.0.1:{upstream}"))
}

#[tokio::test]
async fn caddy_forward_auth_through_the_shipped_caddyfile() {
    let Some(caddy) = tool("caddy") else { return };
    let s = tally().await;
    let (up, hits) = upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let file = dir.path().join("Caddyfile");
    std::fs::write(&file, ports(&shipped("caddy.Caddyfile"), port, &s, up)).expect("write");
    let log = dir.path().join("caddy.log");
    let child = Command::new(caddy)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&file)
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env("XDG_DATA_HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn caddy");
    let mut gw = Gateway { child, log };
    wait_for_port(port, &mut gw).await;
    exercise(&s, "caddy", port, &hits).await;
    drop(gw);
    s.stop().await;
}

#[tokio::test]
async fn nginx_auth_request_through_the_shipped_config() {
    let Some(nginx) = tool("nginx") else { return };
    let s = tally().await;
    let (up, hits) = upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let port = free_port();
    let server = ports(&shipped("nginx.conf"), port, &s, up);
    // One process (no master/workers), so killing its PID stops all of it.
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         {server}\n}}\n"
    );
    let file = dir.path().join("nginx.conf");
    std::fs::write(&file, conf).expect("write");
    let log = dir.path().join("error.log");
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("log"))
        .spawn()
        .expect("spawn nginx");
    let mut gw = Gateway { child, log };
    wait_for_port(port, &mut gw).await;
    exercise(&s, "nginx", port, &hits).await;
    drop(gw);
    s.stop().await;
}
