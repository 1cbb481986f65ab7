//! `POST /v1/batch` on the client: many money commands in one request, each with its own
//! idempotency key and its own typed answer, under the same [`RetryPolicy`] as a single
//! call.
//!
//! [`RetryPolicy`]: crate::RetryPolicy

use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::client::{check_key, Client, Replayable};
use crate::error::{Denial, Error, Outcome, Problem};
use crate::retry::plan_retry;
use crate::types::{Capture, CheckResult, Credit, Debit, Hold, Receipt, Refund};

/// One command of a [`Client::batch`] call, built by [`BatchItem::debit`],
/// [`BatchItem::hold`], ... from the same request types as the single calls.
///
/// Every item but a check gets its idempotency key when it is built (the request's own,
/// or a fresh one), so sending the same items again, after a dropped connection or a
/// crash of your process, can never apply one of them twice.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// The item as the server reads it: `op`, `agent_id` or `hold_id`, `idempotency_key`
    /// and the single route's body fields.
    json: Map<String, Value>,
}

impl BatchItem {
    /// `POST /v1/agents/{id}/debits` as an item.
    pub fn debit(agent_id: impl Into<String>, debit: &Debit) -> Self {
        Self::new(
            "debit",
            "agent_id",
            agent_id.into(),
            debit,
            Some(&debit.idempotency_key),
        )
    }

    /// `POST /v1/agents/{id}/check` as an item (no key: a check changes nothing).
    pub fn check(agent_id: impl Into<String>, debit: &Debit) -> Self {
        Self::new("check", "agent_id", agent_id.into(), debit, None)
    }

    /// `POST /v1/agents/{id}/credits` as an item (needs an admin token).
    pub fn credit(agent_id: impl Into<String>, credit: &Credit) -> Self {
        Self::new(
            "credit",
            "agent_id",
            agent_id.into(),
            credit,
            Some(&credit.idempotency_key),
        )
    }

    /// `POST /v1/agents/{id}/holds` as an item.
    pub fn hold(agent_id: impl Into<String>, hold: &Hold) -> Self {
        Self::new(
            "hold",
            "agent_id",
            agent_id.into(),
            hold,
            Some(&hold.idempotency_key),
        )
    }

    /// `POST /v1/holds/{hold_id}/capture` as an item.
    pub fn capture(hold_id: impl Into<String>, capture: &Capture) -> Self {
        Self::new(
            "capture",
            "hold_id",
            hold_id.into(),
            capture,
            Some(&capture.idempotency_key),
        )
    }

    /// `POST /v1/holds/{hold_id}/void` as an item.
    pub fn void(hold_id: impl Into<String>, idempotency_key: Option<&str>) -> Self {
        let key = idempotency_key.map(str::to_owned);
        Self::new("void", "hold_id", hold_id.into(), &Map::new(), Some(&key))
    }

    /// `POST /v1/agents/{id}/refunds` as an item (needs an admin token).
    pub fn refund(agent_id: impl Into<String>, refund: &Refund) -> Self {
        Self::new(
            "refund",
            "agent_id",
            agent_id.into(),
            refund,
            Some(&refund.idempotency_key),
        )
    }

    /// `key`: `None` for a check, else the caller's key or `None` for a fresh one.
    fn new<B: Serialize>(
        op: &str,
        target: &str,
        id: String,
        body: &B,
        key: Option<&Option<String>>,
    ) -> Self {
        let mut json = match serde_json::to_value(body) {
            Ok(Value::Object(fields)) => fields,
            // The request types are structs of numbers, strings and JSON maps.
            other => unreachable!("a request body serializes to an object, not {other:?}"),
        };
        json.insert("op".into(), op.into());
        json.insert(target.into(), id.into());
        if let Some(key) = key {
            let key = key.clone().unwrap_or_else(Client::new_idempotency_key);
            json.insert("idempotency_key".into(), key.into());
        }
        Self { json }
    }

