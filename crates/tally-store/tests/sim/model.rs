//! The simulation's reference model: the simplest ledger that says what the engine must
//! answer and hold (balance, held amount, open holds, the keys applied in order).

use std::collections::BTreeMap;

use tally_core::{CommandKind, Receipt};

/// A change as the model knows it.
#[derive(Debug, Clone)]
pub struct Change {
    pub agent: usize,
    pub key: String,
    pub kind: CommandKind,
    /// The hold a void or capture settles, by the key that placed it.
    pub hold_key: Option<String>,
    /// The answer, when it was acknowledged.
    pub receipt: Option<Receipt>,
}

/// The reference model of one agent: the simplest ledger that can say what the engine must.
#[derive(Debug, Clone, Default)]
pub struct AgentModel {
    pub created: bool,
    pub balance_micros: u64,
    pub held_micros: u64,
    /// Open holds by the key that placed them: the hold's seq and amount.
    pub holds: BTreeMap<String, (u64, u64)>,
    /// Keys of the changes applied, in order (each wrote one journal entry).
    pub keys: Vec<String>,
    /// Sequence number of the newest entry.
    pub seq: u64,
}

/// What the model says a command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Approved,
    Denied,
}

impl AgentModel {
    pub fn expect(&self, kind: &CommandKind) -> Expect {
        match kind {
            CommandKind::Debit { amount_micros } | CommandKind::Hold { amount_micros, .. }
                if *amount_micros > self.balance_micros =>
            {
                Expect::Denied
            }
            _ => Expect::Approved,
        }
    }

    /// Applies an approved change whose entry has sequence number `seq`.
    pub fn apply(&mut self, c: &Change, seq: u64) -> Result<(), String> {
        if seq != self.seq + 1 {
            return Err(format!("{}: entry {seq} after {}", c.key, self.seq));
        }
        self.seq = seq;
        self.keys.push(c.key.clone());
        let hold = |holds: &mut BTreeMap<String, (u64, u64)>| {
            c.hold_key
                .as_ref()
                .and_then(|k| holds.remove(k))
                .ok_or_else(|| format!("{}: settles no open hold", c.key))
        };
        match c.kind {
            CommandKind::CreateAgent { .. } => self.created = true,
            CommandKind::Credit { amount_micros } => self.balance_micros += amount_micros,
            CommandKind::Debit { amount_micros } => self.balance_micros -= amount_micros,
            CommandKind::Hold { amount_micros, .. } => {
                self.balance_micros -= amount_micros;
                self.held_micros += amount_micros;
                self.holds.insert(c.key.clone(), (seq, amount_micros));
            }
            CommandKind::Void { .. } => {
                let (_, amount) = hold(&mut self.holds)?;
                self.held_micros -= amount;
                self.balance_micros += amount;
            }
            CommandKind::Capture { amount_micros, .. } => {
                let (_, amount) = hold(&mut self.holds)?;
                self.held_micros -= amount;
                self.balance_micros += amount - amount_micros;
            }
            ref other => return Err(format!("the model does not know {other:?}")),
        }
        Ok(())
    }
}
