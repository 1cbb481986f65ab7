//! The JSON objects of the `/v1` API (see `crates/tally-server/API.md`), requests and
//! answers. Answers are read leniently (`#[serde(default)]`): a field the server adds
//! later must not break an older client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Free-form metadata attached to a change and echoed in the journal.
pub type Metadata = serde_json::Map<String, Value>;

/// An agent, as `GET /v1/agents/{id}` returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Agent {
    pub id: String,
    pub plan: String,
    /// `"active"` or `"suspended"`.
    pub status: String,
    pub balance_micros: u64,
    pub held_micros: u64,
    /// The current spend period, `YYYY-MM`.
    pub period: String,
    pub period_spent_micros: u64,
    pub credited_total_micros: u64,
    pub debited_total_micros: u64,
    pub refunded_total_micros: u64,
    pub holds: Vec<OpenHold>,
    pub version: u64,
    pub created_at: String,
    pub updated_at: String,
}

/// An open hold of an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct OpenHold {
    pub hold_id: String,
    pub amount_micros: u64,
    pub expires_at: String,
}

/// One page of `GET /v1/agents`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct AgentPage {
    pub agents: Vec<Agent>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// The answer to a change (credit, debit, hold, capture, void, refund).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Receipt {
    pub agent_id: String,
    /// The journal sequence of this change (what a refund names as `debit_seq`).
    pub seq: u64,
    /// `"credit"`, `"debit"`, `"hold"`, `"capture"`, `"void"`, `"refund"`.
    pub kind: String,
    pub amount_micros: u64,
    pub balance_micros: u64,
    pub held_micros: u64,
    pub at: String,
    /// For holds: `"<agent_id>~<seq>"`.
    pub hold_id: Option<String>,
    pub expires_at: Option<String>,
    /// The server answered from its idempotency record (`Idempotent-Replayed: true`): the
    /// change was made by an earlier attempt and was not made again.
    #[serde(skip)]
    pub replayed: bool,
}

/// The answer to `POST /v1/agents/{id}/check` when the debit would pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct CheckResult {
    pub allowed: bool,
    pub amount_micros: u64,
    pub balance_micros: u64,
}

/// One journal entry (`GET /v1/agents/{id}/journal`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct JournalEntry {
    /// The agent's own sequence number: dense, from 1.
    pub seq: u64,
    /// `"agent_created"`, `"agent_updated"`, `"credit"`, `"debit"`, `"hold"`, `"capture"`,
    /// `"void"`, `"expire"`, `"refund"`.
    pub kind: String,
    /// Money moved: the captured amount for captures, the released one for voids and
    /// expiries.
    pub amount_micros: u64,
    /// Balance after this change.
    pub balance_micros: u64,
    /// Sum of open holds after this change.
    pub held_micros: u64,
    pub at: String,
    pub idempotency_key: Option<String>,
    pub task_type: Option<String>,
    pub metadata: Value,
    pub hold_seq: Option<u64>,
    pub debit_seq: Option<u64>,
    pub period: Option<String>,
    /// Set on `agent_created` / `agent_updated` entries.
    pub plan: Option<String>,
    /// Set on `agent_created` / `agent_updated` entries.
    pub status: Option<String>,
    /// Set on `api_key_issued` / `api_key_revoked` entries.
    pub api_key_prefix: Option<String>,
    /// Set on spends and refunds: the part of `amount_micros` drawn from (or returned to)
    /// promotional credit grants.
    pub promotional_micros: Option<u64>,
}

/// One page of the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct JournalPage {
    pub entries: Vec<JournalEntry>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_after: Option<u64>,
}

/// One change-feed entry (`GET /v1/events`): a journal entry and whose it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct FeedEvent {
    pub agent_id: String,
    #[serde(flatten)]
    pub entry: JournalEntry,
    /// Fields of the entry this client version has no name for (from a newer server, or
    /// kinds such as `threshold_crossed`), kept so that a relay passes them on.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// One page of the change feed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct EventsPage {
    /// Every agent's durable events after the cursor, in commit order.
    pub events: Vec<FeedEvent>,
    /// Opaque: pass as `after` for the next page. Always set, also on an empty page.
    pub next_cursor: String,
}

