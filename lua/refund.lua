--[[
refund: void a reservation's hold (the LLM call failed); nothing is charged.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] record hash, KEYS[4] settle stream,
KEYS[5] due zset (as in reserve.lua)
ARGV[1] user id
ARGV[2] reservation id
ARGV[3] record prefix

Returns {code, status, released, used, reserved, limit, plan, ps, pe} with status 'refunded',
or 'expired' when the hold had already expired: OK (0); REPLAYED (1) the first answer;
or {code} alone: NOT_LOADED (-1); NOT_FOUND (-4) no record (the caller may ask Postgres whether
it was settled before Redis lost the record); ALREADY_COMMITTED (-5).
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[4], due = KEYS[5], user = ARGV[1],
  prefix = ARGV[3]}
local record, rid = KEYS[3], ARGV[2]

local now = now_ms()
local s = touch(k, now)
if not s then return {NOT_LOADED} end

local r = redis.call('HMGET', record, 's', 'g', 'rb', 'md')
local status, held = r[1], tonumber(r[2]) or 0
if not status then return {NOT_FOUND} end
if r[3] then return replay(REPLAYED, r[3]) end
if status == 'C' then return {ALREADY_COMMITTED} end

local outcome = 'expired'
if status == 'H' then
  outcome = 'refunded'
  s.reserved = s.reserved - held
  redis.call('HSET', k.state, 'reserved', s.reserved)
  redis.call('ZREM', k.holds, rid)
  redis.call('XADD', k.stream, '*', 'k', 'refunded', 'u', k.user, 'r', rid, 'tr', held,
    'tc', 0, 'l', 0, 'md', r[4] or '', 't', now, 'ps', s.ps)
end

local answer = {outcome, held, s.used, s.reserved, limit_of(s), s.plan, s.ps, s.pe}
redis.call('HSET', record, 's', status == 'H' and 'R' or status, 'rb', keep(answer))
redis.call('PEXPIRE', record, SETTLED_RETENTION_MS)
table.insert(answer, 1, OK)
return answer
