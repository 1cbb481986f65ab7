//! The application: shared state, the router with its layers (auth, metrics, limits,
//! timeout), and a server that binds first, opens the engine in the background, and shuts
//! down gracefully (stop accepting, finish in-flight requests, then `engine.shutdown()`).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, patch, post, put};
use axum::Router;
use tally_core::{PlanBook, PlanName, TimestampMs};
use tally_store::{Clock, Engine};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent_keys::{self, KeyIndex};
use crate::auth::{Authenticator, Need, Role};
use crate::authorize;
use crate::batch;
use crate::config::{Config, ForwardAuth, Limits, RouteTable, StorageConfig, X402};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::problem::Problem;
use crate::proxy::{self, Proxy};
use crate::routes;
use crate::serve;
use crate::topup;
use crate::x402::{Facilitator, InUseSet};

/// Everything handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    engine: OnceLock<Engine>,
    plans: Arc<PlanBook>,
    default_plan: PlanName,
    clock: Arc<dyn Clock>,
    auth: Authenticator,
    limits: Limits,
    metrics: Metrics,
    x402: Option<X402>,
    public_url: String,
    keys: KeyIndex,
    routes: Arc<RouteTable>,
    forward_auth: ForwardAuth,
    facilitator: Option<Facilitator>,
    payments_in_use: InUseSet,
    /// The facilitator's address `upto` payments bind: configured, or learned once from
    /// its `/supported`.
    upto_address: OnceLock<String>,
    /// x402 settlements in flight, on disk (with a facilitator configured).
    outbox: Option<Outbox>,
    /// True once shutdown began: long polls answer at once instead of holding the drain.
    draining: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    pub fn new(
        config: &Config,
        clock: Arc<dyn Clock>,
        metrics: Metrics,
        public_url: String,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                engine: OnceLock::new(),
                plans: Arc::new(config.plans.clone()),
                default_plan: config.default_plan.clone(),
                clock,
                auth: Authenticator::new(
                    config.tokens.clone(),
                    config.limits.auth_header_bytes_max,
                ),
                limits: config.limits.clone(),
                metrics,
                x402: config.x402.clone(),
                public_url,
                keys: KeyIndex::default(),
                routes: Arc::new(config.routes.clone()),
                forward_auth: config.forward_auth.clone(),
                facilitator: config.x402.as_ref().and_then(|x| match Facilitator::new(x) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!(error = %e, "the x402 facilitator client could not be built");
                        None
                    }
                }),
                payments_in_use: InUseSet::default(),
                upto_address: config
                    .x402
                    .as_ref()
                    .and_then(|x| x.facilitator_address.clone())
                    .map(OnceLock::from)
                    .unwrap_or_default(),
                outbox: config
                    .x402
                    .as_ref()
                    .and_then(|x| x.facilitator_url.as_ref())
                    .and_then(|_| match Outbox::open(&config.data_dir) {
                        Ok(o) => Some(o),
                        Err(e) => {
                            tracing::error!(error = %e, "the x402 settlement directory could not be opened; payments are refused");
                            None
                        }
                    }),
                draining: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    /// Tells long polls to answer now: the server is shutting down.
    pub fn begin_drain(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Resolves once shutdown began.
    pub async fn draining(&self) {
        let mut rx = self.inner.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The engine, or 503 `not-ready` while it is still opening.
    pub fn engine(&self) -> Result<&Engine, Problem> {
        self.inner.engine.get().ok_or_else(Problem::not_ready)
    }

    /// Installs the opened engine; the server is ready from now on.
    pub fn set_engine(&self, engine: Engine) {
        let _ = self.inner.engine.set(engine);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.engine.get().is_some_and(Engine::is_ready)
    }

    pub fn plans(&self) -> &PlanBook {
        &self.inner.plans
    }

    pub fn default_plan(&self) -> &PlanName {
        &self.inner.default_plan
    }

    pub fn now_ms(&self) -> TimestampMs {
        self.inner.clock.now_ms()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn x402(&self) -> Option<&X402> {
        self.inner.x402.as_ref()
    }

    pub fn public_url(&self) -> &str {
        &self.inner.public_url
    }

    /// Agent API keys by prefix.
    pub fn keys(&self) -> &KeyIndex {
        &self.inner.keys
    }

    pub fn routes(&self) -> &RouteTable {
        &self.inner.routes
    }

    pub fn forward_auth(&self) -> &ForwardAuth {
        &self.inner.forward_auth
    }

    /// The x402 facilitator, when `[x402]` names one.
    pub fn facilitator(&self) -> Option<&Facilitator> {
        self.inner.facilitator.as_ref()
    }

    /// x402 settlements in flight.
    pub fn outbox(&self) -> Option<&Outbox> {
        self.inner.outbox.as_ref()
    }

    /// The facilitator's address for `upto` payments, once known.
    pub fn upto_address(&self) -> Option<&str> {
        self.inner.upto_address.get().map(String::as_str)
    }

    /// Keeps the `upto` address learned from the facilitator's `/supported`; the first
    /// one learned (or the configured one) stays.
    pub fn learn_upto_address(&self, kinds: &[serde_json::Value]) -> Option<&str> {
        if let Some(network) = self.x402().map(|x| x.network.as_str()) {
            if let Some(a) = crate::x402::upto_address(kinds, network) {
                let _ = self.inner.upto_address.set(a);
            }
        }
        self.upto_address()
    }

    /// x402 payments being used by a request now.
    pub fn payments_in_use(&self) -> &InUseSet {
        &self.inner.payments_in_use
    }

    /// The caller's role, when it allows `need`.
    pub fn role(&self, headers: &axum::http::HeaderMap, need: Need) -> Result<Role, Problem> {
        self.inner.auth.authorize(headers, need)
    }

    fn authorize(&self, req: &Request, need: Need) -> Result<(), Problem> {
        self.inner.auth.authorize(req.headers(), need).map(|_| ())
    }
}

async fn need_admin(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match st.authorize(&req, Need::Admin) {
        Ok(()) => next.run(req).await,
        Err(p) => p.into_response(),
    }
}

async fn need_service(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match st.authorize(&req, Need::Service) {
        Ok(()) => next.run(req).await,
        Err(p) => p.into_response(),
    }
}

async fn need_read(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match st.authorize(&req, Need::Read) {
        Ok(()) => next.run(req).await,
        Err(p) => p.into_response(),
    }
}

/// Records latency by route template (never the raw path: no per-agent labels).
async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let start = Instant::now();
    let timeout = Duration::from_millis(st.limits().request_timeout_ms);
    let resp = match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "Timeout",
            "the request took too long",
        )
        .retry_after_ms(1_000)
        .into_response(),
    };
    st.metrics()
        .http_request_duration_seconds
        .with_label_values(&[route.as_str(), method.as_str(), resp.status().as_str()])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// The whole API.
