--[[
apply_plan: put a user's plan, period and credits, as Postgres now records them, into Redis.
A user Redis does not know is left alone: the next call seeds it from Postgres anyway.

KEYS[1] state hash
ARGV[1] plan          ARGV[2] quota (tokens of the plan)   ARGV[3] credits of the period
ARGV[4] used in that period as Postgres knows it (taken only when the period changes)
ARGV[5] period start, ARGV[6] period end (unix seconds)
ARGV[7] plan after the period end ('' = same)   ARGV[8] its quota ('' = same)

Returns 1 when the state was updated, 0 when Redis does not know the user.
]]
local state = KEYS[1]
if redis.call('EXISTS', state) == 0 then return 0 end
if redis.call('HGET', state, 'ps') ~= ARGV[5] then
  -- A new period (a subscription started or ended): its own usage and alerts.
  redis.call('HSET', state, 'used', ARGV[4], 'al', 0)
end
redis.call('HSET', state, 'plan', ARGV[1], 'quota', ARGV[2], 'credits', ARGV[3], 'ps', ARGV[5],
  'pe', ARGV[6])
if ARGV[7] ~= '' then
  redis.call('HSET', state, 'np', ARGV[7], 'nq', ARGV[8])
else
  redis.call('HDEL', state, 'np', 'nq')
end
return 1
