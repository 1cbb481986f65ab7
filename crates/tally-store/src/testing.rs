//! Test support shared by the unit tests of this crate: journal entries made the real way,
//! by `decide` and `evolve`.

use tally_core::{
    AgentId, AgentState, Command, CommandKind, Event, IdempotencyKey, PlanBook, PlanName, RateState,
};

/// Decides `kinds` in order for agent `agent-1` on an unlimited plan named `default`, each
/// with its own idempotency key, and returns the agent as they leave it and their events.
pub fn decided(kinds: impl IntoIterator<Item = CommandKind>) -> (AgentState, Vec<Event>) {
    let id = AgentId::new("agent-1").expect("valid");
    let plans = PlanBook::new([tally_core::Plan::unlimited(default_plan())]);
    let mut rate = RateState::default();
    let mut state = None;
    let mut events = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        let cmd = Command::new(id.clone(), kind)
            .with_key(IdempotencyKey::new(format!("k{i}")).expect("valid"));
        let d = tally_core::decide(state.as_ref(), &mut rate, &cmd, &plans, 1_000).expect("valid");
        for e in &d.events {
            state = Some(tally_core::evolve(state, &id, e).expect("evolves"));
        }
        events.extend(d.events);
    }
    (state.expect("created"), events)
}

pub fn default_plan() -> PlanName {
    PlanName::new("default").expect("valid")
}
