//! The metering reverse proxy (`[proxy] listen`): a request with an agent API key is
//! priced from `[[routes]]`, charged (a debit for a fixed price, a hold of the maximum for
//! a variable one), forwarded to the route's upstream with its body streamed, and its
//! response streamed back. It settles only on success: an upstream 5xx, a refused
//! connection or a time-out (before or during the body) refunds the debit / voids the
//! hold; a variable price is captured from the upstream's usage header or trailer once
//! the body has ended. Every request runs in its own task, so a client that hangs up
//! cannot cancel a settlement half-way.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tally_core::{AgentId, Command, CommandKind, IdempotencyKey};
use tally_store::{Engine, Reply};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::app::AppState;
use crate::authorize::{
    agent_of, carries_agent_key, route_metadata, X_TALLY_AGENT, X_TALLY_BALANCE_MICROS,
    X_TALLY_CHARGED_MICROS, X_TALLY_RECEIPT, X_TALLY_ROUTE,
};
use crate::config::{Price, ProxyConfig, Route};
use crate::payments;
use crate::problem::Problem;
use crate::respond::{classify, rate_headers, Success};
use crate::serve;
use crate::x402::{self, PAYMENT_SIGNATURE};

/// The hold a variable-price call runs under (`<agent>~<seq>`), and its amount.
pub const X_TALLY_HOLD: HeaderName = HeaderName::from_static("x-tally-hold");
pub const X_TALLY_HOLD_MICROS: HeaderName = HeaderName::from_static("x-tally-hold-micros");
/// The official x402 clients mark their paid retry with it; not for the upstream.
const PAYMENT_RETRY: HeaderName = HeaderName::from_static("payment-retry");

/// Response frames queued between the upstream and a slow client: the proxy never holds
/// more than this many of a body (hyper reads at most ~16 KiB a frame).
const PUMP_FRAMES_MAX: usize = 16;

/// Connections kept open to upstreams, per host, when idle.
const POOL_IDLE_PER_HOST_MAX: usize = 256;
const POOL_IDLE_TIMEOUT_MS: u64 = 90_000;

/// Hop-by-hop headers (RFC 9110 §7.6.1): about one connection, never forwarded. `Trailer`
/// is end-to-end: hyper sends a chunked body's trailers only for the fields it names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

type UpstreamClient = Client<HttpConnector, LimitedBody>;

/// The proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    st: AppState,
    cfg: ProxyConfig,
    client: UpstreamClient,
    /// One permit per upstream request in flight, held until its charge is settled.
    permits: Arc<Semaphore>,
}

/// What was charged before forwarding, to be settled after.
#[derive(Debug)]
struct Charge {
    agent: AgentId,
    route: Route,
    key: String,
    kind: ChargeKind,
}

#[derive(Debug, Clone, Copy)]
enum ChargeKind {
    Debit { seq: u64, amount_micros: u64 },
    Hold { seq: u64, max_micros: u64 },
}

/// How a call ended, for its settlement.
#[derive(Debug)]
enum Ending {
    /// The upstream answered and its body arrived whole: keep the charge (a hold is
    /// captured at the usage the upstream reported).
    Served { usage_micros: Option<u64> },
    /// The upstream failed (or the route refunds 4xx): undo the charge.
    Failed(&'static str),
}

impl Proxy {
    pub fn new(st: AppState, cfg: ProxyConfig) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX)
            .pool_idle_timeout(Duration::from_millis(POOL_IDLE_TIMEOUT_MS))
            .build(connector);
        Arc::new(Self {
            st,
            permits: Arc::new(Semaphore::new(cfg.concurrency_max)),
            cfg,
            client,
        })
    }

    /// Waits (at most `wait`) until every forwarded call has been settled; for shutdown,
    /// before the engine closes.
    pub async fn drain(&self, wait: Duration) -> bool {
        let all = u32::try_from(self.cfg.concurrency_max).unwrap_or(u32::MAX);
        tokio::time::timeout(wait, self.permits.acquire_many(all))
            .await
            .is_ok_and(|p| p.is_ok())
    }

    /// The longest a shutdown waits for calls in flight to settle.
    pub fn drain_wait(&self) -> Duration {
        Duration::from_millis(self.cfg.upstream_timeout_ms + 5_000)
    }
}

