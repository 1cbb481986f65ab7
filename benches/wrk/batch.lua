-- wrk script: POST /v1/batch with BATCH debits (default 100) per request, each with a
-- distinct idempotency key, spread round-robin over AGENTS agents (bench-0 .. bench-N-1).
-- Env: TALLY_TOKEN, AGENTS (default 64), BATCH (default 100).
local token = os.getenv("TALLY_TOKEN") or ""
local agents = tonumber(os.getenv("AGENTS") or "64")
local batch = tonumber(os.getenv("BATCH") or "100")
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end

local counter = 0

function request()
  local items = {}
  for i = 1, batch do
    counter = counter + 1
    local agent = (counter * 7 + tid) % agents
    items[i] = string.format(
      '{"op":"debit","agent_id":"bench-%d","idempotency_key":"%s-%d-%d","amount_micros":1}',
      agent, run, tid, counter)
  end
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }
  return wrk.format("POST", "/v1/batch", headers, '{"items":[' .. table.concat(items, ",") .. ']}')
end

dofile((os.getenv("WRK_LIB") or "benches/wrk") .. "/result.lua")
