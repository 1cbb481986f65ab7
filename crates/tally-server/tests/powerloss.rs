//! Power failures under the real `tally` binary, on LazyFS: a FUSE file system that keeps
//! written data in its own cache until the writer fsyncs it, and drops what was never
//! synced on command. It proves that a debit answered 201 survives losing power, and that
//! the recovery after one survives losing power again.
//!
//! Each round, concurrent keyed debits go to tally over HTTP for about a second; then the
//! power fails (SIGKILL, LazyFS drops every unsynced byte, unmount, mount) and tally
//! restarts on the same data directory. Round kinds, in turn:
//! - `kill`: one power failure under load;
//! - `kill-after-restart` (every other round): a second power failure the moment the
//!   restart is ready. Recovery has replayed the write-ahead log into sled and deleted its
//!   segments by then, so this fails when the WAL goes before sled's files are on disk by a
//!   real fsync;
//! - `torn-wal`: LazyFS tears the next write to the newest WAL segment (some parts reach
//!   the disk, the others never do) and crashes itself; debits keep coming (answered 500)
//!   until tally is killed.
//!
//! After every restart: each acknowledged debit is in its agent's journal exactly once, at
//! the seq it was acknowledged with; retrying it with the same key and body answers 201
//! `Idempotent-Replayed: true` with that seq; a debit sent but not acknowledged is applied
//! at most once; journal seqs are dense from 1; each balance is the journal's credits minus
//! its debits.
//!
//! Needs root, /dev/fuse and `../shared/tools/lazyfs/` beside the checkout (or
//! `LAZYFS_DIR`); the test builds LazyFS into `target/lazyfs` (its `build.sh` installs the
//! Debian packages it needs). Without them it prints SKIPPED and passes, unless `CI=true`:
//! then it fails. `POWERLOSS_ROUNDS` sets the rounds (default 20), `POWERLOSS_SEED` the
//! seed of the random choices (thread timing still differs). A long run:
//! `POWERLOSS_ROUNDS=200 cargo test -p tally-server --test powerloss -- --nocapture`

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const TOKEN: &str = "powerloss-admin-token";
const AGENTS: usize = 8;
const TASKS: usize = 16;
const CREDIT_MICROS: u64 = 1_000_000_000_000;
const DEBIT_MICROS_MAX: u64 = 1_000_000;
const ROUNDS_DEFAULT: u64 = 20;
/// Debits run this long before the power fails, at random in between.
const LOAD_MS_MIN: u64 = 500;
const LOAD_MS_MAX: u64 = 1_500;
/// Acknowledged debits of earlier rounds retried after a restart (all of this round's are).
const OLD_RETRIES_MAX: usize = 256;
const JOURNAL_PAGE_LIMIT: u32 = 1_000;
const BUILD_WAIT_S_MAX: u64 = 1_800;
const SCRIPT_WAIT_S_MAX: u64 = 60;
const READY_WAIT_S_MAX: u64 = 120;
const REQUEST_TIMEOUT_S: u64 = 10;
const TORN_CRASH_WAIT_S_MAX: u64 = 10;
/// The longest command LazyFS reads whole from its faults FIFO (one 100-byte read, whose
/// last byte it takes for the newline).
const FIFO_COMMAND_BYTES_MAX: usize = 99;
/// How much of each log a failure prints (all of it is copied to `target/powerloss/`).
const LOG_TAIL_BYTES: usize = 32 << 10;
/// LazyFS's cache, which it allocates at every mount (lazyfs.sh's default is 1gb). A round
/// writes well under 1 MiB between mounts; a full cache fails the test.
const LAZYFS_CACHE_DEFAULT: &str = "128mb";

fn agent_name(i: usize) -> String {
    format!("pl-agent-{i}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Kill,
    KillAfterRestart,
    TornWal,
}

impl Kind {
    /// Rounds count from 1: kill, kill-after-restart, torn-wal, kill-after-restart, ...
    fn of(round: u64) -> Self {
        match round % 4 {
            0 | 2 => Self::KillAfterRestart,
            3 => Self::TornWal,
            _ => Self::Kill,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::KillAfterRestart => "kill-after-restart",
            Self::TornWal => "torn-wal",
        }
    }
}

/// Runs `cmd` to its end, or kills it after `wait_max`; its stdout, or what went wrong.
fn run_bounded(mut cmd: Command, wait_max: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(wait_max) {
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            tail(&String::from_utf8_lossy(&out.stderr), 4 << 10)
        )),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Err(format!("{what} did not finish within {wait_max:?}"))
        }
    }
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut at = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn is_root() -> bool {
    // "Uid: real effective saved fs"
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// A process that has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit_once(')').map_or("", |(_, rest)| rest.trim_start());
        !(state.starts_with('Z') || state.starts_with('X'))
    })
}

