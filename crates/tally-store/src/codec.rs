//! The byte format of everything tally stores: one version byte, then bincode 2 (serde,
//! standard config). No other file knows the encoding.
//!
//! bincode 2 is unmaintained (RUSTSEC-2025-0141). It is kept because the users asked for
//! it, pinned (`=2.0.1`), and isolated here, so replacing it touches this file and a
//! migration of the version byte only.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tally_core::{AgentState, Event};
use thiserror::Error;

use crate::storage::AgentWrite;

/// The format version written by this build for agent records, WAL batches and numbers.
pub const RECORD_VERSION: u8 = 1;
/// The format of a journal chunk (several events of one agent under one key). Version 1
/// journal values, written before chunks existed, hold a single event and still decode.
pub const CHUNK_VERSION: u8 = 2;
/// Largest record body decoded. Far above the largest agent record (1,024 holds and
/// 1,024 refundable debits, ~60 KB); a corrupted length prefix claiming more is a decode
/// error instead of an allocation of whatever the prefix says.
pub const RECORD_BYTES_MAX: usize = 1 << 20;

/// A stored record could not be read.
#[derive(Debug, Error)]
pub enum CodecError {
    #[error("record is empty")]
    Empty,
    #[error("record has format version {found}; this build reads versions up to {CHUNK_VERSION} (written by a newer tally?)")]
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

fn encode_as<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![version];
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
    encode_as(CHUNK_VERSION, &events)
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

/// Encodes one agent's writes of a `Storage::apply` as the payload of one WAL record.
pub fn encode_write(write: &AgentWrite) -> Result<Vec<u8>, CodecError> {
    let bytes = encode(write)?;
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
    let write: AgentWrite = decode(bytes)?;
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
    encode(agent)
}

/// Decodes an agent record and checks its invariants again (pair assertion: on write and
/// on read).
pub fn decode_agent(bytes: &[u8]) -> Result<AgentState, CodecError> {
    let agent: AgentState = decode(bytes)?;
    agent
        .check_invariants()
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(agent)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{CommandKind, Status};

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
        ])
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
        bytes[0] = 3;
        let err = decode_agent(&bytes).expect_err("newer version");
        assert!(matches!(err, CodecError::UnknownVersion { found: 3 }));
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
