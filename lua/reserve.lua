--[[
reserve: check the user's quota and place a hold, atomically; a known reservation id replays.

KEYS[1] state hash       q:{bN}:s:<user>
KEYS[2] holds zset       q:{bN}:h:<user>   reservation id -> expires at (unix ms)
KEYS[3] record hash      q:{bN}:r:<user>/<reservation id>
KEYS[4] settle stream    q:{bN}:settled
KEYS[5] due zset         q:{bN}:due        user -> earliest hold expiry (unix ms)
ARGV[1] user id
ARGV[2] reservation id
ARGV[3] tokens wanted (integer >= 1)
ARGV[4] min_tokens: smallest partial grant accepted (0 = all or nothing)
ARGV[5] ttl of the hold, ms
ARGV[6] metadata JSON ('' = none)
ARGV[7] record prefix    q:{bN}:r:<user>/

Returns {code, plan, granted, limit, used, reserved, ps, pe, expires_ms}:
  OK (0) hold placed; REPLAYED (1) the first answer of this reservation id;
  QUOTA_EXCEEDED (-2) nothing held (granted and expires_ms are 0);
or {code} alone: NOT_LOADED (-1) the user is not in Redis (load from Postgres, then call again);
  IDEMPOTENCY_CONFLICT (-3) the id was used with other fields.
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[4], due = KEYS[5], user = ARGV[1],
  prefix = ARGV[7]}
local record, rid = KEYS[3], ARGV[2]
local tokens, min_tokens, ttl_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local metadata = ARGV[6]
local fingerprint = ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. metadata

local now = now_ms()
local s = touch(k, now)
if not s then return {NOT_LOADED} end

-- A new id (the usual case) costs one field's read. An id already settled by a late commit
-- has no fingerprint: any reserve with it conflicts.
if redis.call('HGET', record, 's') then
  local known = redis.call('HMGET', record, 'f', 'sb')
  if known[1] ~= fingerprint then return {IDEMPOTENCY_CONFLICT} end
  return replay(REPLAYED, known[2])
end

local limit = limit_of(s)
local available = limit - s.used - s.reserved
local granted = tokens
if tokens > available then
  if min_tokens > 0 and available >= min_tokens then
    granted = available
  else
    return {QUOTA_EXCEEDED, s.plan, 0, limit, s.used, s.reserved, s.ps, s.pe, 0}
  end
end

local expires = now + ttl_ms
s.reserved = s.reserved + granted
local answer = {s.plan, granted, limit, s.used, s.reserved, s.ps, s.pe, expires}
if metadata == '' then
  redis.call('HSET', record, 's', 'H', 'g', granted, 'x', expires, 'f', fingerprint,
    'sb', keep(answer))
else
  redis.call('HSET', record, 's', 'H', 'g', granted, 'x', expires, 'f', fingerprint,
    'md', metadata, 'sb', keep(answer))
end
redis.call('ZADD', k.holds, expires, rid)
save_hold(k, s, expires)
table.insert(answer, 1, OK)
return answer