pub fn router(st: AppState) -> Router {
    let admin = || middleware::from_fn_with_state(st.clone(), need_admin);
    let service = || middleware::from_fn_with_state(st.clone(), need_service);
    let read = || middleware::from_fn_with_state(st.clone(), need_read);
    Router::new()
        .route(
            "/v1/agents",
            post(routes::create_agent)
                .route_layer(admin())
                .merge(get(routes::list_agents).route_layer(read())),
        )
        .route(
            "/v1/agents/{id}",
            get(routes::get_agent)
                .route_layer(read())
                .merge(patch(routes::patch_agent).route_layer(admin())),
        )
        .route(
            "/v1/agents/{id}/thresholds",
            put(routes::put_thresholds)
                .merge(delete(routes::delete_thresholds))
                .route_layer(admin()),
        )
        // Admin credits, and x402 top-ups by the agent or a service: roles in the handler.
        .route("/v1/agents/{id}/credits", post(topup::credit))
        .route(
            "/v1/agents/{id}/grants",
            post(routes::grant).route_layer(admin()),
        )
        .route(
            "/v1/agents/{id}/debits",
            post(routes::debit).route_layer(service()),
        )
        .route(
            "/v1/agents/{id}/check",
            post(routes::check).route_layer(service()),
        )
        .route(
            "/v1/agents/{id}/holds",
            post(routes::hold).route_layer(service()),
        )
        .route(
            "/v1/agents/{id}/refunds",
            post(routes::refund).route_layer(admin()),
        )
        .route(
            "/v1/agents/{id}/journal",
            get(routes::journal).route_layer(read()),
        )
        .route("/v1/events", get(routes::events).route_layer(read()))
        .route(
            "/v1/agents/{id}/usage",
            get(routes::usage).route_layer(read()),
        )
        .route(
            "/v1/holds/{hold_id}/capture",
            post(routes::capture).route_layer(service()),
        )
        .route(
            "/v1/holds/{hold_id}/void",
            post(routes::void).route_layer(service()),
        )
        .route(
            "/v1/agents/{id}/keys",
            post(agent_keys::issue)
                .route_layer(service())
                .merge(get(agent_keys::list).route_layer(read())),
        )
        .route(
            "/v1/agents/{id}/keys/{prefix}",
            delete(agent_keys::revoke).route_layer(service()),
        )
        .route(
            "/v1/receipts/{receipt}/refund",
            post(authorize::refund_receipt).route_layer(service()),
        )
        // Authenticated by the agent's own API key, never by a tally token.
        .route("/v1/authorize", any(authorize::authorize))
        // Roles per item (credits and refunds need admin): checked in the handler.
        .route("/v1/batch", post(batch::batch))
        .route("/v1/plans", get(routes::plans).route_layer(read()))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .merge(envoy_routes(&st))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn(serve::limit_header_bytes))
        .layer(middleware::from_fn_with_state(st.clone(), observe))
        .layer(DefaultBodyLimit::max(st.limits().body_bytes_max))
        .with_state(st)
}

