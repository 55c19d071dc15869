--[[
refund: void a reservation's hold (the LLM call failed); nothing is charged.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] record hash, KEYS[4] settle stream,
KEYS[5] due zset (as in reserve.lua)
ARGV[1] user id
ARGV[2] reservation id
ARGV[3] record prefix

Returns {code, answer}, answer = "status|released|used|reserved|limit|plan|ps|pe" with status
'refunded', or 'expired' when the hold had already expired:
  OK (0); REPLAYED (1) the first answer; NOT_LOADED (-1); NOT_FOUND (-4);
  ALREADY_COMMITTED (-5).
]]
local state, holds, record, stream, due_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user, rid, record_prefix = ARGV[1], ARGV[2], ARGV[3]

local now = now_ms()
if not touch(state, holds, record_prefix, stream, user, now) then return {NOT_LOADED, ''} end

local r = redis.call('HMGET', record, 's', 'g', 'rb', 'md')
local status, held = r[1], tonumber(r[2]) or 0
if not status then return {NOT_FOUND, ''} end
-- A refund answered before replays even if a late commit charged the expired hold since.
if r[3] then return {REPLAYED, r[3]} end
if status == 'C' then return {ALREADY_COMMITTED, ''} end

local outcome = 'expired'
if status == 'H' then
  outcome = 'refunded'
  redis.call('HINCRBY', state, 'reserved', -held)
  redis.call('ZREM', holds, rid)
  track_due(holds, due_set, user)
  redis.call('XADD', stream, '*', 'k', 'refunded', 'u', user, 'r', rid, 'tr', held, 'tc', 0,
    'l', 0, 'md', r[4] or '', 't', int(now), 'ps', redis.call('HGET', state, 'ps'))
end

local u = usage_of(state)
local answer = join({outcome, held, u.used, u.reserved, u.limit, u.plan, u.ps, u.pe})
redis.call('HSET', record, 's', status == 'H' and 'R' or status, 'rb', answer)
redis.call('PEXPIRE', record, SETTLED_RETENTION_MS)
return {OK, answer}
