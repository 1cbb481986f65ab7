//! The overspend invariant, checked from the server's own journal after the run: what the
//! mock agents were told (receipts, 402s, 429s) against what the server recorded.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::{Agent, Client, JournalEntry};

/// Examples kept per violated check; the count is always exact.
const EXAMPLES_MAX: usize = 10;

/// A change the server approved, as its receipt told the agent.
#[derive(Debug, Clone)]
pub struct Applied {
    pub seq: u64,
    /// The journal kind it must appear as.
    pub kind: &'static str,
    pub amount_micros: u64,
    pub key: String,
}

/// What one agent was told during the run.
#[derive(Debug, Default)]
pub struct AgentLog {
    pub applied: Vec<Applied>,
    /// Keys of requests answered 402: they must never reach the journal.
    pub denied_funds: Vec<String>,
    /// Keys of requests answered 429 or 403: same.
    pub denied_other: Vec<String>,
    /// Keys of calls with no final answer (transport errors, 5xx after retries): each may
    /// appear at most once.
    pub unknown: Vec<String>,
}

impl AgentLog {
    pub fn merge(&mut self, other: AgentLog) {
        self.applied.extend(other.applied);
        self.denied_funds.extend(other.denied_funds);
        self.denied_other.extend(other.denied_other);
        self.unknown.extend(other.unknown);
    }
}

/// One named invariant and how often it failed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub description: &'static str,
    pub ok: bool,
    pub violations: u64,
    pub examples: Vec<String>,
}

/// The result of every check over every agent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InvariantReport {
    pub ok: bool,
    pub agents_checked: u64,
    pub journal_entries: u64,
    pub approved_checked: u64,
    pub denied_402_checked: u64,
    pub checks: Vec<Check>,
}

const CHECKS: [(&str, &str); 6] = [
    ("journal_dense", "every journal's seq runs 1, 2, 3, ... with no gap or repeat"),
    (
        "no_overspend",
        "at every journal entry, debits + captures <= credits + refunds",
    ),
    (
        "balance_matches_journal",
        "balance + held = credits - debits - captures + refunds at every entry, and the agent's final balance and held are the journal's",
    ),
    (
        "approved_exactly_once",
        "every approved receipt is in the journal at its seq with its kind, amount and key, and its key appears exactly once",
    ),
    (
        "no_charge_after_402",
        "no idempotency key answered 402 appears in the journal",
    ),
    (
        "no_unexplained_entries",
        "no key answered 429/403 appears in the journal, no key appears twice, and every keyed entry is one the agents sent",
    ),
];

#[derive(Debug)]
struct Checks {
    found: BTreeMap<&'static str, (u64, Vec<String>)>,
}

impl Checks {
    fn new() -> Self {
        Self {
            found: CHECKS
                .iter()
                .map(|(name, _)| (*name, (0, Vec::new())))
                .collect(),
        }
    }

    fn fail(&mut self, name: &'static str, example: impl FnOnce() -> String) {
        let (count, examples) = self.found.get_mut(name).expect("a check named in CHECKS");
        *count += 1;
        if examples.len() < EXAMPLES_MAX {
            examples.push(example());
        }
    }
}

/// Which money column an entry moves.
fn money(entry: &JournalEntry) -> (u64, u64, u64, u64) {
    let a = entry.amount_micros;
    match entry.kind.as_str() {
        "credit" => (a, 0, 0, 0),
        "debit" => (0, a, 0, 0),
        "capture" => (0, 0, a, 0),
        "refund" => (0, 0, 0, a),
        _ => (0, 0, 0, 0),
    }
}

