//! The simulation's oracle, after every recovery: the journal and the agents the recovered
//! engine shows against the model (see `tests/sim.rs`), and a replayed retry.

use std::collections::HashMap;

use tally_core::{evolve, AgentState, CommandKind, Outcome};
use tally_store::Reply;

use crate::harness::{Sim, AGENTS};

impl Sim {
    /// The oracle: the recovered engine against the model (see the file's comment).
    pub async fn check(&mut self) -> Result<(), String> {
        let maybe = self.maybe.take();
        // The feed resumes from the last recovery's cursor: what it showed then was durable,
        // so it is still there, and nothing comes twice.
        loop {
            let page = self
                .engine()?
                .events(self.feed_cursor, 1_000, std::time::Duration::ZERO)
                .await
                .map_err(|e| e.to_string())?;
            self.feed_cursor = page.next;
            if page.events.is_empty() {
                break;
            }
            for (a, e) in page.events {
                self.fed.entry(a).or_default().push(e);
            }
        }
        for agent in 0..AGENTS {
            let id = self.ids[agent].clone();
            let engine = self.engine()?;
            let state = engine.agent(&id).await.map_err(|e| e.to_string())?;
            let journal = engine
                .journal(&id, 0, usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            if self.fed.get(&id).map_or(&[][..], Vec::as_slice) != &journal[..] {
                return Err(format!(
                    "agent-{agent}: the feed holds {:?}, the journal {journal:?}",
                    self.fed.get(&id)
                ));
            }
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for e in &journal {
                let k = e
                    .idempotency_key
                    .as_ref()
                    .ok_or_else(|| format!("agent-{agent}: an entry without a key: {e:?}"))?;
                *counts.entry(k.as_str()).or_default() += 1;
                if self.sent.get(k.as_str()) != Some(&agent) {
                    return Err(format!("agent-{agent}: entry of a key never sent: {e:?}"));
                }
            }
            if let Some((k, n)) = counts.iter().find(|(_, n)| **n > 1) {
                return Err(format!("agent-{agent}: change {k} applied {n} times"));
            }
            // The change in doubt is decided by the journal, once and for all: present, it
            // is durable (recovery made it so) and counts as acknowledged; absent, it never
            // happened.
            if let Some(c) = maybe.as_ref().filter(|c| c.agent == agent) {
                match journal.iter().find(|e| {
                    e.idempotency_key.as_ref().map(|k| k.as_str()) == Some(c.key.as_str())
                }) {
                    Some(e) => {
                        let seq = e.seq;
                        self.model[agent].apply(c, seq)?;
                        self.log(format!("{}: in doubt, kept", c.key));
                        self.stats.maybe_kept += 1;
                    }
                    None => {
                        self.log(format!("{}: in doubt, lost", c.key));
                        self.stats.maybe_lost += 1;
                    }
                }
            }
            let m = &self.model[agent];
            let keys: Vec<&str> = journal
                .iter()
                .filter_map(|e| e.idempotency_key.as_ref().map(|k| k.as_str()))
                .collect();
            let want: Vec<&str> = m.keys.iter().map(String::as_str).collect();
            if keys != want {
                let lost: Vec<&&str> = want.iter().filter(|k| !keys.contains(k)).collect();
                return Err(format!(
                    "agent-{agent}: journal holds changes {keys:?}, acknowledged {want:?} \
                     (lost: {lost:?})"
                ));
            }
            let mut replayed: Option<AgentState> = None;
            for e in &journal {
                replayed = Some(evolve(replayed, &id, e).map_err(|e| e.to_string())?);
            }
            if replayed != state {
                return Err(format!(
                    "agent-{agent}: the journal replays to {replayed:?}, the engine holds {state:?}"
                ));
            }
            let got = state
                .as_ref()
                .map(|s| (s.balance_micros, s.held_micros, s.last_seq));
            let want = m
                .created
                .then_some((m.balance_micros, m.held_micros, m.seq));
            if got != want {
                return Err(format!(
                    "agent-{agent}: engine (balance, held, seq) {got:?}, model {want:?}"
                ));
            }
            if let Some(s) = &state {
                s.check_invariants().map_err(|e| e.to_string())?;
            }
        }
        // A change in doubt that left no entry may be sent again as new.
        if let Some(c) = maybe.filter(|c| !self.model[c.agent].keys.contains(&c.key)) {
            self.sent.remove(&c.key);
        }
        self.log("check: ok".into());
        Ok(())
    }

    /// An acknowledged change sent again with its key (the newest debit when there is one)
    /// is answered from the journal, and changes nothing.
    pub async fn retry_acked(&mut self) -> Result<(), String> {
        let Some(c) = self
            .acked
            .iter()
            .rev()
            .find(|c| matches!(c.kind, CommandKind::Debit { .. }))
            .or_else(|| self.acked.last())
            .cloned()
        else {
            return Ok(());
        };
        let reply = self.engine()?.submit(self.command(&c)).await;
        let want = Reply::Decided {
            outcome: Outcome::Approved(c.receipt.ok_or("an acknowledged change has a receipt")?),
            rate: None,
            replayed: true,
        };
        match reply {
            Ok(r) if r == want => {}
            // A fault hit the read of the journal behind the replay: nothing changed.
            Err(tally_store::SubmitError::Failed(_)) => {
                self.log(format!("retry {}: error", c.key));
                return Ok(());
            }
            other => {
                return Err(format!(
                    "retry of {} {:?} after recovery: {other:?}, want {want:?}",
                    c.key, c.kind
                ))
            }
        }
        self.stats.replays += 1;
        self.log(format!("retry {}: replayed", c.key));
        let state = self
            .engine()?
            .agent(&self.ids[c.agent])
            .await
            .map_err(|e| e.to_string())?;
        let m = &self.model[c.agent];
        if state.map(|s| (s.balance_micros, s.last_seq)) != Some((m.balance_micros, m.seq)) {
            return Err(format!("retry of {} changed the agent", c.key));
        }
        Ok(())
    }
}
