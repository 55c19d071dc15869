--[[
seed: put a user's state, loaded from Postgres, into Redis unless another caller already did.
Setting (never adding) the fields makes concurrent first requests for one user seed exactly once.
The state expires a while after the period ends unless the user makes a call in a later one.

KEYS[1] state hash
ARGV[1] plan          ARGV[2] quota (tokens of the plan)   ARGV[3] credits of the period
ARGV[4] used so far in the period (from Postgres)
ARGV[5] period start, ARGV[6] period end (unix seconds)
ARGV[7] plan after the period end ('' = same)   ARGV[8] its quota ('' = same)

Returns 1 when this call seeded the state, 0 when it was there already.
]]
local state = KEYS[1]
if redis.call('EXISTS', state) == 1 then return 0 end
redis.call('HSET', state, 'plan', ARGV[1], 'quota', ARGV[2], 'credits', ARGV[3], 'used', ARGV[4],
  'reserved', 0, 'ps', ARGV[5], 'pe', ARGV[6], 'al', 0)
if ARGV[7] ~= '' then redis.call('HSET', state, 'np', ARGV[7], 'nq', ARGV[8]) end
keep_until_idle(state, tonumber(ARGV[6]))
return 1
