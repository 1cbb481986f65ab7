//! Threshold webhooks: sends the crossings the journal records (`threshold_crossed`
//! entries, decided in tally-core with the change that crossed them) to the configured
//! endpoints, signed per the Standard Webhooks spec, at least once.
//!
//! The journal is the outbox. Each endpoint has a task that reads the change feed from
//! its own cursor (`<data_dir>/webhooks/<name>.cursor`, fsynced) and moves the cursor past
//! a page only once every crossing in it was delivered or given up on. A crash or a
//! restart re-reads from the cursor: nothing is lost, and what is sent again carries the
//! same `webhook-id` (`<agent>:<seq>` of the journal entry), by which receivers dedupe.
//! The tasks only read; a slow or hanging receiver delays its own webhooks, never a debit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tally_core::{AgentId, Event, EventKind};
use tally_store::{Engine, FeedCursor};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::dto::{crossing_json, cursor_text, parse_cursor, rfc3339_ms};
use crate::metrics::Metrics;

/// Most `[[webhooks]]` endpoints.
pub const WEBHOOK_ENDPOINTS_MAX: usize = 16;
/// Most secrets per endpoint (each signs; two cover a rotation).
pub const WEBHOOK_SECRETS_MAX: usize = 4;
/// One delivery attempt, connect to answer.
pub const WEBHOOK_TIMEOUT_MS_DEFAULT: u64 = 10_000;
pub const WEBHOOK_TIMEOUT_MS_MAX: u64 = 60_000;
/// How long one webhook is retried before it is given up (logged and counted `failed`).
pub const WEBHOOK_RETRY_FOR_MS_DEFAULT: u64 = 3_600_000;
pub const WEBHOOK_RETRY_FOR_MS_MAX: u64 = 3 * 86_400_000;
/// The first wait between attempts; it doubles up to [`WEBHOOK_BACKOFF_MS_MAX`].
pub const WEBHOOK_BACKOFF_FIRST_MS_DEFAULT: u64 = 1_000;
pub const WEBHOOK_BACKOFF_MS_MAX: u64 = 300_000;
/// The webhook types, one per kind of crossing.
pub const WEBHOOK_TYPES: &[&str] = &["balance.low", "cap.threshold_reached", "grant.expiring"];
/// How old a `webhook-timestamp` `tally webhooks verify` accepts by default, as the
/// spec's reference libraries do (and as far in the future).
pub const SIGNATURE_TOLERANCE_S: i64 = 300;
/// At shutdown, how long an attempt under way may still take.
const WEBHOOK_STOP_GRACE_MS: u64 = 2_000;
/// Journal entries read per feed page.
const FEED_PAGE_EVENTS: usize = 512;
/// The feed's long poll when nothing is new.
const FEED_WAIT_MS: u64 = 10_000;
/// A cursor moved only past entries that were not crossings is saved at most this often
/// (a restart then re-reads at most this much of the feed).
const CURSOR_SAVE_INTERVAL_MS: u64 = 1_000;
/// Pause after the engine refused a feed read (it is shutting down, or overloaded).
const FEED_ERROR_PAUSE_MS: u64 = 1_000;
/// Largest cursor file read.
const CURSOR_FILE_BYTES_MAX: u64 = 256;
/// The spec's secrets are 24 to 64 random bytes.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// A signing secret (the bytes of a `whsec_…` string). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Parses `whsec_<base64 of 24-64 bytes>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text
            .strip_prefix("whsec_")
            .ok_or("a secret starts with whsec_")?;
        // Padded or not: both forms are in circulation.
        let b64 = b64.trim_end_matches('=');
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64)
            .map_err(|_| "the part after whsec_ is not base64")?;
        if !SECRET_BYTES.contains(&bytes.len()) {
            return Err(format!(
                "a secret is {}-{} bytes, got {}",
                SECRET_BYTES.start(),
                SECRET_BYTES.end(),
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }
}

/// One `[[webhooks]]` endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Names its cursor file and its metric series.
    pub name: String,
    pub url: String,
    pub secrets: Vec<Secret>,
    /// The webhook types it wants; `None` is all.
    pub types: Option<Vec<String>>,
    pub timeout_ms: u64,
    pub retry_for_ms: u64,
    pub backoff_first_ms: u64,
}