/// Spend of one period (`GET /v1/agents/{id}/usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Usage {
    pub period: String,
    pub start_at: String,
    pub end_at: String,
    pub spent_micros: u64,
    pub refunded_micros: u64,
    pub credited_micros: u64,
    /// Money of credit grants that expired in the period.
    pub expired_micros: u64,
    pub debits: u64,
    /// `"paid"` and `"promotional"`: spend, refunds and credits by grant category.
    pub by_category: BTreeMap<String, CategoryUsage>,
    pub by_task_type: BTreeMap<String, TaskUsage>,
}

/// Spend, refunds and credits of one grant category within a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct CategoryUsage {
    pub spent_micros: u64,
    pub refunded_micros: u64,
    pub credited_micros: u64,
}

/// Spend of one task type within a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct TaskUsage {
    pub spent_micros: u64,
    pub refunded_micros: u64,
    pub count: u64,
}

/// `POST /v1/agents`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NewAgent {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Reused across retries; generated when `None`.
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl NewAgent {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ..Self::default()
        }
    }
    pub fn plan(mut self, plan: impl Into<String>) -> Self {
        self.plan = Some(plan.into());
        self
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// `PATCH /v1/agents/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// `"active"` or `"suspended"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/agents/{id}/credits`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Credit {
    pub amount_micros: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl Credit {
    pub fn new(amount_micros: u64) -> Self {
        Self {
            amount_micros,
            ..Self::default()
        }
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// Priority of a debit or hold: past a plan's soft threshold only `Critical` goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Normal,
    Critical,
}

/// `POST /v1/agents/{id}/debits` and `/check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Debit {
    pub amount_micros: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Reused across retries; generated when `None`. Give your own to retry the same
    /// logical debit later (after a top-up, or after a crash of your process).
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl Debit {
    pub fn new(amount_micros: u64) -> Self {
        Self {
            amount_micros,
            ..Self::default()
        }
    }
    pub fn task_type(mut self, task_type: impl Into<String>) -> Self {
        self.task_type = Some(task_type.into());
        self
    }
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// `POST /v1/agents/{id}/holds`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub amount_micros: u64,
    pub ttl_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl Hold {
    pub fn new(amount_micros: u64, ttl_ms: u64) -> Self {
        Self {
            amount_micros,
            ttl_ms,
            ..Self::default()
        }
    }
    pub fn task_type(mut self, task_type: impl Into<String>) -> Self {
        self.task_type = Some(task_type.into());
        self
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// `POST /v1/holds/{hold_id}/capture`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Capture {
    pub amount_micros: u64,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl Capture {
    pub fn new(amount_micros: u64) -> Self {
        Self {
            amount_micros,
            idempotency_key: None,
        }
    }
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// `POST /v1/agents/{id}/refunds`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Refund {
    /// The `seq` of the debit's receipt.
    pub debit_seq: u64,
    pub amount_micros: u64,
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

/// `GET /v1/plans`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Plans {
    pub plans: Vec<PlanInfo>,
    /// The plan of agents created without one.
    pub default_plan: Option<String>,
}

/// A plan as the server describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct PlanInfo {
    pub name: String,
    pub buckets: Vec<BucketInfo>,
    /// The `RateLimit-Policy` header of the plan (`"second";q=50;w=1`), if it has buckets.
    pub rate_limit_policy: Option<String>,
    pub monthly_cap_micros: Option<u64>,
    pub soft_threshold_pct: Option<u8>,
    pub anchor_day: u8,
    pub pricing: Option<Value>,
    pub hold_ttl_max_ms: u64,
}

/// One rate-limit bucket of a plan: `quota` requests per `window_ms`, `burst` at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct BucketInfo {
    pub name: String,
    pub quota: u32,
    pub window_ms: u64,
    pub burst: u32,
}
