--[[
wrk script of the benchmark loads. benchmarks/run.py sets the environment:

BENCH_MODE     bare (POST /bare), reserve (POST /v1/reserve), flow (reserve, then commit or
               refund the reservation it got), naive (POST /chat of benchmarks/apps.py)
BENCH_USERS    users are <BENCH_PREFIX>0 .. <BENCH_PREFIX><BENCH_USERS - 1>, picked at random
BENCH_PREFIX   user id prefix
BENCH_TOKENS   tokens per reserve (or per naive chat request)
BENCH_RUN      unique per load, so reservation ids never repeat across loads
BENCH_REFUND_PERCENT  flow: share of reservations refunded instead of committed
BENCH_COMMIT   flow: "partial" commits 1..granted tokens, "full" commits what was granted
BENCH_LLM_MS   flow: wait before the commit or refund (the LLM call), ms; 0 = none
BENCH_DELAY_MS bare and reserve: each connection waits this long after an answer before its
               next request (a paced load below saturation, for latency); 0 = none

done() prints one line "BENCH_JSON {...}" with the totals, latency percentiles (us) and the
flow's counters; run.py parses it.
]]

local mode = os.getenv("BENCH_MODE") or "bare"
local users = tonumber(os.getenv("BENCH_USERS") or "10000")
local prefix = os.getenv("BENCH_PREFIX") or "u"
local tokens = tonumber(os.getenv("BENCH_TOKENS") or "10")
local run = os.getenv("BENCH_RUN") or "r"
local refund_percent = tonumber(os.getenv("BENCH_REFUND_PERCENT") or "10")
local commit_full = os.getenv("BENCH_COMMIT") == "full"
local llm_ms = tonumber(os.getenv("BENCH_LLM_MS") or "0")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")

local paths = {bare = "/bare", reserve = "/v1/reserve", flow = "/v1/reserve", naive = "/chat"}
local path = paths[mode]
local headers = {["Content-Type"] = "application/json"}
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(thread_id * 7919 + os.time())
  counter = 0
  -- Reservations granted and not settled yet, oldest first (flow only).
  pending, first, last = {}, 1, 0
  reserved, committed, refunded, refused, failed = 0, 0, 0, 0, 0
end

local function reserve_body()
  counter = counter + 1
  local user = prefix .. math.random(0, users - 1)
  if mode == "naive" or mode == "bare" then
    return string.format('{"user_id":"%s","tokens":%d}', user, tokens)
  end
  return string.format('{"user_id":"%s","tokens":%d,"reservation_id":"%s-%d-%d"}',
    user, tokens, run, thread_id, counter)
end

function request()
  if last >= first then
    local item = pending[first]
    pending[first] = nil
    first = first + 1
    if math.random(100) <= refund_percent then
      return wrk.format("POST", "/v1/refund", headers,
        string.format('{"user_id":"%s","reservation_id":"%s"}', item[1], item[2]))
    end
    local used = item[3]
    if not commit_full then used = math.random(1, item[3]) end
    return wrk.format("POST", "/v1/commit", headers,
      string.format('{"user_id":"%s","reservation_id":"%s","tokens":%d}', item[1], item[2], used))
  end
  return wrk.format("POST", path, headers, reserve_body())
end

if mode == "flow" then
  function response(status, headers, body)
    if status == 200 then
      if body:find('"status":"committed"', 1, true) then
        committed = committed + 1
      elseif body:find('"status":"refunded"', 1, true) then
        refunded = refunded + 1
      else
        reserved = reserved + 1
        last = last + 1
        pending[last] = {
          body:match('"user_id":"([^"]+)"'),
          body:match('"reservation_id":"([^"]+)"'),
          tonumber(body:match('"granted":(%d+)')),
        }
      end
    elseif status == 429 then
      refused = refused + 1
    else
      failed = failed + 1
    end
  end

  if llm_ms > 0 then
    function delay()
      if last >= first then return llm_ms end
      return 0
    end
  end
end

if mode ~= "flow" and delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

local percentiles = {10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 96, 97, 98, 99,
  99.5, 99.7, 99.9, 99.95, 99.99}

function done(summary, latency, requests)
  local parts = {}
  for _, p in ipairs(percentiles) do
    table.insert(parts, string.format('[%s,%d]', p, latency:percentile(p)))
  end
  local totals = {reserved = 0, committed = 0, refunded = 0, refused = 0, failed = 0}
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (thread:get(name) or 0)
    end
  end
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f},"percentiles_us":[%s],' ..
    '"flow":{"reserved":%d,"committed":%d,"refunded":%d,"refused":%d,"failed":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(parts, ","),
    totals.reserved, totals.committed, totals.refunded, totals.refused, totals.failed))
end
