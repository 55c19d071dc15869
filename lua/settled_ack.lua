--[[
settled_ack: acknowledge entries of a settle stream and delete them, in one call, after the
sync worker's Postgres transaction that wrote them has committed. Only the given ids are
deleted, so an entry that was not processed is never dropped (no trimming).

KEYS[1] settle stream    q:{bN}:settled
ARGV[1] consumer group of the sync workers
ARGV[2..n] entry ids written to Postgres

Returns the number of entries acknowledged (0 for ids acknowledged before: a redelivery).
]]
local stream, group = KEYS[1], ARGV[1]
local acked = 0
-- XACK and XDEL take many ids; unpack in slices to stay below Lua's argument limit.
local SLICE = 1000
for first = 2, #ARGV, SLICE do
  local last = math.min(first + SLICE - 1, #ARGV)
  acked = acked + redis.call('XACK', stream, group, unpack(ARGV, first, last))
  redis.call('XDEL', stream, unpack(ARGV, first, last))
end
return acked