/// Checks one agent's journal against what it was told; failures go into `checks`.
fn check_agent(
    id: &str,
    agent: &Agent,
    journal: &[JournalEntry],
    log: &AgentLog,
    setup_keys: &HashSet<String>,
    checks: &mut Checks,
) {
    // Dense from 1.
    for (i, entry) in journal.iter().enumerate() {
        let want = i as u64 + 1;
        if entry.seq != want {
            checks.fail("journal_dense", || {
                format!("{id}: entry {i} has seq {}, expected {want}", entry.seq)
            });
            break;
        }
    }

    // Running sums, checked at every entry.
    let (mut credits, mut debits, mut captures, mut refunds) = (0u128, 0u128, 0u128, 0u128);
    for entry in journal {
        let (c, d, k, r) = money(entry);
        credits += u128::from(c);
        debits += u128::from(d);
        captures += u128::from(k);
        refunds += u128::from(r);
        if debits + captures > credits + refunds {
            checks.fail("no_overspend", || {
                format!(
                    "{id} seq {}: debits {debits} + captures {captures} > credits {credits} + refunds {refunds}",
                    entry.seq
                )
            });
        }
        let expected = (credits + refunds).checked_sub(debits + captures);
        let actual = u128::from(entry.balance_micros) + u128::from(entry.held_micros);
        if expected != Some(actual) {
            checks.fail("balance_matches_journal", || {
                format!(
                    "{id} seq {}: balance {} + held {} != credits {credits} - debits {debits} - captures {captures} + refunds {refunds}",
                    entry.seq, entry.balance_micros, entry.held_micros
                )
            });
        }
    }
    let (last_balance, last_held) = journal
        .last()
        .map_or((0, 0), |e| (e.balance_micros, e.held_micros));
    if (agent.balance_micros, agent.held_micros) != (last_balance, last_held) {
        checks.fail("balance_matches_journal", || {
            format!(
                "{id}: agent says balance {} held {}, its journal ends at balance {last_balance} held {last_held}",
                agent.balance_micros, agent.held_micros
            )
        });
    }

    // Keys: how often each appears.
    let mut key_count: HashMap<&str, u64> = HashMap::new();
    // A crossing is journaled under the key of the change that crossed, right after it:
    // one request, two entries.
    for entry in journal.iter().filter(|e| e.kind != "threshold_crossed") {
        if let Some(key) = entry.idempotency_key.as_deref() {
            *key_count.entry(key).or_default() += 1;
        }
    }
    let by_seq: HashMap<u64, &JournalEntry> = journal.iter().map(|e| (e.seq, e)).collect();
    for applied in &log.applied {
        match by_seq.get(&applied.seq) {
            None => checks.fail("approved_exactly_once", || {
                format!(
                    "{id}: approved {} seq {} is not in the journal",
                    applied.kind, applied.seq
                )
            }),
            Some(entry)
                if entry.kind != applied.kind
                    || entry.amount_micros != applied.amount_micros
                    || entry.idempotency_key.as_deref() != Some(applied.key.as_str()) =>
            {
                checks.fail("approved_exactly_once", || {
                    format!(
                        "{id} seq {}: receipt said {} {} key {}, journal has {} {} key {:?}",
                        applied.seq,
                        applied.kind,
                        applied.amount_micros,
                        applied.key,
                        entry.kind,
                        entry.amount_micros,
                        entry.idempotency_key
                    )
                })
            }
            Some(_) => {}
        }
        let n = key_count.get(applied.key.as_str()).copied().unwrap_or(0);
        if n != 1 {
            checks.fail("approved_exactly_once", || {
                format!("{id}: approved key {} appears {n} times", applied.key)
            });
        }
    }
    for key in &log.denied_funds {
        if let Some(n) = key_count.get(key.as_str()) {
            checks.fail("no_charge_after_402", || {
                format!("{id}: key {key} was answered 402 but appears {n} time(s)")
            });
        }
    }
    for key in &log.denied_other {
        if let Some(n) = key_count.get(key.as_str()) {
            checks.fail("no_unexplained_entries", || {
                format!("{id}: key {key} was denied (429/403) but appears {n} time(s)")
            });
        }
    }
    let sent: HashSet<&str> = log
        .applied
        .iter()
        .map(|a| a.key.as_str())
        .chain(log.unknown.iter().map(String::as_str))
        .chain(log.denied_funds.iter().map(String::as_str))
        .chain(log.denied_other.iter().map(String::as_str))
        .collect();
    for (key, n) in &key_count {
        if *n > 1 {
            checks.fail("no_unexplained_entries", || {
                format!("{id}: key {key} appears {n} times")
            });
        }
        if !sent.contains(key) && !setup_keys.contains(*key) {
            checks.fail("no_unexplained_entries", || {
                format!("{id}: key {key} is in the journal but was never sent")
            });
        }
    }
}

/// Reads every agent and its whole journal and checks them against the logs.
pub async fn check(
    client: &Client,
    agents: &[(String, AgentLog)],
    setup_keys: &HashSet<String>,
) -> anyhow::Result<InvariantReport> {
    let mut checks = Checks::new();
    let mut journal_entries = 0;
    for (id, log) in agents {
        let agent = client.get_agent(id).await?;
        let journal = client.journal_all(id).await?;
        journal_entries += journal.len() as u64;
        check_agent(id, &agent, &journal, log, setup_keys, &mut checks);
    }
    Ok(report(checks, agents, journal_entries))
}

