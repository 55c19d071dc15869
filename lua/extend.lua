--[[
extend: raise an open hold to a new total (a streamed answer outgrew its estimate) and, with a
ttl, move its expiry. The total is named, not the increment, so a retry changes nothing.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] record hash, KEYS[4] settle stream,
KEYS[5] due zset (as in reserve.lua)
ARGV[1] user id
ARGV[2] reservation id
ARGV[3] tokens: the hold's new total (integer >= 1)
ARGV[4] new ttl from now, ms (0 = keep the expiry)
ARGV[5] record prefix

Returns {code, plan, granted, limit, used, reserved, ps, pe, expires_ms, added} as in
reserve.lua (granted: the new total; added: the tokens this call added to the hold):
  OK (0); QUOTA_EXCEEDED (-2) the hold stays as it was (granted, expires_ms, added 0);
  BELOW_HOLD (-8) the total asked is less than the hold: {code, tokens held};
or {code} alone: NOT_LOADED (-1); NOT_FOUND (-4); ALREADY_COMMITTED (-5);
  ALREADY_REFUNDED (-6); EXPIRED (-7).
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[4], due = KEYS[5], user = ARGV[1],
  prefix = ARGV[5]}
local record, rid, tokens, ttl_ms = KEYS[3], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local now = now_ms()
local s = touch(k, now)
if not s then return {NOT_LOADED} end

local r = redis.call('HMGET', record, 's', 'g', 'x')
local status, held, expires = r[1], tonumber(r[2]), tonumber(r[3])
if not status then return {NOT_FOUND} end
if status == 'C' then return {ALREADY_COMMITTED} end
if status == 'R' then return {ALREADY_REFUNDED} end
-- A hold past its expiry that a bounded sweep has not reached yet is expired all the same.
if status == 'E' or expires <= now then return {EXPIRED} end
if tokens < held then return {BELOW_HOLD, held} end

local limit = limit_of(s)
local added = tokens - held
if added > limit - s.used - s.reserved then
  return {QUOTA_EXCEEDED, s.plan, 0, limit, s.used, s.reserved, s.ps, s.pe, 0, 0}
end
if ttl_ms > 0 then
  expires = now + ttl_ms
  redis.call('ZADD', k.holds, expires, rid)
end
s.reserved = s.reserved + added
redis.call('HSET', record, 'g', tokens, 'x', expires)
save_hold(k, s, expires)
return {OK, s.plan, tokens, limit, s.used, s.reserved, s.ps, s.pe, expires, added}
