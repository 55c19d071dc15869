--[[
apply_plan: put a user's plan, period and credits, as Postgres now records them, into Redis.
A user Redis does not know is left alone: the next call seeds it from Postgres anyway.

The caller computed the period on its own clock. Only a period that is current by Redis' clock
is applied: one that has ended (Redis may have rolled into the next one already) or has not
begun would roll the user's period back, or start the next one early, and zero usage made
since. The caller reads the account again at Redis' time and pushes again.

Credits only grow within a period: a push that read the grants before an operator's grant
committed never takes that grant back (a period of its own takes Postgres' total as it is).

KEYS[1] state hash
ARGV[1] plan          ARGV[2] quota (tokens of the plan)   ARGV[3] credits of the period
ARGV[4] used in that period as Postgres knows it (taken only when the period changes)
ARGV[5] period start, ARGV[6] period end (unix seconds)
ARGV[7] plan after the period end ('' = same)   ARGV[8] its quota ('' = same)

Returns APPLIED (1) the state was updated; UNKNOWN_USER (0) Redis does not know the user;
NOT_CURRENT (2) the period is not the current one by Redis' clock: nothing changed.
]]
local state = KEYS[1]
local period_start, period_end = tonumber(ARGV[5]), tonumber(ARGV[6])
local UNKNOWN_USER, APPLIED, NOT_CURRENT = 0, 1, 2

local s = read_state(state)
if not s then return UNKNOWN_USER end
local now_s = math.floor(now_ms() / 1000)
if now_s < period_start or now_s >= period_end then return NOT_CURRENT end

local credits = tonumber(ARGV[3])
if s.ps ~= period_start then
  -- A new period (a subscription started or ended): its own usage and alerts.
  redis.call('HSET', state, 'used', ARGV[4], 'al', 0)
else
  credits = math.max(credits, s.credits)
end
redis.call('HSET', state, 'plan', ARGV[1], 'quota', ARGV[2], 'credits', int(credits), 'ps',
  ARGV[5], 'pe', ARGV[6])
if ARGV[7] ~= '' then
  redis.call('HSET', state, 'np', ARGV[7], 'nq', ARGV[8])
else
  redis.call('HDEL', state, 'np', 'nq')
end
keep_until_idle(state, period_end)
return APPLIED
