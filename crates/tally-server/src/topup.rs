//! `POST /v1/agents/{id}/credits`: an admin's credit, or a top-up paid with x402. A
//! request with a payment (`PAYMENT-SIGNATURE`), from the agent's own key or a service
//! token, is verified and settled through the facilitator and then credited with the
//! settled amount; without a payment such a caller is asked for one (402). The payment's
//! identity is the credit's idempotency key, so one payment credits once across retries
//! and restarts.

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use tally_core::{Command, CommandKind, Metadata};
use tally_store::Reply;

use crate::app::AppState;
use crate::auth::Need;
use crate::authorize::agent_of;
use crate::dto::{receipt_json, CreditBody};
use crate::extract::{AgentPath, ApiJson, IdemKey};
use crate::outbox::Settlement;
use crate::payments::{self, SettleError};
use crate::problem::Problem;
use crate::respond::{classify, json_response, submit_error, Success};
use crate::routes;
use crate::x402::{self, PAYMENT_RESPONSE, PAYMENT_SIGNATURE, X_PAYMENT};

/// `POST /v1/agents/{id}/credits`.
pub async fn credit(State(st): State<AppState>, req: Request) -> Result<Response, Problem> {
    let (mut parts, body) = req.into_parts();
    let admin = st.role(&parts.headers, Need::Admin);
    // Authentication first, as on every route: no token and no agent key is 401 whatever
    // else is wrong with the request.
    if admin.is_err()
        && st.role(&parts.headers, Need::Service).is_err()
        && agent_of(&st, &parts.headers).await.is_err()
    {
        return Err(admin
            .err()
            .unwrap_or_else(|| Problem::forbidden("not allowed")));
    }
    let AgentPath(id) = AgentPath::from_request_parts(&mut parts, &st).await?;
    let paying =
        parts.headers.contains_key(PAYMENT_SIGNATURE) || parts.headers.contains_key(X_PAYMENT);
    if admin.is_ok() && !paying {
        let key = IdemKey::from_request_parts(&mut parts, &st).await?;
        let body =
            ApiJson::<CreditBody>::from_request(Request::from_parts(parts, body), &st).await?;
        return routes::credit(State(st), AgentPath(id), key, body).await;
    }
    // A payment may come from the agent itself or a service; anyone else gets the
    // answer they would have had for a credit.
    let own_key = agent_of(&st, &parts.headers).await.is_ok_and(|a| a == id);
    if !own_key && st.role(&parts.headers, Need::Service).is_err() {
        return Err(admin
            .err()
            .unwrap_or_else(|| Problem::forbidden("not allowed")));
    }
    let (Some(x), Some(facilitator)) = (st.x402(), st.facilitator()) else {
        return Err(admin.err().unwrap_or_else(|| {
            Problem::forbidden("credits need the admin role; x402 top-ups are not configured")
        }));
    };
    let ApiJson(body) =
        ApiJson::<CreditBody>::from_request(Request::from_parts(parts.clone(), body), &st).await?;
    if body.amount_micros == 0 {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-amount",
            "Invalid amount",
            "a top-up is at least 1 micro",
        ));
    }
    let want = x402::requirement(x, body.amount_micros);
    let resource = format!("{}/v1/agents/{id}/credits", st.public_url());
    let ask = |error: &str| x402::payment_problem(x, error, &resource, want.clone());
    let count = |outcome: &str| payments::count(&st, outcome);
    let payment = match x402::read_payment(&parts.headers) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(ask(
                "a top-up is paid with an x402 payment in PAYMENT-SIGNATURE",
            ))
        }
        Err(e) => {
            count("refused");
            return Err(ask(&e.to_string()));
        }
    };
    if let Err(e) = payment.check(&want) {
        count("refused");
        return Err(ask(&e.to_string()));
    }
    let engine = st.engine()?;
    // Before any money moves: a payment settled for an agent that cannot be credited
    // would be lost.
    if engine.agent(&id).await.map_err(submit_error)?.is_none() {
        return Err(Problem::not_found(format!("no agent {id}")));
    }
    let mut metadata = body.metadata.entries().clone();
    metadata.insert(
        "x402_payment".into(),
        payment.id.chars().take(128).collect(),
    );
    let metadata = Metadata::new(metadata).map_err(|e| Problem::invalid(e.to_string()))?;
    let amount_micros = payment.amount_micros(&want);
    let key =
        crate::extract::idempotency_key(&payment.id, tally_core::id::IDEMPOTENCY_KEY_LEN_MAX)?;
    let mut credit =
        Command::new(id.clone(), CommandKind::Credit { amount_micros }).with_key(key.clone());
    credit.metadata = metadata;
    let Some(_in_use) = x402::InUse::claim(st.payments_in_use(), &payment.id) else {
        count("refused");
        return Err(ask("this payment is being used by another request"));
    };
    // Credited already (a retry, before or after a restart): the same receipt again,
    // and the facilitator is not asked twice.
    if payments::keyed_already(engine, &id, &key).await? {
        return receipt(&st, &credit, engine.submit(credit.clone()).await, None);
    }
    let verdict = facilitator.verify(&payment, &want).await.map_err(|e| {
        count("facilitator_error");
        e.problem()
    })?;
    if !verdict.ok {
        count("invalid");
        let reason = verdict.reason.as_deref().unwrap_or("no reason given");
        return Err(ask(&format!(
            "the facilitator refused the payment: {reason}"
        )));
    }
    count("verified");
    // Recorded on disk before /settle: a crash between the settlement and the credit is
    // finished at the next start (`payments::recover`).
    let settlement = Settlement {
        payment_id: payment.id.clone(),
        payload: payment.payload.clone(),
        requirements: want.clone(),
        credit: credit.clone(),
        debit: None,
        unsettled: None,
        credit_transaction: false,
    };
    let settled = match payments::settle_recorded(&st, engine, &settlement, true).await {
        Ok(s) => s,
        Err(e) => {
            count(match e {
                SettleError::Refused(_) => "invalid",
                _ => "facilitator_error",
            });
            return Err(e.problem(x, &resource, &want));
        }
    };
    // The credit's receipt (a failure to write it was logged, and the next start writes
    // it from the settlement's file).
    // A top-up is at least 1 micro, so its credit was always submitted.
    let answer = settled
        .credit
        .ok_or_else(|| Problem::invalid("a top-up settled for nothing"))?;
    receipt(&st, &credit, answer, Some(&settled.verdict))
}

fn receipt(
    st: &AppState,
    cmd: &Command,
    answer: Result<Reply, tally_store::SubmitError>,
    settled: Option<&x402::Verdict>,
) -> Result<Response, Problem> {
    let Success::Applied {
        receipt, replayed, ..
    } = classify(st, cmd, answer)?
    else {
        return Err(Problem::invalid("unexpected dry-run answer"));
    };
    let mut resp = json_response(
        StatusCode::CREATED,
        receipt_json(&cmd.agent, "credit", &receipt),
        None,
        replayed,
    );
    if let Some(v) = settled.and_then(|s| HeaderValue::from_str(&x402::payment_response(s)).ok()) {
        resp.headers_mut().insert(PAYMENT_RESPONSE, v);
    }
    Ok(resp)
}
