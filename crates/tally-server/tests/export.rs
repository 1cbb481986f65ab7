//! `tally export`, the real binary, against a local CloudEvents receiver on port 0 that
//! fails now and then: every event of the feed arrives at least once as a valid CloudEvent;
//! a killed export resumes from its cursor file re-sending at most the batch in flight; a
//! permanent 4xx stops it with the cursor where it was; SIGTERM exits 0.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::Value;
use tokio::sync::Notify;

/// The longest any step of these tests waits (for the feed, a delivery, an exit).
const STEP_WAIT: Duration = Duration::from_secs(60);

/// How the receiver answers its n-th request (from 1).
#[derive(Clone, Copy)]
enum Mode {
    /// Mostly 200; now and then a 500 after storing the batch (the ack is lost), a 503,
    /// or a 429 with `Retry-After: 0`.
    Flaky,
    /// 200 to the first `n - 1` requests; the n-th is stored and never answered.
    HangAt(u64),
    /// 200 to the first `n - 1` requests, then 400 to every one.
    BadRequestFrom(u64),
}

#[derive(Default)]
struct Received {
    requests: u64,
    /// Every batch that reached the receiver, with whether it was answered 2xx.
    batches: Vec<(Vec<Value>, bool)>,
    content_types: BTreeSet<String>,
    authorizations: BTreeSet<String>,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Received>>,
    changed: Arc<Notify>,
}

async fn ingest(State(rx): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let batch: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array");
    let mode = *rx.mode.lock().expect("mode");
    let n = {
        let mut got = rx.got.lock().expect("got");
        got.requests += 1;
        let ct = headers
            .get("content-type")
            .map(|v| v.to_str().expect("ascii"));
        got.content_types.insert(ct.unwrap_or("").to_owned());
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().expect("ascii"));
        got.authorizations.insert(auth.unwrap_or("").to_owned());
        got.requests
    };
    let answer = match mode {
        Mode::Flaky if n % 7 == 3 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Mode::Flaky if n % 7 == 5 => (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response(),
        Mode::Flaky if n % 11 == 0 => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")]).into_response()
        }
        Mode::HangAt(at) if n >= at => {
            rx.got.lock().expect("got").batches.push((batch, false));
            rx.changed.notify_waiters();
            return std::future::pending().await;
        }
        Mode::BadRequestFrom(from) if n >= from => {
            (StatusCode::BAD_REQUEST, "no such meter").into_response()
        }
        _ => StatusCode::ACCEPTED.into_response(),
    };
    // A 500 here stands for a receiver that stored the batch and then failed to answer.
    let status = answer.status();
    let stored = status.is_success() || status == StatusCode::INTERNAL_SERVER_ERROR;
    if stored {
        rx.got
            .lock()
            .expect("got")
            .batches
            .push((batch, status.is_success()));
    }
    rx.changed.notify_waiters();
    answer
}

impl Receiver {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let rx = Receiver {
            url: format!(
                "http://{}/api/v1/events",
                listener.local_addr().expect("addr")
            ),
            mode: Arc::new(Mutex::new(mode)),
            got: Arc::new(Mutex::new(Received::default())),
            changed: Arc::new(Notify::new()),
        };
        let app = axum::Router::new()
            .route("/api/v1/events", axum::routing::post(ingest))
            .with_state(rx.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        rx
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().expect("mode") = mode;
    }

    /// Every event that reached the receiver (stored), in arrival order.
    fn events(&self) -> Vec<Value> {
        let got = self.got.lock().expect("got");
        got.batches.iter().flat_map(|(b, _)| b.clone()).collect()
    }

    fn ids(&self) -> BTreeSet<String> {
        self.events().iter().map(id_of).collect()
    }

    fn requests(&self) -> u64 {
        self.got.lock().expect("got").requests
    }

