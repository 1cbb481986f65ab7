//! From engine answers to HTTP: every reply, outcome, denial and command error is mapped
//! to exactly one status and problem type in [`classify`]'s single `match`. Denials are
//! logged as one structured line and counted here too.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tally_core::{
    Command, CommandError, CommandKind, Denial, Outcome, PlanBook, RateStatus, Receipt,
};
use tally_store::{Reply, SubmitError};

use crate::app::AppState;
use crate::dto::rfc3339_ms;
use crate::problem::{retry_after_secs, Problem};

pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const PAYMENT_REQUIRED: HeaderName = HeaderName::from_static("payment-required");

/// A command the engine accepted.
#[derive(Debug)]
pub enum Success {
    Applied {
        receipt: Receipt,
        rate: Option<RateStatus>,
        replayed: bool,
    },
    WouldApprove {
        amount_micros: u64,
        balance_micros: u64,
        rate: Option<RateStatus>,
    },
}

fn route_segment(kind: &CommandKind) -> &'static str {
    match kind {
        CommandKind::Hold { .. } => "holds",
        CommandKind::Check { .. } => "check",
        _ => "debits",
    }
}

fn problem(status: StatusCode, kind: &'static str, title: &'static str, detail: String) -> Problem {
    Problem::new(status, kind, title, detail)
}

/// Why the engine could not take or answer a command (writes and reads alike).
pub fn submit_error(e: SubmitError) -> Problem {
    use StatusCode as S;
    match e {
        SubmitError::Overloaded { retry_after_ms } => problem(
            S::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            "the agent's shard queue is full; retry later".into(),
        )
        .retry_after_ms(retry_after_ms),
        SubmitError::ShuttingDown => problem(
            S::SERVICE_UNAVAILABLE,
            "shutting-down",
            "Shutting down",
            "the server is shutting down".into(),
        )
        .retry_after_ms(1_000),
        SubmitError::ScanTooLarge { entries_max } => problem(
            S::UNPROCESSABLE_ENTITY,
            "scan-too-large",
            "Too much to read",
            format!(
                "the answer needs more than {entries_max} journal entries read; ask for a more recent period, or page through GET .../journal"
            ),
        )
        .field("entries_max", entries_max),
        SubmitError::Unavailable {
            retry_after_ms,
            reason,
        } => {
            tracing::warn!(%reason, "storage unavailable");
            problem(
                S::SERVICE_UNAVAILABLE,
                "storage-unavailable",
                "Storage unavailable",
                "the storage backend is unreachable or failing over; a change answered this way may or may not have been made: retry it with the same Idempotency-Key".into(),
            )
            .retry_after_ms(retry_after_ms)
        }
        SubmitError::Unsupported(what) => problem(
            S::NOT_IMPLEMENTED,
            "not-supported",
            "Not supported",
            format!("this server's storage backend does not offer {what}"),
        ),
        SubmitError::Failed(why) => {
            tracing::error!(error = %why, "engine failed");
            problem(
                S::INTERNAL_SERVER_ERROR,
                "internal-error",
                "Internal error",
                "the engine stopped after a storage failure".into(),
            )
        }
    }
}

