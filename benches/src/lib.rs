//! Shared helpers of tally's benchmark programs.

/// Resident memory of this process in bytes, from `/proc/self/status` (Linux).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The `p`-th percentile (0–100) of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Mean of a Prometheus histogram: sum / count.
pub fn histogram_mean(h: &prometheus::Histogram) -> f64 {
    let count = h.get_sample_count();
    if count == 0 {
        0.0
    } else {
        h.get_sample_sum() / count as f64
    }
}
