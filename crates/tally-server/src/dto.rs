//! The JSON shapes of the API (see `API.md`): request bodies, validated on the way in by
//! the core's newtypes, and the objects we answer with.

use chrono::{DateTime, SecondsFormat};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tally_core::{
    grant::draw_order, AgentId, AgentState, Crossing, Event, EventKind, GrantCategory, Metadata,
    Plan, PlanBook, PlanName, Priority, Receipt, Status, TaskType, Thresholds, TimestampMs,
    GRANT_PRIORITY_DEFAULT,
};
use tally_store::{FeedCursor, Usage};

/// The version byte of a change-feed cursor, so its layout can change without old cursors
/// being misread.
const CURSOR_VERSION: u8 = 1;
/// Version, lsn (8 bytes), offset (4 bytes).
const CURSOR_BYTES: usize = 13;

/// A change-feed cursor as clients see it: opaque, URL-safe base64 of a version byte, the
/// log position and the offset within that log record.
pub fn cursor_text(c: FeedCursor) -> String {
    use base64::Engine as _;
    let mut raw = Vec::with_capacity(CURSOR_BYTES);
    raw.push(CURSOR_VERSION);
    raw.extend_from_slice(&c.lsn.to_be_bytes());
    raw.extend_from_slice(&c.offset.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// The cursor `text` names; `None` when it is not one this build wrote.
pub fn parse_cursor(text: &str) -> Option<FeedCursor> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    let raw: &[u8; CURSOR_BYTES] = raw.as_slice().try_into().ok()?;
    if raw[0] != CURSOR_VERSION {
        return None;
    }
    Some(FeedCursor {
        lsn: u64::from_be_bytes(raw[1..9].try_into().ok()?),
        offset: u32::from_be_bytes(raw[9..13].try_into().ok()?),
    })
}

/// `POST /v1/agents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentBody {
    pub id: AgentId,
    pub plan: Option<PlanName>,
    pub status: Option<Status>,
}

/// `PATCH /v1/agents/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchAgentBody {
    pub plan: Option<PlanName>,
    pub status: Option<Status>,
}

/// `PUT /v1/agents/{id}/thresholds`: the agent's own, replacing its plan's as a whole.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsBody {
    pub balance_below_micros: Option<u64>,
    pub cap_spend_percent: Option<u8>,
    pub grant_expiring_within_ms: Option<u64>,
}

/// `POST /v1/agents/{id}/credits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditBody {
    pub amount_micros: u64,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/agents/{id}/grants`: a credit grant. Without `expires_at` it never expires;
/// `priority` (lower is drawn first) defaults to a plain credit's, `category` to `paid`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    pub amount_micros: u64,
    /// RFC 3339; must be in the future.
    pub expires_at: Option<String>,
    #[serde(default = "grant_priority_default")]
    pub priority: u32,
    #[serde(default = "grant_category_default")]
    pub category: GrantCategory,
    #[serde(default)]
    pub metadata: Metadata,
}

fn grant_priority_default() -> u32 {
    GRANT_PRIORITY_DEFAULT
}

fn grant_category_default() -> GrantCategory {
    GrantCategory::Paid
}

/// Milliseconds since the epoch of an RFC 3339 time; a time before 1970 is 0 (it is in
/// the past either way). `None` when it does not parse.
pub fn parse_rfc3339_ms(text: &str) -> Option<TimestampMs> {
    let t = DateTime::parse_from_rfc3339(text).ok()?;
    Some(u64::try_from(t.timestamp_millis()).unwrap_or(0))
}

/// `POST /v1/agents/{id}/debits` and `/check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebitBody {
    pub amount_micros: u64,
    pub task_type: Option<TaskType>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/agents/{id}/holds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    pub amount_micros: u64,
    pub ttl_ms: u64,
    pub task_type: Option<TaskType>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `POST /v1/holds/{hold_id}/capture`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureBody {
    pub amount_micros: u64,
}

/// `POST /v1/holds/{hold_id}/void` (`{}` or no body).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoidBody {}

/// `POST /v1/agents/{id}/refunds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    pub debit_seq: u64,
    pub amount_micros: u64,
}

