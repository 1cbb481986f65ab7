//! Forward-auth for gateways (`/v1/authorize`: Caddy `forward_auth`, Traefik
//! `ForwardAuth`, Envoy `ext_authz`, nginx `auth_request`) and the refund of a call by its
//! receipt. Forward-auth finds the agent by its API key, prices the original call from the
//! route table and debits it through the engine like the debit route; a denial is the
//! debit route's own problem (through `respond::classify`), reshaped only for nginx.

use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use tally_core::{AgentId, Command, CommandError, CommandKind, IdempotencyKey, Metadata};
use tally_store::Reply;

use crate::app::AppState;
use crate::config::DenyMode;
use crate::dto::{parse_hold_id, receipt_json};
use crate::extract::{ApiQuery, IdemKey, OptionalJson};
use crate::payments;
use crate::problem::Problem;
use crate::respond::{classify, json_response, rate_headers, submit_error, Success};

pub const X_TALLY_AGENT: HeaderName = HeaderName::from_static("x-tally-agent");
pub const X_TALLY_CHARGED_MICROS: HeaderName = HeaderName::from_static("x-tally-charged-micros");
pub const X_TALLY_BALANCE_MICROS: HeaderName = HeaderName::from_static("x-tally-balance-micros");
pub const X_TALLY_RECEIPT: HeaderName = HeaderName::from_static("x-tally-receipt");
pub const X_TALLY_ROUTE: HeaderName = HeaderName::from_static("x-tally-route");
/// nginx mode: the real status of a denial, and its problem as compact JSON.
pub const X_TALLY_STATUS: HeaderName = HeaderName::from_static("x-tally-status");
pub const X_TALLY_PROBLEM: HeaderName = HeaderName::from_static("x-tally-problem");
const X_FORWARDED_METHOD: &str = "x-forwarded-method";
const X_FORWARDED_URI: &str = "x-forwarded-uri";

#[derive(Debug, Default, Deserialize)]
pub struct AuthorizeQuery {
    mode: Option<String>,
}

/// One header's value as text, 400 when repeated or not visible ASCII.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Problem> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::invalid(format!("more than one {name} header")));
    }
    v.to_str()
        .map(Some)
        .map_err(|_| Problem::invalid(format!("{name} must be visible ASCII")))
}

/// The original call: `X-Forwarded-Method` + `X-Forwarded-Uri`, or for Envoy the
/// request's own method and the path after the configured prefix.
fn original_call(
    st: &AppState,
    own_method: &Method,
    headers: &HeaderMap,
    path: &str,
) -> Result<(Method, String), Problem> {
    let method = single(headers, X_FORWARDED_METHOD)?;
    let uri = single(headers, X_FORWARDED_URI)?;
    if let (Some(m), Some(u)) = (method, uri) {
        let m = Method::from_bytes(m.as_bytes())
            .map_err(|_| Problem::invalid("X-Forwarded-Method is not an HTTP method"))?;
        return Ok((m, u.to_owned()));
    }
    if let Some(prefix) = &st.forward_auth().envoy_path_prefix {
        if let Some(rest) = path.strip_prefix(prefix.as_str()) {
            if rest.starts_with('/') {
                return Ok((own_method.clone(), rest.to_owned()));
            }
        }
    }
    Err(Problem::invalid(
        "the original call is unknown: send X-Forwarded-Method and X-Forwarded-Uri, or configure forward_auth.envoy_path_prefix",
    ))
}

/// The agent whose key the request carries (`Authorization: Bearer tk_...` or the
/// configured key header), else 401. On a shared store (several nodes), another node may
/// have revoked the key since this node's index learned it: the agent's record, read
/// afresh, has the last word.
pub(crate) async fn agent_of(st: &AppState, headers: &HeaderMap) -> Result<AgentId, Problem> {
    let agent = agent_in_index(st, headers)?;
    let Ok(engine) = st.engine() else {
        return Ok(agent);
    };
    if !engine.is_shared() {
        return Ok(agent);
    }
    let state = engine.agent(&agent).await.map_err(submit_error)?;
    let key = presented_key(st, headers)?.unwrap_or_default();
    let still = state.as_ref().is_some_and(|s| {
        crate::agent_keys::prefix_of(key).is_some_and(|p| s.api_keys.contains_key(p))
    });
    if let Some(state) = &state {
        st.keys().sync_agent(state);
    }
    if still {
        Ok(agent)
    } else {
        Err(Problem::invalid_token(
            "the agent API key is unknown or revoked",
        ))
    }
}

/// The key a request presents, if any.
fn presented_key<'h>(st: &AppState, headers: &'h HeaderMap) -> Result<Option<&'h str>, Problem> {
    let bearer = single(headers, "authorization")?.and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let header_key = match &st.forward_auth().key_header {
        Some(h) => single(headers, h.as_str())?,
        None => None,
    };
    Ok(bearer.or(header_key))
}

