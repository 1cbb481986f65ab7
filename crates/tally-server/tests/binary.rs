//! Tests of the built `tally` binary as a process: SIGKILL under load and restart (every
//! acknowledged debit is there, once), SIGTERM exits 0, the first-start admin token.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::spawn;
use serde_json::{json, Value};

const TOKEN: &str = "kill-test-admin-token";
/// Debits acknowledged before the SIGKILL, and the time allowed to reach them.
const ACKS_BEFORE_KILL: usize = 300;
const ACKS_DEADLINE: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    key: &str,
    body: Value,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
}

async fn journal(http: &reqwest::Client, base: &str, agent: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let page: Value = http
            .get(format!(
                "{base}/v1/agents/{agent}/journal?after={after}&limit=1000"
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("journal")
            .json()
            .await
            .expect("json");
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        all.extend(entries);
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_debit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = spawn(dir.path(), Some(TOKEN));
    let http = client();
    let base = p.base.clone();
    assert_eq!(
        post(&http, &base, "/v1/agents", "create", json!({"id": "k1"}))
            .await
            .expect("create")
            .status(),
        201
    );
    let credit = 1_000_000_000u64;
    assert_eq!(
        post(
            &http,
            &base,
            "/v1/agents/k1/credits",
            "credit",
            json!({"amount_micros": credit})
        )
        .await
        .expect("credit")
        .status(),
        201
    );

    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (http, base, acked, stop) = (http.clone(), base.clone(), acked.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{n}");
                let amount = 1_000 + w;
                match post(
                    &http,
                    &base,
                    "/v1/agents/k1/debits",
                    &key,
                    json!({"amount_micros": amount}),
                )
                .await
                {
                    Ok(r) if r.status() == 201 => acked.lock().expect("lock").push((key, amount)),
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return, // the server died mid-request: not acknowledged
                }
                n += 1;
            }
        }));
    }
    // A dead server or worker must fail the test, not hang it.
    let deadline = std::time::Instant::now() + ACKS_DEADLINE;
    while acked.lock().expect("lock").len() < ACKS_BEFORE_KILL {
        let n = acked.lock().expect("lock").len();
        let all_stopped = workers.iter().all(|w| w.is_finished());
        if all_stopped || std::time::Instant::now() >= deadline {
            let server = p.child.try_wait();
            let _ = p.child.kill();
            let _ = p.child.wait();
            let mut ended = Vec::new();
            for w in workers {
                w.abort(); // a finished worker keeps its result; a stuck one is cancelled
                ended.push(w.await);
            }
            panic!(
                "only {n} of {ACKS_BEFORE_KILL} debits acknowledged (all workers stopped: \
                 {all_stopped}, deadline {ACKS_DEADLINE:?}); server before the kill: \
                 {server:?}; workers: {ended:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.child.kill().expect("SIGKILL");
    p.child.wait().expect("reaped");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let acked = acked.lock().expect("lock").clone();

    let mut p2 = spawn(dir.path(), Some(TOKEN));
    let entries = journal(&http, &p2.base, "k1").await;
    let mut debits: HashMap<String, u64> = HashMap::new();
    let mut sum = 0u64;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "journal sequences are dense"
        );
        if e["kind"] == "debit" {
            let key = e["idempotency_key"].as_str().expect("keyed").to_owned();
            let amount = e["amount_micros"].as_u64().expect("amount");
            assert!(
                debits.insert(key.clone(), amount).is_none(),
                "{key} applied twice"
            );
            sum += amount;
        }
    }
    for (key, amount) in &acked {
        assert_eq!(
            debits.get(key),
            Some(amount),
            "acknowledged debit {key} lost"
        );
    }
    assert!(debits.len() >= acked.len());
    let agent: Value = http
        .get(format!("{}/v1/agents/k1", p2.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("agent")
        .json()
        .await
        .expect("json");
    assert_eq!(agent["balance_micros"].as_u64(), Some(credit - sum));
    assert_eq!(agent["debited_total_micros"].as_u64(), Some(sum));
    assert_eq!(agent["version"].as_u64(), Some(entries.len() as u64));
    // A retried acknowledged key replays; it does not debit again.
    let (key, amount) = &acked[0];
    let r = post(
        &http,
        &p2.base,
        "/v1/agents/k1/debits",
        key,
        json!({"amount_micros": amount}),
    )
    .await
    .expect("replay");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    p2.child.kill().expect("kill");
    p2.child.wait().expect("reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_prints_an_admin_token_once_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = spawn(dir.path(), None);
    let token = p
        .preamble
        .iter()
        .find_map(|l| {
            l.rsplit_once(": ")
                .filter(|_| l.contains("admin token"))
                .map(|(_, t)| t.to_owned())
        })
        .expect("a token line before the listening line");
    assert_eq!(token.len(), 64);
    let file = dir.path().join("admin-token.sha256");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).expect("file").permissions().mode() & 0o777,
            0o600
        );
    }
    assert_eq!(
        std::fs::read_to_string(&file).expect("read").trim(),
        tally_server::auth::token_sha256_hex(&token)
    );
    let http = client();
    let ok = http
        .get(format!("{}/v1/agents", p.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    assert_eq!(ok.status(), 200);
    let r = http
        .post(format!("{}/v1/agents", p.base))
        .bearer_auth(&token)
        .header("Idempotency-Key", "c")
        .json(&json!({"id": "t1"}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(p.child.id().to_string())
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = p.child.wait().expect("wait");
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");

    let mut again = spawn(dir.path(), None);
    assert!(
        again.preamble.is_empty(),
        "no new token on later starts: {:?}",
        again.preamble
    );
    let agent = http
        .get(format!("{}/v1/agents/t1", again.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(
        agent.status(),
        200,
        "the same token still works and the agent survived"
    );
    again.child.kill().expect("kill");
    again.child.wait().expect("reaped");
}

#[test]
fn a_bad_config_names_the_key_and_line_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tally.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nbody_bytes_maxx = 10\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("TALLY_DATA_DIR", dir.path().join("data"))
        .output()
        .expect("run tally");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("body_bytes_maxx") && err.contains("line 5"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout when it does not start"
    );
}

#[test]
fn loadtest_and_token_hash_are_wired() {
    let help = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["loadtest", "--help"])
        .output()
        .expect("run tally");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--spawn"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("token-hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"test\n").expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[tokio::test]
async fn an_empty_admin_token_file_left_by_a_crash_does_not_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // What a crash between creating the file and writing the hash left behind.
    let file = dir.path().join("admin-token.sha256");
    std::fs::write(&file, "").expect("write");
    let mut p = spawn(dir.path(), None);
    let token = p
        .preamble
        .iter()
        .find_map(|l| {
            l.rsplit_once(": ")
                .filter(|_| l.contains("admin token"))
                .map(|(_, t)| t.to_owned())
        })
        .expect("a new token line before the listening line");
    assert_eq!(
        std::fs::read_to_string(&file).expect("read").trim(),
        tally_server::auth::token_sha256_hex(&token)
    );
    let ok = client()
        .get(format!("{}/v1/agents", p.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    assert_eq!(ok.status(), 200);
    let _ = p.child.kill();
    let _ = p.child.wait();
}
