--[[
seed: put a user's state, loaded from Postgres, into Redis unless another caller already did.
Setting (never adding) the fields makes concurrent first requests for one user seed exactly once.
The state expires a while after the period ends unless the user makes a call in a later one.
Holds that outlived the state (deleted by hand, or expired while no sync worker swept them)
still count: `reserved` starts as their sum and `ex` as their earliest expiry, so they settle
as any hold does. This reads every such hold: a cost only of this rare path.

KEYS[1] state hash       q:{bN}:s:<user>
KEYS[2] holds zset       q:{bN}:h:<user>
ARGV[1] plan          ARGV[2] quota (tokens of the plan)   ARGV[3] credits of the period
ARGV[4] used so far in the period (from Postgres)
ARGV[5] period start, ARGV[6] period end (unix seconds)
ARGV[7] plan after the period end ('' = same)   ARGV[8] its quota ('' = same)
ARGV[9] record prefix    q:{bN}:r:<user>/

Returns 1 when this call seeded the state, 0 when it was there already.
]]
local state, holds, record_prefix = KEYS[1], KEYS[2], ARGV[9]
if redis.call('EXISTS', state) == 1 then return 0 end

local reserved, earliest = 0, nil
local held = redis.call('ZRANGE', holds, 0, -1, 'WITHSCORES')
for i = 1, #held, 2 do
  reserved = reserved + (tonumber(redis.call('HGET', record_prefix .. held[i], 'g')) or 0)
  earliest = earliest or held[i + 1]
end
redis.call('HSET', state, 'plan', ARGV[1], 'quota', ARGV[2], 'credits', ARGV[3], 'used', ARGV[4],
  'reserved', reserved, 'ps', ARGV[5], 'pe', ARGV[6], 'al', 0)
if earliest then redis.call('HSET', state, 'ex', earliest) end
if ARGV[7] ~= '' then redis.call('HSET', state, 'np', ARGV[7], 'nq', ARGV[8]) end
keep_until_idle(state, tonumber(ARGV[6]))
return 1