    /// `"debit"`, `"check"`, `"credit"`, `"hold"`, `"capture"`, `"void"` or `"refund"`.
    pub fn op(&self) -> &str {
        self.json
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The item's idempotency key (`None` only for a check).
    pub fn idempotency_key(&self) -> Option<&str> {
        self.json.get("idempotency_key").and_then(Value::as_str)
    }
}

/// The answer to one [`BatchItem`]: what its single route would have answered.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchAnswer {
    /// The item's HTTP status (201, 200, 402, 429, 422, ...).
    pub status: u16,
    pub outcome: BatchOutcome,
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// The change was made; `receipt.replayed` when an earlier request with the same key
    /// had made it.
    Applied(Receipt),
    /// A check that would pass.
    Checked(CheckResult),
    /// A typed refusal (402, 429, 403 suspended), exactly as the single call returns it.
    /// `retry_after` comes from the body's `retry_after_ms` (in whole seconds, rounded up,
    /// like the single route's header); a monthly cap's is `None` (see `resets_at`).
    Denied(Denial),
    /// Any other problem of the item alone: 400 bad item, 403 role, 404 unknown agent or
    /// hold, 409 key in use, 422 key reused or refund too large, 503 still overloaded
    /// after the retries. Nothing was changed by it.
    Failed(Box<Problem>),
}

impl BatchOutcome {
    pub fn receipt(&self) -> Option<&Receipt> {
        match self {
            BatchOutcome::Applied(receipt) => Some(receipt),
            _ => None,
        }
    }
}

/// The envelope of the answer, as the server writes it.
#[derive(Debug, Deserialize)]
struct WireBatch {
    items: Vec<WireAnswer>,
}

impl Replayable for WireBatch {}

#[derive(Debug, Deserialize)]
struct WireAnswer {
    status: u16,
    #[serde(default)]
    replayed: bool,
    receipt: Option<Receipt>,
    result: Option<CheckResult>,
    problem: Option<Problem>,
}

impl WireAnswer {
    fn into_answer(self) -> Result<BatchAnswer, Error> {
        let status = self.status;
        let outcome = match (self.receipt, self.result, self.problem) {
            (Some(mut receipt), None, None) if (200..300).contains(&status) => {
                receipt.replayed = self.replayed;
                BatchOutcome::Applied(receipt)
            }
            (None, Some(result), None) if (200..300).contains(&status) => {
                BatchOutcome::Checked(result)
            }
            (None, None, Some(mut problem)) if status >= 400 => {
                problem.status = status;
                // No headers per item: the body's exact wait stands in for Retry-After.
                problem.retry_after = problem
                    .fields
                    .get("retry_after_ms")
                    .and_then(Value::as_u64)
                    .map(|ms| Duration::from_secs(ms.div_ceil(1_000).max(1)));
                match Denial::from_problem(problem, None) {
                    Ok(denial) => BatchOutcome::Denied(denial),
                    Err(problem) => BatchOutcome::Failed(Box::new(problem)),
                }
            }
            _ => {
                return Err(decode_error(
                    status,
                    "an item answer holds exactly one of receipt, result or problem, matching its status",
                ))
            }
        };
        Ok(BatchAnswer { status, outcome })
    }
}

fn decode_error(status: u16, why: &str) -> Error {
    Error::Decode {
        status,
        source: <serde_json::Error as serde::de::Error>::custom(why),
    }
}

