//! The sled backend. One tree, prefixed keys, so that one `apply_batch` is atomic across
//! journal entries, agent records and metadata:
//! - `a/<agent>`: agent record (a checkpoint; it holds the last sequence it includes);
//! - `j/<agent>/<seq as 8 bytes big-endian>`: one journal entry per event;
//! - `m/schema`: the schema version.
//!
//! Agent ids never contain `/`, so `j/<agent>/` is a prefix of that agent's entries only.
//! sled is pinned (`=0.34.7`) and is beta software with known crash bugs; the kill test is
//! what lets us trust it here.

use std::path::Path;
use std::time::{Duration, Instant};

use tally_core::{AgentId, AgentState, Event};

use crate::codec;
use crate::error::StoreError;
use crate::storage::{AgentWrite, Storage};

/// The schema this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"m/schema";
/// How long opening waits for sled's file lock.
const LOCK_WAIT_MS_MAX: u64 = 5_000;

/// tally's data in a sled database.
#[derive(Debug, Clone)]
pub struct SledStorage {
    db: sled::Db,
}

fn agent_key(agent: &AgentId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + agent.as_str().len());
    k.extend_from_slice(b"a/");
    k.extend_from_slice(agent.as_str().as_bytes());
    k
}

fn journal_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + agent.as_str().len() + 8);
    k.extend_from_slice(b"j/");
    k.extend_from_slice(agent.as_str().as_bytes());
    k.push(b'/');
    k
}

fn journal_key(agent: &AgentId, seq: u64) -> Vec<u8> {
    let mut k = journal_prefix(agent);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl SledStorage {
    /// Opens or creates the database at `path` with a page cache of `cache_bytes`, and
    /// checks (or writes) the schema version.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput);
        let started = Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                // sled's background threads may hold the file lock for a moment after the
                // previous handle in this process was dropped; another process holding it
                // is still an error once the wait is over.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < Duration::from_millis(LOCK_WAIT_MS_MAX) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(StoreError::Io(format!(
                        "opening sled at {} (is another tally using it?): {e}",
                        path.display()
                    )))
                }
            }
        };
        match db.get(SCHEMA_KEY)? {
            Some(bytes) => {
                let found = codec::decode_u32(&bytes)?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaVersion {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                db.insert(SCHEMA_KEY, codec::encode_u32(SCHEMA_VERSION))?;
                db.flush()?;
            }
        }
        Ok(Self { db })
    }
}

impl Storage for SledStorage {
    fn apply(&self, writes: &[AgentWrite]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for w in writes {
            for e in &w.events {
                batch.insert(journal_key(&w.agent, e.seq), codec::encode_event(e)?);
            }
            if let Some(record) = &w.checkpoint {
                debug_assert_eq!(record.check_invariants(), Ok(()));
                batch.insert(agent_key(&w.agent), codec::encode_agent(record)?);
            }
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn load_agents(&self) -> Result<Vec<AgentState>, StoreError> {
        let mut agents = Vec::new();
        for item in self.db.scan_prefix(b"a/") {
            let (_, value) = item?;
            agents.push(codec::decode_agent(&value)?);
        }
        Ok(agents)
    }

    fn journal(
        &self,
        agent: &AgentId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut end = journal_prefix(agent);
        end.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for item in self.db.range(journal_key(agent, start)..=end).take(limit) {
            let (_, value) = item?;
            out.push(codec::decode_event(&value)?);
        }
        Ok(out)
    }

    fn journal_rev(
        &self,
        agent: &AgentId,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let start = journal_key(agent, 0);
        let end = journal_key(agent, before_seq);
        let mut out = Vec::new();
        for item in self.db.range(start..end).rev().take(limit) {
            let (_, value) = item?;
            out.push(codec::decode_event(&value)?);
        }
        Ok(out)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}
