//! Selling one call for an x402 payment, shared by the metering proxy and forward-auth:
//! [`take`] asks for the payment (402), checks it pays the route's price, has the
//! facilitator verify it, makes the payer an agent and checks its status, rate limits and
//! cap; [`settle`] settles it and journals the payment as a credit and the call as a debit
//! of the payer, both keyed by the payment's identity. The proxy settles after the
//! upstream served the call; forward-auth, which never sees the upstream, before.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use tally_core::{AgentId, Command, CommandError, CommandKind, Metadata};
use tally_store::{Engine, Reply};

use crate::app::AppState;
use crate::authorize::{route_metadata, X_TALLY_AGENT, X_TALLY_CHARGED_MICROS, X_TALLY_ROUTE};
use crate::config::{Price, Route, X402};
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

fn count(st: &AppState, outcome: &str) {
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
/// the call (the proxy), so a failure is journaled (see [`unsettled`]). A failure is a
/// 402 with the reason, or 502 when the facilitator cannot answer.
pub async fn settle(
    st: &AppState,
    engine: &Engine,
    route: &Route,
    taken: &Taken,
    resource: &str,
    served: bool,
    charge_micros: u64,
) -> Result<Vec<(HeaderName, HeaderValue)>, Problem> {
    let (Some(x), Some(facilitator)) = (st.x402(), st.facilitator()) else {
        return Err(Problem::not_found("no x402 facilitator is configured"));
    };
    // `upto` settles what the call cost; `exact` what was signed.
    let charge_micros = if taken.upto {
        charge_micros.min(taken.price_micros)
    } else {
        taken.price_micros
    };
    let settle_with = if taken.upto {
        x402::settling(&taken.want, charge_micros)
    } else {
        taken.want.clone()
    };
    let settled = match facilitator.settle(&taken.payment, &settle_with).await {
        Ok(v) if v.ok => v,
        Ok(v) => {
            let reason = v.reason.as_deref().unwrap_or("no reason given");
            unsettled(st, engine, route, taken, served, charge_micros, reason).await;
            return Err(x402::payment_problem(
                x,
                &format!("the payment could not be settled: {reason}"),
                resource,
                taken.want.clone(),
            ));
        }
        Err(e) => {
            unsettled(
                st,
                engine,
                route,
                taken,
                served,
                charge_micros,
                &e.to_string(),
            )
            .await;
            return Err(e.problem());
        }
    };
    let amount_micros = if taken.upto {
        charge_micros
    } else {
        taken.payment.amount_micros(&taken.want)
    };
    count(st, "settled");
    st.metrics().x402_settled_micros_total.inc_by(amount_micros);
    journal(
        st,
        engine,
        route,
        taken,
        &settled,
        amount_micros,
        charge_micros,
    )
    .await;
    let mut headers = taken.headers(route);
    headers.push((X_TALLY_CHARGED_MICROS, HeaderValue::from(charge_micros)));
    if let Ok(v) = HeaderValue::from_str(&x402::payment_response(&settled)) {
        headers.push((PAYMENT_RESPONSE, v));
    }
    Ok(headers)
}

/// A settlement that failed: counted (alert on
/// `tally_x402_payments_total{outcome="settle_failed"}`) and logged at error. When the
/// upstream had already served the call (the proxy), the work was done and not paid for:
/// journaled as `payment_unsettled` in the payer's journal with the payment's identity,
/// the route and the reason, keyed `<identity>:unsettled` so a retried request with the
/// same payment records it once. Forward-auth settles before the gateway forwards, so
/// there nothing was served and nothing is owed.
async fn unsettled(
    st: &AppState,
    engine: &Engine,
    route: &Route,
    taken: &Taken,
    served: bool,
    charge_micros: u64,
    reason: &str,
) {
    count(st, "settle_failed");
    tracing::error!(
        route = %route.name,
        agent = %taken.agent,
        payment = %taken.payment.id,
        served,
        reason,
        "x402 settlement failed; the answer was withheld"
    );
    // An `upto` call that cost nothing owes nothing.
    if !served || charge_micros == 0 {
        return;
    }
    let mut record = Command::new(
        taken.agent.clone(),
        CommandKind::RecordUnsettledPayment {
            amount_micros: charge_micros,
        },
    );
    record.task_type = route.task_type.clone();
    record.metadata = Metadata::new(BTreeMap::from([
        ("route".to_owned(), clip(&route.name)),
        ("x402_payment".to_owned(), clip(&taken.payment.id)),
        ("reason".to_owned(), clip(reason)),
    ]))
    .unwrap_or_default();
    keyed_submit(
        st,
        engine,
        taken,
        record,
        format!("{}:unsettled", taken.payment.id),
    )
    .await;
}

/// At most the longest metadata value, cut on a character boundary.
fn clip(s: &str) -> String {
    let mut end = s.len().min(tally_core::METADATA_VALUE_LEN_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Submits a command keyed by `key`; a failure is logged at error with the payment, never
/// dropped silently (the caller has already answered or is about to).
async fn keyed_submit(st: &AppState, engine: &Engine, taken: &Taken, cmd: Command, key: String) {
    let cmd = match tally_core::IdempotencyKey::new(key) {
        Ok(key) => cmd.with_key(key),
        Err(e) => {
            tracing::error!(payment = %taken.payment.id, error = %e, "a payment's key is not a valid idempotency key");
            return;
        }
    };
    let answer = engine.submit(cmd.clone()).await;
    if let Err(p) = classify(st, &cmd, answer) {
        tracing::error!(
            agent = %taken.agent,
            payment = %taken.payment.id,
            problem = %p.to_json(),
            "a journal entry for an x402 payment could not be written"
        );
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

/// The settled payment as a credit, and the call as a debit of what it cost, in the
/// payer's journal; both keyed by the payment's identity, so neither lands twice. The
/// money has arrived: a debit refused now (a concurrent call took the last rate cell)
/// leaves it as the payer's prepaid balance. An `upto` call that cost 0 moved nothing and
/// writes nothing.
async fn journal(
    st: &AppState,
    engine: &Engine,
    route: &Route,
    taken: &Taken,
    settled: &x402::Verdict,
    amount_micros: u64,
    charge_micros: u64,
) {
    if amount_micros == 0 {
        return;
    }
    let transaction = clip(
        settled
            .raw
            .get("transaction")
            .and_then(Value::as_str)
            .unwrap_or(""),
    );
    let mut credit = Command::new(taken.agent.clone(), CommandKind::Credit { amount_micros });
    credit.metadata = Metadata::new(BTreeMap::from([
        ("x402_payment".to_owned(), clip(&taken.payment.id)),
        ("x402_transaction".to_owned(), transaction),
    ]))
    .unwrap_or_default();
    let mut debit = Command::new(
        taken.agent.clone(),
        CommandKind::Debit {
            amount_micros: charge_micros,
        },
    )
    .with_priority(route.priority);
    debit.task_type = route.task_type.clone();
    debit.metadata = route_metadata(route).unwrap_or_default();
    keyed_submit(st, engine, taken, credit, taken.payment.id.clone()).await;
    keyed_submit(
        st,
        engine,
        taken,
        debit,
        format!("{}:call", taken.payment.id),
    )
    .await;
}
