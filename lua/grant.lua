--[[
grant: set the one-off credits of the user's current period to the total Postgres records
(setting, not adding, so a repeated call or a concurrent seed never counts a grant twice).

KEYS[1] state hash, KEYS[2] holds zset, KEYS[3] settle stream, KEYS[4] due zset
ARGV[1] user id
ARGV[2] record prefix
ARGV[3] credits of the period in total
ARGV[4] the period they belong to (start, unix seconds)

Returns {code, answer}, answer as in usage.lua ("plan|limit|used|reserved|credits|ps|pe"):
  OK (0); NOT_LOADED (-1); OTHER_PERIOD (2) Redis is in another period than ARGV[4] (by its
  clock, or awaiting a plan push): nothing changed, the answer shows Redis' period.
]]
local k = {state = KEYS[1], holds = KEYS[2], stream = KEYS[3], due = KEYS[4], user = ARGV[1],
  prefix = ARGV[2]}
local credits, period_start = tonumber(ARGV[3]), tonumber(ARGV[4])

local s = touch(k, now_ms())
if not s then return {NOT_LOADED, ''} end
if s.ps ~= period_start then return {OTHER_PERIOD, usage_answer(s)} end
s.credits = credits
redis.call('HSET', k.state, 'credits', int(credits))
return {OK, usage_answer(s)}
