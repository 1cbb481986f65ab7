//! The byte format of everything tally stores: one version byte, then bincode 2 (serde,
//! standard config). No other file knows the encoding.
//!
//! bincode 2 is unmaintained (RUSTSEC-2025-0141). It is kept because the users asked for
//! it, pinned (`=2.0.1`), and isolated here, so replacing it touches this file and a
//! migration of the version byte only.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tally_core::{AgentState, Event, RateState};
use thiserror::Error;

use crate::storage::{AgentWrite, FeedEntry, KeyEntry};

/// The format version written by this build for agent records, WAL batches and numbers.
pub const RECORD_VERSION: u8 = 1;
/// The format of a journal chunk (several events of one agent under one key). Version 1
/// journal values, written before chunks existed, hold a single event and still decode.
pub const CHUNK_VERSION: u8 = 2;
/// The format of agent records and WAL batches since agents hold credit grants
/// (`AgentState::grants`, and the draws of holds and refundable debits) and their own
/// notification thresholds (`AgentState::thresholds`, none after a migration). Version 3 ones
/// (with API keys, before grants) and version 1 ones (before API keys) still decode: an
/// old balance becomes one never-expiring `paid` grant of the default priority with id 0,
/// from which every open hold and refundable debit is taken to have drawn. Events and
/// numbers stay at version 1 (new event kinds are appended variants, so old events
/// decode unchanged).
pub const AGENT_VERSION: u8 = 4;
/// The agent record format before credit grants.
pub const AGENT_VERSION_V3: u8 = 3;
/// Largest record body decoded. Above the largest agent record: 1,024 holds and 1,024
/// refundable debits, each with the draws of up to `GRANTS_PER_AGENT_MAX` (32) grants
/// at ~30 bytes a draw, ~2 MB at worst (~60 KB with one grant); a corrupted length
/// prefix claiming more is a decode error instead of an allocation of whatever the
/// prefix says.
pub const RECORD_BYTES_MAX: usize = 4 << 20;

/// A stored record could not be read.
#[derive(Debug, Error)]
pub enum CodecError {
    #[error("record is empty")]
    Empty,
    #[error("record has format version {found}; this build reads versions up to {AGENT_VERSION} (written by a newer tally?)")]
    UnknownVersion { found: u8 },
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
    #[error("record does not encode: {0}")]
    Encode(String),
}

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<RECORD_BYTES_MAX>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<RECORD_BYTES_MAX>()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode_as(RECORD_VERSION, value)
}

/// Room reserved to encode one journal entry (40–50 bytes, ~110 with an idempotency key)
/// and one agent record (~150 bytes with one grant). A buffer grown from one byte by each
/// field's write reallocated several times per entry: ~3 % of batched debits' CPU went to
/// reallocating and copying.
const ENTRY_BYTES_HINT: usize = 128;
const AGENT_BYTES_HINT: usize = 256;
/// A change-feed entry: lsn, agent id, first seq, count.
const FEED_ENTRY_BYTES_HINT: usize = 48;

fn encode_as<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    encode_sized(version, value, 64)
}

/// [`encode_as`] into a buffer of `room` bytes to begin with (it grows if need be).
fn encode_sized<T: Serialize>(version: u8, value: &T, room: usize) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(room.min(RECORD_BYTES_MAX));
    out.push(version);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != RECORD_VERSION {
        return Err(CodecError::UnknownVersion { found: version });
    }
    decode_body(body)
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::Trailing(body.len() - read));
    }
    Ok(value)
}

pub fn encode_event(event: &Event) -> Result<Vec<u8>, CodecError> {
    encode(event)
}

pub fn decode_event(bytes: &[u8]) -> Result<Event, CodecError> {
    decode(bytes)
}

/// Encodes consecutive events of one agent as one journal chunk.
pub fn encode_chunk(events: &[Event]) -> Result<Vec<u8>, CodecError> {
    encode_sized(CHUNK_VERSION, &events, events.len() * ENTRY_BYTES_HINT)
}

/// Decodes a journal value: a chunk, or a single event written by an older build.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<Event>, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        RECORD_VERSION => Ok(vec![decode_body(body)?]),
        CHUNK_VERSION => decode_body(body),
        found => Err(CodecError::UnknownVersion { found }),
    }
}