/// The LazyFS scripts and a built binary, or why there are none.
struct Tools {
    script: PathBuf,
    lazyfs_bin: PathBuf,
}

fn tools() -> Result<Tools, String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse".into());
    }
    if !is_root() {
        return Err("not root (LazyFS's build installs packages; mounting needs root)".into());
    }
    let dir = std::env::var_os("LAZYFS_DIR").map_or_else(
        || workspace_dir().join("../shared/tools/lazyfs"),
        PathBuf::from,
    );
    let (script, build) = (dir.join("lazyfs.sh"), dir.join("build.sh"));
    if !script.is_file() || !build.is_file() {
        return Err(format!(
            "no lazyfs.sh and build.sh in {} (set LAZYFS_DIR)",
            dir.display()
        ));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&build).arg(workspace_dir().join("target/lazyfs"));
    let out = run_bounded(cmd, Duration::from_secs(BUILD_WAIT_S_MAX))
        .map_err(|e| format!("building LazyFS: {e}"))?;
    let lazyfs_bin = PathBuf::from(out.lines().last().unwrap_or_default().trim());
    if !lazyfs_bin.is_file() {
        return Err(format!("build.sh printed no LazyFS binary: {out}"));
    }
    Ok(Tools { script, lazyfs_bin })
}

/// Passes with a reason, or fails in CI, where a missing tool must not look like a pass.
fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the power-failure test cannot run, and CI=true: {reason}");
    }
    eprintln!("SKIPPED powerloss (it fails instead when CI=true): {reason}");
}

/// LazyFS and tally as this test started them. Dropping it, also in a panic, kills tally,
/// unmounts, stops LazyFS and then removes the temporary directory.
struct Rig {
    tools: Tools,
    root: PathBuf,
    mnt: PathBuf,
    lazyfs_pid: Option<u32>,
    tally: Option<Child>,
    tally_stderr: PathBuf,
    /// The logs of earlier mounts (each mount starts its log afresh).
    lazyfs_logs: PathBuf,
    tmp: tempfile::TempDir,
}

