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

Returns {code, answer}, answer = "plan|granted|limit|used|reserved|ps|pe|expires_ms":
  OK (0) hold placed; REPLAYED (1) the first answer of this reservation id;
  NOT_LOADED (-1) the user is not in Redis (load from Postgres, then call again);
  QUOTA_EXCEEDED (-2) nothing held (granted and expires_ms are 0);
  IDEMPOTENCY_CONFLICT (-3) the id was used with other fields (answer '').
]]
local state, holds, record, stream, due_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user, rid = ARGV[1], ARGV[2]
local tokens, min_tokens, ttl_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local metadata, record_prefix = ARGV[6], ARGV[7]
local fingerprint = ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. metadata

local now = now_ms()
if not touch(state, holds, record_prefix, stream, user, now) then return {NOT_LOADED, ''} end

-- An id already settled by a late commit has no fingerprint: any reserve with it conflicts.
local known = redis.call('HMGET', record, 's', 'f', 'sb')
if known[1] then
  if known[2] ~= fingerprint then return {IDEMPOTENCY_CONFLICT, ''} end
  return {REPLAYED, known[3]}
end

local u = usage_of(state)
local available = u.limit - u.used - u.reserved
local granted = tokens
if tokens > available then
  if min_tokens > 0 and available >= min_tokens then
    granted = available
  else
    return {QUOTA_EXCEEDED, join({u.plan, 0, u.limit, u.used, u.reserved, u.ps, u.pe, 0})}
  end
end

local expires = now + ttl_ms
local reserved = redis.call('HINCRBY', state, 'reserved', granted)
local answer = join({u.plan, granted, u.limit, u.used, reserved, u.ps, u.pe, expires})
redis.call('HSET', record, 's', 'H', 'g', granted, 'x', expires, 'f', fingerprint, 'md', metadata,
  'sb', answer)
redis.call('ZADD', holds, expires, rid)
-- LT adds a new user and only ever moves an existing one earlier.
redis.call('ZADD', due_set, 'LT', expires, user)
return {OK, answer}
