//! The HTTP client: one method per `/v1` route, each a logical call that may make several
//! requests under the [`RetryPolicy`] with one idempotency key.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use crate::error::{Denial, Error, Outcome, Problem};
use crate::retry::{parse_retry_after, plan_retry, RetryPolicy};
use crate::types::{
    Agent, AgentPage, AgentPatch, Capture, CheckResult, Credit, Debit, EventsPage, Hold,
    JournalEntry, JournalPage, NewAgent, Plans, Receipt, Refund, Usage,
};

/// Longest idempotency key the server accepts.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;
/// Entries asked for per journal page by [`Client::journal_all`].
pub const JOURNAL_PAGE_LIMIT: u32 = 1_000;
/// Most bytes of a non-JSON error body kept in [`Problem::detail`].
const ERROR_BODY_LEN_MAX: usize = 512;

/// An async client of one tally server. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    policy: RetryPolicy,
}

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    token: Option<String>,
    policy: RetryPolicy,
    pool_idle_per_host_max: usize,
    pool_idle_timeout: Option<Duration>,
}

impl ClientBuilder {
    /// The bearer token sent with every request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Idle connections kept open to the server (default 32).
    pub fn pool_idle_per_host_max(mut self, max: usize) -> Self {
        self.pool_idle_per_host_max = max;
        self
    }

    /// How long an idle connection is kept (default 90 s; `None`: until the server closes
    /// it). `None` also means the client runs no timer of its own between calls, which
    /// keeps a test under `tokio::time::pause` from skipping ahead while a request is in
    /// flight.
    pub fn pool_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let base = Url::parse(&self.base_url)
            .map_err(|e| Error::InvalidArgument(format!("base URL {:?}: {e}", self.base_url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::InvalidArgument(format!(
                "base URL {:?}: not an http(s) URL",
                self.base_url
            )));
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(self.pool_idle_per_host_max)
            .pool_idle_timeout(self.pool_idle_timeout)
            .user_agent(concat!("tally-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            token: self.token,
            policy: self.policy,
        })
    }
}

/// One answer of the server, before the retry loop decides what to do with it.
pub(crate) struct Attempt<T> {
    pub(crate) result: Result<Outcome<T>, Error>,
    /// `None`: final. `Some(hint)`: may be retried, after `hint` when the server said so.
    pub(crate) retry: Option<Option<Duration>>,
}

impl Client {
    /// A client of the server at `base_url` (`http://127.0.0.1:8402`), default policy,
    /// no token.
    pub fn new(base_url: &str) -> Result<Self, Error> {
        Self::builder(base_url).build()
    }

    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            token: None,
            policy: RetryPolicy::default(),
            pool_idle_per_host_max: 32,
            pool_idle_timeout: Some(Duration::from_secs(90)),
        }
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The same client (same connections) with another retry policy.
    pub fn with_retry_policy(&self, policy: RetryPolicy) -> Self {
        Self {
            policy,
            ..self.clone()
        }
    }

    /// A fresh idempotency key (a UUID v4). Generate one yourself and pass it when you
    /// may want to repeat the logical call later.
    pub fn new_idempotency_key() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// `POST /v1/agents`.
    pub async fn create_agent(&self, agent: &NewAgent) -> Result<Agent, Error> {
        let key = key_or_new(&agent.idempotency_key)?;
        let url = self.url(&["v1", "agents"], &[])?;
        self.call(Method::POST, url, Some(body(agent)?), Some(key))
            .await
            .and_then(approved)
    }

    /// `GET /v1/agents/{id}`.
    pub async fn get_agent(&self, agent_id: &str) -> Result<Agent, Error> {
        let url = self.url(&["v1", "agents", agent_id], &[])?;
        self.call(Method::GET, url, None, None)
            .await
            .and_then(approved)
    }