/// The proxy's router: every path goes to [`handle`].
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(axum::middleware::from_fn(serve::limit_header_bytes))
        .with_state(proxy)
}

/// Runs the call in a task of its own so that a client hanging up cannot cancel a
/// settlement half-way.
async fn handle(State(px): State<Arc<Proxy>>, req: Request) -> Response {
    let task = tokio::spawn(async move {
        match px.call(req).await {
            Ok(resp) => resp,
            Err(p) => p.into_response(),
        }
    });
    match task.await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "proxy task failed");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal-error",
                "Internal error",
                "the proxy failed; see the server log",
            )
            .into_response()
        }
    }
}

impl Proxy {
    fn count(&self, route: &str, outcome: &str) {
        self.st
            .metrics()
            .proxy_requests_total
            .with_label_values(&[route, outcome])
            .inc();
    }

    async fn call(self: Arc<Self>, req: Request) -> Result<Response, Problem> {
        let st = &self.st;
        let (parts, body) = req.into_parts();
        let route = st
            .routes()
            .find(&parts.method, parts.uri.path())
            .map(|m| m.route.clone());
        // A caller with no agent key may pay per call where the route takes x402.
        let pays = route.as_ref().is_some_and(|r| r.x402) && !carries_agent_key(st, &parts.headers);
        let agent = if pays {
            None
        } else {
            Some(agent_of(st, &parts.headers).await?)
        };
        let route = route.ok_or_else(|| {
            Problem::not_found(format!(
                "no priced route for {} {}",
                parts.method,
                parts.uri.path()
            ))
        })?;
        if let Some(len) = content_length(&parts.headers)? {
            if len > self.cfg.body_bytes_max {
                self.count(&route.name, "body_too_large");
                return Err(self.body_too_large());
            }
        }
        let target = format!(
            "{}{}",
            route.upstream,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let target: Uri = target
            .parse()
            .map_err(|_| Problem::invalid("the request target cannot be forwarded"))?;
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.count(&route.name, "busy");
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "proxy-busy",
                "Proxy busy",
                format!(
                    "{} upstream calls are in flight, the most proxy.concurrency_max allows; nothing was charged",
                    self.cfg.concurrency_max
                ),
            )
            .retry_after_ms(1_000));
        };
        let engine = st.engine()?.clone();
        let Some(agent) = agent else {
            return self
                .paid_call(engine, parts, body, route, target, permit)
                .await;
        };
        let (charge, receipt_headers) = self.charge(&engine, agent, route).await?;
        let deadline = Instant::now() + Duration::from_millis(self.cfg.upstream_timeout_ms);
        match self
            .forward(parts, body, target, &receipt_headers, deadline)
            .await
        {
            Ok(resp) => Ok(self.stream_back(
                engine,
                Some(charge),
                resp,
                deadline,
                receipt_headers,
                permit,
            )),
            Err(problem) => {
                let reason = match problem.status {
                    StatusCode::GATEWAY_TIMEOUT => "upstream_timeout",
                    StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
                    _ => "upstream_failed",
                };
                self.settle(&engine, &charge, Ending::Failed(reason)).await;
                drop(permit);
                Err(problem)
            }
        }
    }

    /// Sends the call upstream with `extra` headers; an upstream 5xx, a refused
    /// connection, a time-out or a body past the limit is the problem to answer (after
    /// undoing whatever was charged).
    async fn forward(
        &self,
        parts: axum::http::request::Parts,
        body: axum::body::Body,
        target: Uri,
        extra: &[(HeaderName, HeaderValue)],
        deadline: Instant,
    ) -> Result<hyper::Response<Incoming>, Problem> {
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        self.strip_agent_key(&mut headers);
        for h in [&PAYMENT_SIGNATURE, &x402::X_PAYMENT, &PAYMENT_RETRY] {
            headers.remove(h);
        }
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        if let Some(ip) = peer {
            append_forwarded_for(&mut headers, ip);
        }
        if let Some(host) = headers.remove(header::HOST) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        // A variable price may come in a trailer, which hyper's servers send only to a
        // client that accepts them.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        let over_limit = Arc::new(AtomicBool::new(false));
        let mut up = hyper::Request::new(LimitedBody {
            inner: body,
            seen: 0,
            max: self.cfg.body_bytes_max,
            over: over_limit.clone(),
        });
        *up.method_mut() = parts.method;
        *up.uri_mut() = target;
        *up.headers_mut() = headers;

        match tokio::time::timeout_at(deadline, self.client.request(up)).await {
            Ok(Ok(resp)) if resp.status().is_server_error() => Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-error",
                "Upstream error",
                format!(
                    "the upstream answered {}; nothing is charged for it",
                    resp.status().as_u16()
                ),
            )
            .field("upstream_status", resp.status().as_u16())),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) if over_limit.load(Ordering::SeqCst) => Err(self.body_too_large()),
            Ok(Err(e)) if timed_out(&e) => Err(upstream_timeout()),
            Ok(Err(e)) => Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "Upstream unreachable",
                format!(
                    "the upstream could not be reached ({}); nothing is charged for it",
                    error_chain(&e)
                ),
            )),
            Err(_) => Err(upstream_timeout()),
        }
    }

    fn body_too_large(&self) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!(
                "the proxy forwards request bodies of at most {} bytes (proxy.body_bytes_max)",
                self.cfg.body_bytes_max
            ),
        )
        .field("body_bytes_max", self.cfg.body_bytes_max)
    }

    /// The agent key is for tally alone: the upstream never sees it.
    fn strip_agent_key(&self, headers: &mut HeaderMap) {
        let bearer_is_key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
        if bearer_is_key {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(h) = &self.st.forward_auth().key_header {
            headers.remove(h);
        }
        // The upstream trusts X-Tally-*: only tally sets them.
        let spoofed: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-tally-"))
            .cloned()
            .collect();
        for k in spoofed {
            headers.remove(k);
        }
    }

    /// Debits the route's price, or holds its maximum. A denial is the debit route's own
    /// 402/429 problem, and nothing is forwarded.
    async fn charge(
        &self,
        engine: &Engine,
        agent: AgentId,
        route: Route,
    ) -> Result<(Charge, Vec<(HeaderName, HeaderValue)>), Problem> {
        let key = format!("proxy:{:032x}", rand::random::<u128>());
        let kind = match &route.price {
            Price::Variable { max_micros, .. } => CommandKind::Hold {
                amount_micros: *max_micros,
                ttl_ms: self.cfg.hold_ttl_ms(),
            },
            fixed => CommandKind::Debit {
                amount_micros: fixed.fixed_micros().unwrap_or_default(),
            },
        };
        let is_hold = matches!(kind, CommandKind::Hold { .. });
        let mut cmd = Command::new(agent.clone(), kind)
            .with_key(idempotency_key(&key)?)
            .with_priority(route.priority);
        cmd.task_type = route.task_type.clone();
        cmd.metadata = route_metadata(&route)?;
        let result = engine.submit(cmd.clone()).await;
        let outcome = classify(&self.st, &cmd, result);
        let Ok(Success::Applied { receipt, rate, .. }) = outcome else {
            self.count(&route.name, "denied");
            return Err(match outcome {
                Err(p) => p,
                Ok(_) => Problem::invalid("unexpected dry-run answer"),
            });
        };
        let id = format!("{agent}~{}", receipt.seq);
        let mut headers = vec![
            (X_TALLY_AGENT, agent.to_string()),
            (X_TALLY_ROUTE, route.name.clone()),
            (
                X_TALLY_BALANCE_MICROS,
                receipt.balance_after_micros.to_string(),
            ),
        ];
        let kind = if is_hold {
            headers.push((X_TALLY_HOLD, id));
            headers.push((X_TALLY_HOLD_MICROS, receipt.amount_micros.to_string()));
            ChargeKind::Hold {
                seq: receipt.seq,
                max_micros: receipt.amount_micros,
            }
        } else {
            headers.push((X_TALLY_RECEIPT, id));
            headers.push((X_TALLY_CHARGED_MICROS, receipt.amount_micros.to_string()));
            ChargeKind::Debit {
                seq: receipt.seq,
                amount_micros: receipt.amount_micros,
            }
        };
        let mut values = payments::header_values(&headers);
        // The RateLimit headers of the charge, for the client.
        let mut carrier = Response::new(axum::body::Body::empty());
        rate_headers(&mut carrier, self.st.plans(), rate.as_ref());
        for (n, v) in carrier.headers() {
            values.push((n.clone(), v.clone()));
        }
        Ok((
            Charge {
                agent,
                route,
                key,
                kind,
            },
            values,
        ))
    }

    /// Sends the upstream's answer to the client as it arrives; a task pumps the body and
    /// settles the charge when it ends.
    fn stream_back(
        self: Arc<Self>,
        engine: Engine,
        charge: Option<Charge>,
        resp: hyper::Response<Incoming>,
        deadline: Instant,
        receipt_headers: Vec<(HeaderName, HeaderValue)>,
        permit: OwnedSemaphorePermit,
    ) -> Response {
        let (mut head, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        let refund_4xx = head.status.is_client_error()
            && charge
                .as_ref()
                .is_some_and(|c| !c.route.charge_client_errors);
        let usage_in_head = charge
            .as_ref()
            .and_then(|c| usage_micros(&c.route.price, &head.headers));
        for (name, value) in receipt_headers {
            if refund_4xx && name == X_TALLY_CHARGED_MICROS {
                head.headers.insert(name, HeaderValue::from_static("0"));
            } else if name != header::TE {
                head.headers.insert(name, value);
            }
        }
        let (tx, rx) = mpsc::channel(PUMP_FRAMES_MAX);
        let aborted = Arc::new(AtomicBool::new(false));
        let body = ChannelBody {
            rx,
            aborted: aborted.clone(),
        };
        tokio::spawn(async move {
            let pumped = pump(incoming, tx, deadline, aborted).await;
            // A paid call's money moved before its head was sent: nothing to settle.
            if let Some(charge) = charge {
                let ending = match pumped {
                    Err(why) => Ending::Failed(why),
                    Ok(_) if refund_4xx => Ending::Failed("client_error_refunded"),
                    Ok(trailers) => Ending::Served {
                        usage_micros: usage_in_head.or_else(|| {
                            trailers.and_then(|t| usage_micros(&charge.route.price, &t))
                        }),
                    },
                };
                self.settle(&engine, &charge, ending).await;
            }
            drop(permit);
        });
        Response::from_parts(head, axum::body::Body::new(body))
    }

    /// A call paid with x402 by a caller with no agent key: the payment taken (asked,
    /// checked, verified, the payer's limits checked), the call forwarded, and the payment
    /// settled only when the upstream answered well (the spec's order: verify, serve,
    /// settle).
    #[allow(clippy::too_many_arguments)]
    async fn paid_call(
        self: Arc<Self>,
        engine: Engine,
        parts: axum::http::request::Parts,
        body: axum::body::Body,
        route: Route,
        target: Uri,
        permit: OwnedSemaphorePermit,
    ) -> Result<Response, Problem> {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let resource = format!(
            "http://{host}{}",
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let taken = payments::take(&self.st, &engine, &route, &parts.headers, &resource).await?;
        let deadline = Instant::now() + Duration::from_millis(self.cfg.upstream_timeout_ms);
        let agent_headers = taken.headers(&route);
        let resp = match self
            .forward(parts, body, target, &agent_headers, deadline)
            .await
        {
            Ok(resp) => resp,
            Err(problem) => {
                // Not served: the payment is not settled and may be sent again.
                self.count(&route.name, "upstream_failed");
                return Err(problem);
            }
        };
        if resp.status().is_client_error() && !route.charge_client_errors {
            self.count(&route.name, "client_error_not_settled");
            return Ok(self.stream_back(engine, None, resp, deadline, agent_headers, permit));
        }
        // `upto`: what the upstream reported in its head, at most the maximum, the
        // maximum when it reported nothing (the payment settles before the body streams,
        // so a usage trailer is not waited for).
        let charge_micros = usage_micros(&route.price, resp.headers())
            .map_or(taken.price_micros, |u| u.min(taken.price_micros));
        let paid_headers = match payments::settle(
            &self.st,
            &engine,
            &route,
            &taken,
            &resource,
            true,
            charge_micros,
        )
        .await
        {
            Ok(h) => h,
            Err(p) => {
                self.count(&route.name, "settle_failed");
                return Err(p);
            }
        };
        self.count(&route.name, "served_paid");
        Ok(self.stream_back(engine, None, resp, deadline, paid_headers, permit))
    }

    /// Keeps, refunds, voids or captures the charge, once. A failure here is logged and
    /// counted: a hold left open expires by itself; a refund that could not be written
    /// leaves the engine failed (and unready) anyway.
    async fn settle(&self, engine: &Engine, charge: &Charge, ending: Ending) {
        let (kind, outcome) = match (charge.kind, &ending) {
            (ChargeKind::Debit { .. }, Ending::Served { .. }) => {
                self.count(&charge.route.name, "served");
                return;
            }
            (ChargeKind::Debit { seq, amount_micros }, Ending::Failed(why)) => (
                CommandKind::Refund {
                    debit_seq: seq,
                    amount_micros,
                },
                *why,
            ),
            (ChargeKind::Hold { seq, .. }, Ending::Failed(why)) => {
                (CommandKind::Void { hold_seq: seq }, *why)
            }
            (ChargeKind::Hold { seq, max_micros }, Ending::Served { usage_micros }) => {
                let (amount, outcome) = match usage_micros {
                    None => (max_micros, "served_usage_missing"),
                    Some(u) if *u > max_micros => (max_micros, "served_usage_over_max"),
                    Some(u) => (*u, "served"),
                };
                if amount == 0 {
                    (CommandKind::Void { hold_seq: seq }, outcome)
                } else {
                    (
                        CommandKind::Capture {
                            hold_seq: seq,
                            amount_micros: amount,
                        },
                        outcome,
                    )
                }
            }
        };
        if outcome == "served_usage_missing" || outcome == "served_usage_over_max" {
            tracing::warn!(
                route = %charge.route.name,
                agent = %charge.agent,
                outcome,
                "the upstream's usage was missing or above the route's maximum; captured the maximum"
            );
        }
        let Ok(key) = idempotency_key(&format!("{}:settle", charge.key)) else {
            return;
        };
        let cmd = Command::new(charge.agent.clone(), kind).with_key(key);
        match engine.submit(cmd).await {
            Ok(Reply::Decided { .. }) => self.count(&charge.route.name, outcome),
            other => {
                tracing::error!(
                    route = %charge.route.name,
                    agent = %charge.agent,
                    answer = ?other,
                    "settling a proxied call failed"
                );
                self.count(&charge.route.name, "settle_failed");
            }
        }
    }
}

fn upstream_timeout() -> Problem {
    Problem::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream-timeout",
        "Upstream timed out",
        "the upstream did not answer in time (proxy.connect_timeout_ms / proxy.upstream_timeout_ms); nothing is charged for it",
    )
}

fn idempotency_key(raw: &str) -> Result<IdempotencyKey, Problem> {
    IdempotencyKey::new(raw).map_err(|e| Problem::invalid(e.to_string()))
}

/// Copies the upstream body to the client, frame by frame, until it ends (its trailers,
/// if any) or fails or the deadline passes (why, for the metrics). A client that hangs up (or cannot keep up by the deadline) stops
/// receiving, but the body is still read to its end: the upstream did the work, and a
/// usage trailer may be at the end.
async fn pump(
    mut incoming: Incoming,
    tx: mpsc::Sender<Frame<Bytes>>,
    deadline: Instant,
    aborted: Arc<AtomicBool>,
) -> Result<Option<HeaderMap>, &'static str> {
    let mut tx = Some(tx);
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let frame = match tokio::time::timeout_at(deadline, incoming.frame()).await {
            Err(_) => {
                aborted.store(true, Ordering::SeqCst);
                return Err("upstream_timeout");
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "upstream body failed");
                aborted.store(true, Ordering::SeqCst);
                return Err("upstream_failed");
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(t) = frame.trailers_ref() {
            trailers = Some(t.clone());
        }
        if let Some(sender) = &tx {
            let sent = tokio::time::timeout_at(deadline, sender.send(frame)).await;
            if !matches!(sent, Ok(Ok(()))) {
                // Gone, or too slow to read by the deadline: the client's body is cut
                // (the flag turns the end of the channel into an error, not a clean end).
                aborted.store(true, Ordering::SeqCst);
                tx = None;
            }
        }
    }
    Ok(trailers)
}

