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
/// The upper bound of the histogram's highest non-empty bucket: "the slowest one took at
/// most this long" (infinite when it landed past the last bound).
pub fn histogram_max_bound(h: &prometheus::Histogram) -> f64 {
    use prometheus::core::Collector;
    let families = h.collect();
    let Some(metric) = families.first().and_then(|f| f.get_metric().first()) else {
        return 0.0;
    };
    let hist = metric.get_histogram();
    let total = hist.get_sample_count();
    hist.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() == total)
        .map_or(f64::INFINITY, |b| b.upper_bound())
}

pub fn histogram_mean(h: &prometheus::Histogram) -> f64 {
    let count = h.get_sample_count();
    if count == 0 {
        0.0
    } else {
        h.get_sample_sum() / count as f64
    }
}
