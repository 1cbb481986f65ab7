//! `tally export`: pushes the change feed (`GET /v1/events`) to an ingest endpoint as
//! CloudEvents 1.0 structured batches, at least once, resuming from a cursor file.
//!
//! One feed page is one batch. The cursor after a page is written to the cursor file
//! (temp file, fsync, rename, fsync of the directory) only once the ingest endpoint
//! answered 2xx for that batch, so a crash or a kill re-sends at most the batch that was
//! in flight; receivers dedupe by the CloudEvent `id` (`<agent>:<seq>`, stable forever).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde_json::{json, Value};
use tally_client::retry::{parse_retry_after, RetryPolicy};
use tally_client::{Client, EventsPage, FeedEvent};

/// Events per batch when `--batch` is not given.
pub const BATCH_SIZE_DEFAULT: u32 = 100;
/// Most events per batch: the feed's page limit (`limits.page_limit_max` by default).
pub const BATCH_SIZE_MAX: u32 = crate::config::PAGE_LIMIT_MAX_DEFAULT;
/// The first retry of a failed request waits up to this long (full jitter), doubling.
pub const BACKOFF_BASE_MS: u64 = 250;
/// No computed wait between retries is longer.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// A receiver's `Retry-After` is honoured up to this long.
pub const RETRY_AFTER_MAX_MS: u64 = 600_000;
/// Bytes of a cursor file read at most; a longer one is not a cursor this tool wrote.
pub const CURSOR_FILE_LEN_MAX: u64 = 1_024;
/// How long one `--follow` poll of the feed waits for new events.
pub const FOLLOW_WAIT_MS: u64 = 10_000;
/// Timeout of one ingest POST (connect, send, answer).
pub const INGEST_TIMEOUT_MS: u64 = 30_000;
/// A progress line at most this often while delivering (and one at the end).
pub const PROGRESS_INTERVAL_MS: u64 = 5_000;
/// A progress line this often while `--follow` waits with nothing to deliver.
pub const PROGRESS_IDLE_INTERVAL_MS: u64 = 60_000;
/// Bytes of an error answer's body quoted in a message.
const ERROR_BODY_LEN_MAX: usize = 512;

/// The media type of a CloudEvents JSON batch (CloudEvents JSON format, section 4).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

