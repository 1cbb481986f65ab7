//! Selling one call for an x402 payment, shared by the metering proxy and forward-auth:
//! [`take`] asks for the payment (402), checks it pays the route's price, has the
//! facilitator verify it, makes the payer an agent and checks its status, rate limits and
//! cap; [`settle`] settles it and journals the payment as a credit and the call as a debit
//! of the payer, both keyed by the payment's identity. The proxy settles after the
//! upstream served the call; forward-auth, which never sees the upstream, before.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use tally_core::{AgentId, Command, CommandError, CommandKind, IdempotencyKey, Metadata};
use tally_store::{Engine, Reply};

use crate::app::AppState;
use crate::authorize::{route_metadata, X_TALLY_AGENT, X_TALLY_CHARGED_MICROS, X_TALLY_ROUTE};
use crate::config::{Price, Route, X402};
use crate::outbox::{Outbox, Settlement};
use crate::problem::Problem;
use crate::respond::{classify, submit_error};
use crate::x402::{self, InUse, Payment, PAYMENT_RESPONSE};

/// The identity of the x402 payment a call was bought with.
pub const X_TALLY_PAYMENT: HeaderName = HeaderName::from_static("x-tally-payment");

/// A verified payment for one call, held by this request until it is done.
#[derive(Debug)]
pub struct Taken {
    pub payment: Payment,
    pub want: Value,
    pub agent: AgentId,
    /// The fixed price (`exact`), or the most the call may cost (`upto`).
    pub price_micros: u64,
    /// Paid with `upto`: settled for what the call cost, at most `price_micros`.
    pub upto: bool,
    _in_use: InUse,
}

impl Taken {
    /// The headers that tell the upstream who pays.
    pub fn headers(&self, route: &Route) -> Vec<(HeaderName, HeaderValue)> {
        header_values(&[
            (X_TALLY_AGENT, self.agent.to_string()),
            (X_TALLY_ROUTE, route.name.clone()),
            (X_TALLY_PAYMENT, self.payment.id.clone()),
        ])
    }
}

/// The pairs whose values are valid header values.
pub(crate) fn header_values(pairs: &[(HeaderName, String)]) -> Vec<(HeaderName, HeaderValue)> {
    pairs
        .iter()
        .filter_map(|(n, v)| HeaderValue::from_str(v).ok().map(|v| (n.clone(), v)))
        .collect()
}

/// Counts an x402 payment outcome (`tally_x402_payments_total`).
pub(crate) fn count(st: &AppState, outcome: &str) {
    st.metrics()
        .x402_payments_total
        .with_label_values(&[outcome])
        .inc();
}

/// Everything before the call is served. A 402 (asked again, with the reason) for no,
/// a malformed, a v1, an underpaying or a misdirected payment, one in use by another
/// request or one the facilitator refuses; 502 when the facilitator cannot answer; the
/// payer's 403/429 when its status, rate limits or cap say no. No money moves in any.
pub async fn take(
    st: &AppState,
    engine: &Engine,
    route: &Route,
    headers: &HeaderMap,
    resource: &str,
) -> Result<Taken, Problem> {
    let (Some(x), Some(facilitator)) = (st.x402(), st.facilitator()) else {
        return Err(Problem::not_found(
            "this route takes x402 payments but no facilitator is configured",
        ));
    };
    let (want, price_micros, upto) = match &route.price {
        Price::Variable { max_micros, .. } => {
            let address = upto_address(st, facilitator).await?;
            let want = x402::requirement_upto(x, *max_micros, &address);
            (want, *max_micros, true)
        }
        fixed => {
            let price_micros = fixed.fixed_micros().unwrap_or_default();
            (x402::requirement(x, price_micros), price_micros, false)
        }
    };
    let ask = |error: &str| x402::payment_problem(x, error, resource, want.clone());
    let payment = match x402::read_payment(headers) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(ask("payment required")),
        Err(e) => {
            count(st, "refused");
            return Err(ask(&e.to_string()));
        }
    };
    if let Err(e) = payment.check(&want) {
        count(st, "refused");
        return Err(ask(&e.to_string()));
    }
    let Some(in_use) = InUse::claim(st.payments_in_use(), &payment.id) else {
        count(st, "refused");
        return Err(ask("this payment is being used by another request"));
    };
    let verdict = facilitator.verify(&payment, &want).await.map_err(|e| {
        count(st, "facilitator_error");
        e.problem()
    })?;
    if !verdict.ok {
        count(st, "invalid");
        let reason = verdict.reason.as_deref().unwrap_or("no reason given");
        return Err(ask(&format!(
            "the facilitator refused the payment: {reason}"
        )));
    }
    let payer = verdict
        .payer
        .clone()
        .or_else(|| x402::payer_of(&payment.payload))
        .unwrap_or_default();
    let Some(agent) = x402::payer_agent(&x.network, &payer) else {
        count(st, "invalid");
        return Err(ask("the payer's address cannot name an agent"));
    };
    count(st, "verified");
    ensure_payer(st, engine, &agent, x).await?;
    // The payer's status, rate limits and cap hold before anything is served; its funds
    // come with the payment.
    let mut check = Command::new(
        agent.clone(),
        CommandKind::Check {
            amount_micros: price_micros,
        },
    )
    .with_priority(route.priority);
    check.task_type = route.task_type.clone();
    let checked = engine.submit(check.clone()).await;
    match classify(st, &check, checked) {
        Ok(_) => {}
        Err(p) if p.kind == "insufficient-funds" => {}
        Err(p) => return Err(p),
    }
    Ok(Taken {
        payment,
        want,
        agent,
        price_micros,
        upto,
        _in_use: in_use,
    })
}