/// Encodes a run of change-feed entries (one indexing pass's agent writes, in lsn order).
pub fn encode_feed(entries: &[FeedEntry]) -> Result<Vec<u8>, CodecError> {
    encode_sized(
        RECORD_VERSION,
        &entries,
        entries.len() * FEED_ENTRY_BYTES_HINT,
    )
}

/// Decodes a run of change-feed entries.
pub fn decode_feed(bytes: &[u8]) -> Result<Vec<FeedEntry>, CodecError> {
    decode(bytes)
}

/// Encodes one agent's writes of a `Storage::apply` as the payload of one WAL record.
pub fn encode_write(write: &AgentWrite) -> Result<Vec<u8>, CodecError> {
    let room = write.events.len() * ENTRY_BYTES_HINT
        + write.checkpoint.as_ref().map_or(0, |_| AGENT_BYTES_HINT);
    let bytes = encode_sized(AGENT_VERSION, write, room)?;
    // Checked here so that a record too large to read back is never written.
    if bytes.len() > RECORD_BYTES_MAX {
        return Err(CodecError::Encode(format!(
            "{} bytes, above the {RECORD_BYTES_MAX}-byte record limit",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes a WAL record's payload; its checkpoint, if any, is checked again.
pub fn decode_write(bytes: &[u8]) -> Result<AgentWrite, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    let write: AgentWrite = match version {
        AGENT_VERSION => decode_body(body)?,
        AGENT_VERSION_V3 => decode_body::<legacy::AgentWriteV3>(body)?.into(),
        RECORD_VERSION => decode_body::<legacy::AgentWriteV1>(body)?.into(),
        found => return Err(CodecError::UnknownVersion { found }),
    };
    if let Some(record) = &write.checkpoint {
        record
            .check_invariants()
            .map_err(|e| CodecError::Decode(e.to_string()))?;
    }
    Ok(write)
}

pub fn encode_u64(value: u64) -> Vec<u8> {
    encode_fixed(value.to_be_bytes())
}

pub fn decode_u64(bytes: &[u8]) -> Result<u64, CodecError> {
    decode_fixed(bytes).map(u64::from_be_bytes)
}

pub fn encode_agent(agent: &AgentState) -> Result<Vec<u8>, CodecError> {
    encode_sized(AGENT_VERSION, agent, AGENT_BYTES_HINT)
}

/// Decodes an agent record and checks its invariants again (pair assertion: on write and
/// on read).
pub fn decode_agent(bytes: &[u8]) -> Result<AgentState, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    let agent: AgentState = match version {
        AGENT_VERSION => decode_body(body)?,
        AGENT_VERSION_V3 => decode_body::<legacy::AgentStateV3>(body)?.into(),
        RECORD_VERSION => decode_body::<legacy::AgentStateV1>(body)?.into(),
        found => return Err(CodecError::UnknownVersion { found }),
    };
    agent
        .check_invariants()
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(agent)
}

/// An agent's limiter state, kept by a shared backend beside its record so that the nodes
/// share one limiter per agent (`redis_store.rs`). Version 1, like events and numbers.
pub fn encode_rate(rate: &RateState) -> Result<Vec<u8>, CodecError> {
    encode(rate)
}

pub fn decode_rate(bytes: &[u8]) -> Result<RateState, CodecError> {
    decode(bytes)
}

pub fn encode_u32(value: u32) -> Vec<u8> {
    encode_fixed(value.to_be_bytes())
}

pub fn decode_u32(bytes: &[u8]) -> Result<u32, CodecError> {
    decode_fixed(bytes).map(u32::from_be_bytes)
}

/// A number's fixed-width form: the version byte, then its big-endian bytes.
fn encode_fixed<const N: usize>(bytes: [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + N);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&bytes);
    out
}

fn decode_fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != RECORD_VERSION {
        return Err(CodecError::UnknownVersion { found: version });
    }
    body.try_into()
        .map_err(|_| CodecError::Decode(format!("expected {N} bytes")))
}

/// The older shapes of agent records and WAL batches, field for field, so that a data
/// dir written by an older build opens: version 1 (before API keys) and version 3 (before
/// credit grants).
mod legacy {
    use std::collections::{BTreeMap, VecDeque};

    use serde::{Deserialize, Serialize};
    use tally_core::{
        AgentId, AgentState, ApiKey, Draw, Event, Grant, GrantTerms, Hold, PeriodKey, PlanName,
        Refundable, Status, TimestampMs,
    };

    use crate::storage::AgentWrite;

    /// The id of the grant an old balance becomes (real grant ids are seqs, from 1).
    pub(super) const MIGRATED_GRANT_ID: u64 = 0;

    #[derive(Serialize, Deserialize)]
    pub(super) struct HoldV3 {
        pub(super) amount_micros: u64,
        pub(super) expires_at_ms: TimestampMs,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct RefundableV3 {
        pub(super) seq: u64,
        pub(super) remaining_micros: u64,
        pub(super) period: PeriodKey,
    }

    #[derive(Deserialize)]
    pub(super) struct AgentStateV1 {
        id: AgentId,
        plan: PlanName,
        status: Status,
        balance_micros: u64,
        held_micros: u64,
        holds: BTreeMap<u64, HoldV3>,
        period: PeriodKey,
        period_spent_micros: u64,
        credited_total_micros: u64,
        debited_total_micros: u64,
        refunded_total_micros: u64,
        refundable: VecDeque<RefundableV3>,
        last_seq: u64,
        created_at_ms: TimestampMs,
        updated_at_ms: TimestampMs,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct AgentStateV3 {
        pub(super) id: AgentId,
        pub(super) plan: PlanName,
        pub(super) status: Status,
        pub(super) balance_micros: u64,
        pub(super) held_micros: u64,
        pub(super) holds: BTreeMap<u64, HoldV3>,
        pub(super) period: PeriodKey,
        pub(super) period_spent_micros: u64,
        pub(super) credited_total_micros: u64,
        pub(super) debited_total_micros: u64,
        pub(super) refunded_total_micros: u64,
        pub(super) refundable: VecDeque<RefundableV3>,
        pub(super) last_seq: u64,
        pub(super) created_at_ms: TimestampMs,
        pub(super) updated_at_ms: TimestampMs,
        pub(super) api_keys: BTreeMap<String, ApiKey>,
    }

    impl From<AgentStateV1> for AgentStateV3 {
        fn from(v: AgentStateV1) -> Self {
            AgentStateV3 {
                id: v.id,
                plan: v.plan,
                status: v.status,
                balance_micros: v.balance_micros,
                held_micros: v.held_micros,
                holds: v.holds,
                period: v.period,
                period_spent_micros: v.period_spent_micros,
                credited_total_micros: v.credited_total_micros,
                debited_total_micros: v.debited_total_micros,
                refunded_total_micros: v.refunded_total_micros,
                refundable: v.refundable,
                last_seq: v.last_seq,
                created_at_ms: v.created_at_ms,
                updated_at_ms: v.updated_at_ms,
                api_keys: BTreeMap::new(),
            }
        }
    }

    impl From<AgentStateV1> for AgentState {
        fn from(v: AgentStateV1) -> Self {
            AgentStateV3::from(v).into()
        }
    }

    /// Money of the migrated grant: what a hold reserved or a debit took before grants.
    fn from_migrated(micros: u64) -> Vec<Draw> {
        if micros == 0 {
            return Vec::new();
        }
        vec![Draw {
            grant_id: MIGRATED_GRANT_ID,
            micros,
            terms: GrantTerms::PLAIN,
        }]
    }

    /// Before grants: the balance becomes one never-expiring `paid` grant of the default
    /// priority (what a plain credit issues), and holds and refundable debits drew from it.
    impl From<AgentStateV3> for AgentState {
        fn from(v: AgentStateV3) -> Self {
            let mut grants = BTreeMap::new();
            if v.balance_micros > 0 {
                grants.insert(
                    MIGRATED_GRANT_ID,
                    Grant {
                        amount_micros: v.balance_micros,
                        remaining_micros: v.balance_micros,
                        terms: GrantTerms::PLAIN,
                        expiry_warned: false,
                    },
                );
            }
            AgentState {
                id: v.id,
                plan: v.plan,
                status: v.status,
                balance_micros: v.balance_micros,
                held_micros: v.held_micros,
                holds: v
                    .holds
                    .into_iter()
                    .map(|(seq, h)| {
                        let hold = Hold {
                            amount_micros: h.amount_micros,
                            expires_at_ms: h.expires_at_ms,
                            draws: from_migrated(h.amount_micros),
                        };
                        (seq, hold)
                    })
                    .collect(),
                period: v.period,
                period_spent_micros: v.period_spent_micros,
                credited_total_micros: v.credited_total_micros,
                debited_total_micros: v.debited_total_micros,
                refunded_total_micros: v.refunded_total_micros,
                refundable: v
                    .refundable
                    .into_iter()
                    .map(|r| Refundable {
                        seq: r.seq,
                        remaining_micros: r.remaining_micros,
                        period: r.period,
                        draws: from_migrated(r.remaining_micros),
                    })
                    .collect(),
                last_seq: v.last_seq,
                created_at_ms: v.created_at_ms,
                updated_at_ms: v.updated_at_ms,
                api_keys: v.api_keys,
                thresholds: None,
                grants: grants.into(),
                expired_total_micros: 0,
                debited_promotional_total_micros: 0,
            }
        }
    }

    #[derive(Deserialize)]
    pub(super) struct AgentWriteV1 {
        agent: AgentId,
        expected_seq: u64,
        events: Vec<Event>,
        checkpoint: Option<AgentStateV1>,
    }

    impl From<AgentWriteV1> for AgentWrite {
        fn from(v: AgentWriteV1) -> Self {
            AgentWrite {
                rate: None,
                rate_before: None,
                agent: v.agent,
                expected_seq: v.expected_seq,
                events: v.events,
                checkpoint: v.checkpoint.map(Into::into),
            }
        }
    }

    #[derive(Deserialize)]
    pub(super) struct AgentWriteV3 {
        agent: AgentId,
        expected_seq: u64,
        events: Vec<Event>,
        checkpoint: Option<AgentStateV3>,
    }

    impl From<AgentWriteV3> for AgentWrite {
        fn from(v: AgentWriteV3) -> Self {
            AgentWrite {
                rate: None,
                rate_before: None,
                agent: v.agent,
                expected_seq: v.expected_seq,
                events: v.events,
                checkpoint: v.checkpoint.map(Into::into),
            }
        }
    }

    /// For the tests: `agent` (which must hold only plain money) in the version 3 shape.
    #[cfg(test)]
    pub(super) fn to_v3(a: &AgentState) -> AgentStateV3 {
        AgentStateV3 {
            id: a.id.clone(),
            plan: a.plan.clone(),
            status: a.status,
            balance_micros: a.balance_micros,
            held_micros: a.held_micros,
            holds: a
                .holds
                .iter()
                .map(|(s, h)| {
                    let hold = HoldV3 {
                        amount_micros: h.amount_micros,
                        expires_at_ms: h.expires_at_ms,
                    };
                    (*s, hold)
                })
                .collect(),
            period: a.period,
            period_spent_micros: a.period_spent_micros,
            credited_total_micros: a.credited_total_micros,
            debited_total_micros: a.debited_total_micros,
            refunded_total_micros: a.refunded_total_micros,
            refundable: a
                .refundable
                .iter()
                .map(|r| RefundableV3 {
                    seq: r.seq,
                    remaining_micros: r.remaining_micros,
                    period: r.period,
                })
                .collect(),
            last_seq: a.last_seq,
            created_at_ms: a.created_at_ms,
            updated_at_ms: a.updated_at_ms,
            api_keys: a.api_keys.clone(),
        }
    }

    /// For the test: a version 1 record of `agent` (without its keys).
    #[cfg(test)]
    pub(super) fn encode_v1(agent: &AgentState) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            id: &'a AgentId,
            plan: &'a PlanName,
            status: Status,
            balance_micros: u64,
            held_micros: u64,
            holds: &'a BTreeMap<u64, HoldV3>,
            period: PeriodKey,
            period_spent_micros: u64,
            credited_total_micros: u64,
            debited_total_micros: u64,
            refunded_total_micros: u64,
            refundable: &'a VecDeque<RefundableV3>,
            last_seq: u64,
            created_at_ms: TimestampMs,
            updated_at_ms: TimestampMs,
        }
        let a = to_v3(agent);
        super::encode_as(
            super::RECORD_VERSION,
            &V1 {
                id: &a.id,
                plan: &a.plan,
                status: a.status,
                balance_micros: a.balance_micros,
                held_micros: a.held_micros,
                holds: &a.holds,
                period: a.period,
                period_spent_micros: a.period_spent_micros,
                credited_total_micros: a.credited_total_micros,
                debited_total_micros: a.debited_total_micros,
                refunded_total_micros: a.refunded_total_micros,
                refundable: &a.refundable,
                last_seq: a.last_seq,
                created_at_ms: a.created_at_ms,
                updated_at_ms: a.updated_at_ms,
            },
        )
        .expect("encodes")
    }
}

/// A key-index record: fixed width, so a sorted run file can be searched by offset.
/// `[slot u128 BE][fingerprint u128 LE][first_seq u64 LE][events u32 LE][at_ms u64 LE]`.
pub const KEY_RECORD_BYTES: usize = 52;
/// The end of a key-index run file: `[magic 8][count u64][hour u64][min_at_ms u64]
/// [max_at_ms u64][crc32 of the records u32][crc32 of the footer before it u32]`, LE.
pub const KEY_RUN_FOOTER_BYTES: usize = 48;
const KEY_RUN_MAGIC: &[u8; 8] = b"tallyKR1";

pub fn encode_key_record(slot: u128, entry: &KeyEntry) -> [u8; KEY_RECORD_BYTES] {
    let mut out = [0u8; KEY_RECORD_BYTES];
    out[0..16].copy_from_slice(&slot.to_be_bytes());
    out[16..32].copy_from_slice(&entry.fingerprint.to_le_bytes());
    out[32..40].copy_from_slice(&entry.first_seq.to_le_bytes());
    out[40..44].copy_from_slice(&entry.events.to_le_bytes());
    out[44..52].copy_from_slice(&entry.at_ms.to_le_bytes());
    out
}

/// Decodes one key record; `bytes` is exactly [`KEY_RECORD_BYTES`] long.
pub fn decode_key_record(bytes: &[u8]) -> Result<(u128, KeyEntry), CodecError> {
    if bytes.len() != KEY_RECORD_BYTES {
        return Err(CodecError::Decode(format!(
            "a key record is {KEY_RECORD_BYTES} bytes, not {}",
            bytes.len()
        )));
    }
    let slot = u128::from_be_bytes(fixed(&bytes[0..16]));
    let entry = KeyEntry {
        fingerprint: u128::from_le_bytes(fixed(&bytes[16..32])),
        first_seq: u64::from_le_bytes(fixed(&bytes[32..40])),
        events: u32::from_le_bytes(fixed(&bytes[40..44])),
        at_ms: u64::from_le_bytes(fixed(&bytes[44..52])),
    };
    if entry.first_seq == 0 || entry.events == 0 {
        return Err(CodecError::Decode(
            "a key record points at no journal entry".into(),
        ));
    }
    Ok((slot, entry))
}

/// A slice whose length the caller checked, as an array.
fn fixed<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes
        .try_into()
        .expect("callers pass slices of the array's length")
}