#[derive(Debug, Clone, clap::Args)]
#[command(after_long_help = EXPORT_HELP)]
pub struct ExportArgs {
    /// The tally server to read the change feed from.
    #[arg(long, env = "TALLY_URL", default_value = "http://127.0.0.1:8402")]
    pub from: String,
    /// A token with the reader role (or above) on that server.
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The ingest URL that takes CloudEvents batches (e.g. OpenMeter's /api/v1/events).
    #[arg(long)]
    pub to: String,
    /// Where the position reached is kept; without it every run starts from the
    /// beginning of the feed.
    #[arg(long)]
    pub cursor_file: Option<PathBuf>,
    /// Events per batch (one feed page), 1..=1000.
    #[arg(long, default_value_t = BATCH_SIZE_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(BATCH_SIZE_MAX)))]
    pub batch: u32,
    /// Keep running and long-poll the feed for new events (the default).
    #[arg(long, conflicts_with = "once")]
    pub follow: bool,
    /// Stop once caught up with the feed (for cron jobs and tests).
    #[arg(long)]
    pub once: bool,
    /// The CloudEvent `source` (default `tally://<host:port of --from>`).
    #[arg(long)]
    pub source: Option<String>,
    /// An extra header on every ingest request, `Name: value`; repeatable.
    #[arg(long = "ingest-header", value_name = "NAME: VALUE")]
    pub ingest_headers: Vec<String>,
}

const EXPORT_HELP: &str = "\
Each feed entry becomes one CloudEvent 1.0:
  specversion \"1.0\", id \"<agent>:<seq>\" (unique and stable: dedupe by it),
  source (--source), type \"dev.tally.<kind>\" (dev.tally.debit, dev.tally.credit, ...),
  subject = agent id, time = the entry's time (RFC 3339), datacontenttype application/json,
  data = the journal entry (agent_id, seq, kind, amount_micros, balance_micros, period,
  idempotency_key, task_type, metadata, ...).
A page of the feed is POSTed as one batch (Content-Type: application/cloudevents-batch+json,
a JSON array). 2xx: delivered, and only then the cursor file moves past it. 5xx, 408, 429 or
no answer: the same batch again, with exponential backoff and full jitter (capped at 30 s)
or after Retry-After. Any other 4xx stops the export with exit status 2 and the cursor
where it was: nothing is skipped. SIGINT/SIGTERM: exit 0, cursor at the last delivery.
Delivery is at least once: after a crash the batch in flight is sent again.";

/// Runs the export until `--once` catches up, a permanent error, or `shutdown`.
pub async fn run(
    args: ExportArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut exporter = Exporter::new(args)?;
    let result = tokio::select! {
        r = exporter.run() => r,
        () = shutdown => {
            // Whatever was in flight is abandoned; the cursor file holds the last batch
            // the receiver acknowledged (its write has no await point, so it is whole).
            exporter.progress.print("stopped by signal", &exporter.cursor);
            return Ok(());
        }
    };
    exporter.progress.print("done", &exporter.cursor);
    result
}

struct Exporter {
    args: ExportArgs,
    source: String,
    feed: Client,
    ingest: reqwest::Client,
    ingest_url: reqwest::Url,
    ingest_headers: HeaderMap,
    backoff: RetryPolicy,
    cursor: String,
    progress: Progress,
}

/// What a failed request says about the next attempt.
enum Failure {
    /// Try the same request again, after the hint when there is one.
    Transient(String, Option<Duration>),
    /// Stop: retrying cannot help.
    Permanent(String),
}

impl Exporter {
    fn new(args: ExportArgs) -> anyhow::Result<Self> {
        let ingest_url =
            reqwest::Url::parse(&args.to).with_context(|| format!("--to {:?}", args.to))?;
        if !matches!(ingest_url.scheme(), "http" | "https") {
            bail!("--to {:?}: not an http(s) URL", args.to);
        }
        let from =
            reqwest::Url::parse(&args.from).with_context(|| format!("--from {:?}", args.from))?;
        let source = match &args.source {
            Some(s) if !s.is_empty() => s.clone(),
            Some(_) => bail!("--source: empty"),
            None => format!(
                "tally://{}{}",
                from.host_str().unwrap_or("localhost"),
                from.port().map(|p| format!(":{p}")).unwrap_or_default()
            ),
        };
        let mut ingest_headers = HeaderMap::new();
        for h in &args.ingest_headers {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("--ingest-header {h:?}: expected `Name: value`"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("--ingest-header {h:?}: header name"))?;
            let value = HeaderValue::from_str(value.trim())
                .with_context(|| format!("--ingest-header {name}: header value"))?;
            ingest_headers.append(name, value);
        }
        // The exporter retries by itself, forever for transient failures: the client makes
        // one attempt per call, long enough for a long poll.
        let feed = Client::builder(args.from.clone())
            .token(args.token.clone())
            .retry_policy(RetryPolicy {
                attempt_timeout: Some(Duration::from_millis(FOLLOW_WAIT_MS + INGEST_TIMEOUT_MS)),
                ..RetryPolicy::no_retries()
            })
            .build()
            .context("--from")?;
        let ingest = reqwest::Client::builder()
            .timeout(Duration::from_millis(INGEST_TIMEOUT_MS))
            .user_agent(concat!("tally-export/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("ingest HTTP client")?;
        let cursor = match &args.cursor_file {
            Some(path) => read_cursor(path)?.unwrap_or_default(),
            None => {
                eprintln!("tally export: no --cursor-file: starting at the beginning of the feed, progress is not saved");
                String::new()
            }
        };
        Ok(Self {
            source,
            feed,
            ingest,
            ingest_url,
            ingest_headers,
            backoff: RetryPolicy {
                backoff_base: Duration::from_millis(BACKOFF_BASE_MS),
                backoff_cap: Duration::from_millis(BACKOFF_CAP_MS),
                ..RetryPolicy::default()
            },
            cursor,
            progress: Progress::new(),
            args,
        })
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let wait_ms = if self.args.once { 0 } else { FOLLOW_WAIT_MS };
        loop {
            let page = self.fetch(wait_ms).await?;
            let full = page.events.len() >= self.args.batch as usize;
            if page.events.is_empty() {
                self.progress.caught_up = true;
                if self.args.once {
                    return Ok(());
                }
                self.progress
                    .maybe_print(&self.cursor, PROGRESS_IDLE_INTERVAL_MS);
                continue;
            }
            let batch: Vec<Value> = page
                .events
                .iter()
                .map(|e| cloud_event(&self.source, e))
                .collect();
            let body = serde_json::to_vec(&batch).context("encoding a batch")?;
            self.deliver(body).await?;
            // Delivered: only now does the cursor move on.
            if let Some(path) = &self.args.cursor_file {
                write_cursor(path, &page.next_cursor)?;
            }
            self.cursor = page.next_cursor;
            let last_at = page.events.last().map(|e| e.entry.at.as_str());
            self.progress.delivered(page.events.len(), last_at, !full);
            self.progress
                .maybe_print(&self.cursor, PROGRESS_INTERVAL_MS);
            if self.args.once && !full {
                return Ok(());
            }
        }
    }

    /// One page of the feed after the cursor; transient failures are retried.
    async fn fetch(&mut self, wait_ms: u64) -> anyhow::Result<EventsPage> {
        let mut retry = 0;
        loop {
            let failure = match self
                .feed
                .events(&self.cursor, self.args.batch, wait_ms)
                .await
            {
                Ok(page) => return Ok(page),
                Err(e) => feed_failure(&self.args.from, e),
            };
            self.after_failure(failure, &mut retry).await?;
        }
    }

    /// POSTs one batch until a 2xx; transient failures are retried.
    async fn deliver(&mut self, body: Vec<u8>) -> anyhow::Result<()> {
        let mut retry = 0;
        loop {
            let request = self
                .ingest
                .post(self.ingest_url.clone())
                .headers(self.ingest_headers.clone())
                .header(CONTENT_TYPE, BATCH_CONTENT_TYPE)
                .body(body.clone());
            let failure = match request.send().await {
                Err(e) => Failure::Transient(format!("POST {}: {e}", self.ingest_url), None),
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        return Ok(());
                    }
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let text = response.text().await.unwrap_or_default();
                    let text: String = text.chars().take(ERROR_BODY_LEN_MAX).collect();
                    let what = format!("POST {} answered {status}: {text}", self.ingest_url);
                    match status.as_u16() {
                        408 | 429 => Failure::Transient(what, retry_after),
                        400..=499 => Failure::Permanent(format!(
                            "{what}\nthe batch was not delivered and the cursor was not moved; fix the receiver or the request and run again"
                        )),
                        _ => Failure::Transient(what, retry_after),
                    }
                }
            };
            self.after_failure(failure, &mut retry).await?;
        }
    }

