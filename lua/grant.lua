--[[
grant: set the one-off credits of the user's current period to the total Postgres records
(setting, not adding, so a repeated call or a concurrent seed never counts a grant twice).

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] settle stream, KEYS[4] due zset
ARGV[1] user id
ARGV[2] record prefix
ARGV[3] credits of the period in total
ARGV[4] the period they belong to (start, unix seconds): ignored when Redis is in another one

Returns {code, answer}, answer as in usage.lua ("plan|limit|used|reserved|credits|ps|pe"):
  OK (0); NOT_LOADED (-1).
]]
local state, holds, stream, due_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, record_prefix, credits, period_start = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local now = now_ms()
if not touch(state, holds, record_prefix, stream, user, now) then return {NOT_LOADED, ''} end
if redis.call('HGET', state, 'ps') == period_start then
  redis.call('HSET', state, 'credits', credits)
end
local u = usage_of(state)
return {OK, join({u.plan, u.limit, u.used, u.reserved, u.credits, u.ps, u.pe})}