/// The facilitator's address for `upto` requirements: configured or learned, else asked
/// of its `/supported` now. 502 when it lists none.
async fn upto_address(st: &AppState, facilitator: &x402::Facilitator) -> Result<String, Problem> {
    if let Some(a) = st.upto_address() {
        return Ok(a.to_owned());
    }
    let kinds = facilitator.kinds().await.map_err(|e| e.problem())?;
    st.learn_upto_address(&kinds)
        .map(str::to_owned)
        .ok_or_else(|| {
            x402::FacilitatorError(
                "lists no upto kind with a facilitatorAddress for the configured network \
             (set [x402] facilitator_address)"
                    .into(),
            )
            .problem()
        })
}

/// Settles the payment (retried with the same payload) and journals it; the headers for
/// the answer (`PAYMENT-RESPONSE`, `X-Tally-*`). `served`: the upstream has already done
/// the call (the proxy), so a failure is journaled as `payment_unsettled`; forward-auth
/// settles before the gateway forwards, so there nothing was served and nothing is owed.
/// A failure is a 402 with the reason, or 502 when the facilitator cannot answer.
pub async fn settle(
    st: &AppState,
    engine: &Engine,
    route: &Route,
    taken: &Taken,
    resource: &str,
    served: bool,
    charge_micros: u64,
) -> Result<Vec<(HeaderName, HeaderValue)>, Problem> {
    let Some(x) = st.x402() else {
        return Err(Problem::not_found("no x402 facilitator is configured"));
    };
    // `upto` settles what the call cost; `exact` what was signed.
    let (charge_micros, requirements, paid_micros) = if taken.upto {
        let charge = charge_micros.min(taken.price_micros);
        (charge, x402::settling(&taken.want, charge), charge)
    } else {
        let paid = taken.payment.amount_micros(&taken.want);
        (taken.price_micros, taken.want.clone(), paid)
    };
    let settlement = call_settlement(
        route,
        taken,
        requirements,
        paid_micros,
        charge_micros,
        served,
    );
    let settled = match settle_recorded(st, engine, &settlement, true).await {
        Ok(v) => v.verdict,
        Err(e) => {
            count(st, "settle_failed");
            tracing::error!(
                route = %route.name,
                agent = %taken.agent,
                payment = %taken.payment.id,
                served,
                error = %e,
                "x402 settlement failed; the answer was withheld"
            );
            return Err(e.problem(x, resource, &taken.want));
        }
    };
    let mut headers = taken.headers(route);
    headers.push((X_TALLY_CHARGED_MICROS, HeaderValue::from(charge_micros)));
    if let Ok(v) = HeaderValue::from_str(&x402::payment_response(&settled)) {
        headers.push((PAYMENT_RESPONSE, v));
    }
    Ok(headers)
}