/// The single mapping from an engine answer to success or one problem.
pub fn classify(
    st: &AppState,
    cmd: &Command,
    result: Result<Reply, SubmitError>,
) -> Result<Success, Problem> {
    use StatusCode as S;
    let m = st.metrics();
    let answer = match result {
        Err(e) => Err(submit_error(e)),
        Ok(Reply::KeyReused) => {
            m.decisions_total.with_label_values(&["key_reused"]).inc();
            Err(problem(
                S::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                "this Idempotency-Key was used for a different request".into(),
            ))
        }
        Ok(Reply::Rejected(e)) => {
            m.decisions_total.with_label_values(&["rejected"]).inc();
            Err(match e {
                CommandError::UnknownAgent => Problem::not_found(format!("no agent {}", cmd.agent)),
                CommandError::AgentExists => problem(
                    S::CONFLICT,
                    "agent-exists",
                    "Agent exists",
                    format!("agent {} already exists", cmd.agent),
                ),
                CommandError::UnknownPlan(p) => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "unknown-plan",
                    "Unknown plan",
                    format!("no plan named {p:?}"),
                ),
                CommandError::ZeroAmount => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "invalid-amount",
                    "Invalid amount",
                    e.to_string(),
                ),
                CommandError::Overflow => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "amount-overflow",
                    "Amount overflow",
                    e.to_string(),
                ),
                CommandError::InvalidTtl { max_ms, .. } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "invalid-ttl",
                    "Invalid TTL",
                    e.to_string(),
                )
                .field("ttl_ms_max", max_ms),
                CommandError::UnknownHold(_) => Problem::not_found(e.to_string()),
                CommandError::HoldExpired { expires_at_ms, .. } => {
                    problem(S::CONFLICT, "hold-expired", "Hold expired", e.to_string())
                        .field("expires_at", rfc3339_ms(expires_at_ms))
                }
                CommandError::CaptureExceedsHold { held_micros, .. } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "capture-exceeds-hold",
                    "Capture exceeds hold",
                    e.to_string(),
                )
                .field("held_micros", held_micros),
                CommandError::TooManyHolds { max } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "too-many-holds",
                    "Too many holds",
                    e.to_string(),
                )
                .field("open_holds_max", max),
                CommandError::UnknownDebit(_) => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "unknown-debit",
                    "Unknown debit",
                    e.to_string(),
                ),
                CommandError::RefundExceedsDebit {
                    refundable_micros, ..
                } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "refund-exceeds-debit",
                    "Refund exceeds debit",
                    e.to_string(),
                )
                .field("refundable_micros", refundable_micros),
                CommandError::TooManyApiKeys { max } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "too-many-api-keys",
                    "Too many API keys",
                    e.to_string(),
                )
                .field("api_keys_max", max),
                CommandError::ApiKeyExists(_) => problem(
                    S::CONFLICT,
                    "api-key-exists",
                    "API key prefix in use",
                    e.to_string(),
                ),
                CommandError::UnknownApiKey(_) => Problem::not_found(e.to_string()),
                CommandError::TooManyGrants { max } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "too-many-grants",
                    "Too many credit grants",
                    e.to_string(),
                )
                .field("grants_max", max),
                CommandError::GrantExpiryNotInFuture { expires_at_ms, .. } => problem(
                    S::UNPROCESSABLE_ENTITY,
                    "grant-expires-in-past",
                    "Grant expires in the past",
                    e.to_string(),
                )
                .field("expires_at", rfc3339_ms(expires_at_ms)),
                CommandError::Invalid(v) => Problem::invalid(v.to_string()),
            })
        }
        Ok(Reply::Decided {
            outcome: Outcome::Denied(denial),
            ..
        }) => {
            log_denial(st, cmd, &denial);
            Err(match denial {
                Denial::Suspended => problem(
                    S::FORBIDDEN,
                    "agent-suspended",
                    "Agent suspended",
                    format!("agent {} is suspended", cmd.agent),
                ),
                Denial::RateLimited {
                    bucket,
                    quota,
                    window_ms,
                    retry_after_ms,
                } => {
                    problem(S::TOO_MANY_REQUESTS, "rate-limited", "Rate limited", format!("rate limit {bucket:?} ({quota} per {} s) reached; retry in {retry_after_ms} ms", window_ms / 1_000))
                        .retry_after_ms(retry_after_ms)
                        .field("bucket", bucket.clone())
                        .header(RATELIMIT_POLICY, policy_header(st.plans(), &bucket, quota, window_ms))
                        // For the bucket that refused, the next refill is the wait.
                        .header(RATELIMIT, ratelimit_value(&bucket, 0, retry_after_ms))
                }
                Denial::MonthlyCapReached {
                    cap_micros,
                    limit_micros,
                    spent_micros,
                    held_micros,
                    resets_at_ms,
                    soft,
                } => {
                    let wait_ms = resets_at_ms.saturating_sub(st.now_ms());
                    let what = if soft {
                        "soft threshold for low-priority work"
                    } else {
                        "monthly cap"
                    };
                    problem(
                        S::TOO_MANY_REQUESTS,
                        "monthly-cap-reached",
                        "Monthly cap reached",
                        format!(
                            "the {what} of {limit_micros} micros is reached until {}",
                            rfc3339_ms(resets_at_ms)
                        ),
                    )
                    .header(
                        axum::http::header::RETRY_AFTER,
                        retry_after_secs(wait_ms).to_string(),
                    )
                    .field("cap_micros", cap_micros)
                    .field("limit_micros", limit_micros)
                    .field("spent_micros", spent_micros)
                    .field("held_micros", held_micros)
                    .field("resets_at", rfc3339_ms(resets_at_ms))
                    .field("soft", soft)
                }
                Denial::InsufficientFunds {
                    required_micros,
                    available_micros,
                    balance_micros,
                    held_micros,
                    retry_after_ms,
                } => {
                    let top_up = format!("/v1/agents/{}/credits", cmd.agent);
                    let mut p = problem(
                        S::PAYMENT_REQUIRED,
                        "insufficient-funds",
                        "Insufficient funds",
                        format!("{required_micros} micros required, {available_micros} available"),
                    )
                    .field("required_micros", required_micros)
                    .field("available_micros", available_micros)
                    .field("balance_micros", balance_micros)
                    .field("held_micros", held_micros)
                    .field("retryable", retry_after_ms.is_some())
                    .field("top_up", top_up);
                    if let Some(ms) = retry_after_ms {
                        p = p.retry_after_ms(ms);
                    }
                    if let Some(x) = st.x402() {
                        let needed = required_micros.saturating_sub(available_micros);
                        let resource = format!(
                            "{}/v1/agents/{}/{}",
                            st.public_url(),
                            cmd.agent,
                            route_segment(&cmd.kind)
                        );
                        let accepts = json!([crate::x402::requirement(x, needed)]);
                        let (_, encoded) = crate::x402::payment_required(
                            "insufficient funds",
                            &resource,
                            &x.description,
                            &accepts,
                        );
                        p = p
                            .field("accepts", accepts)
                            .header(PAYMENT_REQUIRED, encoded);
                    }
                    p
                }
            })
        }
        Ok(Reply::Decided {
            outcome: Outcome::Approved(receipt),
            rate,
            replayed,
        }) => {
            m.decisions_total.with_label_values(&["approved"]).inc();
            if !replayed {
                match cmd.kind {
                    CommandKind::Debit { .. } | CommandKind::Capture { .. } => {
                        m.debited_micros_total.inc_by(receipt.amount_micros)
                    }
                    CommandKind::Credit { .. } | CommandKind::IssueGrant { .. } => {
                        m.credited_micros_total.inc_by(receipt.amount_micros)
                    }
                    _ => {}
                }
            }
            Ok(Success::Applied {
                receipt,
                rate,
                replayed,
            })
        }
        Ok(Reply::Decided {
            outcome:
                Outcome::WouldApprove {
                    amount_micros,
                    balance_micros,
                },
            rate,
            ..
        }) => {
            m.decisions_total
                .with_label_values(&["would_approve"])
                .inc();
            Ok(Success::WouldApprove {
                amount_micros,
                balance_micros,
                rate,
            })
        }
    };
    answer
}