    /// `GET /v1/agents?after=&limit=`: one page.
    pub async fn list_agents(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<AgentPage, Error> {
        let limit = limit.map(|l| l.to_string());
        let mut query = Vec::new();
        if let Some(after) = after {
            query.push(("after", after));
        }
        if let Some(limit) = &limit {
            query.push(("limit", limit.as_str()));
        }
        let url = self.url(&["v1", "agents"], &query)?;
        self.call(Method::GET, url, None, None)
            .await
            .and_then(approved)
    }

    /// `PATCH /v1/agents/{id}`.
    pub async fn update_agent(&self, agent_id: &str, patch: &AgentPatch) -> Result<Agent, Error> {
        let key = key_or_new(&patch.idempotency_key)?;
        let url = self.url(&["v1", "agents", agent_id], &[])?;
        self.call(Method::PATCH, url, Some(body(patch)?), Some(key))
            .await
            .and_then(approved)
    }

    /// `POST /v1/agents/{id}/credits`: a top-up.
    pub async fn credit(&self, agent_id: &str, credit: &Credit) -> Result<Receipt, Error> {
        let key = key_or_new(&credit.idempotency_key)?;
        let url = self.url(&["v1", "agents", agent_id, "credits"], &[])?;
        self.call(Method::POST, url, Some(body(credit)?), Some(key))
            .await
            .and_then(approved)
    }

    /// `POST /v1/agents/{id}/debits`. A 402 comes back at once as
    /// [`Denial::InsufficientFunds`]; a 429 is retried after its `Retry-After` when the
    /// policy allows and the budget has room, else returned as a denial.
    pub async fn debit(&self, agent_id: &str, debit: &Debit) -> Result<Outcome<Receipt>, Error> {
        let key = key_or_new(&debit.idempotency_key)?;
        let url = self.url(&["v1", "agents", agent_id, "debits"], &[])?;
        self.call(Method::POST, url, Some(body(debit)?), Some(key))
            .await
    }

    /// `POST /v1/agents/{id}/check`: would this debit pass? Changes nothing.
    pub async fn check(
        &self,
        agent_id: &str,
        debit: &Debit,
    ) -> Result<Outcome<CheckResult>, Error> {
        let url = self.url(&["v1", "agents", agent_id, "check"], &[])?;
        self.call(Method::POST, url, Some(body(debit)?), None).await
    }

    /// `POST /v1/agents/{id}/holds`: authorizes up to an amount; the receipt's `hold_id`
    /// names it for [`Client::capture`] and [`Client::void`].
    pub async fn hold(&self, agent_id: &str, hold: &Hold) -> Result<Outcome<Receipt>, Error> {
        let key = key_or_new(&hold.idempotency_key)?;
        let url = self.url(&["v1", "agents", agent_id, "holds"], &[])?;
        self.call(Method::POST, url, Some(body(hold)?), Some(key))
            .await
    }

    /// `POST /v1/holds/{hold_id}/capture`: takes up to the held amount, releases the rest.
    pub async fn capture(&self, hold_id: &str, capture: &Capture) -> Result<Receipt, Error> {
        let key = key_or_new(&capture.idempotency_key)?;
        let url = self.url(&["v1", "holds", hold_id, "capture"], &[])?;
        self.call(Method::POST, url, Some(body(capture)?), Some(key))
            .await
            .and_then(approved)
    }

    /// `POST /v1/holds/{hold_id}/void`: releases the whole hold.
    pub async fn void(
        &self,
        hold_id: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Receipt, Error> {
        let key = key_or_new(&idempotency_key.map(str::to_owned))?;
        let url = self.url(&["v1", "holds", hold_id, "void"], &[])?;
        self.call(Method::POST, url, Some(b"{}".to_vec()), Some(key))
            .await
            .and_then(approved)
    }

    /// `POST /v1/agents/{id}/refunds`: gives back part or all of a debit.
    pub async fn refund(&self, agent_id: &str, refund: &Refund) -> Result<Receipt, Error> {
        let key = key_or_new(&refund.idempotency_key)?;
        let url = self.url(&["v1", "agents", agent_id, "refunds"], &[])?;
        self.call(Method::POST, url, Some(body(refund)?), Some(key))
            .await
            .and_then(approved)
    }

    /// `GET /v1/agents/{id}/journal?after=&limit=`: one page, entries with `seq > after`.
    pub async fn journal(
        &self,
        agent_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<JournalPage, Error> {
        let (after, limit) = (after.to_string(), limit.to_string());
        let url = self.url(
            &["v1", "agents", agent_id, "journal"],
            &[("after", &after), ("limit", &limit)],
        )?;
        self.call(Method::GET, url, None, None)
            .await
            .and_then(approved)
    }

    /// The whole journal of an agent, page by page.
    pub async fn journal_all(&self, agent_id: &str) -> Result<Vec<JournalEntry>, Error> {
        let mut entries = Vec::new();
        let mut after = 0;
        loop {
            let page = self.journal(agent_id, after, JOURNAL_PAGE_LIMIT).await?;
            entries.extend(page.entries);
            match page.next_after {
                Some(next) if next > after => after = next,
                Some(next) => {
                    return Err(Error::InvalidArgument(format!(
                        "journal of {agent_id}: next_after {next} does not advance past {after}"
                    )))
                }
                None => return Ok(entries),
            }
        }
    }

    /// `GET /v1/events?after=&limit=&wait_ms=`: one page of the change feed after `after`
    /// (the start when empty), waiting up to `wait_ms` for the first event when there is
    /// none yet. A long poll needs an `attempt_timeout` longer than `wait_ms`.
    pub async fn events(&self, after: &str, limit: u32, wait_ms: u64) -> Result<EventsPage, Error> {
        let (limit, wait_ms) = (limit.to_string(), wait_ms.to_string());
        let url = self.url(
            &["v1", "events"],
            &[("after", after), ("limit", &limit), ("wait_ms", &wait_ms)],
        )?;
        self.call(Method::GET, url, None, None)
            .await
            .and_then(approved)
    }

    /// `GET /v1/agents/{id}/usage?period=YYYY-MM` (the current period when `None`).
    pub async fn usage(&self, agent_id: &str, period: Option<&str>) -> Result<Usage, Error> {
        let query: Vec<(&str, &str)> = period.map(|p| ("period", p)).into_iter().collect();
        let url = self.url(&["v1", "agents", agent_id, "usage"], &query)?;
        self.call(Method::GET, url, None, None)
            .await
            .and_then(approved)
    }

    /// `GET /v1/plans`.
    pub async fn plans(&self) -> Result<Plans, Error> {
        let url = self.url(&["v1", "plans"], &[])?;
        self.call(Method::GET, url, None, None)
            .await
            .and_then(approved)
    }

    pub(crate) fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Url, Error> {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| Error::InvalidArgument("base URL cannot have a path".into()))?;
            path.pop_if_empty();
            for segment in segments {
                if segment.is_empty() {
                    return Err(Error::InvalidArgument("empty id".into()));
                }
                path.push(segment);
            }
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// One logical call: attempts until an answer is final, attempts run out or the
    /// next wait would overrun the budget. Every attempt carries the same key.
    async fn call<T: DeserializeOwned + Replayable>(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        idempotency_key: Option<String>,
    ) -> Result<Outcome<T>, Error> {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt = self
                .attempt(
                    &method,
                    &url,
                    body.as_deref(),
                    idempotency_key.as_deref(),
                    self.attempt_timeout(started),
                )
                .await;
            let result = attempt.result.map_err(|e| match e {
                Error::Transport { source, .. } => Error::Transport {
                    attempts,
                    idempotency_key: idempotency_key.clone(),
                    source,
                },
                e => e,
            });
            let Some(hint) = attempt.retry else {
                return result;
            };
            // The RNG is not Send: keep it out of the await below.
            let wait = {
                let mut rng = rand::thread_rng();
                plan_retry(&self.policy, attempts, started.elapsed(), hint, &mut rng)
            };
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return result,
            }
        }
    }

    /// The timeout of the next attempt of a call that started at `started`: no attempt
    /// runs past the call's budget (but a zero budget still gets one whole attempt).
    pub(crate) fn attempt_timeout(&self, started: Instant) -> Option<Duration> {
        let left = self.policy.total_time_max.saturating_sub(started.elapsed());
        self.policy
            .attempt_timeout
            .map(|t| if left.is_zero() { t } else { t.min(left) })
    }

    pub(crate) async fn attempt<T: DeserializeOwned + Replayable>(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&[u8]>,
        idempotency_key: Option<&str>,
        timeout: Option<Duration>,
    ) -> Attempt<T> {
        let transport = |source| Attempt {
            result: Err(Error::Transport {
                attempts: 0,
                idempotency_key: None,
                source,
            }),
            // Safe to repeat: reads change nothing, writes carry their key.
            retry: Some(None),
        };
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return transport(e),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => return transport(e),
        };
        if status.is_success() {
            let result = serde_json::from_slice::<T>(&bytes)
                .map(|mut value| {
                    value.set_replayed(header_is_true(&headers, "idempotent-replayed"));
                    Outcome::Approved(value)
                })
                .map_err(|source| Error::Decode {
                    status: status.as_u16(),
                    source,
                });
            return Attempt {
                result,
                retry: None,
            };
        }
        let problem = problem_of(status.as_u16(), &headers, &bytes);
        let payment_required = headers
            .get("payment-required")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match Denial::from_problem(problem, payment_required) {
            Ok(denial) => {
                let retry = match &denial {
                    Denial::RateLimited { retry_after, .. } if self.policy.retry_rate_limited => {
                        Some(Some(*retry_after))
                    }
                    // Only worth waiting for when the reset falls inside the budget, which
                    // the retry loop checks; without a Retry-After it cannot.
                    Denial::MonthlyCapReached {
                        retry_after: Some(retry_after),
                        ..
                    } if self.policy.retry_rate_limited => Some(Some(*retry_after)),
                    // 402: never retried (a top-up must come first); 403: never.
                    _ => None,
                };
                Attempt {
                    result: Ok(Outcome::Denied(denial)),
                    retry,
                }
            }
            Err(problem) => {
                let retryable = matches!(problem.status, 408 | 502 | 503 | 504)
                    || (problem.status == 409 && problem.kind() == "idempotency-key-in-use");
                let retry = retryable.then_some(problem.retry_after);
                Attempt {
                    result: Err(Error::Problem(Box::new(problem))),
                    retry,
                }
            }
        }
    }
}

