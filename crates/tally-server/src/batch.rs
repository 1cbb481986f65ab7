//! `POST /v1/batch`: up to `limits.batch_items_max` money commands (debit, credit, hold,
//! capture, void, refund, check) in one request, each with its own idempotency key and
//! answered on its own, in order, exactly as its single route would answer it (status,
//! receipt or problem, replay flag). Items are independent; items for one agent are
//! decided in the order given; the engine takes them all into its group commits at once.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tally_core::{AgentId, Command, CommandKind, Metadata, Priority, TaskType};

use crate::app::AppState;
use crate::auth::{Need, Role};
use crate::dto::{
    parse_hold_id, receipt_json, CaptureBody, CreditBody, DebitBody, HoldBody, ReceiptJson,
    RefundBody, VoidBody,
};
use crate::extract::{check_json_content_type, idempotency_key, parse_json, too_large};
use crate::problem::Problem;
use crate::respond::{classify, json_response, Success};
use crate::routes::spend_command;

/// The fields of an item that say what and whom it is for; the rest is the single route's
/// body.
const ENVELOPE_FIELDS: [&str; 4] = ["op", "agent_id", "hold_id", "idempotency_key"];

/// One item, ready for the engine: its command and the single route's status and receipt
/// kind.
struct Prepared {
    cmd: Command,
    status: StatusCode,
    kind: &'static str,
}

/// `POST /v1/batch` (service role; credits and refunds in it need the admin role).
pub async fn batch(State(st): State<AppState>, req: Request) -> Result<Response, Problem> {
    let role = st.role(req.headers(), Need::Service)?;
    check_json_content_type(req.headers())?;
    let limit = st.limits().batch_bytes_max;
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| too_large(limit))?;
    // Items stay raw text until each is parsed on its own (see `prepare_debit`). The map
    // is ordered as `serde_json::Map` is, so the unknown field named is the same.
    let mut body: BTreeMap<String, &RawValue> = parse_json(&st, &bytes)?;
    if let Some(k) = body.keys().find(|k| *k != "items") {
        return Err(Problem::invalid(format!(
            "unknown field {k:?}: a batch is {{\"items\": [...]}}"
        )));
    }
    let Some(Ok(items)) = body
        .remove("items")
        .map(|raw| serde_json::from_str::<Vec<&RawValue>>(raw.get()))
    else {
        return Err(Problem::invalid(
            "a batch is {\"items\": [...]}, an array of items",
        ));
    };
    let max = st.limits().batch_items_max;
    if items.len() > max {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            "Batch too large",
            format!("{} items; a batch holds at most {max}", items.len()),
        )
        .field("batch_items_max", max));
    }
    if items.is_empty() {
        return Err(Problem::invalid("a batch needs at least one item"));
    }
    let prepared: Vec<Result<Prepared, Problem>> = items
        .into_iter()
        .map(|raw| match prepare_debit(&st, raw) {
            Some(debit) => Ok(debit),
            None => serde_json::from_str(raw.get())
                // Raw items are well-formed JSON, but only a full parse checks that
                // each number fits (`1e400` does not).
                .map_err(|e| Problem::invalid(format!("invalid item: {e}")))
                .and_then(|item| prepare(&st, role, item)),
        })
        .collect();
    let cmds: Vec<Command> = prepared
        .iter()
        .filter_map(|p| p.as_ref().ok().map(|p| p.cmd.clone()))
        .collect();
    let engine = st.engine()?;
    let mut results = engine.submit_many(cmds).await.into_iter();
    let mut items = Vec::with_capacity(prepared.len());
    for p in &prepared {
        let answer = match p {
            Err(problem) => problem_item(problem),
            Ok(p) => match results.next() {
                Some(result) => answer_item(p, classify(&st, &p.cmd, result)),
                None => problem_item(&Problem::invalid("no answer for this item")),
            },
        };
        items.push(answer);
    }
    Ok(json_response(
        StatusCode::OK,
        BatchAnswer { items },
        None,
        false,
    ))
}

