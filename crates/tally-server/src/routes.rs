//! The handlers: DTO in, `Command` to the engine, answer out through `respond::classify`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tally_core::{AgentId, Command, CommandKind, GrantTerms, PeriodKey, Status, Thresholds};

use crate::app::AppState;
use crate::dto::{
    agent_json, cursor_text, event_json, feed_event_json, parse_cursor, parse_hold_id,
    parse_rfc3339_ms, plan_json, receipt_json, usage_json, CaptureBody, CreateAgentBody,
    CreditBody, DebitBody, GrantBody, HoldBody, PatchAgentBody, RefundBody, ThresholdsBody,
    VoidBody,
};
use crate::extract::{AgentPath, ApiJson, ApiQuery, HoldPath, IdemKey, OptionalJson};
use crate::problem::Problem;
use crate::respond::{classify, json_response, submit_error, Success};

type Answer = Result<Response, Problem>;

/// Submits a money command and answers its receipt with `status`.
async fn submit_receipt(st: &AppState, cmd: Command, status: StatusCode, kind: &str) -> Answer {
    let engine = st.engine()?;
    let result = engine.submit(cmd.clone()).await;
    match classify(st, &cmd, result)? {
        Success::Applied {
            receipt,
            rate,
            replayed,
        } => Ok(json_response(
            status,
            receipt_json(&cmd.agent, kind, &receipt),
            rate.as_ref().map(|r| (st.plans(), r)),
            replayed,
        )),
        Success::WouldApprove { .. } => Err(Problem::invalid("unexpected dry-run answer")),
    }
}

/// Submits an agent command and answers the agent as it is now.
async fn submit_agent(st: &AppState, cmd: Command, status: StatusCode) -> Answer {
    let engine = st.engine()?;
    let result = engine.submit(cmd.clone()).await;
    let replayed = match classify(st, &cmd, result)? {
        Success::Applied { replayed, .. } => replayed,
        Success::WouldApprove { .. } => false,
    };
    let agent = fetch_agent(st, &cmd.agent).await?;
    Ok(json_response(
        status,
        agent_json(&agent, st.plans(), st.now_ms()),
        None,
        replayed,
    ))
}

async fn fetch_agent(st: &AppState, id: &AgentId) -> Result<tally_core::AgentState, Problem> {
    st.engine()?
        .agent(id)
        .await
        .map_err(submit_error)?
        .ok_or_else(|| Problem::not_found(format!("no agent {id}")))
}

pub async fn create_agent(
    State(st): State<AppState>,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<CreateAgentBody>,
) -> Answer {
    let kind = CommandKind::CreateAgent {
        plan: body.plan.unwrap_or_else(|| st.default_plan().clone()),
        status: body.status.unwrap_or(Status::Active),
    };
    let cmd = Command::new(body.id, kind).with_key(key);
    submit_agent(&st, cmd, StatusCode::CREATED).await
}

pub async fn patch_agent(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<PatchAgentBody>,
) -> Answer {
    let kind = CommandKind::UpdateAgent {
        plan: body.plan,
        status: body.status,
    };
    submit_agent(&st, Command::new(id, kind).with_key(key), StatusCode::OK).await
}

/// `PUT /v1/agents/{id}/thresholds`: the agent's own notification thresholds.
pub async fn put_thresholds(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<ThresholdsBody>,
) -> Answer {
    let thresholds = Thresholds {
        balance_below_micros: body.balance_below_micros,
        cap_spend_percent: body.cap_spend_percent,
        grant_expiring_within_ms: body.grant_expiring_within_ms,
    };
    let kind = CommandKind::SetThresholds {
        thresholds: Some(thresholds),
    };
    submit_agent(&st, Command::new(id, kind).with_key(key), StatusCode::OK).await
}

/// `DELETE /v1/agents/{id}/thresholds`: back to the plan's.
pub async fn delete_thresholds(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
) -> Answer {
    let kind = CommandKind::SetThresholds { thresholds: None };
    submit_agent(&st, Command::new(id, kind).with_key(key), StatusCode::OK).await
}

pub async fn get_agent(State(st): State<AppState>, AgentPath(id): AgentPath) -> Answer {
    let agent = fetch_agent(&st, &id).await?;
    Ok(json_response(
        StatusCode::OK,
        agent_json(&agent, st.plans(), st.now_ms()),
        None,
        false,
    ))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

fn page_limit(st: &AppState, limit: Option<u32>) -> Result<usize, Problem> {
    let max = st.limits().page_limit_max;
    match limit.unwrap_or(st.limits().page_limit_default) {
        n if n == 0 || n > max => {
            Err(Problem::invalid(format!("limit must be 1..={max}")).field("page_limit_max", max))
        }
        n => Ok(n as usize),
    }
}

pub async fn list_agents(State(st): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> Answer {
    let limit = page_limit(&st, q.limit)?;
    let after = match q.after.filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => Some(AgentId::new(a).map_err(|e| Problem::invalid(format!("after: {e}")))?),
    };
    let engine = st.engine()?;
    let page = engine
        .list_agents(after.as_ref(), limit)
        .await
        .map_err(submit_error)?;
    let now = st.now_ms();
    let agents: Vec<Value> = page
        .agents
        .iter()
        .map(|a| agent_json(a, st.plans(), now))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"agents": agents, "next_after": page.next_after.as_ref().map(AgentId::as_str)}),
        None,
        false,
    ))
}