impl Endpoint {
    fn wants(&self, kind: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|t| t == kind))
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn sign(secret: &Secret, id: &str, timestamp_s: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    )
}

/// The `webhook-signature` header: one signature per secret, space-separated.
pub fn signature_header(secrets: &[Secret], id: &str, timestamp_s: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| sign(s, id, timestamp_s, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a webhook does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is {0} s away from now, beyond the tolerance")]
    OutOfTolerance(i64),
    #[error("no v1 signature in webhook-signature matches")]
    NoMatch,
}

/// Checks a received webhook as a receiver should: the timestamp within `tolerance_s` of
/// `now_s`, and one of the header's `v1,` signatures equal (in constant time) to ours.
pub fn verify(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    body: &[u8],
    signature_header: &str,
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    use subtle::ConstantTimeEq as _;
    let ts: i64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now_s.saturating_sub(ts);
    if skew.abs() > tolerance_s {
        return Err(VerifyError::OutOfTolerance(skew));
    }
    let expected = sign(secret, id, ts, body);
    let matched = signature_header
        .split_whitespace()
        .filter(|s| s.starts_with("v1,"))
        .any(|s| bool::from(s.as_bytes().ct_eq(expected.as_bytes())));
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

/// The `webhook-id` of a journal entry: the same on every attempt and after restarts.
pub fn webhook_id(agent: &AgentId, seq: u64) -> String {
    format!("{agent}:{seq}")
}

/// The webhook of a journal entry, if it records a crossing: its type and JSON body.
pub fn payload(agent: &AgentId, event: &Event) -> Option<(&'static str, Vec<u8>)> {
    let EventKind::ThresholdCrossed { crossing } = &event.kind else {
        return None;
    };
    let mut data = crossing_json(crossing);
    data["agent_id"] = json!(agent.as_str());
    data["seq"] = json!(event.seq);
    data["balance_micros"] = json!(event.balance_after_micros);
    data["held_micros"] = json!(event.held_after_micros);
    data["at"] = json!(rfc3339_ms(event.at_ms));
    data["idempotency_key"] = json!(event.idempotency_key.as_ref().map(|k| k.as_str()));
    let body = json!({
        "type": crossing.name(),
        "timestamp": rfc3339_ms(event.at_ms),
        "data": data,
    });
    Some((crossing.name(), body.to_string().into_bytes()))
}

/// An endpoint's position in the change feed, kept in a file.
#[derive(Debug, Clone)]
struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    fn load(&self) -> anyhow::Result<Option<FeedCursor>> {
        use std::io::Read as _;
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut text = String::new();
        file.take(CURSOR_FILE_BYTES_MAX).read_to_string(&mut text)?;
        parse_cursor(text.trim()).map(Some).ok_or_else(|| {
            anyhow::anyhow!(
                "{} does not hold a feed cursor; remove it to start from the current end of the feed",
                self.path.display()
            )
        })
    }

    /// Replaces the cursor file durably ([`crate::auth::write_file_atomically`]): after
    /// a crash it holds the old cursor or the new one.
    fn save(&self, cursor: FeedCursor) -> std::io::Result<()> {
        use std::io::Write as _;
        crate::auth::write_file_atomically(&self.path, true, |f| {
            writeln!(f, "{}", cursor_text(cursor))
        })
    }

    async fn save_async(&self, cursor: FeedCursor) {
        let file = self.clone();
        let saved = tokio::task::spawn_blocking(move || file.save(cursor)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(path = %self.path.display(), error = %e, "saving the webhook cursor failed; webhooks since the last save will be sent again after a restart")
            }
            Err(e) => tracing::error!(error = %e, "saving the webhook cursor panicked"),
        }
    }
}