    /// Waits until `done` holds of what was received.
    async fn wait_for(&self, what: &str, done: impl Fn(&Receiver) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(STEP_WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }
}

fn id_of(e: &Value) -> String {
    e["id"].as_str().expect("id").to_owned()
}

/// Agents `a00..a{agents}`, each created, credited and debited `debits` times (some with a
/// task type and metadata).
async fn populate(s: &TestServer, agents: usize, debits: usize) {
    for a in 0..agents {
        let agent = format!("a{a:02}");
        s.agent(&agent, "default", 1_000_000).await;
        for d in 0..debits {
            let key = format!("{agent}-d{d}");
            let body = serde_json::json!({
                "amount_micros": 10 + d as u64,
                "task_type": "llm",
                "metadata": {"model": "m1"},
            });
            let r = s.debit_with(&agent, &key, body).await;
            assert_eq!(r.status, 201, "{}", r.text);
        }
    }
}

/// The whole feed (waiting until it holds at least `count` events) read in pages of
/// `limit`: the events and the cursor after each page.
async fn feed(s: &TestServer, count: usize, limit: usize) -> (Vec<Value>, Vec<String>) {
    let read = async {
        loop {
            let (mut events, mut cursors, mut cursor) = (Vec::new(), Vec::new(), String::new());
            loop {
                let r = s
                    .get(&format!("/v1/events?after={cursor}&limit={limit}"))
                    .await;
                assert_eq!(r.status, 200, "{}", r.text);
                let page = r.body["events"].as_array().expect("events").clone();
                cursor = r.body["next_cursor"].as_str().expect("cursor").to_owned();
                if page.is_empty() {
                    break;
                }
                events.extend(page);
                cursors.push(cursor.clone());
            }
            if events.len() >= count {
                return (events, cursors);
            }
            // The feed shows what the indexer has moved to sled: poll until it has.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(STEP_WAIT, read)
        .await
        .expect("the feed catches up")
}

/// The CloudEvent id of each feed entry.
fn feed_ids(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| format!("{}:{}", e["agent_id"].as_str().expect("agent"), e["seq"]))
        .collect()
}

/// `tally export` from `s` to `rx`, with `extra` arguments.
fn export(
    s: &TestServer,
    rx: &Receiver,
    cursor_file: &Path,
    extra: &[&str],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.arg("export")
        .args([
            "--from",
            &s.base,
            "--to",
            &rx.url,
            "--source",
            "tally://test",
        ])
        .arg("--cursor-file")
        .arg(cursor_file)
        .args(extra)
        .env("TALLY_TOKEN", READER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs an export to its end: exit success and stderr.
async fn export_to_end(mut cmd: tokio::process::Command) -> (bool, String) {
    let out = tokio::time::timeout(STEP_WAIT, cmd.output())
        .await
        .expect("the export ends")
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cursor_in(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("cursor file")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_a_flaky_receiver_as_a_cloud_event() {
    let s = TestServer::start().await;
    populate(&s, 20, 13).await; // 20 x (create, credit, 13 debits) = 300 events
    let (events, _) = feed(&s, 300, 1_000).await;
    assert_eq!(events.len(), 300);
    let rx = Receiver::start(Mode::Flaky).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cursor_file = dir.path().join("cursor");

    let (ok, stderr) = export_to_end(export(
        &s,
        &rx,
        &cursor_file,
        &[
            "--once",
            "--batch",
            "7",
            "--ingest-header",
            "Authorization: Bearer ingest-secret",
        ],
    ))
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(
        rx.ids(),
        feed_ids(&events),
        "every event at least once, nothing else"
    );
    assert!(
        stderr.contains("retry"),
        "the receiver failed now and then: {stderr}"
    );
    assert!(
        stderr.contains("done: 300 events in 43 batches"),
        "{stderr}"
    );
    assert_eq!(
        rx.got.lock().expect("got").content_types,
        BTreeSet::from(["application/cloudevents-batch+json".to_owned()])
    );
    assert_eq!(
        rx.got.lock().expect("got").authorizations,
        BTreeSet::from(["Bearer ingest-secret".to_owned()]),
        "--ingest-header on every request"
    );

    // Each delivery is a valid CloudEvent carrying its entry.
    let by_id: BTreeMap<String, &Value> = events
        .iter()
        .map(|e| {
            (
                format!("{}:{}", e["agent_id"].as_str().expect("agent"), e["seq"]),
                e,
            )
        })
        .collect();
    for ce in rx.events() {
        let entry = by_id[&id_of(&ce)];
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["source"], "tally://test");
        assert_eq!(ce["subject"], entry["agent_id"]);
        assert_eq!(
            ce["type"],
            format!("dev.tally.{}", entry["kind"].as_str().expect("kind"))
        );
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["time"], entry["at"]);
        let time = ce["time"].as_str().expect("time");
        chrono::DateTime::parse_from_rfc3339(time).expect("time is RFC 3339");
        assert_eq!(&ce["data"], entry, "data is the feed entry");
    }
    let debit = rx
        .events()
        .into_iter()
        .find(|e| e["type"] == "dev.tally.debit")
        .expect("a debit");
    assert_eq!(debit["data"]["task_type"], "llm");
    assert_eq!(debit["data"]["metadata"]["model"], "m1");
    assert!(debit["data"]["period"].is_string());

    // Caught up: another run sends nothing.
    let requests = rx.requests();
    let (ok, stderr) = export_to_end(export(&s, &rx, &cursor_file, &["--once"])).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        rx.requests(),
        requests,
        "nothing new, nothing sent: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_export_resumes_from_its_cursor_file_resending_only_the_batch_in_flight() {
    let s = TestServer::start().await;
    populate(&s, 20, 3).await; // 100 events
    let (events, cursors) = feed(&s, 100, 10).await;
    let rx = Receiver::start(Mode::HangAt(4)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cursor_file = dir.path().join("cursor");

    let mut first = export(&s, &rx, &cursor_file, &["--follow", "--batch", "10"])
        .spawn()
        .expect("spawn export");
    rx.wait_for("the 4th batch", |rx| rx.requests() >= 4).await;
    first.kill().await.expect("SIGKILL");
    assert_eq!(
        cursor_in(&cursor_file),
        cursors[2],
        "the cursor is after the 3 acknowledged batches, not the one in flight"
    );
    let before: Vec<Value> = rx.events();
    assert_eq!(
        before.len(),
        40,
        "3 delivered batches and the one in flight"
    );
    let in_flight: BTreeSet<String> = before[30..].iter().map(id_of).collect();

    // More events while no export runs, then an export with the same cursor file.
    for a in 0..5 {
        let r = s.debit(&format!("a{a:02}"), "after-kill", 1).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let (events_now, _) = feed(&s, 105, 1_000).await;
    assert_eq!(events_now[..100], events[..]);
    rx.set_mode(Mode::Flaky);
    let first_run_requests = rx.got.lock().expect("got").batches.len();
    let mut second = export(&s, &rx, &cursor_file, &["--follow", "--batch", "10"])
        .spawn()
        .expect("spawn export");
    let all = feed_ids(&events_now);
    rx.wait_for("every event", |rx| rx.ids() == all).await;

    let again: BTreeSet<String> = {
        let got = rx.got.lock().expect("got");
        got.batches[first_run_requests..]
            .iter()
            .flat_map(|(b, _)| b.iter().map(id_of))
            .collect()
    };
    let before: BTreeSet<String> = before.iter().map(id_of).collect();
    let resent: BTreeSet<String> = again.intersection(&before).cloned().collect();
    assert!(
        resent.is_subset(&in_flight),
        "only the batch in flight is sent again: {resent:?}"
    );
    assert_eq!(resent, in_flight, "and it is: it was never acknowledged");

    // SIGTERM: exit 0, the cursor at the end of what was delivered.
    let pid = second.id().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(STEP_WAIT, second.wait())
        .await
        .expect("exits on SIGTERM")
        .expect("waited");
    assert!(status.success(), "{status:?}");
    let (_, cursors_now) = feed(&s, 105, 1_000).await;
    assert_eq!(
        cursor_in(&cursor_file),
        cursors_now[0],
        "at the end of the feed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_400_stops_the_export_with_the_cursor_unchanged() {
    let s = TestServer::start().await;
    populate(&s, 5, 4).await; // 30 events
    let (_, cursors) = feed(&s, 30, 10).await;
    let rx = Receiver::start(Mode::BadRequestFrom(3)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cursor_file = dir.path().join("cursor");

    let (ok, stderr) =
        export_to_end(export(&s, &rx, &cursor_file, &["--once", "--batch", "10"])).await;
    assert!(!ok, "a 400 is not success: {stderr}");
    assert!(
        stderr.contains("400 Bad Request: no such meter"),
        "{stderr}"
    );
    assert_eq!(rx.requests(), 3, "a 400 is not retried");
    assert_eq!(
        cursor_in(&cursor_file),
        cursors[1],
        "after the 2 delivered batches"
    );

    // Fixed receiver: the run goes on from there.
    rx.set_mode(Mode::Flaky);
    let (ok, stderr) =
        export_to_end(export(&s, &rx, &cursor_file, &["--once", "--batch", "10"])).await;
    assert!(ok, "{stderr}");
    assert_eq!(cursor_in(&cursor_file), cursors[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sizes_are_1_to_the_page_limit_and_a_bad_token_stops_at_once() {
    let s = TestServer::start().await;
    populate(&s, 1, 0).await; // 2 events
    feed(&s, 2, 1_000).await;
    let rx = Receiver::start(Mode::Flaky).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cursor_file = dir.path().join("cursor");
    for bad in ["0", "1001"] {
        let (ok, stderr) =
            export_to_end(export(&s, &rx, &cursor_file, &["--once", "--batch", bad])).await;
        assert!(!ok && stderr.contains("--batch"), "{bad}: {stderr}");
    }
    assert_eq!(rx.requests(), 0);
    let (ok, stderr) = export_to_end(export(
        &s,
        &rx,
        &cursor_file,
        &["--once", "--batch", "1000"],
    ))
    .await;
    assert!(ok, "exactly the maximum: {stderr}");
    assert_eq!(rx.ids().len(), 2);

    // The feed refuses the token: permanent, no retry loop, nothing sent, cursor kept.
    let cursor = cursor_in(&cursor_file);
    let mut cmd = export(&s, &rx, &cursor_file, &["--once"]);
    cmd.env("TALLY_TOKEN", "not-a-token");
    let (ok, stderr) = export_to_end(cmd).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("retry"), "{stderr}");
    assert_eq!(cursor_in(&cursor_file), cursor);
}