/// Answers that can say they were replayed from an idempotency record.
pub(crate) trait Replayable {
    fn set_replayed(&mut self, _replayed: bool) {}
}

impl Replayable for EventsPage {}

impl Replayable for Receipt {
    fn set_replayed(&mut self, replayed: bool) {
        self.replayed = replayed;
    }
}
impl Replayable for Agent {}
impl Replayable for AgentPage {}
impl Replayable for CheckResult {}
impl Replayable for JournalPage {}
impl Replayable for Usage {}
impl Replayable for Plans {}

fn approved<T>(outcome: Outcome<T>) -> Result<T, Error> {
    outcome.into_result().map_err(Error::from)
}

fn body<B: Serialize>(value: &B) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::InvalidArgument(format!("request body: {e}")))
}

/// The caller's key (checked: 1–255 visible ASCII) or a new one.
fn key_or_new(key: &Option<String>) -> Result<String, Error> {
    match key {
        None => Ok(Client::new_idempotency_key()),
        Some(key) => check_key(key).map(|()| key.clone()),
    }
}

/// A key the server accepts: 1–255 visible ASCII characters.
pub(crate) fn check_key(key: &str) -> Result<(), Error> {
    if !key.is_empty()
        && key.len() <= IDEMPOTENCY_KEY_LEN_MAX
        && key.bytes().all(|b| b.is_ascii_graphic())
    {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "idempotency key {key:?}: must be 1-{IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"
        )))
    }
}

