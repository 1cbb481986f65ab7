//! `tally.toml`: raw structs that mirror the file (unknown keys are errors), validated into
//! the typed [`Config`] the server runs with. Errors name the key and the line.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use tally_core::{Plan, PlanBook, PlanName, Pricing, RateBucket, Thresholds};
use tally_store::EngineConfig;

use crate::auth::{Role, TokenHash};

mod gateway;
mod raw;
mod webhooks;
pub use gateway::{
    DenyMode, ForwardAuth, PathPattern, Price, ProxyConfig, Route, RouteMatch, RouteTable, Segment,
    PROXY_HOLD_TTL_SLACK_MS, PROXY_LISTEN_DEFAULT, ROUTES_MAX, USAGE_HEADER_DEFAULT,
};
use raw::RawConfig;

/// Where `tally serve` listens with no config.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8402";
/// Where `tally serve` keeps its data with no config.
pub const DATA_DIR_DEFAULT: &str = "./tally-data";
/// The plan new agents get when they name none, and the built-in plan's name.
pub const DEFAULT_PLAN: &str = "default";

/// Largest request body we accept by default (a debit is ~200 bytes).
pub const BODY_BYTES_MAX_DEFAULT: usize = 64 * 1024;
/// The ceiling an operator may raise the body limit to.
pub const BODY_BYTES_MAX_CEILING: usize = 16 * 1024 * 1024;
pub const JSON_DEPTH_MAX_DEFAULT: usize = 32;
/// serde_json refuses deeper input anyway; ours must be below its recursion limit.
pub const JSON_DEPTH_MAX_CEILING: usize = 100;
pub const PAGE_LIMIT_MAX_DEFAULT: u32 = 1_000;
pub const PAGE_LIMIT_MAX_CEILING: u32 = 10_000;
pub const PAGE_LIMIT_DEFAULT: u32 = 100;
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;
pub const BATCH_ITEMS_MAX_DEFAULT: usize = 1_000;
pub const BATCH_ITEMS_MAX_CEILING: usize = 10_000;
/// 1,000 items of ~200 bytes, with room for metadata.
pub const BATCH_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Longest `Authorization` header value we look at.
pub const AUTH_HEADER_BYTES_MAX_DEFAULT: usize = 1_024;

/// Limits enforced at the HTTP edge, each named in `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request bodies longer than this get 413.
    pub body_bytes_max: usize,
    /// JSON bodies nested deeper than this get 400.
    pub json_depth_max: usize,
    /// Largest `limit` a paged route accepts (400 above).
    pub page_limit_max: u32,
    /// `limit` when the request names none.
    pub page_limit_default: u32,
    /// Longest `Idempotency-Key` accepted (at most the core's 255).
    pub idempotency_key_len_max: usize,
    /// Longest `Authorization` header value.
    pub auth_header_bytes_max: usize,
    /// A request still running after this gets 503.
    pub request_timeout_ms: u64,
    /// Most items in one `POST /v1/batch` (413 above).
    pub batch_items_max: usize,
    /// Largest `POST /v1/batch` body (413 above); other routes keep `body_bytes_max`.
    pub batch_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes_max: BODY_BYTES_MAX_DEFAULT,
            json_depth_max: JSON_DEPTH_MAX_DEFAULT,
            page_limit_max: PAGE_LIMIT_MAX_DEFAULT,
            page_limit_default: PAGE_LIMIT_DEFAULT,
            idempotency_key_len_max: tally_core::id::IDEMPOTENCY_KEY_LEN_MAX,
            auth_header_bytes_max: AUTH_HEADER_BYTES_MAX_DEFAULT,
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            batch_items_max: BATCH_ITEMS_MAX_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
        }
    }
}

