//! `tally loadtest --spawn` as a user runs it: the real binary starts a temporary server,
//! drives it with normal, broke and rate-limited mock agents for a few seconds, and its
//! `--json` report must show 402s and 429s and every invariant holding; with `--batch`, the
//! debits go as `POST /v1/batch` requests and the report counts them item by item.

use std::process::Command;

use serde_json::Value;

#[test]
fn loadtest_spawn_shows_402s_and_429s_and_every_invariant_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report_path = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "loadtest",
            "--spawn",
            "--duration-s",
            "3",
            "--agents",
            "6",
            "--broke-agents",
            "2",
            "--limited-agents",
            "2",
            "--concurrency",
            "4",
            "--quiet",
            "--json",
        ])
        .arg(&report_path)
        .env_remove("TALLY_TOKEN")
        .output()
        .expect("tally runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tally loadtest --spawn failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report written"))
            .expect("report is JSON");
    let count = |status: &str| report["counts_by_status"][status].as_u64().unwrap_or(0);
    assert!(count("201") > 0, "no approvals: {report:#}");
    assert!(count("402") > 0, "no 402s: {report:#}");
    assert!(count("429") > 0, "no 429s: {report:#}");
    assert_eq!(report["spawned"], true);
    assert_eq!(report["invariants"]["ok"], true, "{stdout}");
    let checks = report["invariants"]["checks"].as_array().expect("checks");
    assert!(checks.len() >= 6);
    for check in checks {
        assert_eq!(check["ok"], true, "{check:#}");
    }
    assert!(
        report["invariants"]["denied_402_checked"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    assert!(report["requests_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    // Duplicate debits sent at once were answered by replay, not charged twice.
    assert!(
        report["replayed_receipts"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert!(stdout.contains("invariants: all hold"), "{stdout}");
}

#[test]
fn loadtest_spawn_with_batches_counts_debits_by_item_and_every_invariant_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report_path = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "loadtest",
            "--spawn",
            "--duration-s",
            "2",
            "--agents",
            "6",
            "--broke-agents",
            "2",
            "--limited-agents",
            "2",
            "--concurrency",
            "4",
            "--batch",
            "8",
            "--quiet",
            "--json",
        ])
        .arg(&report_path)
        .env_remove("TALLY_TOKEN")
        .output()
        .expect("tally runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tally loadtest --spawn --batch 8 failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report written"))
            .expect("report is JSON");
    assert_eq!(report["invariants"]["ok"], true, "{stdout}");
    assert_eq!(report["batch_items"], 8);
    let debits = |status: &str| {
        report["debit_counts_by_status"][status]
            .as_u64()
            .unwrap_or(0)
    };
    for status in ["201", "402", "429"] {
        assert!(debits(status) > 0, "no {status} debit: {report:#}");
    }
    let batches = report["latency_ms_batch"]["count"].as_u64().unwrap_or(0);
    let items: u64 = report["counts_by_operation"]["batch_debit"]
        .as_object()
        .expect("batch items counted")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert!(batches > 0, "{report:#}");
    assert_eq!(items, 8 * batches, "{report:#}");
    assert!(
        report["debits_per_s"].as_f64() > report["requests_per_s"].as_f64(),
        "{report:#}"
    );
    assert!(stdout.contains("in batches of 8"), "{stdout}");
}