/// The agent this node's key index says the presented key belongs to, else 401.
fn agent_in_index(st: &AppState, headers: &HeaderMap) -> Result<AgentId, Problem> {
    let Some(key) = presented_key(st, headers)? else {
        return Err(Problem::unauthorized("an agent API key is required"));
    };
    st.keys()
        .verify(key, st.now_ms())
        .ok_or_else(|| Problem::invalid_token("the agent API key is unknown or revoked"))
}

/// The idempotency key: the configured header, else the request id header.
fn idempotency_key(st: &AppState, headers: &HeaderMap) -> Result<IdempotencyKey, Problem> {
    let f = st.forward_auth();
    let raw = match single(headers, f.idempotency_header.as_str())? {
        Some(k) => k,
        None => single(headers, f.request_id_header.as_str())?.ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-missing",
                "Idempotency-Key missing",
                format!(
                    "forward-auth charges once per {} (or {}); the request has neither",
                    f.idempotency_header, f.request_id_header
                ),
            )
        })?,
    };
    IdempotencyKey::new(raw).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            e.to_string(),
        )
    })
}

/// nginx `auth_request` passes on only 401 and 403 (anything else becomes a 500), and no
/// body: the real status and the problem go in headers for `auth_request_set`.
fn for_nginx(p: Problem) -> Response {
    let real = p.status;
    let compact = p.to_json().to_string();
    let mut resp = p.into_response();
    *resp.status_mut() = match real.as_u16() {
        401 | 402 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::FORBIDDEN,
    };
    let h = resp.headers_mut();
    h.insert(X_TALLY_STATUS, HeaderValue::from(real.as_u16()));
    if let Ok(v) = HeaderValue::from_str(&compact) {
        h.insert(X_TALLY_PROBLEM, v);
    }
    resp
}

/// `GET|POST /v1/authorize` (and, for Envoy, any method under the configured prefix).
pub async fn authorize(
    State(st): State<AppState>,
    OriginalUri(uri): OriginalUri,
    ApiQuery(query): ApiQuery<AuthorizeQuery>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let nginx = match query.mode.as_deref() {
        Some("nginx") => true,
        Some("standard") => false,
        None => st.forward_auth().mode == DenyMode::Nginx,
        Some(other) => {
            return Problem::invalid(format!("mode {other:?} is not nginx or standard"))
                .into_response()
        }
    };
    match decide(&st, &method, &headers, uri.path()).await {
        Ok(resp) => resp,
        Err(p) if nginx => for_nginx(p),
        Err(p) => p.into_response(),
    }
}

/// `{"route": <name>}`: the metadata of every charge made for a priced route.
pub(crate) fn route_metadata(route: &crate::config::Route) -> Result<Metadata, Problem> {
    Metadata::new(BTreeMap::from([("route".to_owned(), route.name.clone())]))
        .map_err(|e| Problem::invalid(e.to_string()))
}

/// Whether the request carries an agent key (valid or not): then it is that agent's
/// call, never an x402 payment.
pub(crate) fn carries_agent_key(st: &AppState, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    bearer
        || st
            .forward_auth()
            .key_header
            .as_ref()
            .is_some_and(|h| headers.contains_key(h))
}

/// A call on an `x402 = true` route by a caller with no agent key: the payment is taken
/// and settled before the gateway forwards the call (forward-auth never sees the
/// upstream's answer, so it cannot settle after it, as the proxy does).
async fn paid(
    st: &AppState,
    route: &crate::config::Route,
    headers: &HeaderMap,
    target: &str,
) -> Result<Response, Problem> {
    if route.price.fixed_micros().is_none() {
        return Err(Problem::not_found(format!(
            "route {} has a variable price (x402 upto), which only the metering proxy can settle",
            route.name
        )));
    }
    let engine = st.engine()?;
    let resource = match (
        single(headers, "x-forwarded-proto")?,
        single(headers, "x-forwarded-host")?,
    ) {
        (Some(proto), Some(host)) => format!("{proto}://{host}{target}"),
        _ => format!("{}{target}", st.public_url()),
    };
    let taken = payments::take(st, engine, route, headers, &resource).await?;
    let paid_headers = payments::settle(
        st,
        engine,
        route,
        &taken,
        &resource,
        false,
        taken.price_micros,
    )
    .await?;
    let mut resp = json_response(
        StatusCode::OK,
        json!({
            "allowed": true, "agent_id": taken.agent.as_str(), "route": route.name,
            "charged_micros": taken.price_micros, "payment": taken.payment.id,
        }),
        None,
        false,
    );
    for (name, value) in paid_headers {
        resp.headers_mut().insert(name, value);
    }
    Ok(resp)
}

