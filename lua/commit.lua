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
ARGV[7] '1' to charge a reservation Redis has no record of; '0' answers NOT_FOUND instead, so
        the caller can first ask Postgres whether it was settled before Redis lost the record

Returns {code, charged, released, used, reserved, limit, late, plan, ps, pe, held} (late 1 or 0;
held: the tokens the hold had, 0 when late): OK (0); REPLAYED (1) the first answer;
or {code} alone: NOT_LOADED (-1); NOT_FOUND (-4) no record (ARGV[7] '0');
  IDEMPOTENCY_CONFLICT (-3) committed before with other tokens; ALREADY_REFUNDED (-6).
A refund of an expired hold settled nothing (the expiry did): a commit after it is late, charged.
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[4], due = KEYS[5], user = ARGV[1],
  prefix = ARGV[5]}
local record, rid, tokens, metadata = KEYS[3], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local thresholds, charge_unknown = ARGV[6], ARGV[7] == '1'

local now = now_ms()
local s = touch(k, now, false, true)
if not s then return {NOT_LOADED} end

local r = redis.call('HMGET', record, 's', 'g', 'ct', 'cb', 'md')
local status = r[1]
if status == 'C' then
  if tonumber(r[3]) ~= tokens then return {IDEMPOTENCY_CONFLICT} end
  return replay(REPLAYED, r[4])
end
if status == 'R' then return {ALREADY_REFUNDED} end
if not status and not charge_unknown then return {NOT_FOUND} end

-- A late commit (expired or unknown) has no hold left: an expired one was already released and
-- streamed, and this settlement replaces it.
local held, released = 0, 0
if status == 'H' then
  held = tonumber(r[2])
  released = math.max(held - tokens, 0)
  s.reserved = s.reserved - held
  redis.call('ZREM', k.holds, rid)
end
local late = status == 'H' and 0 or 1
s.used = s.used + tokens

if metadata == '' then
  metadata = r[5] or ''
elseif r[5] then
  local merged = cjson.decode(r[5])
  for key, v in pairs(cjson.decode(metadata)) do merged[key] = v end
  metadata = cjson.encode(merged)
end

local answer = {tokens, released, s.used, s.reserved, limit_of(s), late, s.plan, s.ps, s.pe, held}
redis.call('HSET', record, 's', 'C', 'ct', tokens, 'cb', keep(answer))
redis.call('PEXPIRE', record, SETTLED_RETENTION_MS)
redis.call('XADD', k.stream, '*', 'k', 'committed', 'u', k.user, 'r', rid, 'tr', held,
  'tc', tokens, 'l', late, 'md', metadata, 't', now, 'ps', s.ps)
if tokens > 0 then s.al = fire_alerts(k, s, thresholds, now) end
redis.call('HSET', k.state, 'reserved', s.reserved, 'used', s.used, 'al', s.al)
table.insert(answer, 1, OK)
return answer
