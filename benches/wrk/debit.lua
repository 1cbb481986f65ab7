-- wrk script: POST /v1/agents/{id}/debits with a distinct Idempotency-Key per request,
-- spread round-robin over AGENTS agents (bench-0 .. bench-N-1).
-- Env: TALLY_TOKEN (bearer token), AGENTS (default 64), AMOUNT_MICROS (default 1),
-- KEY_PREFIX (for keys of its own when several wrk run at once).
local token = os.getenv("TALLY_TOKEN") or ""
local agents = tonumber(os.getenv("AGENTS") or "64")
local amount = os.getenv("AMOUNT_MICROS") or "1"
-- KEY_PREFIX tells apart wrk processes started in the same second (their unseeded
-- math.random gives the same number, so their keys would collide and replay).
local run = (os.getenv("KEY_PREFIX") or "") .. tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local counter = 0
local body = '{"amount_micros":' .. amount .. ',"task_type":"bench"}'

function init(args)
  math.randomseed(os.time() + tid)
end

function request()
  counter = counter + 1
  local agent = (counter * 7 + tid) % agents
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter,
  }
  return wrk.format("POST", "/v1/agents/bench-" .. agent .. "/debits", headers, body)
end

local non201 = 0
function response(status, headers, body)
  if status ~= 201 then
    non201 = non201 + 1
  end
end

dofile((os.getenv("WRK_LIB") or "benches/wrk") .. "/result.lua")