async fn decide(
    st: &AppState,
    own_method: &Method,
    headers: &HeaderMap,
    path: &str,
) -> Result<Response, Problem> {
    let call = original_call(st, own_method, headers, path);
    if let Ok((method, target)) = &call {
        if let Some(found) = st.routes().find(method, target) {
            if found.route.x402 && !carries_agent_key(st, headers) {
                let route = found.route.clone();
                return paid(st, &route, headers, target).await;
            }
        }
    }
    let agent = agent_of(st, headers).await?;
    let (method, target) = call?;
    let found = st
        .routes()
        .find(&method, &target)
        .ok_or_else(|| Problem::not_found(format!("no priced route for {method} {target}")))?;
    let route = found.route;
    let Some(amount_micros) = route.price.fixed_micros() else {
        return Err(Problem::not_found(format!(
            "route {} has a variable price, which only the metering proxy can settle",
            route.name
        )));
    };
    let key = idempotency_key(st, headers)?;
    let mut cmd = Command::new(agent.clone(), CommandKind::Debit { amount_micros })
        .with_key(key)
        .with_priority(route.priority);
    cmd.task_type = route.task_type.clone();
    cmd.metadata = route_metadata(route)?;
    let result = st.engine()?.submit(cmd.clone()).await;
    let Success::Applied {
        receipt,
        rate,
        replayed,
    } = classify(st, &cmd, result)?
    else {
        return Err(Problem::invalid("unexpected dry-run answer"));
    };
    let receipt_id = format!("{agent}~{}", receipt.seq);
    let mut resp = json_response(
        StatusCode::OK,
        json!({
            "allowed": true, "agent_id": agent.as_str(), "route": route.name,
            "charged_micros": receipt.amount_micros, "balance_micros": receipt.balance_after_micros,
            "receipt": receipt_id,
        }),
        None,
        replayed,
    );
    rate_headers(&mut resp, st.plans(), rate.as_ref());
    let h = resp.headers_mut();
    for (name, value) in [
        (X_TALLY_AGENT, agent.to_string()),
        (X_TALLY_CHARGED_MICROS, receipt.amount_micros.to_string()),
        (
            X_TALLY_BALANCE_MICROS,
            receipt.balance_after_micros.to_string(),
        ),
        (X_TALLY_RECEIPT, receipt_id),
        (X_TALLY_ROUTE, route.name.clone()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(resp)
}

/// `POST /v1/receipts/{receipt}/refund`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptRefundBody {
    pub amount_micros: Option<u64>,
}

/// Refunds the debit a receipt (`<agent>~<seq>`) names: all of it, or `amount_micros`.
pub async fn refund_receipt(
    State(st): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
    IdemKey(key): IdemKey,
    OptionalJson(body): OptionalJson<ReceiptRefundBody>,
) -> Result<Response, Problem> {
    let (agent, seq) =
        parse_hold_id(&raw).ok_or_else(|| Problem::not_found(format!("no receipt {raw:?}")))?;
    let amount_micros = match body.amount_micros {
        Some(a) => a,
        None => {
            // "All of it" is the debit's own amount, so a retry asks for the same refund
            // (and replays) even after the first one emptied what is refundable.
            let engine = st.engine()?;
            let entry = engine
                .journal(&agent, seq.saturating_sub(1), 1)
                .await
                .map_err(submit_error)?;
            match entry
                .first()
                .filter(|e| e.seq == seq)
                .and_then(|e| e.kind.spend())
            {
                Some((amount_micros, _)) => amount_micros,
                None => {
                    let cmd = Command::new(
                        agent,
                        CommandKind::Refund {
                            debit_seq: seq,
                            amount_micros: 0,
                        },
                    );
                    let unknown = Ok(Reply::Rejected(CommandError::UnknownDebit(seq)));
                    return Err(classify(&st, &cmd, unknown)
                        .err()
                        .unwrap_or_else(|| Problem::not_found(format!("no receipt {raw:?}"))));
                }
            }
        }
    };
    let cmd = Command::new(
        agent.clone(),
        CommandKind::Refund {
            debit_seq: seq,
            amount_micros,
        },
    )
    .with_key(key);
    let result = st.engine()?.submit(cmd.clone()).await;
    match classify(&st, &cmd, result)? {
        Success::Applied {
            receipt, replayed, ..
        } => Ok(json_response(
            StatusCode::CREATED,
            receipt_json(&agent, "refund", &receipt),
            None,
            replayed,
        )),
        Success::WouldApprove { .. } => Err(Problem::invalid("unexpected dry-run answer")),
    }
}