pub async fn credit(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<CreditBody>,
) -> Answer {
    let mut cmd = Command::new(
        id,
        CommandKind::Credit {
            amount_micros: body.amount_micros,
        },
    )
    .with_key(key);
    cmd.metadata = body.metadata;
    submit_receipt(&st, cmd, StatusCode::CREATED, "credit").await
}

/// `POST /v1/agents/{id}/grants`: answers the receipt; the grant's id is its `seq` (a
/// never-expiring grant merges into the live one of the same terms, whose id it keeps).
pub async fn grant(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<GrantBody>,
) -> Answer {
    let expires_at_ms = match &body.expires_at {
        None => None,
        Some(text) => Some(parse_rfc3339_ms(text).ok_or_else(|| {
            Problem::invalid("expires_at must be an RFC 3339 time (2027-01-31T00:00:00Z)")
        })?),
    };
    let terms = GrantTerms {
        expires_at_ms,
        priority: body.priority,
        category: body.category,
    };
    let kind = CommandKind::IssueGrant {
        amount_micros: body.amount_micros,
        terms,
    };
    let mut cmd = Command::new(id, kind).with_key(key);
    cmd.metadata = body.metadata;
    submit_receipt(&st, cmd, StatusCode::CREATED, "grant").await
}

/// A debit or check command with the body's priority, task type and metadata.
pub(crate) fn spend_command(id: AgentId, kind: CommandKind, body: DebitBody) -> Command {
    let mut cmd = Command::new(id, kind).with_priority(body.priority);
    cmd.task_type = body.task_type;
    cmd.metadata = body.metadata;
    cmd
}

pub async fn debit(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<DebitBody>,
) -> Answer {
    let kind = CommandKind::Debit {
        amount_micros: body.amount_micros,
    };
    let cmd = spend_command(id, kind, body).with_key(key);
    submit_receipt(&st, cmd, StatusCode::CREATED, "debit").await
}

pub async fn check(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    ApiJson(body): ApiJson<DebitBody>,
) -> Answer {
    let kind = CommandKind::Check {
        amount_micros: body.amount_micros,
    };
    let cmd = spend_command(id, kind, body);
    let engine = st.engine()?;
    let result = engine.submit(cmd.clone()).await;
    match classify(&st, &cmd, result)? {
        Success::WouldApprove {
            amount_micros,
            balance_micros,
            rate,
        } => Ok(json_response(
            StatusCode::OK,
            json!({"allowed": true, "amount_micros": amount_micros, "balance_micros": balance_micros}),
            rate.as_ref().map(|r| (st.plans(), r)),
            false,
        )),
        Success::Applied { .. } => Err(Problem::invalid("unexpected answer to a check")),
    }
}

pub async fn hold(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<HoldBody>,
) -> Answer {
    let kind = CommandKind::Hold {
        amount_micros: body.amount_micros,
        ttl_ms: body.ttl_ms,
    };
    let mut cmd = Command::new(id, kind)
        .with_priority(body.priority)
        .with_key(key);
    cmd.task_type = body.task_type;
    cmd.metadata = body.metadata;
    submit_receipt(&st, cmd, StatusCode::CREATED, "hold").await
}

fn hold_target(raw: &str) -> Result<(AgentId, u64), Problem> {
    parse_hold_id(raw).ok_or_else(|| Problem::not_found(format!("no hold {raw:?}")))
}

pub async fn capture(
    State(st): State<AppState>,
    HoldPath(raw): HoldPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<CaptureBody>,
) -> Answer {
    let (agent, hold_seq) = hold_target(&raw)?;
    let kind = CommandKind::Capture {
        hold_seq,
        amount_micros: body.amount_micros,
    };
    submit_receipt(
        &st,
        Command::new(agent, kind).with_key(key),
        StatusCode::OK,
        "capture",
    )
    .await
}

pub async fn void(
    State(st): State<AppState>,
    HoldPath(raw): HoldPath,
    IdemKey(key): IdemKey,
    OptionalJson(_body): OptionalJson<VoidBody>,
) -> Answer {
    let (agent, hold_seq) = hold_target(&raw)?;
    let kind = CommandKind::Void { hold_seq };
    submit_receipt(
        &st,
        Command::new(agent, kind).with_key(key),
        StatusCode::OK,
        "void",
    )
    .await
}

pub async fn refund(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(key): IdemKey,
    ApiJson(body): ApiJson<RefundBody>,
) -> Answer {
    let kind = CommandKind::Refund {
        debit_seq: body.debit_seq,
        amount_micros: body.amount_micros,
    };
    submit_receipt(
        &st,
        Command::new(id, kind).with_key(key),
        StatusCode::CREATED,
        "refund",
    )
    .await
}

