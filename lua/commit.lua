--[[
commit: settle a reservation by charging the tokens really used and releasing its hold.
A commit for an expired or unknown reservation still charges (late): usage is never dropped.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] record hash, KEYS[4] settle stream,
KEYS[5] due zset (as in reserve.lua)
ARGV[1] user id
ARGV[2] reservation id
ARGV[3] tokens used (integer >= 0)
ARGV[4] metadata JSON of the commit ('' = keep the reservation's)
ARGV[5] record prefix
ARGV[6] alert thresholds, percents ascending ("80,90,100"): each one crossed for the first
        time this period adds an alert entry to the stream

Returns {code, answer}, answer = "charged|released|used|reserved|limit|late|plan|ps|pe":
  OK (0); REPLAYED (1) the first answer; NOT_LOADED (-1);
  IDEMPOTENCY_CONFLICT (-3) committed before with other tokens; ALREADY_REFUNDED (-6).
]]
local state, holds, record, stream, due_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user, rid, tokens, metadata = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local record_prefix, thresholds = ARGV[5], ARGV[6]

local now = now_ms()
if not touch(state, holds, record_prefix, stream, user, now) then return {NOT_LOADED, ''} end

local r = redis.call('HMGET', record, 's', 'g', 'ct', 'cb', 'md')
local status, held = r[1], tonumber(r[2]) or 0
if status == 'C' then
  if tonumber(r[3]) ~= tokens then return {IDEMPOTENCY_CONFLICT, ''} end
  return {REPLAYED, r[4]}
end
if status == 'R' then return {ALREADY_REFUNDED, ''} end

local late = status ~= 'H'
local released = 0
if not late then
  released = math.max(held - tokens, 0)
  redis.call('HINCRBY', state, 'reserved', -held)
  redis.call('ZREM', holds, rid)
  track_due(holds, due_set, user)
else
  -- The expired hold was already released and streamed; this settlement replaces it.
  held = 0
end
if tokens > 0 then redis.call('HINCRBY', state, 'used', tokens) end

if metadata == '' then
  metadata = r[5] or ''
elseif r[5] and r[5] ~= '' then
  local merged = cjson.decode(r[5])
  for k, v in pairs(cjson.decode(metadata)) do merged[k] = v end
  metadata = cjson.encode(merged)
end

local u = usage_of(state)
local answer = join({tokens, released, u.used, u.reserved, u.limit, late and 1 or 0,
  u.plan, u.ps, u.pe})
redis.call('HSET', record, 's', 'C', 'ct', tokens, 'cb', answer)
redis.call('PEXPIRE', record, SETTLED_RETENTION_MS)
redis.call('XADD', stream, '*', 'k', 'committed', 'u', user, 'r', rid, 'tr', held, 'tc', tokens,
  'l', late and 1 or 0, 'md', metadata, 't', int(now), 'ps', u.ps)
if tokens > 0 then fire_alerts(state, stream, user, u, thresholds, now) end
return {OK, answer}
