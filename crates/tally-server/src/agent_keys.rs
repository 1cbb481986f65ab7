//! Agent API keys: `tk_<prefix>_<secret>`, made here, shown once, kept in the ledger only
//! as the public prefix and the SHA-256 of the whole key (`ApiKeyIssued` events), and
//! found again through an in-memory index prefix → (agent, hash) that is rebuilt from the
//! agents at start and updated by the key routes after each change. An agent key proves
//! only "this is agent X" to forward-auth (and later the proxy); it is never a bearer
//! token for tally's own API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tally_core::{
    AgentId, AgentState, Command, CommandKind, EventKind, TimestampMs, API_KEYS_PER_AGENT_MAX,
    API_KEY_NAME_LEN_MAX, API_KEY_PREFIX_LEN,
};
use tally_store::Engine;

use crate::app::AppState;
use crate::dto::rfc3339_ms;
use crate::extract::{AgentPath, IdemKey, OptionalJson};
use crate::problem::Problem;
use crate::respond::{classify, submit_error, Success, IDEMPOTENT_REPLAYED};

/// What every agent key starts with, so it is recognisable (and scannable) in the wild.
pub const KEY_SCHEME: &str = "tk_";
/// Random bytes in a key's secret part (hex encoded: 64 characters).
pub const KEY_SECRET_BYTES: usize = 32;
/// The longest string that can be a key: `tk_` + prefix + `_` + secret.
pub const KEY_LEN_MAX: usize = 3 + API_KEY_PREFIX_LEN + 1 + 2 * KEY_SECRET_BYTES;
const PREFIX_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh key: the whole key (shown once), its prefix and its SHA-256.
pub fn generate() -> (String, String, [u8; 32]) {
    let mut rng = rand::thread_rng();
    let prefix: String = (0..API_KEY_PREFIX_LEN)
        .map(|_| PREFIX_ALPHABET[rng.gen_range(0..PREFIX_ALPHABET.len())] as char)
        .collect();
    let mut secret = [0u8; KEY_SECRET_BYTES];
    rng.fill(&mut secret[..]);
    let key = format!("{KEY_SCHEME}{prefix}_{}", hex::encode(secret));
    let hash = Sha256::digest(key.as_bytes()).into();
    (key, prefix, hash)
}

/// The prefix of something shaped like a key.
pub(crate) fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_SCHEME)?;
    let (prefix, secret) = rest.split_once('_')?;
    (prefix.len() == API_KEY_PREFIX_LEN && !secret.is_empty()).then_some(prefix)
}

#[derive(Debug)]
struct Entry {
    agent: AgentId,
    sha256: [u8; 32],
    /// 0 = not used since this process started.
    last_used_ms: AtomicU64,
}

/// prefix → (agent, hash): who a presented key belongs to.
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    entries: Arc<RwLock<HashMap<String, Entry>>>,
}

