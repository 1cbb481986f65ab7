//! Selling an existing API: the route table (`[[routes]]`: method and path pattern →
//! upstream and price) and `[forward_auth]`, parsed from their raw shape and validated
//! with the key and line, plus the pure matcher forward-auth and the metering proxy ask
//! "which route is this call, and what does it cost?"; and `[proxy]`, the proxy's limits.

use std::ops::Range;

use axum::http::{HeaderName, Method, Uri};
use serde::Deserialize;
use tally_core::{Pricing, Priority, TaskType};

use super::{ConfigError, Lines};

/// Most routes in one config: the matcher is a linear scan, fine far beyond this.
pub const ROUTES_MAX: usize = 1_024;
/// Longest route path pattern.
pub const ROUTE_PATH_LEN_MAX: usize = 1_024;
/// The usage header of a variable-price route when the config names none.
pub const USAGE_HEADER_DEFAULT: &str = "X-Usage-Cost-Micros";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    name: String,
    methods: Option<Vec<String>>,
    path: String,
    upstream: String,
    task_type: Option<String>,
    priority: Option<String>,
    price_micros: Option<u64>,
    cost_micros: Option<u64>,
    margin_pct: Option<u64>,
    margin_ppm: Option<u64>,
    min_micros: Option<u64>,
    max_micros: Option<u64>,
    variable: Option<RawVariable>,
    charge_client_errors: Option<bool>,
    x402: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariable {
    max_micros: u64,
    usage_header: Option<String>,
    unit_price_micros: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    enabled: Option<bool>,
    listen: Option<String>,
    connect_timeout_ms: Option<u64>,
    upstream_timeout_ms: Option<u64>,
    body_bytes_max: Option<u64>,
    concurrency_max: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForwardAuth {
    key_header: Option<String>,
    idempotency_header: Option<String>,
    request_id_header: Option<String>,
    envoy_path_prefix: Option<String>,
    mode: Option<String>,
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: any one non-empty segment.
    Param(String),
}

/// A path pattern: exact (`/v1/search`), with `{param}` segments (`/items/{id}`), or a
/// prefix (`/files/*`: `/files` and everything below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    pub segments: Vec<Segment>,
    pub prefix: bool,
}

impl PathPattern {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') || raw.len() > ROUTE_PATH_LEN_MAX {
            return Err(format!(
                "must start with / and be at most {ROUTE_PATH_LEN_MAX} bytes"
            ));
        }
        let (body, prefix) = match raw.strip_suffix("/*") {
            Some(b) => (b, true),
            None => (raw, false),
        };
        let mut segments = Vec::new();
        for seg in body.split('/').skip(1) {
            if seg.is_empty() {
                if body == "/" || body.is_empty() {
                    break;
                }
                return Err("has an empty segment (//) or a trailing /".into());
            }
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "{seg:?}: a parameter is {{name}} with [A-Za-z0-9_]"
                    ));
                }
                segments.push(Segment::Param(name.to_owned()));
            } else if seg.contains(['{', '}', '*', '?', '#']) {
                return Err(format!(
                    "{seg:?}: '*' only as a final /*, braces only around a whole segment"
                ));
            } else {
                segments.push(Segment::Literal(seg.to_owned()));
            }
        }
        Ok(Self { segments, prefix })
    }

    fn is_exact(&self) -> bool {
        !self.prefix
            && self
                .segments
                .iter()
                .all(|s| matches!(s, Segment::Literal(_)))
    }

    fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// The parameters when `path` (without query) matches.
    fn matches(&self, path: &[&str]) -> Option<Vec<(String, String)>> {
        if path.len() < self.segments.len() || (!self.prefix && path.len() != self.segments.len()) {
            return None;
        }
        let mut params = Vec::new();
        for (pattern, actual) in self.segments.iter().zip(path) {
            match pattern {
                Segment::Literal(l) if l == actual => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), (*actual).to_owned())),
            }
        }
        Some(params)
    }
}