/// What a key-index run file says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRunFooter {
    pub count: u64,
    pub hour: u64,
    pub min_at_ms: u64,
    pub max_at_ms: u64,
    pub records_crc: u32,
}

pub fn encode_key_run_footer(f: &KeyRunFooter) -> [u8; KEY_RUN_FOOTER_BYTES] {
    let mut out = [0u8; KEY_RUN_FOOTER_BYTES];
    out[0..8].copy_from_slice(KEY_RUN_MAGIC);
    out[8..16].copy_from_slice(&f.count.to_le_bytes());
    out[16..24].copy_from_slice(&f.hour.to_le_bytes());
    out[24..32].copy_from_slice(&f.min_at_ms.to_le_bytes());
    out[32..40].copy_from_slice(&f.max_at_ms.to_le_bytes());
    out[40..44].copy_from_slice(&f.records_crc.to_le_bytes());
    let crc = crc32fast::hash(&out[0..44]);
    out[44..48].copy_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_key_run_footer(bytes: &[u8]) -> Result<KeyRunFooter, CodecError> {
    if bytes.len() != KEY_RUN_FOOTER_BYTES {
        return Err(CodecError::Decode("short key run footer".into()));
    }
    if &bytes[0..8] != KEY_RUN_MAGIC {
        return Err(CodecError::Decode(
            "not a key run (or one written by a newer tally)".into(),
        ));
    }
    let crc = u32::from_le_bytes(fixed(&bytes[44..48]));
    if crc32fast::hash(&bytes[0..44]) != crc {
        return Err(CodecError::Decode(
            "key run footer checksum mismatch".into(),
        ));
    }
    Ok(KeyRunFooter {
        count: u64::from_le_bytes(fixed(&bytes[8..16])),
        hour: u64::from_le_bytes(fixed(&bytes[16..24])),
        min_at_ms: u64::from_le_bytes(fixed(&bytes[24..32])),
        max_at_ms: u64::from_le_bytes(fixed(&bytes[32..40])),
        records_crc: u32::from_le_bytes(fixed(&bytes[40..44])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{CommandKind, Status};

    #[test]
    fn rate_states_round_trip_with_their_version_byte() {
        let (state, _) = crate::testing::decided([tally_core::CommandKind::CreateAgent {
            plan: crate::testing::default_plan(),
            status: Status::Active,
        }]);
        let plans =
            tally_core::PlanBook::new([
                tally_core::Plan::unlimited(crate::testing::default_plan()),
            ]);
        let mut rate = RateState::default();
        let cmd =
            tally_core::Command::new(state.id.clone(), CommandKind::Debit { amount_micros: 0 });
        let _ = tally_core::decide(Some(&state), &mut rate, &cmd, &plans, 5_000);
        for r in [RateState::default(), rate] {
            let bytes = encode_rate(&r).expect("encodes");
            assert_eq!(bytes[0], RECORD_VERSION);
            assert_eq!(decode_rate(&bytes).expect("decodes"), r);
        }
        assert!(matches!(
            decode_rate(&[9, 0]),
            Err(CodecError::UnknownVersion { found: 9 })
        ));
    }

    #[test]
    fn key_records_and_run_footers_round_trip() {
        let entry = KeyEntry {
            fingerprint: u128::MAX - 3,
            first_seq: 42,
            events: 2,
            at_ms: 1_790_000_000_123,
        };
        let bytes = encode_key_record(u128::MAX / 7, &entry);
        assert_eq!(
            decode_key_record(&bytes).expect("decodes"),
            (u128::MAX / 7, entry)
        );
        // Slots are big-endian, so byte order is numeric order.
        assert!(encode_key_record(1, &entry) < encode_key_record(256, &entry));
        assert!(decode_key_record(&bytes[1..]).is_err());
        assert!(
            decode_key_record(&[0u8; KEY_RECORD_BYTES]).is_err(),
            "zeros are no record"
        );

        let footer = KeyRunFooter {
            count: 7,
            hour: 497_222,
            min_at_ms: 1,
            max_at_ms: 2,
            records_crc: 0xdead_beef,
        };
        let bytes = encode_key_run_footer(&footer);
        assert_eq!(decode_key_run_footer(&bytes).expect("decodes"), footer);
        for i in 0..KEY_RUN_FOOTER_BYTES {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(decode_key_run_footer(&bad).is_err(), "flipped byte {i}");
        }
    }

    fn sample() -> (AgentState, Vec<Event>) {
        crate::testing::decided([
            CommandKind::CreateAgent {
                plan: crate::testing::default_plan(),
                status: Status::Active,
            },
            CommandKind::Credit {
                amount_micros: u64::MAX,
            },
            CommandKind::Hold {
                amount_micros: 5,
                ttl_ms: 1_000,
            },
            CommandKind::Debit { amount_micros: 7 },
            CommandKind::IssueApiKey {
                prefix: "abcdefgh".into(),
                sha256: [3; 32],
                name: Some("ci".into()),
            },
        ])
    }

    /// `agent` as a pre-grant record decodes: its balance, holds and refundable debits
    /// are the migrated grant's.
    fn migrated(agent: &AgentState) -> AgentState {
        let mut want = agent.clone();
        let plain = |micros| {
            if micros == 0 {
                Vec::new()
            } else {
                vec![tally_core::Draw {
                    grant_id: legacy::MIGRATED_GRANT_ID,
                    micros,
                    terms: tally_core::GrantTerms::PLAIN,
                }]
            }
        };
        want.grants = std::collections::BTreeMap::from([(
            legacy::MIGRATED_GRANT_ID,
            tally_core::Grant {
                amount_micros: agent.balance_micros,
                remaining_micros: agent.balance_micros,
                terms: tally_core::GrantTerms::PLAIN,
                expiry_warned: false,
            },
        )])
        .into();
        for h in want.holds.values_mut() {
            h.draws = plain(h.amount_micros);
        }
        for r in &mut want.refundable {
            r.draws = plain(r.remaining_micros);
        }
        want
    }

    #[test]
    fn version_3_agent_records_and_writes_migrate_to_one_plain_grant() {
        let (agent, events) = sample();
        let want = migrated(&agent);
        let old = encode_as(AGENT_VERSION_V3, &legacy::to_v3(&agent)).expect("encodes");
        let back = decode_agent(&old).expect("decodes");
        assert_eq!(back, want);
        assert_eq!(back.grants.len(), 1);
        assert_eq!(back.balance_micros, agent.balance_micros);
        // A version 3 WAL record: agent, expected_seq, events, then the checkpoint.
        let mut write = vec![AGENT_VERSION_V3];
        write.extend_from_slice(
            &encode_as(0, &(&agent.id, 0u64, &events[..])).expect("encodes")[1..],
        );
        write.push(1); // Some(checkpoint)
        write.extend_from_slice(&old[1..]);
        let back = decode_write(&write).expect("decodes");
        assert_eq!(back.events, events);
        assert_eq!(back.checkpoint, Some(want.clone()));
        // The migrated agent goes on: an old journal's tail (a debit) draws from the
        // migrated grant.
        let debit = Event {
            seq: want.last_seq + 1,
            balance_after_micros: want.balance_micros - 10,
            kind: tally_core::EventKind::Debited {
                amount_micros: 10,
                period: want.period,
            },
            ..events[3].clone()
        };
        let state = tally_core::evolve(Some(want), &agent.id, &debit).expect("applies");
        assert_eq!(
            state.grants[&legacy::MIGRATED_GRANT_ID].remaining_micros,
            agent.balance_micros - 10
        );
        assert_eq!(
            state.refundable.back().expect("the debit").draws[0].grant_id,
            legacy::MIGRATED_GRANT_ID
        );
    }

    #[test]
    fn grants_encode_exactly_as_the_map_they_were_before() {
        let grant = |remaining_micros, priority| tally_core::Grant {
            amount_micros: 1_000,
            remaining_micros,
            terms: tally_core::GrantTerms {
                expires_at_ms: Some(1_800_000_000_000),
                priority,
                category: tally_core::GrantCategory::Promotional,
            },
            expiry_warned: true,
        };
        // Inserted out of order: the encoding is in id order either way.
        let mut grants = tally_core::GrantMap::new();
        for (id, g) in [(9, grant(5, 1)), (2, grant(7, 3)), (300, grant(1, 2))] {
            grants.insert(id, g);
        }
        let map: std::collections::BTreeMap<u64, tally_core::Grant> =
            grants.iter().map(|(id, g)| (*id, *g)).collect();
        let bytes = encode(&grants).expect("encodes");
        assert_eq!(bytes, encode(&map).expect("encodes"));
        let back: tally_core::GrantMap = decode(&bytes).expect("decodes");
        assert_eq!(back, grants);
        assert_eq!(back.keys().copied().collect::<Vec<_>>(), [2, 9, 300]);
    }

    #[test]
    fn thresholds_round_trip() {
        let (mut agent, _) = sample();
        agent.thresholds = Some(tally_core::Thresholds {
            balance_below_micros: Some(7),
            cap_spend_percent: Some(80),
            grant_expiring_within_ms: None,
        });
        let bytes = encode_agent(&agent).expect("encodes");
        assert_eq!(bytes[0], AGENT_VERSION);
        assert_eq!(decode_agent(&bytes).expect("decodes"), agent);
    }

    #[test]
    fn version_1_agent_records_and_writes_still_decode_without_keys() {
        let (mut agent, events) = sample();
        agent.api_keys.clear();
        let old = legacy::encode_v1(&agent);
        assert_eq!(old[0], RECORD_VERSION);
        let agent = migrated(&agent);
        assert_eq!(decode_agent(&old).expect("decodes"), agent);
        // A version 1 WAL record: agent, expected_seq, events, then the checkpoint.
        let mut write = vec![RECORD_VERSION];
        write.extend_from_slice(
            &encode_as(0, &(&agent.id, 0u64, &events[..4])).expect("encodes")[1..],
        );
        write.push(1); // Some(checkpoint)
        write.extend_from_slice(&old[1..]);
        let back = decode_write(&write).expect("decodes");
        assert_eq!(back.events, events[..4].to_vec());
        assert_eq!(back.checkpoint, Some(agent));
    }

    #[test]
    fn round_trips() {
        let (agent, events) = sample();
        assert_eq!(
            decode_agent(&encode_agent(&agent).expect("encodes")).expect("decodes"),
            agent
        );
        for e in events {
            assert_eq!(
                decode_event(&encode_event(&e).expect("encodes")).expect("decodes"),
                e
            );
        }
        assert_eq!(decode_u32(&encode_u32(7)).expect("decodes"), 7);
        assert_eq!(
            decode_u64(&encode_u64(u64::MAX)).expect("decodes"),
            u64::MAX
        );
    }

    #[test]
    fn chunks_round_trip_and_old_single_events_still_decode() {
        let (agent, events) = sample();
        let chunk = encode_chunk(&events).expect("encodes");
        assert_eq!(chunk[0], CHUNK_VERSION);
        assert_eq!(decode_chunk(&chunk).expect("decodes"), events);
        let old = encode_event(&events[0]).expect("encodes");
        assert_eq!(
            decode_chunk(&old).expect("decodes"),
            vec![events[0].clone()]
        );
        let mut newer = chunk.clone();
        newer[0] = CHUNK_VERSION + 1;
        assert!(matches!(
            decode_chunk(&newer),
            Err(CodecError::UnknownVersion { .. })
        ));

        let write = AgentWrite {
            rate: None,
            rate_before: None,
            agent: agent.id.clone(),
            expected_seq: 0,
            events: events.clone(),
            checkpoint: Some(agent.clone()),
        };
        let back = decode_write(&encode_write(&write).expect("encodes")).expect("decodes");
        assert_eq!(back.events, events);
        assert_eq!(back.checkpoint.as_ref(), Some(&agent));
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let (agent, _) = sample();
        let mut bytes = encode_agent(&agent).expect("encodes");
        bytes[0] = AGENT_VERSION + 1;
        let err = decode_agent(&bytes).expect_err("newer version");
        assert!(matches!(err, CodecError::UnknownVersion { found } if found == AGENT_VERSION + 1));
        assert!(err.to_string().contains("newer"));
    }

    #[test]
    fn huge_length_prefixes_are_errors_not_allocations() {
        // Found by the codec fuzz target: before the byte limit these panicked
        // (capacity overflow), aborted (allocation failure) or allocated 4 GiB.
        let inputs: [&[u8]; 3] = [
            &[0x01, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[
                0x01, 0x00, 0x00, 0x00, 0xfd, 0x0b, 0xfd, 0xfc, 0x03, 0x13, 0xb7, 0xd8, 0x73,
            ],
            &[0x01, 0xfc, 0xc0, 0xc0, 0x00, 0xfc],
        ];
        for bytes in inputs {
            assert!(decode_event(bytes).is_err());
            assert!(decode_agent(bytes).is_err());
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(decode_event(&[]), Err(CodecError::Empty)));
        assert!(decode_event(&[RECORD_VERSION]).is_err());
        assert!(decode_event(&[RECORD_VERSION, 0xff, 0xff, 0xff]).is_err());
        let (_, events) = sample();
        let mut bytes = encode_event(&events[1]).expect("encodes");
        bytes.push(0);
        assert!(matches!(decode_event(&bytes), Err(CodecError::Trailing(1))));
        for cut in 1..bytes.len() - 1 {
            assert!(decode_event(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
    }
}