/// One item's answer, serialized straight into the response: building each as a
/// `serde_json::Value` map and serializing that was about a quarter of the server's CPU
/// (profiled with 100-debit batches). Fields in alphabetical order, the order `json!`
/// objects serialize in, so the bytes are those of the maps this replaced.
#[derive(Serialize)]
#[serde(untagged)]
enum ItemAnswer<'a> {
    Applied {
        receipt: ReceiptJson<'a>,
        replayed: bool,
        status: u16,
    },
    Check {
        result: CheckResult,
        status: u16,
    },
    Problem {
        problem: Value,
        status: u16,
    },
}

/// The `result` of an approved `check` item.
#[derive(Serialize)]
struct CheckResult {
    allowed: bool,
    amount_micros: u64,
    balance_micros: u64,
}

#[derive(Serialize)]
struct BatchAnswer<'a> {
    items: Vec<ItemAnswer<'a>>,
}

fn problem_item(p: &Problem) -> ItemAnswer<'static> {
    ItemAnswer::Problem {
        problem: p.to_json(),
        status: p.status.as_u16(),
    }
}

fn answer_item(p: &Prepared, outcome: Result<Success, Problem>) -> ItemAnswer<'_> {
    match outcome {
        Err(problem) => problem_item(&problem),
        Ok(Success::Applied {
            receipt, replayed, ..
        }) => ItemAnswer::Applied {
            receipt: receipt_json(&p.cmd.agent, p.kind, &receipt),
            replayed,
            status: p.status.as_u16(),
        },
        Ok(Success::WouldApprove {
            amount_micros,
            balance_micros,
            ..
        }) => ItemAnswer::Check {
            result: CheckResult {
                allowed: true,
                amount_micros,
                balance_micros,
            },
            status: 200,
        },
    }
}

/// The item's body fields (all but the envelope's), as the single route's body type.
fn fields<T: DeserializeOwned>(body: Map<String, Value>) -> Result<T, Problem> {
    serde_json::from_value(Value::Object(body)).map_err(|e| Problem::invalid(e.to_string()))
}

/// Splits an item into its envelope fields and the rest (the single route's body), moving
/// the values rather than copying them.
fn split(item: Map<String, Value>) -> (Map<String, Value>, Map<String, Value>) {
    item.into_iter()
        .partition(|(k, _)| ENVELOPE_FIELDS.contains(&k.as_str()))
}

fn text<'a>(item: &'a Map<String, Value>, name: &str) -> Result<&'a str, Problem> {
    match item.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Problem::invalid(format!("{name} must be a string"))),
        None => Err(Problem::invalid(format!("{name} is missing"))),
    }
}

fn agent(item: &Map<String, Value>) -> Result<AgentId, Problem> {
    AgentId::new(text(item, "agent_id")?).map_err(|e| Problem::invalid(format!("agent_id: {e}")))
}

fn hold(item: &Map<String, Value>) -> Result<(AgentId, u64), Problem> {
    let raw = text(item, "hold_id")?;
    parse_hold_id(raw).ok_or_else(|| Problem::not_found(format!("no hold {raw:?}")))
}

/// A debit item with nothing unusual about it, the bulk of what batches carry: parsed
/// straight into its fields. Building a `serde_json::Value` map of each item and then its
/// body type from a second map was ~8 % of the server's CPU (100-debit batches).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DebitItem<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    agent_id: Cow<'a, str>,
    #[serde(borrow)]
    idempotency_key: Cow<'a, str>,
    amount_micros: u64,
    task_type: Option<TaskType>,
    #[serde(default)]
    priority: Priority,
    #[serde(default)]
    metadata: Metadata,
}

/// The item as a debit when it is one that [`prepare`] would accept; `None` for anything
/// else (another op, an unknown or repeated field, a bad value), which `prepare` then
/// answers, so that every problem is worded by one path.
fn prepare_debit(st: &AppState, raw: &RawValue) -> Option<Prepared> {
    let item: DebitItem = serde_json::from_str(raw.get()).ok()?;
    if item.op != "debit" {
        return None;
    }
    let agent = AgentId::new(item.agent_id.as_ref()).ok()?;
    let key = idempotency_key(&item.idempotency_key, st.limits().idempotency_key_len_max).ok()?;
    let body = DebitBody {
        amount_micros: item.amount_micros,
        task_type: item.task_type,
        priority: item.priority,
        metadata: item.metadata,
    };
    let kind = CommandKind::Debit {
        amount_micros: body.amount_micros,
    };
    Some(Prepared {
        cmd: spend_command(agent, kind, body).with_key(key),
        status: StatusCode::CREATED,
        kind: "debit",
    })
}