impl KeyIndex {
    /// Makes the index say exactly what `agent`'s record says about its keys.
    pub fn sync_agent(&self, agent: &AgentState) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|prefix, e| e.agent != agent.id || agent.api_keys.contains_key(prefix));
        for (prefix, key) in &agent.api_keys {
            map.entry(prefix.clone()).or_insert_with(|| Entry {
                agent: agent.id.clone(),
                sha256: key.sha256,
                last_used_ms: AtomicU64::new(0),
            });
        }
    }

    /// Loads every agent's keys (at start, before the server is ready).
    pub async fn rebuild(&self, engine: &Engine) -> anyhow::Result<usize> {
        let mut after: Option<AgentId> = None;
        loop {
            let page = engine
                .list_agents(after.as_ref(), 1_000)
                .await
                .map_err(|e| anyhow::anyhow!("listing agents for the key index: {e}"))?;
            for agent in page.agents.iter().filter(|a| !a.api_keys.is_empty()) {
                self.sync_agent(agent);
            }
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Ok(self.len())
    }

    pub fn len(&self) -> usize {
        self.entries.read().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, prefix: &str) -> bool {
        self.entries.read().is_ok_and(|m| m.contains_key(prefix))
    }

    /// The agent a presented key belongs to, comparing hashes in constant time; records
    /// the use.
    pub fn verify(&self, key: &str, now_ms: TimestampMs) -> Option<AgentId> {
        if key.len() > KEY_LEN_MAX {
            return None;
        }
        let prefix = prefix_of(key)?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let map = self.entries.read().ok()?;
        let entry = map.get(prefix)?;
        if bool::from(entry.sha256.ct_eq(&hash)) {
            entry.last_used_ms.store(now_ms, Ordering::Relaxed);
            Some(entry.agent.clone())
        } else {
            None
        }
    }

    /// When the key was last used, since this process started.
    pub fn last_used_ms(&self, prefix: &str) -> Option<TimestampMs> {
        let map = self.entries.read().ok()?;
        let ms = map.get(prefix)?.last_used_ms.load(Ordering::Relaxed);
        (ms > 0).then_some(ms)
    }
}

/// `POST /v1/agents/{id}/keys`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueKeyBody {
    pub name: Option<String>,
}

fn key_json(st: &AppState, agent: &AgentId, prefix: &str, state: &AgentState) -> Value {
    let key = state.api_keys.get(prefix);
    json!({
        "agent_id": agent.as_str(),
        "prefix": prefix,
        "name": key.and_then(|k| k.name.as_deref()),
        "created_at": key.map(|k| rfc3339_ms(k.created_at_ms)),
        "last_used_at": st.keys().last_used_ms(prefix).map(rfc3339_ms),
    })
}

async fn fetch(st: &AppState, id: &AgentId) -> Result<AgentState, Problem> {
    st.engine()?
        .agent(id)
        .await
        .map_err(submit_error)?
        .ok_or_else(|| Problem::not_found(format!("no agent {id}")))
}

pub async fn issue(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
    IdemKey(idem): IdemKey,
    OptionalJson(body): OptionalJson<IssueKeyBody>,
) -> Result<Response, Problem> {
    if let Some(name) = &body.name {
        if name.is_empty()
            || name.len() > API_KEY_NAME_LEN_MAX
            || !name.chars().all(|c| !c.is_control())
        {
            return Err(Problem::invalid(format!(
                "name must be 1..={API_KEY_NAME_LEN_MAX} bytes without control characters"
            ))
            .field("api_key_name_len_max", API_KEY_NAME_LEN_MAX));
        }
    }
    // A prefix is the lookup key across all agents: draw again on the (rare) collision.
    let (key, prefix, sha256) = loop {
        let k = generate();
        if !st.keys().contains(&k.1) {
            break k;
        }
    };
    let kind = CommandKind::IssueApiKey {
        prefix: prefix.clone(),
        sha256,
        name: body.name,
    };
    let cmd = Command::new(id.clone(), kind).with_key(idem);
    let engine = st.engine()?;
    let result = engine.submit(cmd.clone()).await;
    let Success::Applied {
        receipt, replayed, ..
    } = classify(&st, &cmd, result)?
    else {
        return Err(Problem::invalid("unexpected dry-run answer"));
    };
    let agent = fetch(&st, &id).await?;
    st.keys().sync_agent(&agent);
    // A replay cannot show the key again (only its hash is kept): it names the prefix
    // the first answer issued, with `key: null`.
    let (shown, prefix) = if replayed {
        let first = engine
            .journal(&id, receipt.seq.saturating_sub(1), 1)
            .await
            .map_err(submit_error)?;
        match first.first().map(|e| &e.kind) {
            Some(EventKind::ApiKeyIssued { prefix, .. }) => (None, prefix.clone()),
            _ => return Err(Problem::not_found("the key this request issued is gone")),
        }
    } else {
        (Some(key), prefix)
    };
    let mut body = key_json(&st, &id, &prefix, &agent);
    body["key"] = json!(shown);
    let mut resp = (StatusCode::CREATED, axum::Json(body)).into_response();
    if replayed {
        resp.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, "true".parse().expect("ascii"));
    }
    Ok(resp)
}

