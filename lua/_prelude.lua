--[[
Shared prelude: quota_common.scripts puts this text in front of every operation script, so the
period and expiry rules live in one place while each operation stays one EVALSHA.

A user's keys share the bucket hash tag ({bN}), so every key a script touches, declared or
derived from the record prefix, sits in one slot and the scripts run unchanged on Redis Cluster.

State hash fields: plan, quota (tokens of the plan), credits (one-off tokens of this period),
used, reserved, ps/pe (period start/end, unix seconds), np/nq (plan and quota that take over
at pe; absent = same plan), al (highest alert threshold fired this period, percent), ex (no
hold of the user expires before it, unix ms; absent = no hold, since reserve and extend set it
and only a sweep that leaves no hold removes it).

Scripts name a user's keys in a table k: state, holds, stream, due (the KEYS of the call), user
(the user id) and prefix (the record prefix q:{bN}:r:<user>/).
Reservation record fields: s (status H held, C committed, R refunded, E expired), g (tokens
held), x (expires at, unix ms), f (reserve fingerprint), md (metadata JSON, absent = none),
sb (reserve answer), ct (committed tokens), cb (commit answer), rb (refund answer); the
answers are kept msgpack-packed for replays.

The hot scripts (reserve, extend, commit, refund) answer flat arrays {code, value, ...} and pass
numbers to redis.call as numbers: Redis converts both exactly (up to 2^53) and far cheaper than
Lua's own number formatting, which was a third of a reserve's cost.
]]