/// x402 payment requirements offered on a 402 (`accepts`, `PAYMENT-REQUIRED`).
#[derive(Debug, Clone, PartialEq)]
pub struct X402 {
    pub scheme: String,
    pub network: String,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub description: String,
    /// x402's optional `extra` object (e.g. the EIP-712 domain `name` and `version` of the
    /// asset); `None` when the config has none, and then left out of `accepts`.
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where payments are verified and settled (`POST /verify`, `POST /settle`). Without
    /// one, 402s describe payment but no payment is accepted.
    pub facilitator_url: Option<String>,
    /// Each facilitator request (connect to answer).
    pub facilitator_timeout_ms: u64,
    /// `/settle` is sent at most this many times (the same payload: settlement is
    /// idempotent per payment) while the facilitator cannot be reached or answers 5xx.
    pub settle_attempts_max: u32,
    /// The plan of agents made for wallet payers (`x402:<network>:<address>`).
    pub payer_plan: Option<PlanName>,
    /// The facilitator's address an `upto` payment's witness binds
    /// (`extra.facilitatorAddress` of a variable-price route's requirement). When unset,
    /// learned from the facilitator's `GET /supported` (its `upto` kind's `extra`).
    pub facilitator_address: Option<String>,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `tracing` filter (`info`, `tally=debug`).
    pub log: String,
    /// The base URL clients reach us by, for `top_up` links and x402 `resource.url`.
    pub public_url: Option<String>,
    pub default_plan: PlanName,
    pub plans: PlanBook,
    pub tokens: Vec<TokenHash>,
    pub limits: Limits,
    /// Engine settings; `data_dir` is overwritten with [`Config::data_dir`] at start.
    pub engine: EngineConfig,
    pub x402: Option<X402>,
    /// `[[routes]]`: priced calls of the API being sold.
    pub routes: RouteTable,
    pub forward_auth: ForwardAuth,
    /// `[proxy]`: the metering reverse proxy serving `routes`.
    pub proxy: ProxyConfig,
    /// `[[webhooks]]`: where threshold notifications are sent.
    pub webhooks: Vec<crate::webhooks::Endpoint>,
    /// `[storage]`: where the ledger lives.
    pub storage: StorageConfig,
}

/// Where the ledger lives: sled in `data_dir` (the embedded default, one node), or a Redis
/// Cluster that any number of `tally serve` nodes share.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StorageConfig {
    #[default]
    Sled,
    Redis {
        /// Seed nodes, `host:port`.
        nodes: Vec<String>,
        /// Replicas that must acknowledge a group commit (`WAIT`) before it is answered;
        /// 0 answers once the master has it on disk (a failover may then lose it).
        wait_replicas: u32,
        wait_timeout_ms: u64,
        /// Bound on each request to the cluster.
        op_timeout_ms: u64,
    },
}

/// Longest `storage.wait_timeout_ms`.
pub const STORAGE_WAIT_TIMEOUT_MS_MAX: u64 = 60_000;
/// Longest `storage.op_timeout_ms`.
pub const STORAGE_OP_TIMEOUT_MS_MAX: u64 = 60_000;
/// Most seed nodes in `storage.url`.
pub const STORAGE_NODES_MAX: usize = 64;

