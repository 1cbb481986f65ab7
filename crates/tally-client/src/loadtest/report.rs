//! The final report: what `--json` writes and what people read on stdout.

use std::collections::BTreeMap;

use serde::Serialize;

use super::invariants::InvariantReport;
use super::stats::LatencySummary;

/// The final report (`--json` writes it as is).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub spawned: bool,
    pub duration_s: f64,
    pub concurrency: u32,
    pub agents_normal: u32,
    pub agents_broke: u32,
    pub agents_rate_limited: u32,
    /// Logical calls (a call retried after a 503 or a dropped connection counts once; a
    /// batch is one).
    pub requests: u64,
    pub requests_per_s: f64,
    /// Debits per request (`--batch`; 1: single debits).
    pub batch_items: u32,
    /// Debits answered or given up on: single debits, both of a duplicate pair, and every
    /// item of a batch.
    pub debits: u64,
    pub debits_per_s: f64,
    /// Debits by their own final status (a batch item's, not the batch's 200;
    /// `"transport"` when there was none).
    pub debit_counts_by_status: BTreeMap<String, u64>,
    /// Latency of the batch requests (whole requests), with `--batch` above 1.
    pub latency_ms_batch: Option<LatencySummary>,
    pub counts_by_outcome: BTreeMap<String, u64>,
    /// By final HTTP status (`"transport"` when there was none).
    pub counts_by_status: BTreeMap<String, u64>,
    /// By operation; `duplicate` is the second of two identical debits sent at once.
    pub counts_by_operation: BTreeMap<String, BTreeMap<String, u64>>,
    /// Approved answers that were replays of an earlier request with the same key.
    pub replayed_receipts: u64,
    pub latency_ms_by_outcome: BTreeMap<String, LatencySummary>,
    pub invariants: InvariantReport,
}

/// The report for people.
pub(super) fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tally loadtest: {} requests in {:.1} s = {:.0} req/s ({} workers; agents: {} normal, {} broke, {} rate-limited) against {}{}",
        report.requests,
        report.duration_s,
        report.requests_per_s,
        report.concurrency,
        report.agents_normal,
        report.agents_broke,
        report.agents_rate_limited,
        report.url,
        if report.spawned { " (spawned)" } else { "" },
    );
    if report.batch_items > 1 {
        let debit_statuses: Vec<String> = report
            .debit_counts_by_status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        let _ = writeln!(
            out,
            "debits: {} = {:.0}/s, in batches of {}; debits by their own status: {}",
            report.debits,
            report.debits_per_s,
            report.batch_items,
            debit_statuses.join(", ")
        );
    }
    let statuses: Vec<String> = report
        .counts_by_status
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    let _ = writeln!(
        out,
        "by status: {}; replayed receipts: {}",
        statuses.join(", "),
        report.replayed_receipts
    );
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "outcome", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (outcome, l) in &report.latency_ms_by_outcome {
        let _ = writeln!(
            out,
            "{outcome:<20} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
    }
    if let Some(l) = &report.latency_ms_batch {
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            "batch requests", l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
    }
    for (operation, counts) in &report.counts_by_operation {
        let counts: Vec<String> = counts.iter().map(|(o, n)| format!("{o} {n}")).collect();
        let _ = writeln!(out, "  {operation:<8} {}", counts.join(", "));
    }
    let inv = &report.invariants;
    let _ = writeln!(
        out,
        "invariants: {} ({} agents, {} journal entries, {} approvals and {} 402s checked)",
        if inv.ok { "all hold" } else { "VIOLATED" },
        inv.agents_checked,
        inv.journal_entries,
        inv.approved_checked,
        inv.denied_402_checked
    );
    for check in &inv.checks {
        let _ = writeln!(
            out,
            "  [{}] {}: {}",
            if check.ok { "ok" } else { "FAIL" },
            check.name,
            check.description
        );
        for example in &check.examples {
            let _ = writeln!(out, "        {example}");
        }
    }
    out
}