-- How long a settled reservation is remembered for replays, in ms (24 h).
local SETTLED_RETENTION_MS = 86400000
-- A user's state stays this long after the end of the last period they made a call in, then
-- Redis drops it (the next call loads it from Postgres again): Redis holds the users of the
-- last weeks, not everyone ever seen. Every hold has expired and been streamed by then.
local IDLE_STATE_RETENTION_S = 7 * 86400
-- Expired holds settled per batch (bounds ZREM's unpack), and per call: a user with more holds
-- expiring at once has the rest settled by the next calls (and the reaper), so one call never
-- blocks Redis for long; until then those holds still count (never too much is granted).
local SWEEP_BATCH_MAX = 256
local SWEEP_BATCHES_MAX = 4

-- Lua 5.1 prints numbers with %.14g (1e+14 for 10^14): the answers the scripts format themselves
-- (usage.lua's) use %d, exact up to 2^53, so a large counter never reaches a caller as an
-- exponent. Numbers passed to redis.call are converted by Redis, exactly.
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

-- The user's state in one call, as numbers where they are numbers; nil when Redis does not know
-- the user. Operations decide on this table and write back only the fields they change. Each
-- field read costs, so np/nq (read when the period rolls) and al (by commits) are not read here.
local function read_state(key, with_alerts)
  local fields = {'plan', 'quota', 'credits', 'used', 'reserved', 'ps', 'pe', 'ex'}
  if with_alerts then fields[9] = 'al' end
  local f = redis.call('HMGET', key, unpack(fields))
  if not f[1] then return nil end
  return {
    plan = f[1], quota = tonumber(f[2]), credits = tonumber(f[3]) or 0, used = tonumber(f[4]),
    reserved = tonumber(f[5]), ps = tonumber(f[6]), pe = tonumber(f[7]), ex = tonumber(f[8]),
    al = tonumber(f[9]) or 0,
  }
end

local function limit_of(s)
  return s.quota + s.credits
end

-- Drops the state IDLE_STATE_RETENTION_S after `period_end` unless a later period renews it.
local function keep_until_idle(key, period_end)
  redis.call('PEXPIREAT', key, (period_end + IDLE_STATE_RETENTION_S) * 1000)
end

-- Starts a new period when the current one has ended: usage, credits and alerts start from
-- zero, a scheduled plan (np/nq) takes over, FREE follows calendar months and a paid plan
-- repeats its period length until Stripe's renewal is applied.
local function roll_period(key, s, now_s)
  if now_s < s.pe then return end
  local scheduled = redis.call('HMGET', key, 'np', 'nq')
  s.plan = scheduled[1] or s.plan
  if s.plan == 'FREE' then
    s.ps, s.pe = month_bounds(now_s)
  else
    local length = math.max(s.pe - s.ps, 1)
    s.ps = s.pe + math.floor((now_s - s.pe) / length) * length
    s.pe = s.ps + length
  end
  s.quota = tonumber(scheduled[2]) or s.quota
  s.used, s.credits, s.al = 0, 0, 0
  redis.call('HSET', key, 'plan', s.plan, 'quota', s.quota, 'ps', s.ps, 'pe', s.pe,
    'used', 0, 'credits', 0, 'al', 0)
  redis.call('HDEL', key, 'np', 'nq')
  keep_until_idle(key, s.pe)
end

-- Settles every hold of the user whose expiry has passed: the tokens stop counting and the
-- settlement goes to the bucket's stream for the sync worker, in this same call. Then `ex` and
-- the bucket's due set (for the reaper) name the next expiry exactly.
local function sweep_expired(k, s, now)
  local batches = 0
  repeat
    local due = redis.call('ZRANGEBYSCORE', k.holds, '-inf', now, 'LIMIT', 0, SWEEP_BATCH_MAX)
    for _, rid in ipairs(due) do
      local record = k.prefix .. rid
      local r = redis.call('HMGET', record, 'g', 'md')
      local held = tonumber(r[1]) or 0
      s.reserved = s.reserved - held
      redis.call('HSET', record, 's', 'E')
      redis.call('PEXPIRE', record, SETTLED_RETENTION_MS)
      redis.call('XADD', k.stream, '*', 'k', 'expired', 'u', k.user, 'r', rid, 'tr', held,
        'tc', 0, 'l', 0, 'md', r[2] or '', 't', now, 'ps', s.ps)
    end
    if #due > 0 then redis.call('ZREM', k.holds, unpack(due)) end
    batches = batches + 1
  until #due < SWEEP_BATCH_MAX or batches == SWEEP_BATCHES_MAX
  local next_hold = redis.call('ZRANGE', k.holds, 0, 0, 'WITHSCORES')
  s.ex = tonumber(next_hold[2])
  if s.ex then
    redis.call('HSET', k.state, 'reserved', s.reserved, 'ex', next_hold[2])
    redis.call('ZADD', k.due, next_hold[2], k.user)
  else
    redis.call('HSET', k.state, 'reserved', s.reserved)
    redis.call('HDEL', k.state, 'ex')
    redis.call('ZREM', k.due, k.user)
  end
end

-- The user's state brought up to date (period rolled, expired holds settled), or nil when Redis
-- does not know the user. `ex` is a lower bound of the user's hold expiries (commits and refunds
-- leave it early), so the holds are only looked at when one may have expired; `sweep` forces
-- the look (the reaper's call, which also corrects an early due score).
local function touch(k, now, sweep, with_alerts)
  local s = read_state(k.state, with_alerts)
  if not s then return nil end
  roll_period(k.state, s, math.floor(now / 1000))
  if sweep or (s.ex and s.ex <= now) then sweep_expired(k, s, now) end
  return s
end

-- Writes the state's `reserved` after a hold was placed or raised. The hold's expiry can only
-- move `ex` and the due score earlier (a score may be early, never late).
local function save_hold(k, s, expires)
  if s.ex and s.ex <= expires then
    redis.call('HSET', k.state, 'reserved', s.reserved)
  else
    s.ex = expires
    redis.call('HSET', k.state, 'reserved', s.reserved, 'ex', expires)
    redis.call('ZADD', k.due, 'LT', expires, k.user)
  end
end

-- A settled answer kept for replays: its values, packed.
local function keep(values)
  return cmsgpack.pack(values)
end

-- {code, value...}: a kept answer replayed under another code.
local function replay(code, kept)
  local values = cmsgpack.unpack(kept)
  table.insert(values, 1, code)
  return values
end

-- The answer of usage.lua, grant.lua and reset.lua: "plan|limit|used|reserved|credits|ps|pe".
local function usage_answer(s)
  return join({s.plan, limit_of(s), s.used, s.reserved, s.credits, s.ps, s.pe})
end

-- Adds an alert entry to the stream for each threshold (percent of the limit) that usage has
-- reached for the first time this period; returns the highest threshold fired so far (`al`).
local function fire_alerts(k, s, thresholds, now)
  local limit, highest = limit_of(s), s.al
  for percent in string.gmatch(thresholds, '%d+') do
    percent = tonumber(percent)
    if percent > s.al and s.used * 100 >= percent * limit then
      highest = percent
      redis.call('XADD', k.stream, '*', 'k', 'alert', 'u', k.user, 'th', percent,
        'lim', limit, 'used', s.used, 'ps', s.ps, 'pe', s.pe, 't', now)
    end
  end
  return highest
end

-- Mirrors quota_common.codes.Code.
local OK, REPLAYED, OTHER_PERIOD, NOT_LOADED = 0, 1, 2, -1
local QUOTA_EXCEEDED, IDEMPOTENCY_CONFLICT, NOT_FOUND = -2, -3, -4
local ALREADY_COMMITTED, ALREADY_REFUNDED, EXPIRED, BELOW_HOLD = -5, -6, -7, -8
