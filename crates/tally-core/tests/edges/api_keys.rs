//! API keys in the ledger: issued and revoked as journaled events that move no money,
//! bounded per agent at exactly `API_KEYS_PER_AGENT_MAX`, and replayed by `evolve`.

use super::*;
use tally_core::API_KEYS_PER_AGENT_MAX;

fn issue(prefix: &str) -> CommandKind {
    CommandKind::IssueApiKey {
        prefix: prefix.into(),
        sha256: [7; 32],
        name: Some("ci".into()),
    }
}

fn revoke(prefix: &str) -> CommandKind {
    CommandKind::RevokeApiKey {
        prefix: prefix.into(),
    }
}

#[test]
fn keys_up_to_the_maximum_then_one_more_is_rejected() {
    let mut l = Ledger::new("open", T0);
    l.credit(100, T0);
    for i in 0..API_KEYS_PER_AGENT_MAX {
        l.approve(issue(&format!("p{i:07}")), T0 + i as u64);
    }
    assert_eq!(l.state().api_keys.len(), API_KEYS_PER_AGENT_MAX);
    assert_eq!(
        l.reject(issue("onemore1"), T0),
        CommandError::TooManyApiKeys {
            max: API_KEYS_PER_AGENT_MAX
        }
    );
    // Revoking one makes room again; money never moved.
    l.approve(revoke("p0000000"), T0 + 100);
    l.approve(issue("onemore1"), T0 + 101);
    assert_eq!(l.state().balance_micros, 100);
    let key = &l.state().api_keys["onemore1"];
    assert_eq!(key.created_at_ms, T0 + 101);
    assert_eq!(key.sha256, [7; 32]);
}

#[test]
fn a_prefix_is_issued_once_and_revoked_once() {
    let mut l = Ledger::new("open", T0);
    l.approve(issue("abcdefgh"), T0);
    assert_eq!(
        l.reject(issue("abcdefgh"), T0),
        CommandError::ApiKeyExists("abcdefgh".into())
    );
    l.approve(revoke("abcdefgh"), T0);
    assert_eq!(
        l.reject(revoke("abcdefgh"), T0),
        CommandError::UnknownApiKey("abcdefgh".into())
    );
    assert!(l.state().api_keys.is_empty());
}

#[test]
fn retrying_an_issue_with_other_key_material_is_the_same_request() {
    let a = Command::new(AgentId::new("a1").expect("valid"), issue("aaaaaaaa"));
    let mut b = a.clone();
    b.kind = CommandKind::IssueApiKey {
        prefix: "bbbbbbbb".into(),
        sha256: [9; 32],
        name: Some("ci".into()),
    };
    assert_eq!(a.fingerprint(), b.fingerprint());
    let mut c = a.clone();
    c.kind = CommandKind::IssueApiKey {
        prefix: "aaaaaaaa".into(),
        sha256: [7; 32],
        name: Some("other".into()),
    };
    assert_ne!(a.fingerprint(), c.fingerprint());
}
