//! Fuzzes `tally_store::codec` (`decode_event`, `decode_chunk`, `decode_write`,
//! `decode_agent`, `decode_u32`, `decode_u64`) with arbitrary bytes: decoding never panics,
//! and whatever decodes re-encodes and decodes to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_store::codec::{
    decode_agent, decode_chunk, decode_event, decode_u32, decode_u64, decode_write,
    encode_agent, encode_chunk, encode_event, encode_u32, encode_u64, encode_write,
};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(event) = decode_event(bytes) {
        let again = encode_event(&event).expect("a decoded event encodes");
        let back = decode_event(&again).expect("a re-encoded event decodes");
        assert_eq!(back, event, "event round trip");
    }
    if let Ok(agent) = decode_agent(bytes) {
        // decode_agent checked the invariants; a decoded agent must still satisfy them.
        assert_eq!(agent.check_invariants(), Ok(()));
        let again = encode_agent(&agent).expect("a decoded agent encodes");
        let back = decode_agent(&again).expect("a re-encoded agent decodes");
        assert_eq!(back, agent, "agent round trip");
    }
    if let Ok(events) = decode_chunk(bytes) {
        let again = encode_chunk(&events).expect("a decoded chunk encodes");
        let back = decode_chunk(&again).expect("a re-encoded chunk decodes");
        assert_eq!(back, events, "chunk round trip");
    }
    if let Ok(write) = decode_write(bytes) {
        if let Some(agent) = &write.checkpoint {
            assert_eq!(agent.check_invariants(), Ok(()));
        }
        let again = encode_write(&write).expect("a decoded write encodes");
        let back = decode_write(&again).expect("a re-encoded write decodes");
        assert_eq!(back.agent, write.agent, "write round trip");
        assert_eq!(back.expected_seq, write.expected_seq, "write round trip");
        assert_eq!(back.events, write.events, "write round trip");
        assert_eq!(back.checkpoint, write.checkpoint, "write round trip");
    }
    if let Ok(value) = decode_u64(bytes) {
        assert_eq!(encode_u64(value), bytes, "u64 encoding is canonical");
    }
    if let Ok(value) = decode_u32(bytes) {
        // The u32 format is fixed-width: the encoding is exactly the input.
        assert_eq!(encode_u32(value), bytes, "u32 encoding is canonical");
        assert_eq!(decode_u32(&encode_u32(value)).ok(), Some(value));
    }
});
