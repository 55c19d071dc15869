--[[
usage: a user's current usage, after rolling the period and settling expired holds. The reaper
calls it for users whose due score has passed: it always looks at the holds, and leaves the due
score on the next expiry.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] settle stream, KEYS[4] due zset
ARGV[1] user id
ARGV[2] record prefix

Returns {code, answer}, answer = "plan|limit|used|reserved|credits|ps|pe":
  OK (0); NOT_LOADED (-1) Redis does not know the user: its due entry, if any, is removed in
  this same call (a seed and a reserve in between would otherwise see theirs removed too).
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[3], due = KEYS[4], user = ARGV[1],
  prefix = ARGV[2]}

local s = touch(k, now_ms(), true)
if not s then
  redis.call('ZREM', k.due, k.user)
  return {NOT_LOADED, ''}
end
return {OK, usage_answer(s)}