impl StorageConfig {
    /// Parses `sled` or `redis://host:port[,host:port…]` with the given settings.
    pub fn parse(
        url: &str,
        wait_replicas: u32,
        wait_timeout_ms: u64,
        op_timeout_ms: u64,
    ) -> Result<Self, String> {
        if url == "sled" {
            return Ok(StorageConfig::Sled);
        }
        let Some(rest) = url.strip_prefix("redis://") else {
            return Err(format!(
                "{url:?}: expected \"sled\" or redis://host:port[,host:port...]"
            ));
        };
        let nodes: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .map(|n| n.trim().to_owned())
            .collect();
        if nodes.len() > STORAGE_NODES_MAX {
            return Err(format!("at most {STORAGE_NODES_MAX} seed nodes"));
        }
        for n in &nodes {
            let port = n
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                return Err(format!("{n:?} is not host:port"));
            }
        }
        if !(1..=STORAGE_WAIT_TIMEOUT_MS_MAX).contains(&wait_timeout_ms) {
            return Err(format!(
                "wait_timeout_ms must be 1..={STORAGE_WAIT_TIMEOUT_MS_MAX}"
            ));
        }
        if !(1..=STORAGE_OP_TIMEOUT_MS_MAX).contains(&op_timeout_ms) {
            return Err(format!(
                "op_timeout_ms must be 1..={STORAGE_OP_TIMEOUT_MS_MAX}"
            ));
        }
        Ok(StorageConfig::Redis {
            nodes,
            wait_replicas,
            wait_timeout_ms,
            op_timeout_ms,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        let default_plan = PlanName::new(DEFAULT_PLAN).expect("a valid constant name");
        Self {
            listen: LISTEN_DEFAULT.parse().expect("a valid constant address"),
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            log: "info".into(),
            public_url: None,
            plans: PlanBook::new([Plan::unlimited(default_plan.clone())]),
            default_plan,
            tokens: Vec::new(),
            limits: Limits::default(),
            engine: EngineConfig::new(DATA_DIR_DEFAULT),
            x402: None,
            routes: RouteTable::default(),
            forward_auth: ForwardAuth::default(),
            proxy: ProxyConfig::default(),
            webhooks: Vec::new(),
            storage: StorageConfig::Sled,
        }
    }
}

/// A config file that does not parse or validate.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub message: String,
}

