--[[
usage: a user's current usage, after rolling the period and settling expired holds.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] settle stream, KEYS[4] due zset
ARGV[1] user id
ARGV[2] record prefix

Returns {code, answer}, answer = "plan|limit|used|reserved|credits|ps|pe":
  OK (0); NOT_LOADED (-1).
]]
local state, holds, stream, due_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, record_prefix = ARGV[1], ARGV[2]

local now = now_ms()
if not touch(state, holds, record_prefix, stream, user, now) then return {NOT_LOADED, ''} end
track_due(holds, due_set, user)
local u = usage_of(state)
return {OK, join({u.plan, u.limit, u.used, u.reserved, u.credits, u.ps, u.pe})}