fn report(checks: Checks, agents: &[(String, AgentLog)], journal_entries: u64) -> InvariantReport {
    let checks: Vec<Check> = CHECKS
        .iter()
        .map(|(name, description)| {
            let (violations, examples) = checks.found.get(name).cloned().unwrap_or_default();
            Check {
                name,
                description,
                ok: violations == 0,
                violations,
                examples,
            }
        })
        .collect();
    InvariantReport {
        ok: checks.iter().all(|c| c.ok),
        agents_checked: agents.len() as u64,
        journal_entries,
        approved_checked: agents.iter().map(|(_, l)| l.applied.len() as u64).sum(),
        denied_402_checked: agents
            .iter()
            .map(|(_, l)| l.denied_funds.len() as u64)
            .sum(),
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        seq: u64,
        kind: &str,
        amount: u64,
        balance: u64,
        held: u64,
        key: &str,
    ) -> JournalEntry {
        JournalEntry {
            seq,
            kind: kind.into(),
            amount_micros: amount,
            balance_micros: balance,
            held_micros: held,
            idempotency_key: (!key.is_empty()).then(|| key.to_owned()),
            ..JournalEntry::default()
        }
    }

    fn applied(seq: u64, kind: &'static str, amount: u64, key: &str) -> Applied {
        Applied {
            seq,
            kind,
            amount_micros: amount,
            key: key.into(),
        }
    }

    /// A clean run: create, credit 100, debit 30, hold 50, capture 20 (30 released).
    fn clean() -> (Agent, Vec<JournalEntry>, AgentLog, HashSet<String>) {
        let journal = vec![
            entry(1, "agent_created", 0, 0, 0, "create"),
            entry(2, "credit", 100, 100, 0, "c1"),
            entry(3, "debit", 30, 70, 0, "d1"),
            entry(4, "hold", 50, 20, 50, "h1"),
            entry(5, "capture", 20, 50, 0, "k1"),
        ];
        let log = AgentLog {
            applied: vec![
                applied(3, "debit", 30, "d1"),
                applied(4, "hold", 50, "h1"),
                applied(5, "capture", 20, "k1"),
            ],
            denied_funds: vec!["d2".into()],
            denied_other: vec!["d3".into()],
            unknown: vec![],
        };
        let agent = Agent {
            balance_micros: 50,
            ..Agent::default()
        };
        let setup = ["create".to_owned(), "c1".to_owned()].into();
        (agent, journal, log, setup)
    }

    fn failures(
        agent: &Agent,
        journal: &[JournalEntry],
        log: &AgentLog,
        setup: &HashSet<String>,
    ) -> Vec<&'static str> {
        let mut checks = Checks::new();
        check_agent("a", agent, journal, log, setup, &mut checks);
        checks
            .found
            .iter()
            .filter(|(_, (n, _))| *n > 0)
            .map(|(name, _)| *name)
            .collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let (agent, journal, log, setup) = clean();
        assert_eq!(failures(&agent, &journal, &log, &setup), Vec::<&str>::new());
    }

    #[test]
    fn a_crossing_under_the_key_of_its_debit_is_not_a_second_charge() {
        let (agent, mut journal, log, setup) = clean();
        journal.insert(3, entry(4, "threshold_crossed", 0, 70, 0, "d1"));
        for (i, e) in journal.iter_mut().enumerate() {
            e.seq = i as u64 + 1;
        }
        let mut log = log;
        for a in log.applied.iter_mut().filter(|a| a.seq >= 4) {
            a.seq += 1;
        }
        assert_eq!(failures(&agent, &journal, &log, &setup), Vec::<&str>::new());
        // The same entry as a debit is a double charge.
        journal[3].kind = "debit".into();
        assert!(!failures(&agent, &journal, &log, &setup).is_empty());
    }

    #[test]
    fn a_charge_for_a_402_is_caught() {
        let (agent, mut journal, log, setup) = clean();
        journal.push(entry(6, "debit", 10, 40, 0, "d2"));
        let found = failures(
            &Agent {
                balance_micros: 40,
                ..agent
            },
            &journal,
            &log,
            &setup,
        );
        assert_eq!(found, ["no_charge_after_402"]);
    }

    #[test]
    fn a_double_charge_is_caught() {
        let (agent, mut journal, log, setup) = clean();
        journal.push(entry(6, "debit", 30, 20, 0, "d1"));
        let found = failures(
            &Agent {
                balance_micros: 20,
                ..agent
            },
            &journal,
            &log,
            &setup,
        );
        assert_eq!(found, ["approved_exactly_once", "no_unexplained_entries"]);
    }

    #[test]
    fn overspend_gaps_and_wrong_balances_are_caught() {
        let (agent, mut journal, log, setup) = clean();
        journal.push(entry(6, "debit", 80, 0, 0, "x"));
        let found = failures(
            &Agent {
                balance_micros: 0,
                ..agent.clone()
            },
            &journal,
            &log,
            &setup,
        );
        assert_eq!(
            found,
            [
                "balance_matches_journal",
                "no_overspend",
                "no_unexplained_entries"
            ]
        );

        let (agent, mut journal, log, setup) = clean();
        journal.remove(1);
        let found = failures(&agent, &journal, &log, &setup);
        assert!(found.contains(&"journal_dense"), "{found:?}");

        let (agent, journal, log, setup) = clean();
        let found = failures(
            &Agent {
                balance_micros: 49,
                ..agent
            },
            &journal,
            &log,
            &setup,
        );
        assert_eq!(found, ["balance_matches_journal"]);
    }

    #[test]
    fn a_missing_or_altered_approval_is_caught() {
        let (agent, journal, mut log, setup) = clean();
        log.applied.push(applied(9, "debit", 5, "d9"));
        assert_eq!(
            failures(&agent, &journal, &log, &setup),
            ["approved_exactly_once"]
        );
        let (agent, journal, mut log, setup) = clean();
        log.applied[0].amount_micros = 31;
        assert_eq!(
            failures(&agent, &journal, &log, &setup),
            ["approved_exactly_once"]
        );
    }
}