/// RFC 3339 UTC with milliseconds (`2026-11-29T13:00:00.000Z`).
pub fn rfc3339_ms(ms: TimestampMs) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    DateTime::from_timestamp_millis(ms)
        .unwrap_or(DateTime::<chrono::Utc>::MAX_UTC)
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A hold's public id: `<agent_id>~<seq>` (`~` is outside the agent id charset).
pub fn hold_id(agent: &AgentId, seq: u64) -> String {
    format!("{agent}~{seq}")
}

/// Parses a hold id back into its agent and sequence.
pub fn parse_hold_id(s: &str) -> Option<(AgentId, u64)> {
    let (agent, seq) = s.rsplit_once('~')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((AgentId::new(agent).ok()?, seq.parse().ok()?))
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Active => "active",
        Status::Suspended => "suspended",
    }
}

/// The Agent object. `period` is the period a spend now would count in under the agent's
/// plan ([`AgentState::period_at`]).
pub fn agent_json(a: &AgentState, plans: &PlanBook, now_ms: TimestampMs) -> Value {
    let anchor = plans.get(&a.plan).map_or(1, |p| p.anchor_day);
    let period = a.period_at(now_ms, anchor);
    let holds: Vec<Value> = a
        .holds
        .iter()
        .map(|(seq, h)| {
            json!({
                "hold_id": hold_id(&a.id, *seq),
                "amount_micros": h.amount_micros,
                "expires_at": rfc3339_ms(h.expires_at_ms),
            })
        })
        .collect();
    // In the order spends draw from them.
    let grants: Vec<Value> = draw_order(&a.grants)
        .into_iter()
        .map(|id| {
            let g = &a.grants[&id];
            json!({
                "grant_id": id,
                "amount_micros": g.amount_micros,
                "remaining_micros": g.remaining_micros,
                "expires_at": g.terms.expires_at_ms.map(rfc3339_ms),
                "priority": g.terms.priority,
                "category": g.terms.category.as_str(),
            })
        })
        .collect();
    json!({
        "id": a.id.as_str(),
        "plan": a.plan.as_str(),
        "status": status_name(a.status),
        "balance_micros": a.balance_micros,
        "held_micros": a.held_micros,
        "period": period.to_string(),
        "period_spent_micros": a.spent_in(period),
        "credited_total_micros": a.credited_total_micros,
        "debited_total_micros": a.debited_total_micros,
        "refunded_total_micros": a.refunded_total_micros,
        "expired_total_micros": a.expired_total_micros,
        "debited_paid_total_micros": a.debited_total_micros.saturating_sub(a.debited_promotional_total_micros),
        "debited_promotional_total_micros": a.debited_promotional_total_micros,
        "holds": holds,
        "thresholds": a.thresholds.as_ref().map(thresholds_json),
        "grants": grants,
        "version": a.last_seq,
        "created_at": rfc3339_ms(a.created_at_ms),
        "updated_at": rfc3339_ms(a.updated_at_ms),
    })
}

/// The Receipt object of an applied money command.
/// The body of a 201/200 receipt. A typed struct rather than `json!`, because it is the
/// body of every approved spend (no map of owned keys to build each time); fields in
/// alphabetical order, the order `json!` objects serialize in, so the bytes are the same.
#[derive(Debug, Serialize)]
pub struct ReceiptJson<'a> {
    agent_id: &'a str,
    amount_micros: u64,
    at: String,
    balance_micros: u64,
    expires_at: Option<String>,
    held_micros: u64,
    hold_id: Option<String>,
    kind: &'a str,
    seq: u64,
}

pub fn receipt_json<'a>(agent: &'a AgentId, kind: &'a str, r: &Receipt) -> ReceiptJson<'a> {
    ReceiptJson {
        agent_id: agent.as_str(),
        amount_micros: r.amount_micros,
        at: rfc3339_ms(r.at_ms),
        balance_micros: r.balance_after_micros,
        expires_at: r.hold_expires_at_ms.map(rfc3339_ms),
        held_micros: r.held_after_micros,
        hold_id: (kind == "hold").then(|| hold_id(agent, r.seq)),
        kind,
        seq: r.seq,
    }
}