/// What a call on a route costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Price {
    /// A fixed price.
    Fixed { micros: u64 },
    /// `cost × (1 + margin)` rounded up and clamped ([`tally_core::pricing::price_micros`]),
    /// computed once at start.
    Margin {
        cost_micros: u64,
        pricing: Pricing,
        micros: u64,
    },
    /// Known only after the call: a hold of `max_micros` captured from the upstream's
    /// usage header (or trailer): the cost in micros, or with `unit_price_micros` a count
    /// of units at that price. Served by the metering proxy; forward-auth cannot settle it.
    Variable {
        max_micros: u64,
        usage_header: HeaderName,
        unit_price_micros: Option<u64>,
    },
}

impl Price {
    /// The amount to debit up front, for fixed and margin prices.
    pub fn fixed_micros(&self) -> Option<u64> {
        match self {
            Price::Fixed { micros } | Price::Margin { micros, .. } => Some(*micros),
            Price::Variable { .. } => None,
        }
    }
}

/// One `[[routes]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// `None`: any method.
    pub methods: Option<Vec<Method>>,
    pub path: String,
    pub pattern: PathPattern,
    pub upstream: String,
    pub task_type: Option<TaskType>,
    pub priority: Priority,
    pub price: Price,
    /// Whether an upstream 4xx is charged (the default) or refunded; either way the
    /// client gets the upstream's answer.
    pub charge_client_errors: bool,
    /// The proxy also sells a call to a caller with no agent key for an x402 payment of
    /// the price: scheme `exact` for a fixed price, `upto` the maximum for a variable one
    /// (settled for what the upstream reported). Forward-auth sells fixed prices only.
    pub x402: bool,
}

/// A route that matched a call, with the values of its `{param}` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    pub route: &'a Route,
    pub params: Vec<(String, String)>,
}

/// The validated `[[routes]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` + `path` (a query string is ignored): an exact pattern beats
    /// one with parameters (more literal segments first), which beats a prefix (the
    /// longest first); ties go to the earlier route in the config.
    pub fn find(&self, method: &Method, path: &str) -> Option<RouteMatch<'_>> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let segments: Vec<&str> = path.split('/').skip(1).filter(|s| !s.is_empty()).collect();
        let rank = |p: &PathPattern| {
            let class = if p.is_exact() {
                2
            } else if !p.prefix {
                1
            } else {
                0
            };
            (class, p.segments.len(), p.literal_count())
        };
        let mut best: Option<(RouteMatch<'_>, (u8, usize, usize))> = None;
        for route in &self.routes {
            if let Some(methods) = &route.methods {
                if !methods.contains(method) {
                    continue;
                }
            }
            let Some(params) = route.pattern.matches(&segments) else {
                continue;
            };
            let r = rank(&route.pattern);
            if best.as_ref().is_none_or(|(_, b)| r > *b) {
                best = Some((RouteMatch { route, params }, r));
            }
        }
        best.map(|(m, _)| m)
    }
}

/// How forward-auth answers a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyMode {
    /// The debit route's own 402/429 (Caddy, Traefik, Envoy).
    #[default]
    Standard,
    /// nginx `auth_request` passes only 401/403: 402 → 401, 429 → 403, the problem in
    /// headers.
    Nginx,
}

/// `[forward_auth]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuth {
    /// A header carrying the agent key besides `Authorization: Bearer`.
    pub key_header: Option<HeaderName>,
    pub idempotency_header: HeaderName,
    /// Used when the idempotency header is absent: a call is charged once per distinct
    /// request id.
    pub request_id_header: HeaderName,
    /// For Envoy ext_authz: the original path follows this prefix in the request's own.
    pub envoy_path_prefix: Option<String>,
    pub mode: DenyMode,
}

impl Default for ForwardAuth {
    fn default() -> Self {
        Self {
            key_header: None,
            idempotency_header: HeaderName::from_static("idempotency-key"),
            request_id_header: HeaderName::from_static("x-request-id"),
            envoy_path_prefix: None,
            mode: DenyMode::Standard,
        }
    }
}

