-- wrk script for the proxy bench: POST PATH_PREFIX<agent>/debits through the metering proxy
-- (or straight to the upstream), the agent's API key as bearer, spread round-robin over the
-- keys in KEYS (comma-separated; key i belongs to bench-i).
-- Env: KEYS, MODE ("proxy": bearer key on the request path; "authorize": GET /v1/authorize
-- with X-Forwarded-Method/-Uri and a distinct X-Request-Id, as a gateway asks).
local keys = {}
for k in string.gmatch(os.getenv("KEYS") or "", "[^,]+") do table.insert(keys, k) end
local mode = os.getenv("MODE") or "proxy"
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end

local counter = 0
local body = '{"amount_micros":1}'

function request()
  counter = counter + 1
  local i = (counter * 7 + tid) % #keys
  local path = "/v1/agents/bench-" .. i .. "/debits"
  if mode == "authorize" then
    return wrk.format("GET", "/v1/authorize", {
      ["Authorization"] = "Bearer " .. keys[i + 1],
      ["X-Forwarded-Method"] = "POST",
      ["X-Forwarded-Uri"] = path,
      ["X-Request-Id"] = run .. "-" .. tid .. "-" .. counter,
    }, nil)
  end
  return wrk.format("POST", path, {
    ["Authorization"] = "Bearer " .. keys[i + 1],
    ["Content-Type"] = "application/json",
  }, body)
end

dofile((os.getenv("WRK_LIB") or "benches/wrk") .. "/result.lua")