/// Starts one sender per endpoint. An endpoint without a cursor file starts at the
/// current end of the feed (crossings from before it was configured are not sent).
/// Call before the API takes writes, so that no crossing falls between.
pub async fn start(
    endpoints: &[Endpoint],
    engine: &Engine,
    metrics: &Metrics,
    data_dir: &Path,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    if endpoints.is_empty() {
        return Ok(Vec::new());
    }
    let dir = data_dir.join("webhooks");
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let tail = FeedCursor {
        lsn: engine.feed_indexed_lsn() + 1,
        offset: 0,
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut tasks = Vec::new();
    for ep in endpoints {
        let file = CursorFile {
            path: dir.join(format!("{}.cursor", ep.name)),
        };
        let cursor = match file.load()? {
            Some(c) => c,
            None => {
                file.save(tail)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", file.path.display()))?;
                tail
            }
        };
        for outcome in ["delivered", "retried", "failed"] {
            metrics
                .webhooks_total
                .with_label_values(&[ep.name.as_str(), outcome]);
        }
        tracing::info!(endpoint = %ep.name, cursor = %cursor_text(cursor), "webhook sender starting");
        let sender = Sender {
            ep: Arc::new(ep.clone()),
            client: client.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        tasks.push(tokio::spawn(sender.run(engine.clone(), file, cursor)));
    }
    Ok(tasks)
}

struct Sender {
    ep: Arc<Endpoint>,
    client: reqwest::Client,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
}

enum Delivery {
    Delivered,
    GaveUp,
    Stopped,
}

impl Sender {
    async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Reads the feed from `cursor` and delivers its crossings in order. The cursor file
    /// moves past a crossing once it was delivered (or given up on), so a crash re-sends
    /// at most the one in flight; past other entries at most every
    /// [`CURSOR_SAVE_INTERVAL_MS`], since re-reading them sends nothing.
    async fn run(self, engine: Engine, file: CursorFile, mut cursor: FeedCursor) {
        let mut saved = cursor;
        let mut saved_at = Instant::now();
        'pages: while !self.stopping() {
            let wait = Duration::from_millis(FEED_WAIT_MS);
            let page = tokio::select! {
                page = engine.events(cursor, FEED_PAGE_EVENTS, wait) => page,
                _ = self.stopped() => break,
            };
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(endpoint = %self.ep.name, error = %e, "reading the change feed failed; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(FEED_ERROR_PAUSE_MS)) => continue,
                        _ = self.stopped() => break,
                    }
                }
            };
            for ((agent, event), end) in page.events.iter().zip(&page.ends) {
                let Some((kind, body)) = payload(agent, event) else {
                    continue;
                };
                if !self.ep.wants(kind) {
                    continue;
                }
                if self.stopping() {
                    break 'pages;
                }
                let id = webhook_id(agent, event.seq);
                match self.deliver(&id, kind, body).await {
                    Delivery::Delivered | Delivery::GaveUp => {
                        cursor = *end;
                        file.save_async(cursor).await;
                        saved = cursor;
                        saved_at = Instant::now();
                    }
                    Delivery::Stopped => break 'pages,
                }
            }
            cursor = page.next;
            let due = saved_at.elapsed() >= Duration::from_millis(CURSOR_SAVE_INTERVAL_MS);
            if cursor != saved && due {
                file.save_async(cursor).await;
                saved = cursor;
                saved_at = Instant::now();
            }
        }
        if cursor != saved {
            file.save_async(cursor).await;
        }
        tracing::info!(endpoint = %self.ep.name, "webhook sender stopped");
    }

    /// Sends one webhook until it is accepted (2xx), retrying with exponential backoff
    /// and jitter (or the receiver's `Retry-After`) for at most `retry_for_ms`.
    async fn deliver(&self, id: &str, kind: &str, body: Vec<u8>) -> Delivery {
        let ep = &self.ep;
        let count = |outcome: &str| {
            self.metrics
                .webhooks_total
                .with_label_values(&[ep.name.as_str(), outcome])
                .inc()
        };
        let started = Instant::now();
        let retry_for = Duration::from_millis(ep.retry_for_ms);
        let mut backoff_ms = ep.backoff_first_ms;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let timestamp_s = chrono::Utc::now().timestamp();
            let request = self
                .client
                .post(&ep.url)
                .timeout(Duration::from_millis(ep.timeout_ms))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp_s.to_string())
                .header(
                    "webhook-signature",
                    signature_header(&ep.secrets, id, timestamp_s, &body),
                )
                .body(body.clone())
                .send();
            let mut request = std::pin::pin!(request);
            let answer = tokio::select! {
                answer = &mut request => answer,
                // An attempt under way gets a moment to finish, so that a clean stop does
                // not send again what the receiver just took.
                _ = self.stopped() => {
                    let grace = Duration::from_millis(WEBHOOK_STOP_GRACE_MS);
                    match tokio::time::timeout(grace, request).await {
                        Ok(Ok(resp)) if resp.status().is_success() => {
                            count("delivered");
                            return Delivery::Delivered;
                        }
                        _ => return Delivery::Stopped,
                    }
                }
            };
            let retry_after_ms = match answer {
                Ok(resp) if resp.status().is_success() => {
                    count("delivered");
                    tracing::debug!(endpoint = %ep.name, webhook_id = id, kind, attempt, "webhook delivered");
                    return Delivery::Delivered;
                }
                Ok(resp) => {
                    tracing::warn!(endpoint = %ep.name, webhook_id = id, attempt, status = resp.status().as_u16(), "webhook refused; will retry");
                    resp.headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| s.saturating_mul(1_000))
                }
                Err(e) => {
                    tracing::warn!(endpoint = %ep.name, webhook_id = id, attempt, error = %e, "webhook not delivered; will retry");
                    None
                }
            };
            let elapsed = started.elapsed();
            if elapsed >= retry_for {
                count("failed");
                tracing::error!(endpoint = %ep.name, webhook_id = id, kind, attempts = attempt, "webhook given up after retry_for_ms; the crossing stays in the journal (GET /v1/events, kind threshold_crossed)");
                return Delivery::GaveUp;
            }
            count("retried");
            // Equal jitter: at least half the backoff, so retries never bunch up at zero.
            let jittered = backoff_ms / 2 + rand::random::<u64>() % (backoff_ms / 2 + 1);
            let wait_ms = retry_after_ms
                .unwrap_or(jittered)
                .min(WEBHOOK_BACKOFF_MS_MAX)
                .min((retry_for - elapsed).as_millis() as u64);
            backoff_ms = backoff_ms.saturating_mul(2).min(WEBHOOK_BACKOFF_MS_MAX);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
                _ = self.stopped() => return Delivery::Stopped,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        // The Standard Webhooks spec's example secret.
        Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid")
    }

    #[test]
    fn signs_as_the_spec_example_does() {
        // From the Standard Webhooks reference tests.
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret(), id, 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn verify_checks_the_signature_and_the_timestamp() {
        let (id, ts, body) = ("a:7", 1_800_000_000, b"{}".as_slice());
        let header = format!("v1,bm90IGl0 {}", sign(&secret(), id, ts, body));
        let now = ts + 10;
        let ok = verify(&secret(), id, &ts.to_string(), body, &header, now, 300);
        assert_eq!(ok, Ok(()));
        let tampered = verify(&secret(), id, &ts.to_string(), b"{ }", &header, now, 300);
        assert_eq!(tampered, Err(VerifyError::NoMatch));
        let other_id = verify(&secret(), "a:8", &ts.to_string(), body, &header, now, 300);
        assert_eq!(other_id, Err(VerifyError::NoMatch));
        let old = verify(&secret(), id, &ts.to_string(), body, &header, ts + 301, 300);
        assert_eq!(old, Err(VerifyError::OutOfTolerance(301)));
        let junk = verify(&secret(), id, "soon", body, &header, now, 300);
        assert_eq!(junk, Err(VerifyError::BadTimestamp));
    }

    #[test]
    fn secrets_are_whsec_base64_of_24_to_64_bytes() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        assert!(Secret::parse(&format!("whsec_{}", b64(24))).is_ok());
        assert!(Secret::parse(&format!("whsec_{}", b64(64))).is_ok());
        let unpadded = b64(32);
        assert!(unpadded.ends_with('='));
        assert!(Secret::parse(&format!("whsec_{}", unpadded.trim_end_matches('='))).is_ok());
        assert!(Secret::parse(&format!("whsec_{}", b64(23))).is_err());
        assert!(Secret::parse(&format!("whsec_{}", b64(65))).is_err());
        assert!(Secret::parse(&b64(32)).is_err(), "no prefix");
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert_eq!(format!("{:?}", secret()), "Secret(..)");
    }
}
