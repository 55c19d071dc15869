--[[
reset: usage of the user's current period back to zero (an operator's decision). A reset entry
goes to the settle stream behind every settlement before it; its entry id is the reset's
position, which the sync worker and the operator endpoint record with the period's total, so
that no settlement from before it is ever counted again, whenever it reaches Postgres.

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] settle stream, KEYS[4] due zset
ARGV[1] user id
ARGV[2] record prefix
ARGV[3] the period to reset (start, unix seconds; absent = whichever is current)

Returns {code, answer}:
  OK (0), answer "plan|limit|used|reserved|credits|ps|pe|entry id" (usage.lua's answer, then
    the reset entry's stream id);
  NOT_LOADED (-1);
  OTHER_PERIOD (2) Redis is in another period than ARGV[3] (by its clock, or awaiting a plan
    push): nothing changed, answer as in usage.lua, showing Redis' period.
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[3], due = KEYS[4], user = ARGV[1],
  prefix = ARGV[2]}
local period_start = tonumber(ARGV[3])

local now = now_ms()
local s = touch(k, now)
if not s then return {NOT_LOADED, ''} end
if period_start and s.ps ~= period_start then return {OTHER_PERIOD, usage_answer(s)} end
s.used, s.al = 0, 0
redis.call('HSET', k.state, 'used', 0, 'al', 0)
local entry_id = redis.call('XADD', k.stream, '*', 'k', 'reset', 'u', k.user, 'ps', int(s.ps),
  't', int(now))
return {OK, usage_answer(s) .. '|' .. entry_id}