fn header_is_true(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The problem body of an error answer; a body that is not one becomes a generic
/// problem with the status, so an odd proxy in between cannot make the call fail to parse.
fn problem_of(status: u16, headers: &HeaderMap, bytes: &[u8]) -> Problem {
    let mut problem = serde_json::from_slice::<Problem>(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        let mut end = text.len().min(ERROR_BODY_LEN_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Problem {
            type_uri: "about:blank".into(),
            title: reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error")
                .into(),
            status,
            detail: text[..end].to_owned(),
            ..Problem::default()
        }
    });
    problem.status = status;
    problem.retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    problem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_at_the_edge() {
        assert!(key_or_new(&Some("k".repeat(IDEMPOTENCY_KEY_LEN_MAX))).is_ok());
        assert!(key_or_new(&Some("k".repeat(IDEMPOTENCY_KEY_LEN_MAX + 1))).is_err());
        assert!(key_or_new(&Some(String::new())).is_err());
        assert!(key_or_new(&Some("a b".into())).is_err());
        let generated = key_or_new(&None).expect("generated keys are valid");
        assert!(key_or_new(&Some(generated)).is_ok());
    }

    #[test]
    fn urls_escape_ids() {
        let client = Client::new("http://127.0.0.1:8402/").expect("valid URL");
        let url = client
            .url(&["v1", "agents", "a/b c", "journal"], &[("after", "3")])
            .expect("valid");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8402/v1/agents/a%2Fb%20c/journal?after=3"
        );
        assert!(client.url(&["v1", "agents", ""], &[]).is_err());
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("not a url").is_err());
    }

    #[test]
    fn odd_error_bodies_become_problems() {
        let p = problem_of(502, &HeaderMap::new(), b"<html>bad gateway</html>");
        assert_eq!((p.status, p.kind()), (502, "about:blank"));
        assert!(p.detail.contains("bad gateway"));
        let body = br#"{"type":"urn:tally:problem:insufficient-funds","title":"t","status":402,
            "detail":"d","required_micros":5,"available_micros":1,"retryable":false,
            "accepts":[{"scheme":"exact"}]}"#;
        let p = problem_of(402, &HeaderMap::new(), body);
        match Denial::from_problem(p, None) {
            Ok(Denial::InsufficientFunds {
                required_micros: 5,
                available_micros: 1,
                retryable: false,
                accepts,
                ..
            }) => assert_eq!(accepts.len(), 1),
            other => panic!("{other:?}"),
        }
    }
}
