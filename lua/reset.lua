--[[
reset: usage of the user's current period back to zero (an operator's decision). A reset entry
goes to the settle stream behind every settlement before it, so the sync worker applies the
reset to the period's total in the same order.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] settle stream, KEYS[4] due zset
ARGV[1] user id
ARGV[2] record prefix

Returns {code, answer}, answer as in usage.lua ("plan|limit|used|reserved|credits|ps|pe"):
  OK (0); NOT_LOADED (-1).
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[3], due = KEYS[4], user = ARGV[1],
  prefix = ARGV[2]}

local now = now_ms()
local s = touch(k, now)
if not s then return {NOT_LOADED, ''} end
s.used, s.al = 0, 0
redis.call('HSET', k.state, 'used', 0, 'al', 0)
redis.call('XADD', k.stream, '*', 'k', 'reset', 'u', k.user, 'ps', int(s.ps), 't', int(now))
return {OK, usage_answer(s)}