/// Where the metering proxy listens by default.
pub const PROXY_LISTEN_DEFAULT: &str = "127.0.0.1:8403";
pub const PROXY_CONNECT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub const PROXY_UPSTREAM_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// The longest an upstream exchange may be configured to take.
pub const PROXY_UPSTREAM_TIMEOUT_MS_CEILING: u64 = 3_600_000;
pub const PROXY_BODY_BYTES_MAX_DEFAULT: u64 = 10 * 1024 * 1024;
pub const PROXY_BODY_BYTES_MAX_CEILING: u64 = 1 << 30;
pub const PROXY_CONCURRENCY_MAX_DEFAULT: usize = 1_024;
pub const PROXY_CONCURRENCY_MAX_CEILING: usize = 65_536;
/// How much longer than the upstream time-out a variable-price hold lives: the proxy
/// settles it well before, and an expired hold can no longer be captured.
pub const PROXY_HOLD_TTL_SLACK_MS: u64 = 60_000;

/// `[proxy]`, validated: the metering reverse proxy's listener and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Serve `[[routes]]` on `listen` (when there are routes). Off: forward-auth only.
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
    /// Connecting to the upstream longer than this: 504, charge undone.
    pub connect_timeout_ms: u64,
    /// The whole upstream exchange (request, response head and body) longer than this:
    /// 504 (or a cut stream), charge undone.
    pub upstream_timeout_ms: u64,
    /// Request bodies longer than this get 413 (before any charge when announced by
    /// `Content-Length`, else the charge is undone).
    pub body_bytes_max: u64,
    /// Upstream requests in flight at once; past it 503 `proxy-busy`, nothing charged.
    pub concurrency_max: usize,
}

impl ProxyConfig {
    /// The TTL of a variable-price hold.
    pub fn hold_ttl_ms(&self) -> u64 {
        self.upstream_timeout_ms + PROXY_HOLD_TTL_SLACK_MS
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: PROXY_LISTEN_DEFAULT
                .parse()
                .expect("a valid constant address"),
            connect_timeout_ms: PROXY_CONNECT_TIMEOUT_MS_DEFAULT,
            upstream_timeout_ms: PROXY_UPSTREAM_TIMEOUT_MS_DEFAULT,
            body_bytes_max: PROXY_BODY_BYTES_MAX_DEFAULT,
            concurrency_max: PROXY_CONCURRENCY_MAX_DEFAULT,
        }
    }
}

pub(super) fn proxy(
    lines: &Lines<'_>,
    span: &Range<usize>,
    raw: RawProxy,
) -> Result<ProxyConfig, ConfigError> {
    let d = ProxyConfig::default();
    let listen = match raw.listen {
        None => d.listen,
        Some(l) => l.parse().map_err(|_| {
            lines.err(
                "proxy.listen",
                span,
                format!("{l:?} is not an address like 127.0.0.1:8403"),
            )
        })?,
    };
    Ok(ProxyConfig {
        enabled: raw.enabled.unwrap_or(true),
        listen,
        connect_timeout_ms: super::in_range(
            lines,
            "proxy.connect_timeout_ms",
            span,
            raw.connect_timeout_ms,
            d.connect_timeout_ms,
            1,
            600_000,
        )?,
        upstream_timeout_ms: super::in_range(
            lines,
            "proxy.upstream_timeout_ms",
            span,
            raw.upstream_timeout_ms,
            d.upstream_timeout_ms,
            1,
            PROXY_UPSTREAM_TIMEOUT_MS_CEILING,
        )?,
        body_bytes_max: super::in_range(
            lines,
            "proxy.body_bytes_max",
            span,
            raw.body_bytes_max,
            d.body_bytes_max,
            0,
            PROXY_BODY_BYTES_MAX_CEILING,
        )?,
        concurrency_max: super::in_range(
            lines,
            "proxy.concurrency_max",
            span,
            raw.concurrency_max
                .map(|c| usize::try_from(c).unwrap_or(usize::MAX)),
            d.concurrency_max,
            1,
            PROXY_CONCURRENCY_MAX_CEILING,
        )?,
    })
}

fn header_name(
    lines: &Lines<'_>,
    key: &str,
    span: &Range<usize>,
    value: &str,
) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| lines.err(key, span, format!("{value:?} is not a header name")))
}