impl Rig {
    fn new(tools: Tools) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        // The path LazyFS's `subdir` module is given, as lazyfs.sh spells it; its faults
        // name files by that path.
        let dir = tmp.path().canonicalize().expect("canonical tempdir");
        Self {
            tools,
            // Short names: a torn-op command names a WAL file under `root` and must fit in
            // LazyFS's FIFO read.
            root: dir.join("r"),
            mnt: dir.join("m"),
            lazyfs_pid: None,
            tally: None,
            tally_stderr: dir.join("tally.stderr"),
            lazyfs_logs: dir.join("lazyfs-earlier.log"),
            tmp,
        }
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}{suffix}", self.mnt.display()))
    }

    fn script(&self, args: &[&OsStr]) -> Result<String, String> {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.tools.script)
            .args(args)
            .env("LAZYFS_BIN", &self.tools.lazyfs_bin);
        if std::env::var_os("LAZYFS_CACHE").is_none() {
            cmd.env("LAZYFS_CACHE", LAZYFS_CACHE_DEFAULT);
        }
        run_bounded(cmd, Duration::from_secs(SCRIPT_WAIT_S_MAX))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.sibling(".lazyfs.log")).unwrap_or_default()
    }

    fn mounted(&self) -> bool {
        let needle = format!(" {} ", self.mnt.display());
        fs::read_to_string("/proc/mounts").is_ok_and(|m| m.contains(&needle))
    }

    fn up(&mut self) -> Result<(), String> {
        let out = self.script(&["up".as_ref(), self.root.as_ref(), self.mnt.as_ref()])?;
        let pid = out
            .trim()
            .parse()
            .map_err(|_| format!("lazyfs.sh up: {out}"))?;
        self.lazyfs_pid = Some(pid);
        Ok(())
    }

    fn down(&mut self) -> Result<(), String> {
        // lazyfs.sh cds into the mount first, which fails (ENOTCONN) once LazyFS crashed.
        if self.script(&["down".as_ref(), self.mnt.as_ref()]).is_err() || self.mounted() {
            for cmd in [["fusermount3", "-u"], ["umount", "-l"]] {
                let mut c = Command::new(cmd[0]);
                c.arg(cmd[1]).arg(&self.mnt);
                if run_bounded(c, Duration::from_secs(SCRIPT_WAIT_S_MAX)).is_ok() {
                    break;
                }
            }
        }
        if let Some(pid) = self.lazyfs_pid.take() {
            let deadline = Instant::now() + Duration::from_secs(SCRIPT_WAIT_S_MAX);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let mut all = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.lazyfs_logs)
            .map_err(|e| e.to_string())?;
        write!(all, "=== a LazyFS mount ===\n{}", self.log()).map_err(|e| e.to_string())?;
        if self.mounted() {
            return Err(format!("{} is still mounted", self.mnt.display()));
        }
        Ok(())
    }

    /// Writes one command to LazyFS's faults FIFO and waits until LazyFS has read it.
    fn fault(&self, command: &str) -> Result<(), String> {
        // LazyFS reads a command in one 100-byte read and overwrites the last byte (the
        // newline): a longer command is cut short, and it still logs "configured
        // successfully" for an invalid torn-op.
        if command.len() > FIFO_COMMAND_BYTES_MAX {
            return Err(format!(
                "{command:?} is longer than LazyFS reads ({FIFO_COMMAND_BYTES_MAX} bytes); set \
                 TMPDIR to a shorter path"
            ));
        }
        let fifo = self.sibling(".faults.fifo");
        let line = format!("{command}\n");
        let needle = "[lazyfs.faults.worker]: received";
        let before = self.count_in_log(needle);
        let (tx, rx) = mpsc::channel();
        // Opening a FIFO blocks until LazyFS reads it; a thread keeps that bounded.
        std::thread::spawn(move || {
            let r = OpenOptions::new()
                .write(true)
                .open(&fifo)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(SCRIPT_WAIT_S_MAX)) {
            Ok(r) => r.map_err(|e| format!("writing {command:?} to the faults FIFO: {e}"))?,
            Err(_) => return Err(format!("LazyFS did not read {command:?} from its FIFO")),
        }
        let received = self.await_log(needle, before)?;
        if !received.ends_with(&format!("received '{command}'")) {
            return Err(format!("LazyFS read {received:?}, not {command:?}"));
        }
        Ok(())
    }

    /// Waits for the log to hold more lines containing `needle` than `before`; the newest.
    fn await_log(&self, needle: &str, before: usize) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(SCRIPT_WAIT_S_MAX);
        loop {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() > before {
                return Ok(lines[lines.len() - 1].to_owned());
            }
            if Instant::now() > deadline {
                return Err(format!("LazyFS never logged {needle:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn count_in_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// The share of LazyFS's cache in use. A full cache writes straight through to the
    /// disk, and the power failure would lose nothing: that is a broken test, not a pass.
    fn cache_usage_pct(&self) -> Result<f64, String> {
        let needle = "cache usage";
        let before = self.count_in_log(needle);
        self.fault("lazyfs::display-cache-usage")?;
        let line = self.await_log(needle, before)?;
        let pct: f64 = line
            .rsplit(" is ")
            .next()
            .and_then(|n| n.trim().trim_end_matches('%').parse().ok())
            .ok_or_else(|| format!("unexpected LazyFS line: {line}"))?;
        if pct >= 99.0 {
            return Err(format!(
                "LazyFS's cache is full ({pct} %), so writes went straight to disk; set \
                 LAZYFS_CACHE above {LAZYFS_CACHE_DEFAULT}"
            ));
        }
        Ok(pct)
    }

    /// Power failure with tally already killed: drop what was not synced, unmount, mount.
    fn power_cycle(&mut self) -> Result<f64, String> {
        let usage_pct = self.cache_usage_pct()?;
        let needle = "clear cache request submitted";
        let before = self.count_in_log(needle);
        self.script(&["lose-unsynced".as_ref(), self.mnt.as_ref()])?;
        self.await_log(needle, before)?;
        self.down()?;
        self.up()?;
        Ok(usage_pct)
    }

    /// Starts `tally serve` on the mount; its base URL once the engine is open.
    fn start_tally(&mut self, note: &str) -> Result<String, String> {
        let mut stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.tally_stderr)
            .map_err(|e| e.to_string())?;
        writeln!(stderr, "=== powerloss: {note} ===").map_err(|e| e.to_string())?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("serve")
            .env("TALLY_DATA_DIR", &self.mnt)
            .env("TALLY_LISTEN", "127.0.0.1:0")
            .env("TALLY_LOG", "info")
            .env(
                "TALLY_ADMIN_TOKEN_SHA256",
                tally_server::auth::token_sha256_hex(TOKEN),
            )
            .env_remove("TALLY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting tally: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        self.tally = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Printed once the engine is open; reading on keeps the pipe from filling.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(base) = line.strip_prefix("tally listening on ") {
                    let _ = tx.send(base.to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(READY_WAIT_S_MAX)) {
            Ok(base) => Ok(base),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let mut child = self.tally.take().expect("started");
                let status = child.wait().map_err(|e| e.to_string())?;
                Err(format!("tally exited before it was ready ({status})"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("tally was not ready within {READY_WAIT_S_MAX} s"))
            }
        }
    }

    /// Whether tally's newest start said it dropped a torn record at the end of the WAL.
    fn dropped_torn_tail(&self) -> bool {
        let log = fs::read_to_string(&self.tally_stderr).unwrap_or_default();
        let newest_start = log.rsplit("=== powerloss:").next().unwrap_or_default();
        newest_start.contains("\"torn_tail\":true")
    }

    fn kill_tally(&mut self) -> Result<(), String> {
        let mut child = self.tally.take().expect("tally is running");
        let _ = child.kill();
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.signal() != Some(9) {
            return Err(format!(
                "tally exited by itself before the SIGKILL: {status}"
            ));
        }
        Ok(())
    }

    /// Arms LazyFS to tear the next write to the newest WAL segment and then crash; says how.
    fn tear_next_wal_write(&self, rng: &mut StdRng) -> Result<String, String> {
        let wal_dir = self.root.join("wal");
        let newest = fs::read_dir(&wal_dir)
            .map_err(|e| format!("listing {}: {e}", wal_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max()
            .ok_or_else(|| "no WAL segment".to_owned())?;
        let parts: u32 = rng.gen_range(2..=4);
        // Some of the parts, never all of them.
        let persist: Vec<String> = loop {
            let picked: Vec<String> = (1..=parts)
                .filter(|_| rng.gen_bool(0.5))
                .map(|p| p.to_string())
                .collect();
            if !picked.is_empty() && picked.len() < parts as usize {
                break picked;
            }
        };
        // LazyFS matches `file=` against the path under its root, exactly; the path under
        // the mount matches nothing. It takes no `occurrence=` here (that makes the command
        // invalid): a FIFO torn-op always tears the next write.
        let command = format!(
            "lazyfs::torn-op::file={}::parts={parts}::persist={}",
            newest.display(),
            persist.join(",")
        );
        self.fault(&command)?;
        let segment = newest.file_name().unwrap_or_default().to_string_lossy();
        Ok(format!(
            "; tore {segment}: parts={parts} persist={}",
            persist.join(",")
        ))
    }

    /// Prints everything a failure needs and panics.
    fn fail(&self, round: u64, kind: Kind, seed: u64, what: &str) -> ! {
        let stderr = fs::read_to_string(&self.tally_stderr).unwrap_or_default();
        let earlier = fs::read_to_string(&self.lazyfs_logs).unwrap_or_default();
        let lazyfs = format!("{earlier}=== the current LazyFS mount ===\n{}", self.log());
        let keep = workspace_dir().join("target/powerloss");
        let _ = fs::create_dir_all(&keep);
        let _ = fs::write(keep.join("tally.stderr"), &stderr);
        let _ = fs::write(keep.join("lazyfs.log"), &lazyfs);
        eprintln!(
            "\n--- tally's stderr (last {LOG_TAIL_BYTES} bytes) ---\n{}\n--- LazyFS's log \
             (last {LOG_TAIL_BYTES} bytes) ---\n{}\n--- both in full: {} ---",
            tail(&stderr, LOG_TAIL_BYTES),
            tail(&lazyfs, LOG_TAIL_BYTES),
            keep.display()
        );
        panic!(
            "powerloss failed in round {round} ({}), seed {seed} (POWERLOSS_SEED={seed}): {what}",
            kind.name()
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut child) = self.tally.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.lazyfs_pid.is_some() || self.mounted() {
            if let Err(e) = self.down() {
                eprintln!("powerloss: cleaning up {}: {e}", self.tmp.path().display());
            }
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // Only ever 127.0.0.1, whatever the environment's proxy says.
        .no_proxy()
        .timeout(Duration::from_secs(REQUEST_TIMEOUT_S))
        .build()
        .expect("client")
}

#[derive(Clone, Debug)]
struct Debit {
    agent: usize,
    key: String,
    amount_micros: u64,
    round: u64,
}

/// An answer to a debit: status, `Idempotent-Replayed`, the receipt's seq.
#[derive(Debug)]
struct Answer {
    status: u16,
    replayed: bool,
    seq: Option<u64>,
}

async fn post(
    http: &reqwest::Client,
    url: String,
    key: &str,
    body: Value,
) -> reqwest::Result<Answer> {
    let r = http
        .post(url)
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await?;
    let status = r.status().as_u16();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Ok(Answer {
        status,
        replayed,
        seq: body["seq"].as_u64(),
    })
}

async fn debit(http: &reqwest::Client, base: &str, d: &Debit) -> reqwest::Result<Answer> {
    let url = format!("{base}/v1/agents/{}/debits", agent_name(d.agent));
    post(http, url, &d.key, json!({"amount_micros": d.amount_micros})).await
}

async fn create_agents(http: &reqwest::Client, base: &str) -> Result<(), String> {
    for i in 0..AGENTS {
        let a = agent_name(i);
        for (path, key, body) in [
            (String::new(), "create", json!({"id": a})),
            (
                format!("/{a}/credits"),
                "credit",
                json!({"amount_micros": CREDIT_MICROS}),
            ),
        ] {
            let r = post(http, format!("{base}/v1/agents{path}"), key, body)
                .await
                .map_err(|e| e.to_string())?;
            if r.status != 201 {
                return Err(format!("{key} {a}: {}", r.status));
            }
        }
    }
    Ok(())
}

/// What the debit tasks sent, and what was acknowledged with its seq.
#[derive(Default)]
struct Traffic {
    sent: Vec<Debit>,
    acked: Vec<(Debit, u64)>,
}

/// Concurrent debit tasks until stopped (or tally is gone).
struct Load {
    stop: Arc<AtomicBool>,
    traffic: Arc<Mutex<Traffic>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: &reqwest::Client, base: &str, round: u64, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = Arc::new(Mutex::new(Traffic::default()));
        let tasks = (0..TASKS as u64)
            .map(|t| {
                let (http, base) = (http.clone(), base.to_owned());
                let (stop, traffic) = (stop.clone(), traffic.clone());
                let mut rng = StdRng::seed_from_u64(seed ^ (round << 16) ^ t);
                tokio::spawn(async move {
                    for n in 0u64.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let d = Debit {
                            agent: rng.gen_range(0..AGENTS),
                            key: format!("r{round}-t{t}-{n}"),
                            amount_micros: rng.gen_range(1..=DEBIT_MICROS_MAX),
                            round,
                        };
                        traffic.lock().expect("lock").sent.push(d.clone());
                        match debit(&http, &base, &d).await {
                            Ok(Answer {
                                status: 201,
                                seq: Some(seq),
                                ..
                            }) => traffic.lock().expect("lock").acked.push((d, seq)),
                            // A 500 once the disk is gone, a 503 under backpressure: not
                            // acknowledged, retried after the restart.
                            Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                            // tally is gone.
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            traffic,
            tasks,
        }
    }

    async fn stop(self) -> Traffic {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a debit task panicked");
        }
        std::mem::take(&mut *self.traffic.lock().expect("lock"))
    }
}

/// An acknowledged debit.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Acked {
    agent: usize,
    amount_micros: u64,
    seq: u64,
    round: u64,
}

/// What one check after a restart found.
#[derive(Default)]
struct Findings {
    /// Acknowledged debits missing from the journal, by the round they were acknowledged in.
    lost: BTreeMap<u64, Vec<String>>,
    /// Keys applied more than once.
    doubled: Vec<String>,
    /// Everything else that is wrong, one line each.
    wrong: Vec<String>,
    /// Debits sent but not acknowledged before the power failed: retried...
    in_flight: usize,
    /// ...and of those, applied before the failure (the retry replayed them).
    in_flight_kept: usize,
    retries: usize,
}

impl Findings {
    fn lost_count(&self) -> usize {
        self.lost.values().map(Vec::len).sum()
    }

    fn ok(&self) -> bool {
        self.lost.is_empty() && self.doubled.is_empty() && self.wrong.is_empty()
    }

    fn summary(&self, acked_by_round: &BTreeMap<u64, usize>) -> String {
        let mut s = format!(
            "{} lost, {} doubled, {} other problems",
            self.lost_count(),
            self.doubled.len(),
            self.wrong.len()
        );
        for (round, keys) in &self.lost {
            s += &format!(
                "\n  lost {} of the {} debits acknowledged in round {round} ({}), e.g. {:?}",
                keys.len(),
                acked_by_round.get(round).copied().unwrap_or_default(),
                Kind::of(*round).name(),
                &keys[..keys.len().min(3)]
            );
        }
        if !self.doubled.is_empty() {
            s += &format!(
                "\n  doubled, e.g. {:?}",
                &self.doubled[..self.doubled.len().min(5)]
            );
        }
        for w in self.wrong.iter().take(20) {
            s += &format!("\n  {w}");
        }
        s
    }
}

/// One agent's journal, every page.
async fn journal(http: &reqwest::Client, base: &str, agent: &str) -> Result<Vec<Value>, String> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let url =
            format!("{base}/v1/agents/{agent}/journal?after={after}&limit={JOURNAL_PAGE_LIMIT}");
        let r = http.get(url).bearer_auth(TOKEN).send().await;
        let page: Value = match r {
            Ok(r) if r.status() == 200 => r.json().await.map_err(|e| e.to_string())?,
            Ok(r) => return Err(format!("journal of {agent}: {}", r.status())),
            Err(e) => return Err(format!("journal of {agent}: {e}")),
        };
        all.extend(page["entries"].as_array().cloned().unwrap_or_default());
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => return Ok(all),
        }
    }
}

async fn get_agent(http: &reqwest::Client, base: &str, agent: &str) -> Result<Value, String> {
    let r = http
        .get(format!("{base}/v1/agents/{agent}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("GET agent {agent}: {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

/// Reads every agent's journal and balance: every acknowledged debit once, at its seq.
/// Returns where each key is, `(agent, seq, amount)`.
async fn check_journals(
    http: &reqwest::Client,
    base: &str,
    acked: &BTreeMap<String, Acked>,
    found: &mut Findings,
) -> HashMap<String, (usize, u64, u64)> {
    let reads: Vec<_> = (0..AGENTS)
        .map(|i| {
            let (http, base, a) = (http.clone(), base.to_owned(), agent_name(i));
            tokio::spawn(async move {
                let agent = get_agent(&http, &base, &a).await?;
                Ok::<_, String>((agent, journal(&http, &base, &a).await?))
            })
        })
        .collect();
    let mut where_is: HashMap<String, (usize, u64, u64)> = HashMap::new();
    for (i, read) in reads.into_iter().enumerate() {
        let a = agent_name(i);
        let (agent, entries) = match read.await.expect("a reader panicked") {
            Ok(r) => r,
            Err(e) => {
                found.wrong.push(e);
                continue;
            }
        };
        let (mut credited, mut debited, mut credits) = (0u64, 0u64, 0);
        for (n, e) in entries.iter().enumerate() {
            let seq = e["seq"].as_u64().unwrap_or_default();
            if seq != n as u64 + 1 {
                found
                    .wrong
                    .push(format!("{a}: entry {n} has seq {seq}; not dense from 1"));
                break;
            }
            let amount = e["amount_micros"].as_u64().unwrap_or_default();
            let key = e["idempotency_key"].as_str().unwrap_or_default().to_owned();
            match e["kind"].as_str() {
                Some("credit") => {
                    credited += amount;
                    credits += 1;
                }
                Some("debit") => {
                    debited += amount;
                    if where_is.insert(key.clone(), (i, seq, amount)).is_some() {
                        found.doubled.push(key);
                    }
                }
                _ => {}
            }
        }
        if credits != 1 || credited != CREDIT_MICROS {
            found.wrong.push(format!(
                "{a}: {credits} credits of {credited} micros, not 1 of {CREDIT_MICROS}"
            ));
        }
        let balance = credited.checked_sub(debited);
        if agent["balance_micros"].as_u64() != balance
            || agent["debited_total_micros"].as_u64() != Some(debited)
            || agent["version"].as_u64() != Some(entries.len() as u64)
        {
            found.wrong.push(format!(
                "{a}: balance {} debited {} version {}, but its journal says {balance:?}, {debited}, {}",
                agent["balance_micros"], agent["debited_total_micros"], agent["version"], entries.len()
            ));
        }
    }
    for (key, a) in acked {
        match where_is.get(key) {
            None => found.lost.entry(a.round).or_default().push(key.clone()),
            Some(&(agent, seq, amount))
                if (agent, seq, amount) != (a.agent, a.seq, a.amount_micros) =>
            {
                found.wrong.push(format!(
                    "{key} acknowledged as {a:?} but the journal has agent {agent} seq {seq} amount {amount}"
                ));
            }
            Some(_) => {}
        }
    }
    where_is
}

/// Sends each debit again with its key and body. `Some(seq)`: it must replay with that seq;
/// `None`: it was never applied, so this applies it. Returns each debit with its answer.
async fn retry_all(
    http: &reqwest::Client,
    base: &str,
    jobs: Vec<(Debit, Option<u64>)>,
) -> Vec<(Debit, Option<u64>, Result<Answer, String>)> {
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let workers: Vec<_> = (0..TASKS)
        .map(|_| {
            let (http, base, queue) = (http.clone(), base.to_owned(), queue.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let Some((d, expected)) = queue.lock().expect("lock").pop_front() else {
                        return out;
                    };
                    let answer = debit(&http, &base, &d).await.map_err(|e| e.to_string());
                    out.push((d, expected, answer));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("a retry worker panicked"));
    }
    all
}

/// The checks after a restart; records in-flight debits that the retry applied as acked.
async fn check(
    http: &reqwest::Client,
    base: &str,
    acked: &mut BTreeMap<String, Acked>,
    traffic: &Traffic,
    round: u64,
    rng: &mut StdRng,
) -> Findings {
    let mut found = Findings::default();
    let where_is = check_journals(http, base, acked, &mut found).await;
    let lost: std::collections::HashSet<&String> = found.lost.values().flatten().collect();
    let mut old: Vec<(&String, &Acked)> = acked
        .iter()
        .filter(|(k, a)| a.round < round && !lost.contains(k))
        .collect();
    old.shuffle(rng);
    let mut jobs: Vec<(Debit, Option<u64>)> = old
        .into_iter()
        .take(OLD_RETRIES_MAX)
        .chain(
            acked
                .iter()
                .filter(|(k, a)| a.round == round && !lost.contains(k)),
        )
        .map(|(key, a)| {
            let d = Debit {
                agent: a.agent,
                key: key.clone(),
                amount_micros: a.amount_micros,
                round: a.round,
            };
            (d, Some(a.seq))
        })
        .collect();
    let in_flight: Vec<&Debit> = traffic
        .sent
        .iter()
        .filter(|d| !acked.contains_key(&d.key))
        .collect();
    found.in_flight = in_flight.len();
    for d in in_flight {
        let kept = where_is.get(&d.key);
        found.in_flight_kept += usize::from(kept.is_some());
        jobs.push((d.clone(), kept.map(|k| k.1)));
    }
    found.retries = jobs.len();
    for (d, expected, answer) in retry_all(http, base, jobs).await {
        match (expected, answer) {
            (
                Some(seq),
                Ok(Answer {
                    status: 201,
                    replayed: true,
                    seq: Some(got),
                }),
            ) if got == seq => {}
            (
                None,
                Ok(Answer {
                    status: 201,
                    replayed: false,
                    seq: Some(seq),
                }),
            ) => {
                let a = Acked {
                    agent: d.agent,
                    amount_micros: d.amount_micros,
                    seq,
                    round: d.round,
                };
                acked.insert(d.key, a);
            }
            (expected, answer) => found.wrong.push(format!(
                "retry of {} (in the journal at seq {expected:?}) got {answer:?}",
                d.key
            )),
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_failure_on_lazyfs_loses_no_acknowledged_debit() {
    let tools = match tools() {
        Ok(t) => t,
        Err(reason) => return skip(&reason),
    };
    let rounds: u64 = std::env::var("POWERLOSS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS_DEFAULT);
    let seed: u64 = std::env::var("POWERLOSS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    let mut rig = Rig::new(tools);
    if let Err(e) = rig.up() {
        return skip(&format!("LazyFS does not mount here: {e}"));
    }
    eprintln!(
        "powerloss: {rounds} rounds, seed {seed}, on {}",
        rig.mnt.display()
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    // Every step either answers or fails the test with the round it failed in.
    macro_rules! or_fail {
        ($round:expr, $kind:expr, $e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => rig.fail($round, $kind, seed, &e),
            }
        };
    }
    let mut base = or_fail!(1, Kind::Kill, rig.start_tally("round 1: first start"));
    or_fail!(1, Kind::Kill, create_agents(&http, &base).await);
    let mut acked: BTreeMap<String, Acked> = BTreeMap::new();
    let mut acked_by_round: BTreeMap<u64, usize> = BTreeMap::new();
    for round in 1..=rounds {
        let round_started = Instant::now();
        let kind = Kind::of(round);
        let load_ms = rng.gen_range(LOAD_MS_MIN..=LOAD_MS_MAX);
        let load = Load::start(&http, &base, round, seed);
        let mut torn = String::new();
        if kind == Kind::TornWal {
            tokio::time::sleep(Duration::from_millis(load_ms / 2)).await;
            torn = or_fail!(round, kind, rig.tear_next_wal_write(&mut rng));
            let pid = rig.lazyfs_pid.expect("mounted");
            let deadline = Instant::now() + Duration::from_secs(TORN_CRASH_WAIT_S_MAX);
            while alive(pid) {
                if Instant::now() > deadline {
                    rig.fail(
                        round,
                        kind,
                        seed,
                        &format!("the torn write{torn} never came"),
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Debits keep coming at a store whose disk is gone.
            tokio::time::sleep(Duration::from_millis(load_ms / 2)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(load_ms)).await;
        }
        or_fail!(round, kind, rig.kill_tally());
        let traffic = load.stop().await;
        let load_s = round_started.elapsed().as_secs_f64();
        let mut usage_pct = 0.0;
        if kind == Kind::TornWal {
            // LazyFS crashed: what it had not synced is gone already.
            or_fail!(round, kind, rig.down().and_then(|()| rig.up()));
        } else {
            usage_pct = or_fail!(round, kind, rig.power_cycle());
        }
        base = or_fail!(
            round,
            kind,
            rig.start_tally(&format!("round {round}: restart"))
        );
        if kind == Kind::TornWal {
            torn += match rig.dropped_torn_tail() {
                true => ", recovery dropped a torn record",
                false => ", no torn record was left",
            };
        }
        if kind == Kind::KillAfterRestart {
            // At once: recovery has just replayed the WAL into sled and deleted it.
            or_fail!(round, kind, rig.kill_tally());
            or_fail!(round, kind, rig.power_cycle());
            let note = format!("round {round}: restart after a power failure at the last one");
            base = or_fail!(round, kind, rig.start_tally(&note));
        }
        let power_s = round_started.elapsed().as_secs_f64() - load_s;
        let acks = traffic.acked.len();
        acked_by_round.insert(round, acks);
        for (d, seq) in &traffic.acked {
            let a = Acked {
                agent: d.agent,
                amount_micros: d.amount_micros,
                seq: *seq,
                round,
            };
            acked.insert(d.key.clone(), a);
        }
        let found = check(&http, &base, &mut acked, &traffic, round, &mut rng).await;
        let check_s = round_started.elapsed().as_secs_f64() - load_s - power_s;
        eprintln!(
            "powerloss round {round}/{rounds} {}: {acks} acked ({} in all), {} lost, {} doubled; \
             {} unanswered ({} had been applied), {} retried; LazyFS cache {usage_pct:.2} %; \
             {:.1} s (load {load_s:.1}, power {power_s:.1}, check {check_s:.1}){torn}",
            kind.name(),
            acked.len(),
            found.lost_count(),
            found.doubled.len(),
            found.in_flight,
            found.in_flight_kept,
            found.retries,
            round_started.elapsed().as_secs_f64(),
        );
        if acks == 0 {
            rig.fail(
                round,
                kind,
                seed,
                "no debit was acknowledged: nothing was tested",
            );
        }
        if !found.ok() {
            rig.fail(round, kind, seed, &found.summary(&acked_by_round));
        }
    }
    eprintln!(
        "powerloss: {rounds} rounds, {} acknowledged debits kept, {:.1} s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}