    /// Waits before the next attempt of a transient failure, or gives up on a permanent one.
    async fn after_failure(&mut self, failure: Failure, retry: &mut u32) -> anyhow::Result<()> {
        let (what, hint) = match failure {
            Failure::Permanent(what) => bail!(what),
            Failure::Transient(what, hint) => (what, hint),
        };
        let wait = match hint {
            Some(after) => after.min(Duration::from_millis(RETRY_AFTER_MAX_MS)),
            None => {
                let mut rng = rand::thread_rng();
                self.backoff.backoff(*retry, &mut rng)
            }
        };
        *retry = retry.saturating_add(1);
        self.progress.retries += 1;
        eprintln!(
            "tally export: {what}; retry {retry} in {} ms",
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// What a failed read of the feed means: no answer, 408, 429 and 5xx pass (a restart, an
/// overload); anything else (401, 403, a cursor the server refuses) will not.
fn feed_failure(from: &str, e: tally_client::Error) -> Failure {
    use tally_client::Error;
    let hint = match &e {
        Error::Problem(p) => p.retry_after,
        Error::Denied(d) => d.problem().retry_after,
        _ => None,
    };
    match (&e, e.status()) {
        (Error::Transport { source, .. }, _) => {
            Failure::Transient(format!("reading the feed at {from}: {source}"), None)
        }
        (_, Some(408 | 429 | 500..=599)) => {
            Failure::Transient(format!("reading the feed at {from}: {e}"), hint)
        }
        _ => Failure::Permanent(format!("reading the feed at {from}: {e}")),
    }
}

/// The CloudEvent 1.0 (JSON format) of one feed entry.
pub fn cloud_event(source: &str, e: &FeedEvent) -> Value {
    let mut data = serde_json::to_value(&e.entry).expect("a journal entry serializes");
    for (k, v) in &e.other {
        data[k] = v.clone();
    }
    data["agent_id"] = json!(e.agent_id);
    json!({
        "specversion": "1.0",
        "id": format!("{}:{}", e.agent_id, e.entry.seq),
        "source": source,
        "type": format!("dev.tally.{}", e.entry.kind),
        "subject": e.agent_id,
        "time": e.entry.at,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// The cursor in `path`; `None` when there is no such file (start at the beginning).
pub fn read_cursor(path: &Path) -> anyhow::Result<Option<String>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cursor file {}", path.display())),
    };
    if meta.len() > CURSOR_FILE_LEN_MAX {
        bail!(
            "cursor file {}: {} bytes, more than {CURSOR_FILE_LEN_MAX}: not a cursor file",
            path.display(),
            meta.len()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cursor file {}", path.display()))?;
    let cursor = text.trim();
    if !cursor
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'+' | b'/'))
    {
        bail!(
            "cursor file {}: not a feed cursor: {cursor:?}",
            path.display()
        );
    }
    Ok(Some(cursor.to_owned()))
}

/// Replaces the cursor file atomically and durably
/// ([`crate::auth::write_file_atomically`]: a temp file, fsync, rename over the old one,
/// fsync of the directory). A crash leaves the old cursor or the new one.
pub fn write_cursor(path: &Path, cursor: &str) -> anyhow::Result<()> {
    crate::auth::write_file_atomically(path, true, |f| writeln!(f, "{cursor}"))
        .with_context(|| format!("writing cursor file {}", path.display()))
}

/// Counts for the progress line on stderr: one line at most every
/// [`PROGRESS_INTERVAL_MS`], plain text (no carriage returns), so logs stay readable.
struct Progress {
    started: Instant,
    printed: Option<Instant>,
    events: u64,
    batches: u64,
    retries: u64,
    last_at: Option<String>,
    caught_up: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            printed: None,
            events: 0,
            batches: 0,
            retries: 0,
            last_at: None,
            caught_up: false,
        }
    }

    fn delivered(&mut self, events: usize, last_at: Option<&str>, caught_up: bool) {
        self.events += events as u64;
        self.batches += 1;
        if let Some(at) = last_at {
            self.last_at = Some(at.to_owned());
        }
        self.caught_up = caught_up;
    }

    fn maybe_print(&mut self, cursor: &str, interval_ms: u64) {
        let due = self
            .printed
            .is_none_or(|p| p.elapsed() >= Duration::from_millis(interval_ms));
        if due {
            self.print("progress", cursor);
        }
    }

    fn print(&mut self, state: &str, cursor: &str) {
        self.printed = Some(Instant::now());
        let lag = if self.caught_up {
            "caught up".to_owned()
        } else {
            match self
                .last_at
                .as_deref()
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            {
                Some(at) => {
                    let ms = chrono::Utc::now()
                        .signed_duration_since(at)
                        .num_milliseconds();
                    format!("lag {:.1} s", ms.max(0) as f64 / 1_000.0)
                }
                None => "lag unknown".to_owned(),
            }
        };
        eprintln!(
            "tally export: {state}: {} events in {} batches, {} retries, {:.1} s; {lag}; cursor {}",
            self.events,
            self.batches,
            self.retries,
            self.started.elapsed().as_secs_f64(),
            if cursor.is_empty() { "(start)" } else { cursor },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_entry_becomes_a_cloud_event() {
        let e: FeedEvent = serde_json::from_value(json!({
            "agent_id": "a1", "seq": 7, "kind": "debit", "amount_micros": 500,
            "balance_micros": 9_500, "held_micros": 0, "at": "2026-11-29T13:00:00.000Z",
            "idempotency_key": "k1", "task_type": "llm", "metadata": {"model": "m"},
            "period": "2026-11"
        }))
        .expect("a feed entry");
        let ce = cloud_event("tally://h:1", &e);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "a1:7");
        assert_eq!(ce["type"], "dev.tally.debit");
        assert_eq!(ce["subject"], "a1");
        assert_eq!(ce["source"], "tally://h:1");
        assert_eq!(ce["time"], "2026-11-29T13:00:00.000Z");
        assert_eq!(ce["data"]["amount_micros"], 500);
        assert_eq!(ce["data"]["agent_id"], "a1");
        assert_eq!(ce["data"]["metadata"]["model"], "m");
        assert_eq!(ce["data"]["period"], "2026-11");
    }

    #[test]
    fn the_cursor_file_round_trips_and_refuses_what_it_did_not_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cursor");
        assert_eq!(read_cursor(&path).expect("missing is fine"), None);
        write_cursor(&path, "AQAAAAAAAAABAAAAAA").expect("written");
        assert_eq!(
            read_cursor(&path).expect("read").as_deref(),
            Some("AQAAAAAAAAABAAAAAA")
        );
        std::fs::write(&path, "x".repeat(CURSOR_FILE_LEN_MAX as usize)).expect("write");
        assert!(read_cursor(&path).is_ok(), "exactly the maximum is read");
        std::fs::write(&path, "x".repeat(CURSOR_FILE_LEN_MAX as usize + 1)).expect("write");
        assert!(read_cursor(&path).is_err(), "one byte past it is not");
        std::fs::write(&path, "not a cursor\n").expect("write");
        assert!(read_cursor(&path).is_err());
    }
}