pub(super) fn forward_auth(
    lines: &Lines<'_>,
    span: &Range<usize>,
    raw: RawForwardAuth,
) -> Result<ForwardAuth, ConfigError> {
    let mut f = ForwardAuth::default();
    if let Some(h) = raw.key_header {
        f.key_header = Some(header_name(lines, "forward_auth.key_header", span, &h)?);
    }
    if let Some(h) = raw.idempotency_header {
        f.idempotency_header = header_name(lines, "forward_auth.idempotency_header", span, &h)?;
    }
    if let Some(h) = raw.request_id_header {
        f.request_id_header = header_name(lines, "forward_auth.request_id_header", span, &h)?;
    }
    if let Some(p) = raw.envoy_path_prefix {
        let charset_ok = p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
        // Any other path would overlap tally's own routes.
        let ours = p != "/v1/authorize"
            && (p == "/v1"
                || p.starts_with("/v1/")
                || ["/healthz", "/readyz", "/metrics", "/openapi.json"].contains(&p.as_str()));
        if !p.starts_with('/') || p.ends_with('/') || p.contains("//") || !charset_ok || ours {
            return Err(lines.err(
                "forward_auth.envoy_path_prefix",
                span,
                "must be \"/v1/authorize\" or a path of [A-Za-z0-9/-._~] outside tally's own routes, without a trailing /",
            ));
        }
        f.envoy_path_prefix = Some(p);
    }
    f.mode = match raw.mode.as_deref() {
        None | Some("standard") => DenyMode::Standard,
        Some("nginx") => DenyMode::Nginx,
        Some(other) => {
            return Err(lines.err(
                "forward_auth.mode",
                span,
                format!("{other:?} is not standard or nginx"),
            ))
        }
    };
    Ok(f)
}

pub(super) fn route(
    lines: &Lines<'_>,
    key: &str,
    span: &Range<usize>,
    r: RawRoute,
) -> Result<Route, ConfigError> {
    let err = |field: &str, reason: String| lines.err(&format!("{key}.{field}"), span, reason);
    if r.name.is_empty()
        || r.name.len() > 64
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(err("name", "must be 1..=64 of [A-Za-z0-9._-]".into()));
    }
    let methods = match r.methods {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(err(
                "methods",
                "must list at least one method (leave it out for any)".into(),
            ))
        }
        Some(list) => Some(
            list.iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| err("methods", format!("{m:?} is not an HTTP method")))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let pattern = PathPattern::parse(&r.path).map_err(|e| err("path", e))?;
    let uri: Uri = r
        .upstream
        .parse()
        .map_err(|e| err("upstream", format!("{:?} is not a URL ({e})", r.upstream)))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(err(
            "upstream",
            format!("{:?} must be an http:// or https:// URL", r.upstream),
        ));
    }
    let task_type = r
        .task_type
        .map(TaskType::new)
        .transpose()
        .map_err(|e| err("task_type", e.to_string()))?;
    let priority = match r.priority.as_deref() {
        None | Some("normal") => Priority::Normal,
        Some("low") => Priority::Low,
        Some("critical") => Priority::Critical,
        Some(p) => {
            return Err(err(
                "priority",
                format!("{p:?} is not low, normal or critical"),
            ))
        }
    };
    let price = match (r.price_micros, r.cost_micros, r.variable) {
        (Some(micros), None, None) => {
            if r.margin_pct.is_some()
                || r.margin_ppm.is_some()
                || r.min_micros.is_some()
                || r.max_micros.is_some()
            {
                return Err(err(
                    "price_micros",
                    "a fixed price takes no margin, min_micros or max_micros".into(),
                ));
            }
            if micros == 0 {
                return Err(err("price_micros", "must be at least 1".into()));
            }
            Price::Fixed { micros }
        }
        (None, Some(cost_micros), None) => {
            let margin_ppm = match (r.margin_pct, r.margin_ppm) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        "margin_pct",
                        "give margin_pct or margin_ppm, not both".into(),
                    ))
                }
                (Some(pct), None) => pct
                    .checked_mul(10_000)
                    .ok_or_else(|| err("margin_pct", "too large".into()))?,
                (None, Some(ppm)) => ppm,
                (None, None) => 0,
            };
            let pricing = Pricing {
                margin_ppm,
                min_micros: r.min_micros.unwrap_or(0),
                max_micros: r.max_micros.unwrap_or(u64::MAX),
            };
            if pricing.min_micros > pricing.max_micros {
                return Err(err("min_micros", "must not exceed max_micros".into()));
            }
            let micros = tally_core::pricing::price_micros(cost_micros, &pricing)
                .map_err(|e| err("cost_micros", e.to_string()))?;
            if micros == 0 {
                return Err(err(
                    "cost_micros",
                    "the price comes to 0 micros; set cost_micros or min_micros above 0".into(),
                ));
            }
            Price::Margin {
                cost_micros,
                pricing,
                micros,
            }
        }
        (None, None, Some(v)) => {
            if r.margin_pct.is_some()
                || r.margin_ppm.is_some()
                || r.min_micros.is_some()
                || r.max_micros.is_some()
            {
                return Err(err(
                    "variable",
                    "a variable price takes max_micros inside variable = { ... }".into(),
                ));
            }
            if v.max_micros == 0 {
                return Err(err("variable.max_micros", "must be at least 1".into()));
            }
            if v.unit_price_micros == Some(0) {
                return Err(err("variable.unit_price_micros", "must be at least 1".into()));
            }
            let usage_header = header_name(
                lines,
                &format!("{key}.variable.usage_header"),
                span,
                v.usage_header.as_deref().unwrap_or(USAGE_HEADER_DEFAULT),
            )?;
            Price::Variable {
                max_micros: v.max_micros,
                usage_header,
                unit_price_micros: v.unit_price_micros,
            }
        }
        _ => {
            return Err(err(
                "price_micros",
                "give exactly one price: price_micros, cost_micros (with margin_pct, min_micros, max_micros), or variable = { max_micros }".into(),
            ))
        }
    };
    Ok(Route {
        name: r.name,
        methods,
        path: r.path,
        pattern,
        upstream: r.upstream.trim_end_matches('/').to_owned(),
        task_type,
        priority,
        price,
        charge_client_errors: r.charge_client_errors.unwrap_or(true),
        x402: r.x402.unwrap_or(false),
    })
}