/// A call's settlement: the payment credited to the payer (`paid_micros`), the call
/// debited (`charge_micros`, none when 0), and for a served call the `payment_unsettled`
/// record of what is owed should the settlement fail. All keyed by the payment's identity.
fn call_settlement(
    route: &Route,
    taken: &Taken,
    requirements: Value,
    paid_micros: u64,
    charge_micros: u64,
    served: bool,
) -> Settlement {
    let id = &taken.payment.id;
    let agent = &taken.agent;
    let mut credit = Command::new(
        agent.clone(),
        CommandKind::Credit {
            amount_micros: paid_micros,
        },
    );
    credit.metadata =
        Metadata::new(BTreeMap::from([("x402_payment".to_owned(), clip(id))])).unwrap_or_default();
    let debit = (charge_micros > 0).then(|| {
        let mut debit = Command::new(
            agent.clone(),
            CommandKind::Debit {
                amount_micros: charge_micros,
            },
        )
        .with_priority(route.priority);
        debit.task_type = route.task_type.clone();
        debit.metadata = route_metadata(route).unwrap_or_default();
        keyed(debit, &format!("{id}:call"))
    });
    // An `upto` call that cost nothing owes nothing.
    let unsettled = (served && charge_micros > 0).then(|| {
        let mut record = Command::new(
            agent.clone(),
            CommandKind::RecordUnsettledPayment {
                amount_micros: charge_micros,
            },
        );
        record.task_type = route.task_type.clone();
        record.metadata = Metadata::new(BTreeMap::from([
            ("route".to_owned(), clip(&route.name)),
            ("x402_payment".to_owned(), clip(id)),
        ]))
        .unwrap_or_default();
        keyed(record, &format!("{id}:unsettled"))
    });
    Settlement {
        payment_id: id.clone(),
        payload: taken.payment.payload.clone(),
        requirements,
        credit: keyed(credit, id),
        debit,
        unsettled,
        credit_transaction: true,
    }
}

/// `cmd` with `key` as its idempotency key (a payment identity always makes a valid key:
/// `read_payment` checks it; one that did not would be logged, and the command unkeyed
/// would be refused by the engine, not applied twice).
fn keyed(cmd: Command, key: &str) -> Command {
    match IdempotencyKey::new(key) {
        Ok(k) => cmd.with_key(k),
        Err(e) => {
            tracing::error!(key, error = %e, "a payment's key is not a valid idempotency key");
            cmd
        }
    }
}

/// A settled payment: the facilitator's answer, and the engine's to its credit (none when
/// it settled for 0).
#[derive(Debug)]
pub struct Settled {
    pub verdict: x402::Verdict,
    pub credit: Option<Result<Reply, tally_store::SubmitError>>,
}

/// Why a recorded settlement did not settle.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The facilitator said no (`errorReason`).
    #[error("the payment could not be settled: {0}")]
    Refused(String),
    #[error(transparent)]
    Unreachable(#[from] x402::FacilitatorError),
    /// Not recorded in the outbox, so not sent: no money moved.
    #[error("the settlement could not be recorded before it was sent: {0}")]
    NotRecorded(String),
}

impl SettleError {
    /// 402 asking for `want` again with the reason; 502 when the facilitator could not
    /// answer; 503 when it was never sent.
    pub fn problem(&self, x: &X402, resource: &str, want: &Value) -> Problem {
        match self {
            SettleError::Refused(_) => {
                x402::payment_problem(x, &self.to_string(), resource, want.clone())
            }
            SettleError::Unreachable(e) => e.problem(),
            SettleError::NotRecorded(_) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "settlement-unavailable",
                "Settlement unavailable",
                format!("{self}; the payment may be sent again"),
            )
            .retry_after_ms(1_000),
        }
    }
}

