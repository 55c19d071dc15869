--[[
raise_used: raise a user's `used` back to what Postgres records for the period (the sync
worker's drift repair after Redis restarted from an older snapshot). Never lowers it.

The floor was read from Postgres after the worker saw the bucket's stream fully processed at
`last_id`. Raising is only safe while that still holds: a settlement or a reset added since
(the stream's last id moved) or still unprocessed (entries pending or not yet delivered) makes
the floor stale, so the call changes nothing and says so.

KEYS[1] state hash      q:{bN}:s:<user>
KEYS[2] settle stream   q:{bN}:settled
ARGV[1] period start the floor belongs to (unix seconds)
ARGV[2] floor: tokens charged in that period as Postgres records them (integer >= 0)
ARGV[3] the stream's last generated id when the worker checked it ('0-0' for no stream)
ARGV[4] consumer group of the sync workers

Returns {code, used}:
  OK (0), used = Redis `used` before the call: the caller sees how far apart the two were in
    either direction (raised by floor - used when below; above by used - floor, left alone);
  NOT_LOADED (-1) Redis does not know the user (the next call seeds it from Postgres anyway),
    used = 0;
  STALE (2) another period in Redis or the stream moved on: nothing changed, check again later,
    used = 0.
]]
local state, stream = KEYS[1], KEYS[2]
local period_start, floor = ARGV[1], tonumber(ARGV[2])
local expected_last_id, group = ARGV[3], ARGV[4]
local STALE = 2

if redis.call('EXISTS', state) == 0 then return {NOT_LOADED, 0} end
if redis.call('HGET', state, 'ps') ~= period_start then return {STALE, 0} end

-- Everything settled so far must be in Postgres already: no new entry, none pending, none
-- waiting for delivery. XINFO answers flat name/value lists here.
local function field(list, name)
  for i = 1, #list, 2 do
    if list[i] == name then return list[i + 1] end
  end
  return nil
end
if redis.call('EXISTS', stream) == 1 then
  local last_id = field(redis.call('XINFO', 'STREAM', stream), 'last-generated-id')
  if last_id ~= expected_last_id then return {STALE, 0} end
  local caught_up = false
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(info, 'name') == group then
      caught_up = field(info, 'pending') == 0 and field(info, 'last-delivered-id') == last_id
    end
  end
  if not caught_up then return {STALE, 0} end
elseif expected_last_id ~= '0-0' then
  return {STALE, 0}
end

local used = tonumber(redis.call('HGET', state, 'used')) or 0
if used < floor then redis.call('HSET', state, 'used', int(floor)) end
return {OK, used}
