-- One durable debit in Redis, the same work as tally's debit: the idempotency record (24 h
-- TTL), GCRA, the monthly cap, the balance, a journal entry. Loaded once (SCRIPT LOAD) and
-- called with EVALSHA by run.sh. Standalone Redis only: the idempotency key is derived from
-- the agent's key inside the script and the journal is one stream for all agents.
-- KEYS[1] the agent's hash (balance, tat_us, interval_us, tolerance_us, cap_micros, period,
--         spent_micros, seq), KEYS[2] the journal stream.
-- ARGV[1] the idempotency key, ARGV[2] amount_micros.
-- Returns the receipt; a replay returns the stored one (and counts stat:replayed); a denial
-- returns "denied:<why>" (and counts stat:denied).
local agent, journal = KEYS[1], KEYS[2]
local key, amount = ARGV[1], tonumber(ARGV[2])
local idem = 'idem:' .. agent .. ':' .. key

local prev = redis.call('GET', idem)
if prev then
  redis.call('INCR', 'stat:replayed')
  return prev
end

local a = redis.call('HMGET', agent, 'balance', 'tat_us', 'interval_us', 'tolerance_us',
  'cap_micros', 'period', 'spent_micros', 'seq')
if not a[1] then return redis.error_reply('ERR unknown agent ' .. agent) end
local balance, tat, interval, tolerance = tonumber(a[1]), tonumber(a[2]), tonumber(a[3]), tonumber(a[4])
local cap, period, spent, seq = tonumber(a[5]), tonumber(a[6]), tonumber(a[7]), tonumber(a[8])

local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs * 1000000 + tonumber(t[2])

local function deny(why)
  redis.call('INCR', 'stat:denied')
  return 'denied:' .. why
end

-- GCRA (governor's): conforming while the theoretical arrival time is at most
-- `tolerance` ahead of now; each request moves it on by one emission interval.
local tat0 = math.max(tat, now)
if tat0 - now > tolerance then return deny('rate-limited') end

-- Monthly cap over calendar months in UTC (civil date from days, H. Hinnant).
local z = math.floor(secs / 86400) + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local month = mp < 10 and mp + 3 or mp - 9
local year = yoe + era * 400 + (month <= 2 and 1 or 0)
local this_period = year * 100 + month
if this_period ~= period then spent = 0 end
if spent + amount > cap then return deny('monthly-cap') end

if balance < amount then return deny('insufficient-funds') end

balance = balance - amount
spent = spent + amount
seq = seq + 1
local f = function(n) return string.format('%d', n) end
redis.call('HSET', agent, 'balance', f(balance), 'tat_us', f(tat0 + interval),
  'period', f(this_period), 'spent_micros', f(spent), 'seq', f(seq))
redis.call('XADD', journal, '*', 'agent', agent, 'seq', f(seq), 'kind', 'debit',
  'amount_micros', f(amount), 'balance_micros', f(balance), 'idempotency_key', key, 'at_us', f(now))
local receipt = agent .. ':' .. f(seq) .. ':' .. f(balance)
redis.call('SET', idem, receipt, 'EX', 86400)
return receipt