/// One journal entry.
pub fn event_json(e: &Event) -> Value {
    let (hold_seq, debit_seq, period, plan, status) = match &e.kind {
        EventKind::AgentCreated { plan, status } | EventKind::AgentUpdated { plan, status } => (
            None,
            None,
            None,
            Some(plan.as_str()),
            Some(status_name(*status)),
        ),
        EventKind::Credited { .. } | EventKind::HoldPlaced { .. } => (None, None, None, None, None),
        EventKind::Debited { period, .. } | EventKind::DebitedSplit { period, .. } => {
            (None, None, Some(*period), None, None)
        }
        EventKind::HoldCaptured {
            hold_seq, period, ..
        }
        | EventKind::HoldCapturedSplit {
            hold_seq, period, ..
        } => (Some(*hold_seq), None, Some(*period), None, None),
        EventKind::HoldVoided { hold_seq, .. } | EventKind::HoldExpired { hold_seq, .. } => {
            (Some(*hold_seq), None, None, None, None)
        }
        EventKind::Refunded {
            debit_seq,
            debit_period,
            ..
        }
        | EventKind::RefundedSplit {
            debit_seq,
            debit_period,
            ..
        } => (None, Some(*debit_seq), Some(*debit_period), None, None),
        EventKind::ThresholdCrossed {
            crossing: Crossing::CapSpend { period, .. },
        } => (None, None, Some(*period), None, None),
        EventKind::ApiKeyIssued { .. }
        | EventKind::ApiKeyRevoked { .. }
        | EventKind::PaymentUnsettled { .. }
        | EventKind::ThresholdsSet { .. }
        | EventKind::ThresholdCrossed { .. }
        | EventKind::GrantIssued { .. }
        | EventKind::GrantExpired { .. } => (None, None, None, None, None),
    };
    let (thresholds, crossing) = match &e.kind {
        EventKind::ThresholdsSet { thresholds } => (thresholds.as_ref().map(thresholds_json), None),
        EventKind::ThresholdCrossed { crossing } => (None, Some(crossing_json(crossing))),
        _ => (None, None),
    };
    // Spends and refunds say how much of their money was promotional; others have no split.
    let promotional_micros = (e.kind.spend().is_some() || e.kind.refund_of().is_some())
        .then(|| e.kind.promotional_micros());
    let grant_id = match &e.kind {
        EventKind::GrantExpired { grant_id, .. } => Some(*grant_id),
        _ => None,
    };
    let api_key_prefix = match &e.kind {
        EventKind::ApiKeyIssued { prefix, .. } | EventKind::ApiKeyRevoked { prefix } => {
            Some(prefix.as_str())
        }
        _ => None,
    };
    json!({
        "seq": e.seq,
        "kind": e.kind.name(),
        "amount_micros": e.kind.amount_micros(),
        "balance_micros": e.balance_after_micros,
        "held_micros": e.held_after_micros,
        "at": rfc3339_ms(e.at_ms),
        "idempotency_key": e.idempotency_key.as_ref().map(|k| k.as_str()),
        "task_type": e.task_type.as_ref().map(|t| t.as_str()),
        "metadata": e.metadata.entries(),
        "hold_seq": hold_seq,
        "debit_seq": debit_seq,
        "period": period.map(|p| p.to_string()),
        "plan": plan,
        "status": status,
        "api_key_prefix": api_key_prefix,
        "thresholds": thresholds,
        "crossing": crossing,
        "grant_id": grant_id,
        "promotional_micros": promotional_micros,
    })
}

/// An agent's or a plan's notification thresholds.
pub fn thresholds_json(t: &Thresholds) -> Value {
    json!({
        "balance_below_micros": t.balance_below_micros,
        "cap_spend_percent": t.cap_spend_percent,
        "grant_expiring_within_ms": t.grant_expiring_within_ms,
    })
}

/// A crossed threshold: what the journal entry and the webhook say.
pub fn crossing_json(c: &Crossing) -> Value {
    match *c {
        Crossing::BalanceBelow { threshold_micros } => json!({
            "type": c.name(),
            "threshold_micros": threshold_micros,
        }),
        Crossing::CapSpend {
            percent,
            cap_micros,
            threshold_micros,
            spent_micros,
            period,
        } => json!({
            "type": c.name(),
            "threshold_micros": threshold_micros,
            "percent": percent,
            "cap_micros": cap_micros,
            "spent_micros": spent_micros,
            "period": period.to_string(),
        }),
        Crossing::GrantExpiring {
            grant_id,
            expires_at_ms,
            remaining_micros,
            within_ms,
        } => json!({
            "type": c.name(),
            "grant_id": grant_id,
            "expires_at": rfc3339_ms(expires_at_ms),
            "remaining_micros": remaining_micros,
            "within_ms": within_ms,
        }),
    }
}