/// Records `s` in the outbox (`record`: not when recovering it from there), sends its
/// `/settle`, and writes what followed to the journal: on success the credit (with the
/// transaction when `credit_transaction`) and the debit, on failure the unsettled record.
/// The outbox file goes once the journal has it; a journal write that failed leaves it
/// for the next start, and so does a refused top-up being recovered (`record` false: the
/// first attempt may have moved the money; [`recover`] sets it aside).
pub async fn settle_recorded(
    st: &AppState,
    engine: &Engine,
    s: &Settlement,
    record: bool,
) -> Result<Settled, SettleError> {
    let Some(facilitator) = st.facilitator() else {
        return Err(SettleError::NotRecorded(
            "no x402 facilitator is configured".into(),
        ));
    };
    let Some(outbox) = st.outbox() else {
        return Err(SettleError::NotRecorded(
            "the settlement directory could not be opened".into(),
        ));
    };
    if record {
        outbox
            .put(s)
            .map_err(|e| SettleError::NotRecorded(e.to_string()))?;
    }
    let written = match facilitator.settle(&s.payload, &s.requirements).await {
        Ok(v) if v.ok => {
            let credited = match s.credit.kind {
                CommandKind::Credit { amount_micros } => amount_micros,
                _ => 0,
            };
            count(st, "settled");
            st.metrics().x402_settled_micros_total.inc_by(credited);
            let mut credit = s.credit.clone();
            if s.credit_transaction {
                let transaction = v.raw.get("transaction").and_then(Value::as_str);
                add_metadata(&mut credit, "x402_transaction", transaction.unwrap_or(""));
            }
            // An `upto` call that cost 0 settled for nothing: there is no credit to write.
            let (mut written, credit_answer) = if credited == 0 {
                (true, None)
            } else {
                let (written, answer) = journal_answer(st, engine, &s.payment_id, &credit).await;
                (written, Some(answer))
            };
            if let Some(debit) = &s.debit {
                written &= journal(st, engine, &s.payment_id, debit.clone()).await;
            }
            if written {
                forget(outbox, &s.payment_id);
            }
            return Ok(Settled {
                verdict: v,
                credit: credit_answer,
            });
        }
        Ok(v) => SettleError::Refused(v.reason.unwrap_or_else(|| "no reason given".into())),
        Err(e) => SettleError::Unreachable(e),
    };
    // A live top-up refused moved no money: forgotten. Recovering one, the first attempt
    // may have moved it: the caller sets it aside.
    let mut done = record;
    if let Some(u) = &s.unsettled {
        let mut u = u.clone();
        add_metadata(&mut u, "reason", &written.to_string());
        done = journal(st, engine, &s.payment_id, u).await;
    }
    if done {
        forget(outbox, &s.payment_id);
    }
    Err(written)
}

/// Adds `key = value` (clipped) to `cmd`'s metadata, unless that would break its bounds.
fn add_metadata(cmd: &mut Command, key: &str, value: &str) {
    let mut metadata = cmd.metadata.entries().clone();
    metadata.insert(key.to_owned(), clip(value));
    if let Ok(m) = Metadata::new(metadata) {
        cmd.metadata = m;
    }
}

fn forget(outbox: &Outbox, payment_id: &str) {
    if let Err(e) = outbox.remove(payment_id) {
        tracing::error!(payment = payment_id, error = %e, "a finished x402 settlement's file could not be removed; the next start will find its journal entries");
    }
}

/// Submits a keyed journal entry for a payment: whether the journal has it (applied now
/// or before), and the engine's answer. A failure is logged at error with the payment,
/// never dropped silently.
async fn journal_answer(
    st: &AppState,
    engine: &Engine,
    payment_id: &str,
    cmd: &Command,
) -> (bool, Result<Reply, tally_store::SubmitError>) {
    let answer = engine.submit(cmd.clone()).await;
    // The key is the payment's own: held for another request means this entry (with
    // other metadata, e.g. the transaction) is already there.
    if matches!(answer, Ok(Reply::KeyReused)) {
        return (true, answer);
    }
    match classify(st, cmd, answer.clone()) {
        Ok(_) => (true, answer),
        Err(p) => {
            tracing::error!(
                agent = %cmd.agent,
                payment = payment_id,
                problem = %p.to_json(),
                "a journal entry for an x402 payment could not be written"
            );
            (false, answer)
        }
    }
}

async fn journal(st: &AppState, engine: &Engine, payment_id: &str, cmd: Command) -> bool {
    journal_answer(st, engine, payment_id, &cmd).await.0
}

/// Whether the journal holds a change keyed `key` for `agent`. Asked with a check (which
/// writes nothing) under the key: the engine answers a key it holds for another request
/// as reused.
pub async fn keyed_already(
    engine: &Engine,
    agent: &AgentId,
    key: &IdempotencyKey,
) -> Result<bool, Problem> {
    let probe =
        Command::new(agent.clone(), CommandKind::Check { amount_micros: 1 }).with_key(key.clone());
    let answer = engine.submit(probe).await.map_err(submit_error)?;
    Ok(matches!(answer, Reply::KeyReused))
}

/// Pause between recovery rounds while the facilitator cannot be reached.
const RECOVERY_PAUSE_MS: u64 = 30_000;
/// Recovery rounds at most; what is left waits for the next start.
const RECOVERY_ROUNDS_MAX: u32 = 20;