#[derive(Debug, Deserialize)]
pub struct JournalQuery {
    after: Option<u64>,
    limit: Option<u32>,
}

pub async fn journal(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    ApiQuery(q): ApiQuery<JournalQuery>,
) -> Answer {
    let limit = page_limit(&st, q.limit)?;
    fetch_agent(&st, &id).await?;
    let entries = st
        .engine()?
        .journal(&id, q.after.unwrap_or(0), limit)
        .await
        .map_err(submit_error)?;
    let next_after = if entries.len() == limit {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    let entries: Vec<Value> = entries.iter().map(event_json).collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"entries": entries, "next_after": next_after}),
        None,
        false,
    ))
}

/// The longest a `GET /v1/events` long poll waits for new events, in milliseconds.
pub const EVENTS_WAIT_MS_MAX: u64 = 30_000;

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    after: Option<String>,
    limit: Option<u32>,
    wait_ms: Option<u64>,
}

/// The change feed: durable events of every agent in commit order, after an opaque cursor.
pub async fn events(State(st): State<AppState>, ApiQuery(q): ApiQuery<EventsQuery>) -> Answer {
    let limit = page_limit(&st, q.limit)?;
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > EVENTS_WAIT_MS_MAX {
        return Err(
            Problem::invalid(format!("wait_ms must be 0..={EVENTS_WAIT_MS_MAX}"))
                .field("wait_ms_max", EVENTS_WAIT_MS_MAX),
        );
    }
    let from = match q.after.as_deref().filter(|a| !a.is_empty()) {
        None => tally_store::FeedCursor::default(),
        Some(a) => parse_cursor(a).ok_or_else(|| {
            Problem::invalid("after: not a cursor this server gave out (use next_cursor)")
        })?,
    };
    let engine = st.engine()?;
    if from.lsn > engine.feed_indexed_lsn().saturating_add(1) {
        // Never handed out (another data directory, or made up): waiting on it would
        // show nothing until the log got there, then skip everything before.
        return Err(Problem::invalid(
            "after: a cursor past the end of this server's feed (use next_cursor)",
        ));
    }
    let wait = std::time::Duration::from_millis(wait_ms);
    let page = tokio::select! {
        page = engine.events(from, limit, wait) => page.map_err(submit_error)?,
        // Shutting down: a poll that would wait answers what there is now.
        () = st.draining() => engine
            .events(from, limit, std::time::Duration::ZERO)
            .await
            .map_err(submit_error)?,
    };
    let events: Vec<Value> = page
        .events
        .iter()
        .map(|(agent, e)| feed_event_json(agent, e))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"events": events, "next_cursor": cursor_text(page.next)}),
        None,
        false,
    ))
}

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    period: Option<String>,
}

pub async fn usage(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Answer {
    let agent = fetch_agent(&st, &id).await?;
    let period: PeriodKey = match q.period {
        Some(p) => p
            .parse()
            .map_err(|e: tally_core::ValidationError| Problem::invalid(e.to_string()))?,
        None => {
            let anchor = st.plans().get(&agent.plan).map_or(1, |p| p.anchor_day);
            agent.period_at(st.now_ms(), anchor)
        }
    };
    let usage = st
        .engine()?
        .usage(&id, period)
        .await
        .map_err(submit_error)?
        .ok_or_else(|| Problem::not_found(format!("no agent {id}")))?;
    Ok(json_response(
        StatusCode::OK,
        usage_json(&usage),
        None,
        false,
    ))
}

pub async fn plans(State(st): State<AppState>) -> Answer {
    let plans: Vec<Value> = st.plans().iter().map(plan_json).collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"plans": plans, "default_plan": st.default_plan().as_str()}),
        None,
        false,
    ))
}

pub async fn healthz() -> Response {
    json_response(StatusCode::OK, json!({"status": "ok"}), None, false)
}

pub async fn readyz(State(st): State<AppState>) -> Answer {
    if st.is_ready() {
        let k = st.engine()?.key_index_status();
        // Ready either way; the details say when the disk bound on keys has cut the
        // idempotency window short, so a retry that old would be charged again.
        let idempotency = json!({
            "keys_on_disk": k.keys_on_disk,
            "keys_max": k.keys_max,
            "retention_s": k.retention_ms / 1_000,
            "window_s": k.window_ms / 1_000,
            "window_cut": k.window_ms < k.retention_ms,
            "filter_bytes": k.filter_bytes,
        });
        Ok(json_response(
            StatusCode::OK,
            json!({"status": "ready", "idempotency": idempotency}),
            None,
            false,
        ))
    } else {
        Err(Problem::not_ready())
    }
}

pub async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics().render(),
    )
        .into_response()
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

pub async fn not_found() -> Problem {
    Problem::not_found("no such route")
}

pub async fn method_not_allowed() -> Problem {
    Problem::method_not_allowed()
}
