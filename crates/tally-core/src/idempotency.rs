//! Idempotency as pure logic: what a request with a key that was seen before gets.
//! Storing keys (and their retention window) is the engine's job; the rule is here.

use crate::TimestampMs;

/// Default retention window of idempotency keys: 24 hours.
pub const RETENTION_MS_DEFAULT: u64 = 24 * 3_600_000;

/// What to do with a keyed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen (or forgotten): decide it.
    New,
    /// Seen with the same fingerprint: answer with the stored outcome, change nothing.
    Replay,
    /// Seen with a different request: refuse, change nothing.
    Conflict,
}

/// A remembered key: the fingerprint of the request that used it and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub fingerprint: u128,
    pub at_ms: TimestampMs,
}

/// The verdict for a request with `fingerprint` whose key was `seen` (or not), at
/// `now_ms`, keeping keys for `retention_ms`. A key past its window is forgotten.
/// Denials are never stored under a key, so after a denial the same key is `New`.
pub fn judge(
    seen: Option<Seen>,
    fingerprint: u128,
    now_ms: TimestampMs,
    retention_ms: u64,
) -> Verdict {
    match seen {
        Some(s) if now_ms.saturating_sub(s.at_ms) < retention_ms => {
            if s.fingerprint == fingerprint {
                Verdict::Replay
            } else {
                Verdict::Conflict
            }
        }
        _ => Verdict::New,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let seen = Some(Seen {
            fingerprint: 7,
            at_ms: 1_000,
        });
        assert_eq!(judge(None, 7, 1_000, 10), Verdict::New);
        assert_eq!(judge(seen, 7, 1_000, 10), Verdict::Replay);
        assert_eq!(judge(seen, 8, 1_000, 10), Verdict::Conflict);
        assert_eq!(
            judge(seen, 7, 1_009, 10),
            Verdict::Replay,
            "last ms of the window"
        );
        assert_eq!(
            judge(seen, 8, 1_010, 10),
            Verdict::New,
            "window over: forgotten"
        );
    }
}
