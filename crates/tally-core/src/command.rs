//! Commands: what a caller asks of an agent's ledger, with the envelope every state change
//! carries (idempotency key, task type, priority, metadata) and its fingerprint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ValidationError;
use crate::id::{AgentId, IdempotencyKey, PlanName, TaskType};
use crate::state::Status;

/// Most metadata entries on one command.
pub const METADATA_ENTRIES_MAX: usize = 16;
/// Longest metadata key.
pub const METADATA_KEY_LEN_MAX: usize = 64;
/// Longest metadata value.
pub const METADATA_VALUE_LEN_MAX: usize = 256;

/// How much a request matters when the monthly cap is near: past the plan's soft
/// threshold `Low` is denied while `Normal` and `Critical` go on to the hard cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    Critical,
}

/// Free-form labels kept in the journal with the change (bounded in count and size).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub fn new(entries: BTreeMap<String, String>) -> Result<Self, ValidationError> {
        let invalid = |reason: String| ValidationError::Invalid {
            field: "metadata",
            reason,
        };
        if entries.len() > METADATA_ENTRIES_MAX {
            return Err(invalid(format!("at most {METADATA_ENTRIES_MAX} entries")));
        }
        for (k, v) in &entries {
            if k.is_empty() || k.len() > METADATA_KEY_LEN_MAX {
                return Err(invalid(format!(
                    "keys must be 1..={METADATA_KEY_LEN_MAX} bytes"
                )));
            }
            if v.len() > METADATA_VALUE_LEN_MAX {
                return Err(invalid(format!(
                    "values must be at most {METADATA_VALUE_LEN_MAX} bytes"
                )));
            }
        }
        Ok(Self(entries))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl TryFrom<BTreeMap<String, String>> for Metadata {
    type Error = ValidationError;
    fn try_from(value: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Metadata> for BTreeMap<String, String> {
    fn from(value: Metadata) -> Self {
        value.0
    }
}

/// What to do. Amounts are micros; ids of holds and debits are the journal sequence
/// numbers of the events that created them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    CreateAgent {
        plan: PlanName,
        status: Status,
    },
    UpdateAgent {
        plan: Option<PlanName>,
        status: Option<Status>,
    },
    Credit {
        amount_micros: u64,
    },
    Debit {
        amount_micros: u64,
    },
    /// Would a debit of this amount pass now? Changes nothing, not even the rate limiter.
    Check {
        amount_micros: u64,
    },
    Hold {
        amount_micros: u64,
        ttl_ms: u64,
    },
    /// Settle a hold: `amount_micros ≤` the hold is debited, the rest is released.
    Capture {
        hold_seq: u64,
        amount_micros: u64,
    },
    Void {
        hold_seq: u64,
    },
    /// Release every hold whose expiry is at or before `now`.
    ExpireHolds,
    Refund {
        debit_seq: u64,
        amount_micros: u64,
    },
}

impl CommandKind {
    /// Whether this command can change state (and so needs an idempotency key over HTTP).
    pub fn is_write(&self) -> bool {
        !matches!(self, CommandKind::Check { .. })
    }

    /// The rate limit, cap and funds apply to these.
    pub fn spends(&self) -> bool {
        matches!(
            self,
            CommandKind::Debit { .. } | CommandKind::Hold { .. } | CommandKind::Check { .. }
        )
    }
}

/// A command for one agent, with its envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub agent: AgentId,
    pub kind: CommandKind,
    pub idempotency_key: Option<IdempotencyKey>,
    pub task_type: Option<TaskType>,
    pub priority: Priority,
    pub metadata: Metadata,
}

impl Command {
    /// A command with no key, no task type, normal priority and no metadata.
    pub fn new(agent: AgentId, kind: CommandKind) -> Self {
        Self {
            agent,
            kind,
            idempotency_key: None,
            task_type: None,
            priority: Priority::Normal,
            metadata: Metadata::default(),
        }
    }

