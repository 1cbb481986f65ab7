-- wrk script: POST /v1/batch with BATCH debits (default 100) per request, each with a
-- distinct idempotency key, spread round-robin over AGENTS agents (bench-0 .. bench-N-1).
-- Env: TALLY_TOKEN, AGENTS (default 64), BATCH (default 100).
local token = os.getenv("TALLY_TOKEN") or ""
local agents = tonumber(os.getenv("AGENTS") or "64")
local batch = tonumber(os.getenv("BATCH") or "100")
local run = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
local next_id = 0
local threads = {}

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

-- Items answered 201 (a 200 envelope may hold refused items: overloaded, denied).
ok_items = 0
function response(status, headers, body)
  local _, n = string.gsub(body, '"status":201', "")
  ok_items = ok_items + n
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
local result_line = done
function done(summary, latency, requests)
  result_line(summary, latency, requests)
  local ok = 0
  for _, t in ipairs(threads) do ok = ok + t:get("ok_items") end
  io.write(string.format("ITEMS ok=%d ok_per_s=%.0f\n", ok, ok / (summary.duration / 1e6)))
end
