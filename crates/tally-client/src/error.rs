//! What a call can answer besides success: typed denials (data, not errors: a 402 or a
//! 429 is a normal answer an agent must act on) and [`Error`] for everything else.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prefix of every tally problem `type`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:tally:problem:";

/// An RFC 9457 `application/problem+json` body, plus the `Retry-After` header that came
/// with it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Problem {
    /// `urn:tally:problem:<kind>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Every other field of the body (`required_micros`, `resets_at`, ...).
    #[serde(flatten)]
    pub fields: serde_json::Map<String, Value>,
    /// The `Retry-After` header, parsed.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// The `<kind>` of `urn:tally:problem:<kind>` (`"insufficient-funds"`), or the whole
    /// `type` when it is not a tally problem.
    pub fn kind(&self) -> &str {
        self.type_uri
            .strip_prefix(PROBLEM_TYPE_PREFIX)
            .unwrap_or(&self.type_uri)
    }

    fn u64_field(&self, name: &str) -> u64 {
        self.fields.get(name).and_then(Value::as_u64).unwrap_or(0)
    }

    fn str_field(&self, name: &str) -> Option<String> {
        self.fields
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn bool_field(&self, name: &str) -> Option<bool> {
        self.fields.get(name).and_then(Value::as_bool)
    }
}

/// A typed refusal: the request was valid and the server said no.
#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    /// 402 `insufficient-funds`. Never retried by the client: top up first.
    InsufficientFunds {
        required_micros: u64,
        available_micros: u64,
        balance_micros: u64,
        held_micros: u64,
        /// The server says a retry can succeed without a top-up (an open hold expires).
        retryable: bool,
        /// When `retryable`: how long until it can (`Retry-After`).
        retry_after: Option<Duration>,
        /// The URL path of the credits route.
        top_up: Option<String>,
        /// x402 payment requirements, when the operator configured them.
        accepts: Vec<Value>,
        /// The `PAYMENT-REQUIRED` header (x402 v2, base64 JSON), when present.
        payment_required: Option<String>,
        problem: Box<Problem>,
    },
    /// 429 `rate-limited`.
    RateLimited {
        /// The `Retry-After` header (whole seconds, rounded up).
        retry_after: Duration,
        /// The exact wait from the body, when present.
        retry_after_ms: Option<u64>,
        /// The plan's bucket that refused.
        bucket: Option<String>,
        problem: Box<Problem>,
    },
    /// 429 `monthly-cap-reached`.
    MonthlyCapReached {
        /// RFC 3339 start of the next period.
        resets_at: String,
        retry_after: Option<Duration>,
        cap_micros: u64,
        spent_micros: u64,
        /// Denied at the plan's soft threshold (a `critical` request would go on).
        soft: bool,
        problem: Box<Problem>,
    },
    /// 403 `agent-suspended`.
    Suspended { problem: Box<Problem> },
}

impl Denial {
    /// The HTTP status that carried this denial.
    pub fn status(&self) -> u16 {
        match self {
            Denial::InsufficientFunds { .. } => 402,
            Denial::RateLimited { .. } | Denial::MonthlyCapReached { .. } => 429,
            Denial::Suspended { .. } => 403,
        }
    }

    /// The problem body behind the denial.
    pub fn problem(&self) -> &Problem {
        match self {
            Denial::InsufficientFunds { problem, .. }
            | Denial::RateLimited { problem, .. }
            | Denial::MonthlyCapReached { problem, .. }
            | Denial::Suspended { problem } => problem,
        }
    }

