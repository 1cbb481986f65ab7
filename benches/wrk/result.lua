-- Shared by the wrk scripts (loaded with dofile from $WRK_LIB, which lib.sh sets): prints
-- the RESULT line the bench scripts read (requests, req/s, p50/p99/max in ms, errors).
function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d rps=%.0f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f non2xx_or_socket_errors=%d\n",
    summary.requests, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    e.status + e.connect + e.read + e.write + e.timeout))
end