pub(super) fn routes(
    lines: &Lines<'_>,
    raw: Vec<toml::Spanned<RawRoute>>,
) -> Result<RouteTable, ConfigError> {
    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let span = r.span();
        let key = format!("routes[{i}]");
        if i >= ROUTES_MAX {
            return Err(lines.err(&key, &span, format!("at most {ROUTES_MAX} routes")));
        }
        let built = route(lines, &key, &span, r.into_inner())?;
        if routes.iter().any(|q| q.name == built.name) {
            return Err(lines.err(
                &format!("{key}.name"),
                &span,
                format!("route {} defined twice", built.name),
            ));
        }
        routes.push(built);
    }
    Ok(RouteTable::new(routes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(toml: &str) -> RouteTable {
        Config::from_toml(toml, "t").expect("valid").routes
    }

    const UP: &str = "upstream = \"http://127.0.0.1:9\"\nprice_micros = 1\n";

    #[test]
    fn exact_beats_param_beats_prefix_and_the_longest_prefix_wins() {
        let t = table(&format!(
            "[[routes]]\nname = \"files\"\npath = \"/files/*\"\n{UP}\
             [[routes]]\nname = \"deep\"\npath = \"/files/big/*\"\n{UP}\
             [[routes]]\nname = \"item\"\npath = \"/files/{{id}}\"\n{UP}\
             [[routes]]\nname = \"special\"\npath = \"/files/special\"\n{UP}\
             [[routes]]\nname = \"post\"\nmethods = [\"post\"]\npath = \"/search\"\n{UP}"
        ));
        let name = |m: &Method, p: &str| t.find(m, p).map(|r| r.route.name.clone());
        let get = Method::GET;
        assert_eq!(name(&get, "/files/special").as_deref(), Some("special"));
        let m = t.find(&get, "/files/7?x=1").expect("match");
        assert_eq!(m.route.name, "item");
        assert_eq!(m.params, vec![("id".to_owned(), "7".to_owned())]);
        assert_eq!(name(&get, "/files/a/b").as_deref(), Some("files"));
        assert_eq!(name(&get, "/files").as_deref(), Some("files"));
        assert_eq!(name(&get, "/files/big/x/y").as_deref(), Some("deep"));
        assert_eq!(name(&get, "/other"), None, "no match");
        assert_eq!(name(&get, "/search"), None, "method not listed");
        assert_eq!(name(&Method::POST, "/search").as_deref(), Some("post"));
    }

    #[test]
    fn prices_fixed_margin_rounded_up_and_clamped_or_variable() {
        let t = table(
            "[proxy]\nenabled = false\n[[routes]]\nname = \"a\"\npath = \"/a\"\nupstream = \"https://api.example.com/\"\ncost_micros = 1001\nmargin_pct = 20\n\
             [[routes]]\nname = \"b\"\npath = \"/b\"\nupstream = \"http://x\"\ncost_micros = 10\nmargin_pct = 50\nmin_micros = 100\n\
             [[routes]]\nname = \"c\"\npath = \"/c\"\nupstream = \"http://x\"\ncost_micros = 1000\nmargin_pct = 50\nmax_micros = 1200\n\
             [[routes]]\nname = \"v\"\npath = \"/v\"\nupstream = \"http://x\"\nvariable = { max_micros = 5000 }\n",
        );
        let price = |i: usize| t.routes()[i].price.fixed_micros();
        assert_eq!(price(0), Some(1_202), "1001 × 1.2 = 1201.2 rounds up");
        assert_eq!(t.routes()[0].upstream, "https://api.example.com");
        assert_eq!(price(1), Some(100), "clamped up to min");
        assert_eq!(price(2), Some(1_200), "clamped down to max");
        assert_eq!(price(3), None);
        assert!(matches!(
            &t.routes()[3].price,
            Price::Variable { max_micros: 5000, usage_header, unit_price_micros: None } if usage_header == "x-usage-cost-micros"
        ));
    }

    #[test]
    fn bad_routes_name_the_key_and_line() {
        let cases = [
            ("path = \"/a\"\nupstream = \"ftp://x\"\nprice_micros = 1\n", "routes[0].upstream"),
            ("path = \"a\"\nupstream = \"http://x\"\nprice_micros = 1\n", "routes[0].path"),
            ("path = \"/a/*/b\"\nupstream = \"http://x\"\nprice_micros = 1\n", "routes[0].path"),
            ("path = \"/a\"\nupstream = \"http://x\"\n", "routes[0].price_micros"),
            ("path = \"/a\"\nupstream = \"http://x\"\nprice_micros = 1\ncost_micros = 1\n", "routes[0].price_micros"),
            ("path = \"/a\"\nupstream = \"http://x\"\ncost_micros = 5\nmin_micros = 9\nmax_micros = 8\n", "routes[0].min_micros"),
            ("path = \"/a\"\nupstream = \"http://x\"\nprice_micros = 1\nmethods = [\"G T\"]\n", "routes[0].methods"),
            ("path = \"/a\"\nupstream = \"http://x\"\nvariable = { max_micros = 1, usage_header = \"a b\" }\n", "routes[0].variable.usage_header"),
            ("path = \"/a\"\nupstream = \"http://x\"\nprice_micros = 1\npriority = \"urgent\"\n", "routes[0].priority"),
        ];
        for (body, key) in cases {
            let text = format!("\n[[routes]]\nname = \"r\"\n{body}");
            let msg = Config::from_toml(&text, "t").expect_err(body).to_string();
            assert!(msg.contains(key) && msg.contains("line 2"), "{key}: {msg}");
        }
        let msg = Config::from_toml("[[routes]]\nname = \"r\"\npath = \"/a\"\nupstream = \"http://x\"\nprice_micros = 1\nprise = 2\n", "t")
            .expect_err("unknown key")
            .to_string();
        assert!(msg.contains("prise"), "{msg}");
        for prefix in ["/v1/agents", "/healthz", "/x/{y}", "/x/", "x"] {
            let text = format!("[forward_auth]\nenvoy_path_prefix = {prefix:?}\n");
            let msg = Config::from_toml(&text, "t").expect_err(prefix).to_string();
            assert!(msg.contains("forward_auth.envoy_path_prefix"), "{msg}");
        }
        for prefix in ["/v1/authorize", "/ext-authz", "/auth/check"] {
            let text = format!("[forward_auth]\nenvoy_path_prefix = {prefix:?}\n");
            Config::from_toml(&text, "t").expect(prefix);
        }
        let msg = Config::from_toml("[forward_auth]\nmode = \"apache\"\n", "t")
            .expect_err("mode")
            .to_string();
        assert!(
            msg.contains("forward_auth.mode") && msg.contains("line 1"),
            "{msg}"
        );
    }
}