fn log_denial(st: &AppState, cmd: &Command, denial: &Denial) {
    let amount_micros = match cmd.kind {
        CommandKind::Debit { amount_micros }
        | CommandKind::Hold { amount_micros, .. }
        | CommandKind::Check { amount_micros } => amount_micros,
        _ => 0,
    };
    let reason = denial.reason();
    st.metrics()
        .decisions_total
        .with_label_values(&[reason])
        .inc();
    tracing::info!(
        target: "tally::denial",
        agent = %cmd.agent,
        task_type = cmd.task_type.as_ref().map_or("", |t| t.as_str()),
        amount_micros,
        reason,
        dry_run = matches!(cmd.kind, CommandKind::Check { .. }),
        "denied"
    );
}

/// The `RateLimit-Policy` value: every bucket of the plan the bucket belongs to, when the
/// plans say unambiguously which plan that is; else just the bucket itself.
pub fn policy_header(plans: &PlanBook, bucket: &str, quota: u32, window_ms: u64) -> String {
    let mut owners = plans.iter().filter(|p| {
        p.buckets
            .iter()
            .any(|b| b.name == bucket && b.quota == quota && b.window_ms == window_ms)
    });
    match (owners.next(), owners.next()) {
        (Some(plan), None) => plan.policy_header(),
        _ => format!("\"{bucket}\";q={quota};w={}", window_ms / 1_000),
    }
}

/// The `RateLimit` value for a bucket: `r` requests available now, and `t` whole seconds
/// (rounded up) until one more is ([`RateStatus::next_refill_ms`]); one meaning on a
/// 201 and on a 429 alike.
pub fn ratelimit_value(bucket: &str, remaining: u64, next_refill_ms: u64) -> String {
    format!(
        "\"{bucket}\";r={remaining};t={}",
        next_refill_ms.div_ceil(1_000)
    )
}

/// `RateLimit-Policy` / `RateLimit` for an admitted request.
pub fn rate_headers(resp: &mut Response, plans: &PlanBook, rate: Option<&RateStatus>) {
    let Some(r) = rate else { return };
    let policy = policy_header(plans, &r.bucket, r.quota, r.window_ms);
    let now = ratelimit_value(&r.bucket, r.remaining, r.next_refill_ms);
    for (name, value) in [(RATELIMIT_POLICY, policy), (RATELIMIT, now)] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
}

/// A JSON success response with the rate and replay headers.
pub fn json_response(
    status: StatusCode,
    body: impl serde::Serialize,
    rate: Option<(&PlanBook, &RateStatus)>,
    replayed: bool,
) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some((plans, rate)) = rate {
        rate_headers(&mut resp, plans, Some(rate));
    }
    if replayed {
        resp.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    resp
}