/// Envoy ext_authz sends the original method and path under a prefix.
fn envoy_routes(st: &AppState) -> Router<AppState> {
    match &st.forward_auth().envoy_path_prefix {
        Some(prefix) if prefix != "/v1/authorize" => Router::new()
            .route(prefix, any(authorize::authorize))
            .route(&format!("{prefix}/{{*rest}}"), any(authorize::authorize)),
        Some(_) => Router::new().route("/v1/authorize/{*rest}", any(authorize::authorize)),
        None => Router::new(),
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Where the metering proxy listens, when `[[routes]]` are served by it.
    pub proxy_addr: Option<SocketAddr>,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the engine is open (or failed to open: then the task's error).
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let mut rx = self.shutdown.subscribe();
        loop {
            if self.state.is_ready() {
                return Ok(());
            }
            if self.task.is_finished() {
                return match (&mut self.task).await {
                    Ok(Ok(())) => anyhow::bail!("server stopped before it was ready"),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                };
            }
            // The readiness flag has no notifier; poll briefly (start-up only).
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = rx.changed() => {}
            }
        }
    }

    /// Asks the server to stop: no new connections, in-flight requests finish, then the
    /// engine shuts down.
    pub fn trigger_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Triggers shutdown and waits for it to complete.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.trigger_shutdown();
        self.task.await?
    }

    /// Waits for the server to finish (after a signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// Binds `config.listen`, serves at once (`/readyz` 503 until the engine is open), opens
/// the engine in the background with `clock`, and returns the running server.
/// Opens the engine over the configured storage. Blocking: run it off the runtime.
fn open_engine(
    storage: &StorageConfig,
    engine_config: tally_store::EngineConfig,
    plans: PlanBook,
    clock: Arc<dyn Clock>,
    registry: &prometheus::Registry,
) -> Result<Engine, tally_store::StoreError> {
    match storage {
        StorageConfig::Sled => Engine::open(engine_config, plans, clock, Some(registry)),
        StorageConfig::Redis {
            nodes,
            wait_replicas,
            wait_timeout_ms,
            op_timeout_ms,
        } => {
            let redis = tally_store::RedisStorage::connect(&tally_store::RedisOptions {
                nodes: nodes.clone(),
                idempotency_retention_ms: engine_config.idempotency_retention_ms,
                wait_replicas: *wait_replicas,
                wait_timeout_ms: *wait_timeout_ms,
                op_timeout_ms: *op_timeout_ms,
            })?;
            Engine::open_with(Arc::new(redis), engine_config, plans, clock, Some(registry))
        }
    }
}

/// Where the ledger lives, for messages.
fn storage_name(config: &Config) -> String {
    match &config.storage {
        StorageConfig::Sled => format!("sled in {}", config.data_dir.display()),
        StorageConfig::Redis { nodes, .. } => format!("redis://{}", nodes.join(",")),
    }
}

pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    if matches!(config.storage, StorageConfig::Redis { .. }) && !config.webhooks.is_empty() {
        anyhow::bail!(
            "[[webhooks]] need the change feed, which the redis storage backend does not offer: use sled, or drop the webhooks"
        );
    }
    let metrics = Metrics::new()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let proxy_listener = if config.proxy.enabled && !config.routes.is_empty() {
        let l = TcpListener::bind(config.proxy.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding the proxy's {}: {e}", config.proxy.listen))?;
        Some(l)
    } else {
        None
    };
    let proxy_addr = proxy_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let state = AppState::new(&config, clock.clone(), metrics.clone(), public_url);
    let app = router(state.clone());
    let (shutdown, mut rx) = watch::channel(false);
    let opener_state = state.clone();
    let task = tokio::spawn(async move {
        let engine_config = config.engine_config();
        let plans = config.plans.clone();
        let registry = metrics.registry.clone();
        let storage = config.storage.clone();
        let opening = tokio::task::spawn_blocking(move || {
            open_engine(&storage, engine_config, plans, clock, &registry)
        });
        let mut serve_rx = rx.clone();
        let drain_state = opener_state.clone();
        let server = serve::serve(listener, app, async move {
            let _ = serve_rx.wait_for(|stop| *stop).await;
            drain_state.begin_drain();
        });
        let serving = tokio::spawn(server);
        let proxy = proxy_listener.map(|l| {
            let proxy = Proxy::new(opener_state.clone(), config.proxy.clone());
            let mut proxy_rx = rx.clone();
            let serving = tokio::spawn(serve::serve(l, proxy::router(proxy.clone()), async move {
                let _ = proxy_rx.wait_for(|stop| *stop).await;
            }));
            (proxy, serving)
        });
        let engine = tokio::select! {
            opened = opening => match opened? {
                Ok(engine) => engine,
                Err(e) => {
                    serving.abort();
                    anyhow::bail!("opening the store ({}): {e}", storage_name(&config));
                }
            },
            _ = async { let _ = rx.wait_for(|stop| *stop).await; } => {
                let _ = serving.await;
                if let Some((_, p)) = proxy {
                    let _ = p.await;
                }
                return Ok(());
            }
        };
        // Agent keys are found by prefix from the first request on.
        let keys = match opener_state.keys().rebuild(&engine).await {
            Ok(keys) => keys,
            Err(e) => {
                serving.abort();
                engine.shutdown().await?;
                return Err(e);
            }
        };
        tracing::info!(keys, "agent API key index built");
        // Before the API takes writes: an endpoint's first cursor is the feed's end now.
        let senders = match crate::webhooks::start(
            &config.webhooks,
            &engine,
            &metrics,
            &config.data_dir,
            rx.clone(),
        )
        .await
        {
            Ok(senders) => senders,
            Err(e) => {
                serving.abort();
                engine.shutdown().await?;
                return Err(e.context("starting the webhook senders"));
            }
        };
        opener_state.set_engine(engine.clone());
        if opener_state.outbox().is_some_and(|o| !o.is_empty()) {
            let (st, engine) = (opener_state.clone(), engine.clone());
            tokio::spawn(async move { crate::payments::recover(&st, &engine).await });
        }
        if let (Some(x), Some(f)) = (opener_state.x402(), opener_state.facilitator()) {
            let (f, scheme, network) = (f.clone(), x.scheme.clone(), x.network.clone());
            let upto = config
                .routes
                .routes()
                .iter()
                .any(|r| r.x402 && r.price.fixed_micros().is_none());
            let st = opener_state.clone();
            // A warning, not a refusal to start: the facilitator may come up later.
            tokio::spawn(async move {
                match f.kinds().await {
                    Ok(kinds) => {
                        if crate::x402::lists(&kinds, &scheme, &network) {
                            tracing::info!(%scheme, %network, "the x402 facilitator supports the configured payment kind")
                        } else {
                            tracing::warn!(%scheme, %network, "the x402 facilitator does not list the configured scheme and network in /supported")
                        }
                        if upto && st.learn_upto_address(&kinds).is_none() {
                            tracing::warn!(%network, "variable-price x402 routes need the upto scheme, and the facilitator lists no upto kind with a facilitatorAddress for the network (or set [x402] facilitator_address)")
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the x402 facilitator's /supported could not be read")
                    }
                }
            });
        }
        tracing::info!(storage = %storage_name(&config), "engine open; ready");
        serving.await??;
        if let Some((proxy, serving)) = proxy {
            serving.await??;
            // Calls already forwarded still settle (refund, capture) through the engine.
            if !proxy.drain(proxy.drain_wait()).await {
                tracing::warn!(
                    "proxied calls still unsettled at shutdown; their holds expire by themselves"
                );
            }
        }
        // They see the same stop signal, and save their cursors before ending.
        for sender in senders {
            let _ = sender.await;
        }
        tracing::info!("no more requests; shutting the engine down");
        engine.shutdown().await?;
        Ok(())
    });
    Ok(Running {
        addr,
        proxy_addr,
        state,
        shutdown,
        task,
    })
}