impl Client {
    /// `POST /v1/batch`: the items in one request, answered one [`BatchAnswer`] per item,
    /// in order. Items are independent (one item's denial or bad shape is its own answer,
    /// not an `Err`); one agent's items are decided in the order given.
    ///
    /// **Safe to retry.** Every item carries its own idempotency key, fixed when the item
    /// was built, so the whole batch can be sent again at any time: what was applied
    /// replays (`receipt.replayed`), what was not is applied once. The call itself
    /// retries under the client's [`RetryPolicy`](crate::RetryPolicy), with the same
    /// attempts and time budget as a single call: the whole batch when the envelope
    /// failed (503, 502, 504, 408, a dropped connection), and only the items still worth
    /// retrying when the envelope was answered (503 overloaded, 409
    /// `idempotency-key-in-use`, and 429 `rate-limited` when the policy retries those),
    /// after the longest `retry_after_ms` among them. A 402 is never retried. An item whose
    /// last re-send got no answer keeps the answer it had.
    ///
    /// `Err` is for the envelope: [`Error::InvalidArgument`] for no items or a bad key
    /// (before any request), [`Error::Problem`] for 400, 401, 413 `batch-too-large` (past
    /// the server's `limits.batch_items_max`, default 1,000) or `body-too-large`, 415,
    /// [`Error::Denied`] for a 429 on the whole request, [`Error::Transport`] when no
    /// answer came; then nothing is known of any item: send the same items again.
    pub async fn batch(&self, items: &[BatchItem]) -> Result<Vec<BatchAnswer>, Error> {
        if items.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one item".into(),
            ));
        }
        for item in items {
            if let Some(key) = item.idempotency_key() {
                check_key(key)?;
            }
        }
        let url = self.url(&["v1", "batch"], &[])?;
        let started = Instant::now();
        // Either every item has an answer (the envelope was answered once) or none has.
        let mut answers: Vec<Option<BatchAnswer>> = vec![None; items.len()];
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut last_error: Option<Error>;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let body = serde_json::json!({
                "items": pending.iter().map(|&i| &items[i].json).collect::<Vec<_>>(),
            });
            let body = serde_json::to_vec(&body)
                .map_err(|e| Error::InvalidArgument(format!("request body: {e}")))?;
            let attempt = self
                .attempt::<WireBatch>(
                    &Method::POST,
                    &url,
                    Some(&body),
                    None,
                    self.attempt_timeout(started),
                )
                .await;
            let hint = match attempt.result {
                Ok(Outcome::Approved(wire)) => {
                    last_error = None;
                    if wire.items.len() != pending.len() {
                        let why =
                            format!("{} answers to {} items", wire.items.len(), pending.len());
                        return Err(decode_error(200, &why));
                    }
                    let mut again = Vec::new();
                    let mut hint: Option<Duration> = None;
                    for (&i, wire) in pending.iter().zip(wire.items) {
                        let answer = wire.into_answer()?;
                        if let Some(wait) = self.item_retry(&answer.outcome) {
                            again.push(i);
                            hint = hint.max(wait);
                        }
                        answers[i] = Some(answer);
                    }
                    pending = again;
                    if pending.is_empty() {
                        break;
                    }
                    hint
                }
                Ok(Outcome::Denied(denial)) => {
                    last_error = Some(Error::from(denial));
                    match attempt.retry {
                        Some(hint) => hint,
                        None => break,
                    }
                }
                Err(error) => {
                    last_error = Some(match error {
                        Error::Transport { source, .. } => Error::Transport {
                            attempts,
                            idempotency_key: None,
                            source,
                        },
                        error => error,
                    });
                    match attempt.retry {
                        Some(hint) => hint,
                        None => break,
                    }
                }
            };
            let wait = {
                // The RNG is not Send: keep it out of the await below.
                let mut rng = rand::thread_rng();
                plan_retry(
                    self.retry_policy(),
                    attempts,
                    started.elapsed(),
                    hint,
                    &mut rng,
                )
            };
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => break,
            }
        }
        match answers.into_iter().collect::<Option<Vec<_>>>() {
            Some(answers) => Ok(answers),
            None => Err(last_error.unwrap_or_else(|| {
                decode_error(0, "the batch ended without an answer or an error")
            })),
        }
    }

    /// `Some(hint)` when an answered item is worth sending again under the policy.
    fn item_retry(&self, outcome: &BatchOutcome) -> Option<Option<Duration>> {
        match outcome {
            BatchOutcome::Denied(Denial::RateLimited { retry_after, .. })
                if self.retry_policy().retry_rate_limited =>
            {
                Some(Some(*retry_after))
            }
            BatchOutcome::Failed(problem)
                if matches!(problem.status, 408 | 502 | 503 | 504)
                    || (problem.status == 409 && problem.kind() == "idempotency-key-in-use") =>
            {
                Some(problem.retry_after)
            }
            _ => None,
        }
    }
}
