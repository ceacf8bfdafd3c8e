-- WRK_POST_BYTES=N: each request a POST with an N-byte body (scenario 1p).
local post = tonumber(os.getenv("WRK_POST_BYTES") or "")
if post and post > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", post)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

-- wrk prints this one line at the end; loadtest/bench.py reads it.
-- Latencies in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'REPORT {"requests": %d, "seconds": %.6f, "bytes": %d, "errors": %d, "p50": %d, "p99": %d, "p999": %d}\n',
    summary.requests, summary.duration / 1e6, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
