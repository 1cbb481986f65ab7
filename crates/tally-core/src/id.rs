//! Validated identifiers: agent ids, plan names, task types and idempotency keys.
//! Each is a newtype that can only hold a valid value, checked on construction and on
//! deserialization.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Longest agent id.
pub const AGENT_ID_LEN_MAX: usize = 128;
/// Longest plan name.
pub const PLAN_NAME_LEN_MAX: usize = 64;
/// Longest task type.
pub const TASK_TYPE_LEN_MAX: usize = 64;
/// Longest idempotency key (the design's 1–255 visible ASCII).
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

const NAME_CHARSET: &str = "[A-Za-z0-9._:-]";

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn check(
    field: &'static str,
    value: &str,
    len_max: usize,
    allowed: &'static str,
    ok: fn(u8) -> bool,
) -> Result<(), ValidationError> {
    let len = value.len();
    if len == 0 || len > len_max {
        return Err(ValidationError::Length {
            field,
            min: 1,
            max: len_max,
            len,
        });
    }
    if !value.bytes().all(ok) {
        return Err(ValidationError::Charset { field, allowed });
    }
    Ok(())
}

macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $field:literal, $len_max:expr, $allowed:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        // By hand rather than `into = "String"`, which clones the string to write it;
        // the bytes are the same (a string).
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                check($field, &value, $len_max, $allowed, $ok)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValidationError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

validated_string!(
    /// An agent's id: 1–128 characters of `[A-Za-z0-9._:-]`.
    AgentId, "agent id", AGENT_ID_LEN_MAX, NAME_CHARSET, is_name_byte
);
validated_string!(
    /// A plan's name: 1–64 characters of `[A-Za-z0-9._:-]`.
    PlanName, "plan name", PLAN_NAME_LEN_MAX, NAME_CHARSET, is_name_byte
);
validated_string!(
    /// What a debit paid for (`"llm.completion"`), the key of usage reports.
    TaskType, "task type", TASK_TYPE_LEN_MAX, NAME_CHARSET, is_name_byte
);
validated_string!(
    /// A client's idempotency key: 1–255 visible ASCII characters, scoped per agent.
    IdempotencyKey, "idempotency key", IDEMPOTENCY_KEY_LEN_MAX, "visible ASCII (0x21-0x7E)",
    |b: u8| b.is_ascii_graphic()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_id_edges() {
        assert!(AgentId::new("a").is_ok());
        assert!(AgentId::new("agent-1.eu:prod_x").is_ok());
        assert!(AgentId::new("x".repeat(AGENT_ID_LEN_MAX)).is_ok());
        assert!(matches!(
            AgentId::new("x".repeat(AGENT_ID_LEN_MAX + 1)),
            Err(ValidationError::Length { len: 129, .. })
        ));
        assert!(AgentId::new("").is_err());
        for bad in ["a/b", "a b", "ägent", "a\u{0}", "a~b", "😀", "a?b"] {
            assert!(
                matches!(AgentId::new(bad), Err(ValidationError::Charset { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn idempotency_key_edges() {
        assert!(IdempotencyKey::new("k").is_ok());
        assert!(IdempotencyKey::new("!~/?=&{}").is_ok());
        assert!(IdempotencyKey::new("k".repeat(255)).is_ok());
        assert!(IdempotencyKey::new("k".repeat(256)).is_err());
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new("a b").is_err());
        assert!(IdempotencyKey::new("é").is_err());
        assert!(IdempotencyKey::new("a\tb").is_err());
    }
}