/// The cost a variable-price route's upstream reported in `headers`: the usage header's
/// micros, or its units × `unit_price_micros`. `None` when absent or not a decimal
/// number; a figure too large for u64 counts as `u64::MAX` (it is clamped to the hold).
pub fn usage_micros(price: &Price, headers: &HeaderMap) -> Option<u64> {
    let Price::Variable {
        usage_header,
        unit_price_micros,
        ..
    } = price
    else {
        return None;
    };
    let raw = headers.get(usage_header)?.to_str().ok()?.trim();
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = raw.parse::<u64>().unwrap_or(u64::MAX);
    Some(match unit_price_micros {
        Some(p) => n.saturating_mul(*p),
        None => n,
    })
}

/// Appends the client's address to `X-Forwarded-For` (after any the client sent: the
/// upstream trusts only the last entry, the one tally added).
fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let chain = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&chain) {
        headers.insert(name, v);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// `Content-Length` when the request announces one; 400 when it is not a number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| Problem::invalid("Content-Length is not a number"))
        })
        .transpose()
}

fn timed_out(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return true;
            }
        }
        if s.to_string().contains("timed out") || s.to_string().contains("timeout") {
            return true;
        }
        source = s.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The client's request body on its way upstream, cut off (with an error, so the
/// upstream sees an aborted request, not a short one) past `max` bytes.
#[derive(Debug)]
pub struct LimitedBody {
    inner: axum::body::Body,
    seen: u64,
    max: u64,
    over: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body is longer than proxy.body_bytes_max")]
struct BodyTooLarge;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.max {
                        this.over.store(true, Ordering::SeqCst);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body on its way to the client, fed by [`pump`]. When the pump
/// gave up (`aborted`), the end of the channel is an error, so hyper cuts the connection
/// instead of ending a chunked body cleanly.
#[derive(Debug)]
struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    aborted: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream's response failed or timed out part-way")]
struct UpstreamCut;

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = UpstreamCut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamCut>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if self.aborted.load(Ordering::SeqCst) => {
                Poll::Ready(Some(Err(UpstreamCut)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