    pub fn with_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    pub fn with_task_type(mut self, task_type: TaskType) -> Self {
        self.task_type = Some(task_type);
        self
    }

    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// A stable 128-bit fingerprint of everything the request asks for (not its key):
    /// the first half of SHA-256 over a canonical, length-prefixed encoding, so it does
    /// not change across versions, platforms or restarts as a std hasher could.
    pub fn fingerprint(&self) -> u128 {
        let mut h = Sha256::new();
        let mut field = |tag: u8, bytes: &[u8]| {
            h.update([tag]);
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(b'a', self.agent.as_str().as_bytes());
        let num = |n: u64| n.to_be_bytes();
        match &self.kind {
            CommandKind::CreateAgent { plan, status } => {
                field(b'C', plan.as_str().as_bytes());
                field(b's', &[*status as u8]);
            }
            CommandKind::UpdateAgent { plan, status } => {
                field(
                    b'U',
                    plan.as_ref().map_or(&b""[..], |p| p.as_str().as_bytes()),
                );
                field(b'p', &[u8::from(plan.is_some())]);
                field(b's', &[status.map_or(255, |s| s as u8)]);
            }
            CommandKind::Credit { amount_micros } => field(b'c', &num(*amount_micros)),
            CommandKind::Debit { amount_micros } => field(b'd', &num(*amount_micros)),
            CommandKind::Check { amount_micros } => field(b'k', &num(*amount_micros)),
            CommandKind::Hold {
                amount_micros,
                ttl_ms,
            } => {
                field(b'h', &num(*amount_micros));
                field(b't', &num(*ttl_ms));
            }
            CommandKind::Capture {
                hold_seq,
                amount_micros,
            } => {
                field(b'x', &num(*hold_seq));
                field(b'm', &num(*amount_micros));
            }
            CommandKind::Void { hold_seq } => field(b'v', &num(*hold_seq)),
            CommandKind::ExpireHolds => field(b'e', &[]),
            CommandKind::Refund {
                debit_seq,
                amount_micros,
            } => {
                field(b'r', &num(*debit_seq));
                field(b'm', &num(*amount_micros));
            }
        }
        field(
            b'T',
            self.task_type
                .as_ref()
                .map_or(&b""[..], |t| t.as_str().as_bytes()),
        );
        field(b'P', &[self.priority as u8]);
        for (k, v) in self.metadata.entries() {
            field(b'K', k.as_bytes());
            field(b'V', v.as_bytes());
        }
        let digest = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        u128::from_be_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentId {
        AgentId::new("a1").expect("valid")
    }

    #[test]
    fn fingerprint_ignores_the_key_and_sees_every_field() {
        let base = Command::new(agent(), CommandKind::Debit { amount_micros: 5 });
        let keyed = base
            .clone()
            .with_key(IdempotencyKey::new("k1").expect("valid"));
        assert_eq!(base.fingerprint(), keyed.fingerprint());
        let variants = [
            Command::new(agent(), CommandKind::Debit { amount_micros: 6 }),
            Command::new(agent(), CommandKind::Credit { amount_micros: 5 }),
            Command::new(agent(), CommandKind::Check { amount_micros: 5 }),
            Command::new(
                AgentId::new("a2").expect("valid"),
                CommandKind::Debit { amount_micros: 5 },
            ),
            base.clone()
                .with_task_type(TaskType::new("llm").expect("valid")),
            base.clone().with_priority(Priority::Low),
        ];
        for v in variants {
            assert_ne!(v.fingerprint(), base.fingerprint(), "{v:?}");
        }
    }

    #[test]
    fn fingerprint_is_stable_across_builds() {
        // Pinned: a change here breaks replays of keys stored by an older version.
        let c = Command::new(
            agent(),
            CommandKind::Debit {
                amount_micros: 1_000,
            },
        );
        // The first 16 bytes of SHA-256 over the canonical encoding, computed outside
        // Rust: 'a' len=2 "a1", 'd' len=8 1000 (u64 BE), 'T' len=0, 'P' len=1 [1].
        assert_eq!(
            format!("{:032x}", c.fingerprint()),
            "b508a31f819d010c7a076c9e3e066df3"
        );
        // The key is not part of the fingerprint.
        let keyed = c.with_key(IdempotencyKey::new("k-1").expect("valid"));
        assert_eq!(keyed.fingerprint(), 0xb508a31f819d010c7a076c9e3e066df3);
    }

    #[test]
    fn metadata_limits() {
        let mut m = BTreeMap::new();
        for i in 0..METADATA_ENTRIES_MAX {
            m.insert(format!("k{i}"), "v".repeat(METADATA_VALUE_LEN_MAX));
        }
        assert!(Metadata::new(m.clone()).is_ok());
        m.insert("one-more".into(), "v".into());
        assert!(Metadata::new(m).is_err());
        let long_key = BTreeMap::from([("k".repeat(METADATA_KEY_LEN_MAX + 1), String::new())]);
        assert!(Metadata::new(long_key).is_err());
        let long_value = BTreeMap::from([("k".into(), "v".repeat(METADATA_VALUE_LEN_MAX + 1))]);
        assert!(Metadata::new(long_value).is_err());
        assert!(Metadata::new(BTreeMap::from([(String::new(), String::new())])).is_err());
    }
}
