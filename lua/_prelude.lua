--[[
Shared prelude: quota_common.scripts puts this text in front of every operation script, so the
period and expiry rules live in one place while each operation stays one EVALSHA.

A user's keys share the bucket hash tag ({bN}), so every key a script touches, declared or
derived from the record prefix, sits in one slot and the scripts run unchanged on Redis Cluster.

State hash fields: plan, quota (tokens of the plan), credits (one-off tokens of this period),
used, reserved, ps/pe (period start/end, unix seconds), np/nq (plan and quota that take over
at pe; absent = same plan), al (highest alert threshold fired this period, percent).
Reservation record fields: s (status H held, C committed, R refunded, E expired), g (tokens
held), x (expires at, unix ms), f (reserve fingerprint), md (metadata JSON), sb (reserve
answer), ct (committed tokens), cb (commit answer), rb (refund answer).
]]

-- How long a settled reservation is remembered for replays, in ms (24 h).
local SETTLED_RETENTION_MS = 86400000
-- Expired holds settled per batch (bounds ZREM's unpack); a call sweeps batches until none is
-- left, so an expired hold never counts, however many a user has.
local SWEEP_BATCH_MAX = 256

-- Lua 5.1 prints numbers with %.14g (1e+14 for 10^14): answers and stream fields use %d, exact up
-- to 2^53, so a large counter never reaches a caller as an exponent.
local function int(x)
  return string.format('%d', x)
end

-- An answer string "a|b|c" (see each script's header).
local function join(values)
  for i, v in ipairs(values) do
    if type(v) == 'number' then values[i] = int(v) end
  end
  return table.concat(values, '|')
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Civil date <-> days since 1970-01-01 (Howard Hinnant's algorithms), for UTC calendar months.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function year_month_of(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local function month_bounds(now_s)
  local y, m = year_month_of(math.floor(now_s / 86400))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

-- Starts a new period when the current one has ended: usage, credits and alerts start from
-- zero, a scheduled plan (np/nq) takes over, FREE follows calendar months and a paid plan
-- repeats its period length until Stripe's renewal is applied.
local function roll_period(state, now_s)
  local f = redis.call('HMGET', state, 'plan', 'ps', 'pe', 'np', 'nq')
  local pe = tonumber(f[3])
  if now_s < pe then return end
  local ps = tonumber(f[2])
  local plan = f[4] or f[1]
  if plan == 'FREE' then
    ps, pe = month_bounds(now_s)
  else
    local length = math.max(pe - ps, 1)
    local skipped = math.floor((now_s - pe) / length)
    ps = pe + skipped * length
    pe = ps + length
  end
  redis.call('HSET', state, 'plan', plan, 'ps', ps, 'pe', pe, 'used', 0, 'credits', 0, 'al', 0)
  if f[5] then redis.call('HSET', state, 'quota', f[5]) end
  redis.call('HDEL', state, 'np', 'nq')
end

-- Settles every hold of the user whose expiry has passed: the tokens stop counting and the
-- settlement goes to the bucket's stream for the sync worker, in this same call.
local function sweep_expired(state, holds, record_prefix, stream, user, now)
  local ps = nil
  repeat
    local due = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, SWEEP_BATCH_MAX)
    if #due == 0 then return end
    local released = 0
    ps = ps or redis.call('HGET', state, 'ps')
    for _, rid in ipairs(due) do
      local record = record_prefix .. rid
      local r = redis.call('HMGET', record, 'g', 'md')
      local held = tonumber(r[1]) or 0
      released = released + held
      redis.call('HSET', record, 's', 'E')
      redis.call('PEXPIRE', record, SETTLED_RETENTION_MS)
      redis.call('XADD', stream, '*', 'k', 'expired', 'u', user, 'r', rid, 'tr', int(held), 'tc', 0,
        'l', 0, 'md', r[2] or '', 't', int(now), 'ps', ps)
    end
    redis.call('ZREM', holds, unpack(due))
    if released > 0 then redis.call('HINCRBY', state, 'reserved', -released) end
  until #due < SWEEP_BATCH_MAX
end

-- Keeps the bucket's due set (user -> earliest hold expiry) true enough for the reaper: a score
-- may be early (the reaper then finds nothing), never late.
local function track_due(holds, due_set, user)
  local first = redis.call('ZRANGE', holds, 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', due_set, first[2], user)
  else
    redis.call('ZREM', due_set, user)
  end
end

local function usage_of(state)
  local f = redis.call('HMGET', state, 'plan', 'quota', 'credits', 'used', 'reserved', 'ps', 'pe')
  local credits = tonumber(f[3]) or 0
  return {
    plan = f[1], limit = tonumber(f[2]) + credits, credits = credits,
    used = tonumber(f[4]), reserved = tonumber(f[5]), ps = f[6], pe = f[7],
  }
end

-- Brings a loaded user's state up to date; false when Redis does not know the user.
local function touch(state, holds, record_prefix, stream, user, now)
  if redis.call('EXISTS', state) == 0 then return false end
  roll_period(state, math.floor(now / 1000))
  sweep_expired(state, holds, record_prefix, stream, user, now)
  return true
end

-- Adds an alert entry to the stream for each threshold (percent of the limit) that usage has
-- reached for the first time this period; `al` remembers the highest one fired.
local function fire_alerts(state, stream, user, u, thresholds, now)
  local fired = tonumber(redis.call('HGET', state, 'al')) or 0
  local highest = fired
  for percent in string.gmatch(thresholds, '%d+') do
    percent = tonumber(percent)
    if percent > fired and u.used * 100 >= percent * u.limit then
      highest = percent
      redis.call('XADD', stream, '*', 'k', 'alert', 'u', user, 'th', percent, 'lim', int(u.limit),
        'used', int(u.used), 'ps', u.ps, 'pe', u.pe, 't', int(now))
    end
  end
  if highest > fired then redis.call('HSET', state, 'al', highest) end
end

-- Mirrors quota_common.codes.Code.
local OK, REPLAYED, NOT_LOADED = 0, 1, -1
local QUOTA_EXCEEDED, IDEMPOTENCY_CONFLICT, NOT_FOUND = -2, -3, -4
local ALREADY_COMMITTED, ALREADY_REFUNDED, EXPIRED, BELOW_HOLD = -5, -6, -7, -8
