//! The server's Prometheus metrics. Base units, `_total` on counters, no per-agent labels
//! (per-agent usage is the API's job). The engine registers its own into the same registry.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Handles to the server's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Decisions by outcome: `approved`, `would_approve`, a denial reason, `rejected`,
    /// `key_reused`.
    pub decisions_total: IntCounterVec,
    pub debited_micros_total: IntCounter,
    pub credited_micros_total: IntCounter,
    /// HTTP latency by route template, method and status.
    pub http_request_duration_seconds: HistogramVec,
    /// Calls through the metering proxy by route name (from the config, so bounded) and
    /// outcome: `served`, `served_usage_missing`, `served_usage_over_max`, `denied`,
    /// `upstream_failed`, `upstream_timeout`, `client_error_refunded`, `body_too_large`,
    /// `busy`, `settle_failed`.
    pub proxy_requests_total: IntCounterVec,
    /// x402 payments by outcome: `verified`, `settled`, `invalid` (the facilitator said
    /// no), `refused` (malformed, v1, not what was asked, in use), `facilitator_error`,
    /// `settle_failed` (a served call whose payment did not settle: alert on it).
    pub x402_payments_total: IntCounterVec,
    /// Micros (the asset's atomic units) settled through x402.
    pub x402_settled_micros_total: IntCounter,
    /// Threshold webhooks by endpoint (from the config, so bounded) and outcome:
    /// `delivered`, `retried` (an attempt failed; another follows), `failed` (given up
    /// after `retry_for_ms`: alert on it).
    pub webhooks_total: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let decisions_total = IntCounterVec::new(
            Opts::new("tally_decisions_total", "Ledger decisions by outcome."),
            &["outcome"],
        )?;
        let debited_micros_total = IntCounter::new(
            "tally_debited_micros_total",
            "Micros debited (debits and captures).",
        )?;
        let credited_micros_total = IntCounter::new(
            "tally_credited_micros_total",
            "Micros credited (top-ups and grants).",
        )?;
        let http_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tally_http_request_duration_seconds",
                "HTTP request latency by route template, method and status.",
            )
            .buckets(vec![
                0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 10.0,
            ]),
            &["route", "method", "status"],
        )?;
        let proxy_requests_total = IntCounterVec::new(
            Opts::new(
                "tally_proxy_requests_total",
                "Calls through the metering proxy by route and outcome.",
            ),
            &["route", "outcome"],
        )?;
        registry.register(Box::new(proxy_requests_total.clone()))?;
        let x402_payments_total = IntCounterVec::new(
            Opts::new("tally_x402_payments_total", "x402 payments by outcome."),
            &["outcome"],
        )?;
        let x402_settled_micros_total = IntCounter::new(
            "tally_x402_settled_micros_total",
            "Micros (atomic units) settled through x402.",
        )?;
        // Every outcome from the start, so that rates and alerts see a 0, not no series.
        for outcome in [
            "verified",
            "settled",
            "invalid",
            "refused",
            "facilitator_error",
            "settle_failed",
            "recovered",
            "unresolved",
        ] {
            x402_payments_total.with_label_values(&[outcome]);
        }
        registry.register(Box::new(x402_payments_total.clone()))?;
        let webhooks_total = IntCounterVec::new(
            Opts::new(
                "tally_webhooks_total",
                "Threshold webhooks by endpoint and outcome.",
            ),
            &["endpoint", "outcome"],
        )?;
        registry.register(Box::new(webhooks_total.clone()))?;
        registry.register(Box::new(x402_settled_micros_total.clone()))?;
        registry.register(Box::new(decisions_total.clone()))?;
        registry.register(Box::new(debited_micros_total.clone()))?;
        registry.register(Box::new(credited_micros_total.clone()))?;
        registry.register(Box::new(http_request_duration_seconds.clone()))?;
        Ok(Self {
            registry,
            decisions_total,
            debited_micros_total,
            credited_micros_total,
            http_request_duration_seconds,
            proxy_requests_total,
            x402_payments_total,
            x402_settled_micros_total,
            webhooks_total,
        })
    }

    /// The text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