/// Builds the item's command as its single route would, or the problem that route would
/// answer for a bad request (400, 403, 404).
fn prepare(st: &AppState, role: Role, item: Value) -> Result<Prepared, Problem> {
    let Value::Object(item) = item else {
        return Err(Problem::invalid("an item is an object"));
    };
    let (envelope, body) = split(item);
    let item = &envelope;
    let op = text(item, "op")?;
    let needs_key = op != "check";
    let key = match item.get("idempotency_key") {
        Some(Value::String(k)) if needs_key => {
            Some(idempotency_key(k, st.limits().idempotency_key_len_max)?)
        }
        Some(_) if needs_key => return Err(Problem::invalid("idempotency_key must be a string")),
        Some(_) => return Err(Problem::invalid("a check takes no idempotency_key")),
        None if needs_key => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-missing",
                "Idempotency-Key missing",
                "every state-changing item needs an idempotency_key",
            ))
        }
        None => None,
    };
    if matches!(op, "credit" | "refund") && !role.allows(Need::Admin) {
        return Err(Problem::forbidden(format!(
            "the {} role may not {op}",
            role.name()
        )));
    }
    let (cmd, status, kind) = match op {
        "debit" => {
            let body: DebitBody = fields(body)?;
            let kind = CommandKind::Debit {
                amount_micros: body.amount_micros,
            };
            (
                spend_command(agent(item)?, kind, body),
                StatusCode::CREATED,
                "debit",
            )
        }
        "check" => {
            let body: DebitBody = fields(body)?;
            let kind = CommandKind::Check {
                amount_micros: body.amount_micros,
            };
            (
                spend_command(agent(item)?, kind, body),
                StatusCode::OK,
                "check",
            )
        }
        "credit" => {
            let body: CreditBody = fields(body)?;
            let mut cmd = Command::new(
                agent(item)?,
                CommandKind::Credit {
                    amount_micros: body.amount_micros,
                },
            );
            cmd.metadata = body.metadata;
            (cmd, StatusCode::CREATED, "credit")
        }
        "hold" => {
            let body: HoldBody = fields(body)?;
            let kind = CommandKind::Hold {
                amount_micros: body.amount_micros,
                ttl_ms: body.ttl_ms,
            };
            let mut cmd = Command::new(agent(item)?, kind).with_priority(body.priority);
            cmd.task_type = body.task_type;
            cmd.metadata = body.metadata;
            (cmd, StatusCode::CREATED, "hold")
        }
        "capture" => {
            let body: CaptureBody = fields(body)?;
            let (id, hold_seq) = hold(item)?;
            let kind = CommandKind::Capture {
                hold_seq,
                amount_micros: body.amount_micros,
            };
            (Command::new(id, kind), StatusCode::OK, "capture")
        }
        "void" => {
            let _: VoidBody = fields(body)?;
            let (id, hold_seq) = hold(item)?;
            (
                Command::new(id, CommandKind::Void { hold_seq }),
                StatusCode::OK,
                "void",
            )
        }
        "refund" => {
            let body: RefundBody = fields(body)?;
            let kind = CommandKind::Refund {
                debit_seq: body.debit_seq,
                amount_micros: body.amount_micros,
            };
            (
                Command::new(agent(item)?, kind),
                StatusCode::CREATED,
                "refund",
            )
        }
        other => {
            return Err(Problem::invalid(format!(
                "op {other:?} is not debit, credit, hold, capture, void, refund or check"
            )))
        }
    };
    let cmd = match key {
        Some(k) => cmd.with_key(k),
        None => cmd,
    };
    Ok(Prepared { cmd, status, kind })
}