/// One change-feed entry: a journal entry and whose it is.
pub fn feed_event_json(agent: &AgentId, e: &Event) -> Value {
    let mut v = event_json(e);
    v["agent_id"] = json!(agent.as_str());
    v
}

/// The usage report of one period.
pub fn usage_json(u: &Usage) -> Value {
    let by_task: serde_json::Map<String, Value> = u
        .by_task_type
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({"spent_micros": v.spent_micros, "refunded_micros": v.refunded_micros, "count": v.count}),
            )
        })
        .collect();
    json!({
        "period": u.period.to_string(),
        "start_at": rfc3339_ms(u.start_ms),
        "end_at": rfc3339_ms(u.end_ms),
        "spent_micros": u.spent_micros,
        "refunded_micros": u.refunded_micros,
        "credited_micros": u.credited_micros,
        "expired_micros": u.expired_micros,
        "debits": u.debits,
        "by_category": {
            "paid": {
                "spent_micros": u.spent_micros.saturating_sub(u.spent_promotional_micros),
                "refunded_micros": u.refunded_micros.saturating_sub(u.refunded_promotional_micros),
                "credited_micros": u.credited_micros.saturating_sub(u.credited_promotional_micros),
            },
            "promotional": {
                "spent_micros": u.spent_promotional_micros,
                "refunded_micros": u.refunded_promotional_micros,
                "credited_micros": u.credited_promotional_micros,
            },
        },
        "by_task_type": by_task,
    })
}

/// One plan as `GET /v1/plans` shows it.
pub fn plan_json(p: &Plan) -> Value {
    let buckets: Vec<Value> = p
        .buckets
        .iter()
        .map(|b| json!({"name": b.name, "quota": b.quota, "window_ms": b.window_ms, "burst": b.burst}))
        .collect();
    json!({
        "name": p.name.as_str(),
        "buckets": buckets,
        "rate_limit_policy": if p.buckets.is_empty() { Value::Null } else { Value::from(p.policy_header()) },
        "monthly_cap_micros": p.monthly_cap_micros,
        "soft_threshold_pct": p.soft_threshold_pct,
        "anchor_day": p.anchor_day,
        "pricing": {"margin_ppm": p.pricing.margin_ppm, "min_micros": p.pricing.min_micros, "max_micros": p.pricing.max_micros},
        "hold_ttl_max_ms": p.hold_ttl_max_ms,
        "thresholds": thresholds_json(&p.thresholds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_with_millis() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_957_200_123), "2026-11-29T13:00:00.123Z");
        // Beyond chrono's range: clamped, not a panic.
        assert!(!rfc3339_ms(u64::MAX).is_empty());
    }

    #[test]
    fn receipts_serialize_as_the_json_objects_they_replaced() {
        let agent = AgentId::new("a-1").expect("valid");
        for (kind, expires) in [("debit", None), ("hold", Some(1_795_957_260_000))] {
            let r = Receipt {
                first_seq: 7,
                last_seq: 7,
                seq: 7,
                events: 1,
                amount_micros: 1_500,
                balance_after_micros: 98_500,
                held_after_micros: 0,
                at_ms: 1_795_957_200_123,
                hold_expires_at_ms: expires,
            };
            let old = json!({
                "agent_id": agent.as_str(),
                "seq": r.first_seq,
                "kind": kind,
                "amount_micros": r.amount_micros,
                "balance_micros": r.balance_after_micros,
                "held_micros": r.held_after_micros,
                "at": rfc3339_ms(r.at_ms),
                "hold_id": if kind == "hold" { Value::from(hold_id(&agent, r.first_seq)) } else { Value::Null },
                "expires_at": r.hold_expires_at_ms.map(rfc3339_ms),
            });
            assert_eq!(
                serde_json::to_string(&receipt_json(&agent, kind, &r)).expect("serializes"),
                serde_json::to_string(&old).expect("serializes"),
            );
        }
    }

    #[test]
    fn hold_ids_round_trip() {
        let a = AgentId::new("agent-1").expect("valid");
        assert_eq!(parse_hold_id(&hold_id(&a, 7)), Some((a, 7)));
        for bad in [
            "agent-1",
            "agent-1~",
            "~7",
            "agent-1~x",
            "a b~1",
            "a~99999999999999999999999",
            "a~+1",
        ] {
            assert!(parse_hold_id(bad).is_none(), "{bad}");
        }
    }
}