    /// Builds the typed denial from a problem, or gives the problem back when it is not
    /// one of the denials.
    pub(crate) fn from_problem(
        problem: Problem,
        payment_required: Option<String>,
    ) -> Result<Self, Problem> {
        Ok(match (problem.status, problem.kind()) {
            (402, _) => Denial::InsufficientFunds {
                required_micros: problem.u64_field("required_micros"),
                available_micros: problem.u64_field("available_micros"),
                balance_micros: problem.u64_field("balance_micros"),
                held_micros: problem.u64_field("held_micros"),
                retryable: problem.bool_field("retryable").unwrap_or(false),
                retry_after: problem.retry_after,
                top_up: problem.str_field("top_up"),
                accepts: problem
                    .fields
                    .get("accepts")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                payment_required,
                problem: Box::new(problem),
            },
            (429, "monthly-cap-reached") => Denial::MonthlyCapReached {
                resets_at: problem.str_field("resets_at").unwrap_or_default(),
                retry_after: problem.retry_after,
                cap_micros: problem.u64_field("cap_micros"),
                spent_micros: problem.u64_field("spent_micros"),
                soft: problem.bool_field("soft").unwrap_or(false),
                problem: Box::new(problem),
            },
            (429, _) => Denial::RateLimited {
                retry_after: problem.retry_after.unwrap_or(Duration::from_secs(1)),
                retry_after_ms: problem.fields.get("retry_after_ms").and_then(Value::as_u64),
                bucket: problem.str_field("bucket"),
                problem: Box::new(problem),
            },
            (403, "agent-suspended") => Denial::Suspended {
                problem: Box::new(problem),
            },
            _ => return Err(problem),
        })
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::InsufficientFunds {
                required_micros,
                available_micros,
                ..
            } => write!(
                f,
                "insufficient funds: {required_micros} micros required, {available_micros} available"
            ),
            Denial::RateLimited { retry_after, .. } => {
                write!(f, "rate limited: retry after {retry_after:?}")
            }
            Denial::MonthlyCapReached { resets_at, .. } => {
                write!(f, "monthly cap reached: resets at {resets_at}")
            }
            Denial::Suspended { .. } => f.write_str("agent suspended"),
        }
    }
}

/// The answer of a call that can be refused: approved with its result, or a typed denial.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    Approved(T),
    Denied(Denial),
}

impl<T> Outcome<T> {
    /// `Ok` when approved, the denial as `Err` otherwise (for `?`).
    // A denial is an ordinary answer, read field by field by the caller; boxing it here
    // would only add a `*` to every match.
    #[allow(clippy::result_large_err)]
    pub fn into_result(self) -> Result<T, Denial> {
        match self {
            Outcome::Approved(value) => Ok(value),
            Outcome::Denied(denial) => Err(denial),
        }
    }

    pub fn is_approved(&self) -> bool {
        matches!(self, Outcome::Approved(_))
    }

    pub fn denial(&self) -> Option<&Denial> {
        match self {
            Outcome::Approved(_) => None,
            Outcome::Denied(denial) => Some(denial),
        }
    }
}

/// Everything but success and typed denials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a problem that is not a denial (400, 401, 404, 409, 422,
    /// 503 after the retries, ...).
    #[error("HTTP {status}: {kind}: {detail}", status = .0.status, kind = .0.kind(), detail = .0.detail)]
    Problem(Box<Problem>),
    /// A denial on a route that is not expected to be refused (a credit for a suspended
    /// agent, say).
    #[error("denied: {0}")]
    Denied(Box<Denial>),
    /// No answer: connection refused or dropped, timeout. Retried within the policy
    /// first, so the change may or may not have been made: call again with the same
    /// `idempotency_key` to find out without making it twice.
    #[error("transport error after {attempts} attempt(s) (idempotency key {idempotency_key:?}): {source}")]
    Transport {
        attempts: u32,
        idempotency_key: Option<String>,
        #[source]
        source: reqwest::Error,
    },
    /// A success status with a body that is not what the contract says.
    #[error("HTTP {status}: unexpected body: {source}")]
    Decode {
        status: u16,
        #[source]
        source: serde_json::Error,
    },
    /// A bad argument or base URL, caught before any request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The HTTP status of the answer, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Problem(p) => Some(p.status),
            Error::Denied(d) => Some(d.status()),
            Error::Decode { status, .. } => Some(*status),
            Error::Transport { .. } | Error::InvalidArgument(_) => None,
        }
    }

    /// The problem `<kind>`, when the server sent one.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Error::Problem(p) => Some(p.kind()),
            Error::Denied(d) => Some(d.problem().kind()),
            _ => None,
        }
    }
}

impl From<Denial> for Error {
    fn from(denial: Denial) -> Self {
        Error::Denied(Box::new(denial))
    }
}