/// Finishes the settlements a crash or a stop left in the outbox, after the engine opens:
/// one already credited is only completed (its debit, keyed) and forgotten; any other is
/// settled again with the same payload (the facilitator settles a payment once) and
/// journaled. One the facilitator now refuses is, for a served call, the
/// `payment_unsettled` record; for a top-up it is set aside in `unresolved/` and logged
/// (the first attempt may have moved the money): an operator reconciles it. While the
/// facilitator cannot be reached the rest is tried again, `RECOVERY_ROUNDS_MAX` times.
pub async fn recover(st: &AppState, engine: &Engine) {
    let Some(outbox) = st.outbox() else {
        return;
    };
    for round in 0..RECOVERY_ROUNDS_MAX {
        if round > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(RECOVERY_PAUSE_MS)).await;
        }
        let pending = match outbox.pending() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "the x402 settlements in flight could not be listed");
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        tracing::warn!(
            count = pending.len(),
            round,
            "finishing x402 settlements left by a restart"
        );
        let mut unreachable = 0;
        for s in pending {
            if !recover_one(st, engine, outbox, &s).await {
                unreachable += 1;
            }
        }
        if unreachable == 0 {
            return;
        }
    }
    tracing::error!(
        "x402 settlements are still in flight after {RECOVERY_ROUNDS_MAX} rounds; the next start tries again"
    );
}

/// One settlement from the outbox; false when the facilitator could not be reached.
async fn recover_one(st: &AppState, engine: &Engine, outbox: &Outbox, s: &Settlement) -> bool {
    let Some(_in_use) = InUse::claim(st.payments_in_use(), &s.payment_id) else {
        return true;
    };
    let credited = match &s.credit.idempotency_key {
        Some(key) => keyed_already(engine, &s.credit.agent, key).await,
        None => Ok(false),
    };
    match credited {
        Ok(true) => {
            let done = match &s.debit {
                Some(d) => journal(st, engine, &s.payment_id, d.clone()).await,
                None => true,
            };
            if done {
                forget(outbox, &s.payment_id);
            }
            count(st, "recovered");
            return true;
        }
        Ok(false) => {}
        Err(p) => {
            tracing::error!(payment = %s.payment_id, problem = %p.to_json(), "a pending x402 settlement could not be looked up");
            return true;
        }
    }
    match settle_recorded(st, engine, s, false).await {
        Ok(_) => {
            count(st, "recovered");
            true
        }
        Err(SettleError::Unreachable(e)) => {
            tracing::warn!(payment = %s.payment_id, error = %e, "a pending x402 settlement waits for the facilitator");
            false
        }
        Err(e) if s.unsettled.is_some() => {
            count(st, "settle_failed");
            tracing::error!(payment = %s.payment_id, error = %e, "a served call's x402 settlement, interrupted by a restart, failed; journaled as payment_unsettled");
            true
        }
        Err(e) => {
            count(st, "unresolved");
            let moved = outbox.set_aside(&s.payment_id);
            tracing::error!(
                payment = %s.payment_id,
                agent = %s.credit.agent,
                error = %e,
                moved_to = ?moved,
                "an x402 top-up's settlement was interrupted by a restart and is now refused: \
                 the first attempt may have moved the money; reconcile it with the facilitator"
            );
            true
        }
    }
}

/// Makes the payer's agent on first payment (on `[x402] payer_plan`).
async fn ensure_payer(
    st: &AppState,
    engine: &Engine,
    agent: &AgentId,
    x: &X402,
) -> Result<(), Problem> {
    if engine.agent(agent).await.map_err(submit_error)?.is_some() {
        return Ok(());
    }
    let plan = x
        .payer_plan
        .clone()
        .unwrap_or_else(|| st.default_plan().clone());
    let cmd = Command::new(
        agent.clone(),
        CommandKind::CreateAgent {
            plan,
            status: tally_core::Status::Active,
        },
    );
    match engine.submit(cmd).await.map_err(submit_error)? {
        Reply::Decided { .. } | Reply::Rejected(CommandError::AgentExists) => Ok(()),
        other => Err(Problem::invalid(format!(
            "the payer's agent could not be made: {other:?}"
        ))),
    }
}

/// At most the longest metadata value, cut on a character boundary.
fn clip(s: &str) -> String {
    let mut end = s.len().min(tally_core::METADATA_VALUE_LEN_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