/// Turns byte spans into `line N` for messages.
struct Lines<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Lines<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn err(&self, key: &str, span: &Range<usize>, reason: impl std::fmt::Display) -> ConfigError {
        ConfigError {
            origin: self.origin.to_owned(),
            message: format!("line {}: {key}: {reason}", self.line(span)),
        }
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    lines: &Lines<'_>,
    key: &str,
    span: &Range<usize>,
    value: Option<T>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let v = value.unwrap_or(default);
    if v < min || v > max {
        return Err(lines.err(key, span, format!("must be {min}..={max}, got {v}")));
    }
    Ok(v)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, &origin)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let lines = Lines { origin, text };
        let mut cfg = Config::default();

        if let Some(server) = raw.server {
            let span = server.span();
            let s = server.into_inner();
            if let Some(listen) = s.listen {
                cfg.listen = listen.parse().map_err(|e| {
                    lines.err(
                        "server.listen",
                        &span,
                        format!("{listen:?} is not ip:port ({e})"),
                    )
                })?;
            }
            if let Some(dir) = s.data_dir {
                if dir.as_os_str().is_empty() {
                    return Err(lines.err("server.data_dir", &span, "must not be empty"));
                }
                cfg.data_dir = dir;
            }
            if let Some(log) = s.log {
                cfg.log = log;
            }
            if let Some(url) = s.public_url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(lines.err(
                        "server.public_url",
                        &span,
                        "must start with http:// or https://",
                    ));
                }
                cfg.public_url = Some(url.trim_end_matches('/').to_owned());
            }
            if let Some(p) = s.default_plan {
                cfg.default_plan =
                    PlanName::new(p).map_err(|e| lines.err("server.default_plan", &span, e))?;
            }
        }

        if let Some(limits) = raw.limits {
            let span = limits.span();
            let l = limits.into_inner();
            let d = Limits::default();
            cfg.limits = Limits {
                body_bytes_max: in_range(
                    &lines,
                    "limits.body_bytes_max",
                    &span,
                    l.body_bytes_max,
                    d.body_bytes_max,
                    256,
                    BODY_BYTES_MAX_CEILING,
                )?,
                json_depth_max: in_range(
                    &lines,
                    "limits.json_depth_max",
                    &span,
                    l.json_depth_max,
                    d.json_depth_max,
                    2,
                    JSON_DEPTH_MAX_CEILING,
                )?,
                page_limit_max: in_range(
                    &lines,
                    "limits.page_limit_max",
                    &span,
                    l.page_limit_max,
                    d.page_limit_max,
                    1,
                    PAGE_LIMIT_MAX_CEILING,
                )?,
                page_limit_default: in_range(
                    &lines,
                    "limits.page_limit_default",
                    &span,
                    l.page_limit_default,
                    d.page_limit_default,
                    1,
                    PAGE_LIMIT_MAX_CEILING,
                )?,
                idempotency_key_len_max: in_range(
                    &lines,
                    "limits.idempotency_key_len_max",
                    &span,
                    l.idempotency_key_len_max,
                    d.idempotency_key_len_max,
                    1,
                    tally_core::id::IDEMPOTENCY_KEY_LEN_MAX,
                )?,
                auth_header_bytes_max: in_range(
                    &lines,
                    "limits.auth_header_bytes_max",
                    &span,
                    l.auth_header_bytes_max,
                    d.auth_header_bytes_max,
                    64,
                    16 * 1024,
                )?,
                request_timeout_ms: in_range(
                    &lines,
                    "limits.request_timeout_ms",
                    &span,
                    l.request_timeout_ms,
                    d.request_timeout_ms,
                    100,
                    600_000,
                )?,
                batch_items_max: in_range(
                    &lines,
                    "limits.batch_items_max",
                    &span,
                    l.batch_items_max,
                    d.batch_items_max,
                    1,
                    BATCH_ITEMS_MAX_CEILING,
                )?,
                batch_bytes_max: in_range(
                    &lines,
                    "limits.batch_bytes_max",
                    &span,
                    l.batch_bytes_max,
                    d.batch_bytes_max,
                    1_024,
                    BODY_BYTES_MAX_CEILING,
                )?,
            };
            if cfg.limits.page_limit_default > cfg.limits.page_limit_max {
                return Err(lines.err(
                    "limits.page_limit_default",
                    &span,
                    "must not exceed limits.page_limit_max",
                ));
            }
        }

        if let Some(storage) = raw.storage {
            let span = storage.span();
            let st = storage.into_inner();
            cfg.storage = StorageConfig::parse(
                st.url.as_deref().unwrap_or("sled"),
                st.wait_replicas.unwrap_or(0),
                st.wait_timeout_ms
                    .unwrap_or(tally_store::REDIS_WAIT_TIMEOUT_MS_DEFAULT),
                st.op_timeout_ms
                    .unwrap_or(tally_store::REDIS_OP_TIMEOUT_MS_DEFAULT),
            )
            .map_err(|e| lines.err("storage.url", &span, e))?;
        }

        if let Some(engine) = raw.engine {
            let span = engine.span();
            let e = engine.into_inner();
            let d = EngineConfig::new(DATA_DIR_DEFAULT);
            cfg.engine = EngineConfig {
                data_dir: d.data_dir.clone(),
                shards: in_range(&lines, "engine.shards", &span, e.shards, d.shards, 0, 256)?,
                shard_queue_len_max: in_range(
                    &lines,
                    "engine.shard_queue_len_max",
                    &span,
                    e.shard_queue_len_max,
                    d.shard_queue_len_max,
                    1,
                    1 << 20,
                )?,
                batch_size_max: in_range(
                    &lines,
                    "engine.batch_size_max",
                    &span,
                    e.batch_size_max,
                    d.batch_size_max,
                    1,
                    1 << 16,
                )?,
                sled_cache_bytes: in_range(
                    &lines,
                    "engine.sled_cache_bytes",
                    &span,
                    e.sled_cache_bytes,
                    d.sled_cache_bytes,
                    1 << 20,
                    1 << 40,
                )?,
                checkpoint_interval_ms: in_range(
                    &lines,
                    "engine.checkpoint_interval_ms",
                    &span,
                    e.checkpoint_interval_ms,
                    d.checkpoint_interval_ms,
                    1,
                    86_400_000,
                )?,
                idempotency_retention_ms: in_range(
                    &lines,
                    "engine.idempotency_retention_ms",
                    &span,
                    e.idempotency_retention_ms,
                    d.idempotency_retention_ms,
                    1_000,
                    30 * 86_400_000,
                )?,
                idempotency_keys_max: in_range(
                    &lines,
                    "engine.idempotency_keys_max",
                    &span,
                    e.idempotency_keys_max,
                    d.idempotency_keys_max,
                    1_000,
                    1 << 40,
                )?,
                idempotency_memory_keys_max: in_range(
                    &lines,
                    "engine.idempotency_memory_keys_max",
                    &span,
                    e.idempotency_memory_keys_max,
                    d.idempotency_memory_keys_max,
                    1_000,
                    1 << 28,
                )?,
                hold_sweep_interval_ms: in_range(
                    &lines,
                    "engine.hold_sweep_interval_ms",
                    &span,
                    e.hold_sweep_interval_ms,
                    d.hold_sweep_interval_ms,
                    10,
                    3_600_000,
                )?,
                agents_cached_max: in_range(
                    &lines,
                    "engine.agents_cached_max",
                    &span,
                    e.agents_cached_max,
                    d.agents_cached_max,
                    1,
                    1 << 32,
                )?,
                index_backlog_events_max: in_range(
                    &lines,
                    "engine.index_backlog_events_max",
                    &span,
                    e.index_backlog_events_max,
                    d.index_backlog_events_max,
                    1_024,
                    1 << 26,
                )?,
                index_backlog_bytes_max: in_range(
                    &lines,
                    "engine.index_backlog_bytes_max",
                    &span,
                    e.index_backlog_bytes_max,
                    d.index_backlog_bytes_max,
                    1 << 20,
                    1 << 36,
                )?,
                usage_scan_entries_max: in_range(
                    &lines,
                    "engine.usage_scan_entries_max",
                    &span,
                    e.usage_scan_entries_max,
                    d.usage_scan_entries_max,
                    1_000,
                    1 << 32,
                )?,
            };
        }

        if let Some(auth) = raw.auth {
            for (i, token) in auth.tokens.into_iter().enumerate() {
                let span = token.span();
                let t = token.into_inner();
                let key = format!("auth.tokens[{i}]");
                let role = Role::parse(&t.role).ok_or_else(|| {
                    lines.err(
                        &format!("{key}.role"),
                        &span,
                        format!("{:?} is not admin, service or reader", t.role),
                    )
                })?;
                let hash = TokenHash::from_hex(&t.name, role, &t.sha256)
                    .map_err(|e| lines.err(&format!("{key}.sha256"), &span, e))?;
                cfg.tokens.push(hash);
            }
        }

        if !raw.plans.is_empty() {
            let mut plans = Vec::new();
            for (i, plan) in raw.plans.into_iter().enumerate() {
                let span = plan.span();
                let p = plan.into_inner();
                let key = format!("plans[{i}]");
                let name = PlanName::new(p.name.clone())
                    .map_err(|e| lines.err(&format!("{key}.name"), &span, e))?;
                if plans.iter().any(|q: &Plan| q.name == name) {
                    return Err(lines.err(
                        &format!("{key}.name"),
                        &span,
                        format!("plan {name} defined twice"),
                    ));
                }
                let mut buckets = Vec::new();
                for (j, b) in p.buckets.into_iter().enumerate() {
                    let window_ms = b.window_s.saturating_mul(1_000);
                    let bucket =
                        RateBucket::new(b.name, b.quota, window_ms, b.burst.unwrap_or(b.quota))
                            .map_err(|e| lines.err(&format!("{key}.buckets[{j}]"), &span, e))?;
                    buckets.push(bucket);
                }
                let pricing = match p.pricing {
                    None => Pricing::default(),
                    Some(r) => Pricing {
                        margin_ppm: r.margin_ppm.unwrap_or(0),
                        min_micros: r.min_micros.unwrap_or(0),
                        max_micros: r.max_micros.unwrap_or(u64::MAX),
                    },
                };
                let built = Plan::new(
                    name,
                    buckets,
                    p.monthly_cap_micros,
                    p.soft_threshold_pct,
                    p.anchor_day.unwrap_or(1),
                    pricing,
                    p.hold_ttl_max_ms.unwrap_or(3_600_000),
                )
                .and_then(|plan| match p.thresholds {
                    None => Ok(plan),
                    Some(t) => plan.with_thresholds(Thresholds {
                        balance_below_micros: t.balance_below_micros,
                        cap_spend_percent: t.cap_spend_percent,
                        grant_expiring_within_ms: t.grant_expiring_within_ms,
                    }),
                })
                .map_err(|e| lines.err(&key, &span, e))?;
                plans.push(built);
            }
            cfg.plans = PlanBook::new(plans);
        }
        if cfg.plans.get(&cfg.default_plan).is_none() {
            return Err(ConfigError {
                origin: origin.to_owned(),
                message: format!(
                    "server.default_plan: no plan named {:?} in [[plans]]",
                    cfg.default_plan.as_str()
                ),
            });
        }

        if let Some(x) = raw.x402 {
            let span = x.span();
            let x = x.into_inner();
            for (key, value) in [
                ("x402.network", &x.network),
                ("x402.asset", &x.asset),
                ("x402.pay_to", &x.pay_to),
            ] {
                if value.is_empty()
                    || value.len() > 256
                    || !value.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(lines.err(key, &span, "must be 1..=256 visible ASCII characters"));
                }
            }
            let extra = x
                .extra
                .map(|t| serde_json::to_value(t).and_then(serde_json::from_value))
                .transpose()
                .map_err(|e| lines.err("x402.extra", &span, e))?;
            cfg.x402 = Some(X402 {
                scheme: x.scheme.unwrap_or_else(|| "exact".into()),
                network: x.network,
                asset: x.asset,
                pay_to: x.pay_to,
                max_timeout_seconds: in_range(
                    &lines,
                    "x402.max_timeout_seconds",
                    &span,
                    x.max_timeout_seconds,
                    60,
                    1,
                    86_400,
                )?,
                description: x
                    .description
                    .unwrap_or_else(|| "tally prepaid balance top-up".into()),
                extra,
                facilitator_url: match x.facilitator_url {
                    None => None,
                    Some(u) => {
                        let ok = (u.starts_with("http://") || u.starts_with("https://"))
                            && u.parse::<axum::http::Uri>()
                                .is_ok_and(|p| p.authority().is_some());
                        if !ok {
                            return Err(lines.err(
                                "x402.facilitator_url",
                                &span,
                                format!("{u:?} must be an http:// or https:// URL"),
                            ));
                        }
                        Some(u.trim_end_matches('/').to_owned())
                    }
                },
                facilitator_timeout_ms: in_range(
                    &lines,
                    "x402.facilitator_timeout_ms",
                    &span,
                    x.facilitator_timeout_ms,
                    10_000,
                    100,
                    120_000,
                )?,
                settle_attempts_max: in_range(
                    &lines,
                    "x402.settle_attempts_max",
                    &span,
                    x.settle_attempts_max,
                    3,
                    1,
                    10,
                )?,
                payer_plan: match x.payer_plan {
                    None => None,
                    Some(p) => {
                        let name = PlanName::new(p.clone())
                            .map_err(|e| lines.err("x402.payer_plan", &span, e))?;
                        if cfg.plans.get(&name).is_none() {
                            return Err(lines.err(
                                "x402.payer_plan",
                                &span,
                                format!("no plan named {p:?} in [[plans]]"),
                            ));
                        }
                        Some(name)
                    }
                },
                facilitator_address: match x.facilitator_address {
                    None => None,
                    Some(a) if is_evm_address(&a) => Some(a),
                    Some(a) => {
                        return Err(lines.err(
                            "x402.facilitator_address",
                            &span,
                            format!("{a:?} must be 0x and 40 hex digits"),
                        ))
                    }
                },
            });
        }
        cfg.routes = gateway::routes(&lines, raw.routes)?;
        cfg.webhooks = webhooks::endpoints(&lines, raw.webhooks)?;
        if let Some(f) = raw.forward_auth {
            let span = f.span();
            cfg.forward_auth = gateway::forward_auth(&lines, &span, f.into_inner())?;
        }
        if let Some(r) = cfg.routes.routes().iter().find(|r| r.x402) {
            let why = if cfg
                .x402
                .as_ref()
                .and_then(|x| x.facilitator_url.as_ref())
                .is_none()
            {
                Some("needs [x402] with a facilitator_url")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(lines.err(&format!("routes.{}.x402", r.name), &(0..0), why));
            }
        }
        let proxy_span = raw.proxy.as_ref().map_or(0..0, |p| p.span());
        if let Some(p) = raw.proxy {
            cfg.proxy = gateway::proxy(&lines, &proxy_span, p.into_inner())?;
        }
        if cfg.proxy.enabled {
            // The proxy speaks plain HTTP to upstreams (TLS is left to a sidecar or to
            // forward-auth in a gateway that has it).
            if let Some(r) = cfg
                .routes
                .routes()
                .iter()
                .find(|r| !r.upstream.starts_with("http://"))
            {
                return Err(lines.err(
                    &format!("routes.{}.upstream", r.name),
                    &proxy_span,
                    format!(
                        "{:?}: the metering proxy forwards over plain http:// only; set proxy.enabled = false to use this route with forward-auth alone",
                        r.upstream
                    ),
                ));
            }
            let ttl = cfg.proxy.hold_ttl_ms();
            let variable = cfg
                .routes
                .routes()
                .iter()
                .any(|r| r.price.fixed_micros().is_none());
            if let Some(plan) = cfg
                .plans
                .iter()
                .find(|p| variable && p.hold_ttl_max_ms < ttl)
            {
                return Err(lines.err(
                    "proxy.upstream_timeout_ms",
                    &proxy_span,
                    format!(
                        "variable-price routes hold for upstream_timeout_ms + {PROXY_HOLD_TTL_SLACK_MS} ms = {ttl} ms, longer than plan {}'s hold_ttl_max_ms ({})",
                        plan.name, plan.hold_ttl_max_ms
                    ),
                ));
            }
        }
        Ok(cfg)
    }

    /// The engine settings with the data dir in force.
    pub fn engine_config(&self) -> EngineConfig {
        let mut e = self.engine.clone();
        e.data_dir = self.data_dir.clone();
        e
    }

    /// Adds an admin token hash (from `TALLY_ADMIN_TOKEN_SHA256`).
    pub fn add_admin_hash(&mut self, name: &str, hex_hash: &str) -> Result<(), String> {
        self.tokens
            .push(TokenHash::from_hex(name, Role::Admin, hex_hash.trim())?);
        Ok(())
    }
}