pub async fn list(
    State(st): State<AppState>,
    AgentPath(id): AgentPath,
) -> Result<Response, Problem> {
    let agent = fetch(&st, &id).await?;
    let keys: Vec<Value> = agent
        .api_keys
        .keys()
        .map(|prefix| key_json(&st, &id, prefix, &agent))
        .collect();
    Ok((
        StatusCode::OK,
        axum::Json(json!({"keys": keys, "api_keys_max": API_KEYS_PER_AGENT_MAX})),
    )
        .into_response())
}

pub async fn revoke(
    State(st): State<AppState>,
    Path((raw_id, prefix)): Path<(String, String)>,
    IdemKey(idem): IdemKey,
) -> Result<Response, Problem> {
    let id = AgentId::new(raw_id).map_err(|e| Problem::invalid(e.to_string()))?;
    if prefix.len() != API_KEY_PREFIX_LEN {
        return Err(Problem::not_found(format!(
            "no API key with prefix {prefix:?}"
        )));
    }
    let cmd = Command::new(id.clone(), CommandKind::RevokeApiKey { prefix }).with_key(idem);
    let result = st.engine()?.submit(cmd.clone()).await;
    let replayed = match classify(&st, &cmd, result)? {
        Success::Applied { replayed, .. } => replayed,
        Success::WouldApprove { .. } => false,
    };
    st.keys().sync_agent(&fetch(&st, &id).await?);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if replayed {
        resp.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, "true".parse().expect("ascii"));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tally_core::ApiKey;

    fn agent_with(id: &str, keys: &[(&str, [u8; 32])]) -> AgentState {
        let id = AgentId::new(id).expect("valid id");
        let created = tally_core::Event {
            seq: 1,
            at_ms: 0,
            kind: EventKind::AgentCreated {
                plan: tally_core::PlanName::new("default").expect("valid"),
                status: tally_core::Status::Active,
            },
            balance_after_micros: 0,
            held_after_micros: 0,
            idempotency_key: None,
            fingerprint: 0,
            task_type: None,
            metadata: Default::default(),
        };
        let mut s = tally_core::evolve(None, &id, &created).expect("created");
        s.api_keys = keys
            .iter()
            .map(|(p, h)| {
                let key = ApiKey {
                    sha256: *h,
                    name: None,
                    created_at_ms: 0,
                };
                ((*p).to_owned(), key)
            })
            .collect::<BTreeMap<_, _>>();
        s
    }

    #[test]
    fn keys_verify_by_hash_and_only_for_their_agent() {
        let (key, prefix, hash) = generate();
        assert_eq!(key.len(), KEY_LEN_MAX);
        assert!(key.starts_with("tk_"));
        let index = KeyIndex::default();
        index.sync_agent(&agent_with("a1", &[(&prefix, hash)]));
        assert_eq!(
            index.verify(&key, 5).map(|a| a.to_string()).as_deref(),
            Some("a1")
        );
        assert_eq!(index.last_used_ms(&prefix), Some(5));
        let mut wrong = key.clone();
        wrong.pop();
        wrong.push(if key.ends_with('0') { '1' } else { '0' });
        assert_eq!(index.verify(&wrong, 6), None, "same prefix, other secret");
        assert_eq!(index.verify("tk_short_x", 6), None);
        assert_eq!(index.verify(&format!("{key}0"), 6), None, "too long");
        // Revoked: the agent's record no longer has it.
        index.sync_agent(&agent_with("a1", &[]));
        assert_eq!(index.verify(&key, 7), None);
        assert!(index.is_empty());
    }
}