/// `0x` and 40 hex digits: an EVM address.
pub(crate) fn is_evm_address(s: &str) -> bool {
    s.len() == 42 && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_sled_or_a_redis_cluster_and_says_what_is_wrong() {
        let cfg = Config::from_toml("", "t").expect("empty is valid");
        assert_eq!(cfg.storage, StorageConfig::Sled);
        let cfg = Config::from_toml(
            "[storage]\nurl = \"redis://10.0.0.1:7000,10.0.0.2:7001\"\nwait_replicas = 1\n",
            "t",
        )
        .expect("valid");
        assert_eq!(
            cfg.storage,
            StorageConfig::Redis {
                nodes: vec!["10.0.0.1:7000".into(), "10.0.0.2:7001".into()],
                wait_replicas: 1,
                wait_timeout_ms: tally_store::REDIS_WAIT_TIMEOUT_MS_DEFAULT,
                op_timeout_ms: tally_store::REDIS_OP_TIMEOUT_MS_DEFAULT,
            }
        );
        for (bad, says) in [
            ("url = \"postgres://x:1\"", "expected"),
            ("url = \"redis://\"", "host:port"),
            ("url = \"redis://host\"", "host:port"),
            ("url = \"redis://host:0\"", "host:port"),
            ("url = \"redis://:7000\"", "host:port"),
            (
                "url = \"redis://h:1\"\nwait_timeout_ms = 0",
                "wait_timeout_ms",
            ),
            (
                "url = \"redis://h:1\"\nop_timeout_ms = 60001",
                "op_timeout_ms",
            ),
            ("urls = \"redis://h:1\"", "unknown field"),
        ] {
            let e = Config::from_toml(&format!("[storage]\n{bad}\n"), "t")
                .expect_err(bad)
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let many = (0..=STORAGE_NODES_MAX)
            .map(|i| format!("h{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        let e = StorageConfig::parse(&format!("redis://{many}"), 0, 1, 1).expect_err("too many");
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn the_example_file_parses_and_validates() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/tally.example.toml"
        );
        let cfg = Config::load(Path::new(path)).expect("example config is valid");
        assert!(cfg.plans.len() >= 2);
        assert!(cfg.x402.is_some());
        assert!(!cfg.tokens.is_empty());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let cfg = Config::from_toml("", "t").expect("valid");
        assert_eq!(cfg.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.plans.len(), 1);
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n", "t")
            .expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("listne"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key_and_line() {
        let text = "[limits]\nbody_bytes_max = 1024\n\n[[plans]]\nname = \"default\"\n\n[[plans]]\nname = \"pro\"\nanchor_day = 30\n";
        let msg = Config::from_toml(text, "t")
            .expect_err("anchor 30")
            .to_string();
        assert!(
            msg.contains("plans[1]") && msg.contains("anchor_day") && msg.contains("line 7"),
            "{msg}"
        );

        let msg = Config::from_toml("\n[limits]\npage_limit_max = 0\n", "t")
            .expect_err("0")
            .to_string();
        assert!(
            msg.contains("limits.page_limit_max") && msg.contains("line 2"),
            "{msg}"
        );

        let msg = Config::from_toml(
            "[[auth.tokens]]\nname = \"x\"\nrole = \"root\"\nsha256 = \"00\"\n",
            "t",
        )
        .expect_err("role")
        .to_string();
        assert!(
            msg.contains("auth.tokens[0].role") && msg.contains("line 1"),
            "{msg}"
        );

        let msg = Config::from_toml("[[plans]]\nname = \"pro\"\n", "t")
            .expect_err("no default plan")
            .to_string();
        assert!(msg.contains("default_plan"), "{msg}");

        let msg = Config::from_toml("[limits]\nbody_bytes_max = -1\n", "t")
            .expect_err("negative")
            .to_string();
        assert!(msg.contains("line 2"), "{msg}");

        let x402 = "[x402]\nnetwork = \"eip155:84532\"\nasset = \"0xa\"\npay_to = \"0xb\"\nfacilitator_url = \"http://f\"\n";
        let msg = Config::from_toml(&format!("{x402}facilitator_address = \"0x12\"\n"), "t")
            .expect_err("short address")
            .to_string();
        assert!(msg.contains("x402.facilitator_address"), "{msg}");
        let variable = "[[routes]]\nname = \"v\"\npath = \"/v\"\nupstream = \"http://u\"\nvariable = { max_micros = 5000 }\nx402 = true\n";
        let cfg = Config::from_toml(&format!("{x402}{variable}"), "t").expect("upto route");
        assert!(cfg.routes.routes()[0].x402);
        let msg = Config::from_toml(variable, "t")
            .expect_err("no facilitator")
            .to_string();
        assert!(msg.contains("routes.v.x402"), "{msg}");
    }

    #[test]
    fn buckets_and_caps_become_plans() {
        let text = "[[plans]]\nname = \"default\"\nmonthly_cap_micros = 1000\nsoft_threshold_pct = 80\n[[plans.buckets]]\nname = \"default\"\nquota = 100\nwindow_s = 60\n";
        let cfg = Config::from_toml(text, "t").expect("valid");
        let plan = cfg.plans.get(&cfg.default_plan).expect("default plan");
        assert_eq!(plan.policy_header(), "\"default\";q=100;w=60");
        assert_eq!(plan.buckets[0].burst, 100);
        assert_eq!(plan.soft_limit_micros(), Some(800));
    }
}
