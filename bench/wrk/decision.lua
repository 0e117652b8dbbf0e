-- wrk script for bench/serve.py: POST /v1/customers/{id}/decisions, one random
-- customer id per request, and one parseable result line at the end.
--
-- usage: wrk -t1 -c32 -d20s -s bench/wrk/decision.lua http://127.0.0.1:8000 -- IDS_FILE
--   IDS_FILE            one customer id a line, already URL-safe (bench/serve.py writes it)
--   NBO_BENCH_API_KEY   environment; when set, every request carries
--                       "Authorization: Bearer <key>"
--   NBO_BENCH_THINK_MS  environment; when a positive number, each connection pauses
--                       before each request for a random think time (exponential, of
--                       this mean in ms), as a teller between customers: a lighter
--                       load than back-to-back requests. wrk times a request from its
--                       write, so the pause is not counted in its latency.
--
-- done() prints one line:
--   WRK_RESULT {"requests":..,"rps":..,"p50_ms":..,"p90_ms":..,"p99_ms":..,"non2xx":..,...}
-- "non2xx" is wrk's own count of responses with status >= 400 (3xx would count as
-- success; the decision API does not redirect). Counting statuses in a response()
-- hook would make wrk parse every response, which costs client CPU on a shared
-- 2-core machine, so it is not done here.

-- Every id, padded with spaces to the longest, in one string: a million ids as a
-- million strings made each of LuaJIT's garbage collections walk them all, and wrk,
-- one thread, stopped reading answers for 100-200 ms at a time (counted as the
-- service's latency). One string is one object to the collector.
local ids = ""
local width = 0
local uniform = true
local n = 0
local prefix = "POST /v1/customers/"
local suffix = nil
local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("thread_number", #threads)
end

function init(args)
   local path = args[1]
   if path == nil then
      error("decision.lua needs the customer ids file: wrk ... -- IDS_FILE")
   end
   local list = {}
   for line in io.lines(path) do
      if line ~= "" then
         n = n + 1
         list[n] = line
         width = math.max(width, string.len(line))
      end
   end
   if n == 0 then
      error("no customer ids in " .. path)
   end
   for i = 1, n do
      local short = width - string.len(list[i])
      if short > 0 then
         uniform = false
         list[i] = list[i] .. string.rep(" ", short)
      end
   end
   ids = table.concat(list)
   list = nil
   collectgarbage()
   local body = '{"channel":"branch","staff_id":"S1","branch_id":"B1","max_offers":3}'
   local head = {
      "/decisions HTTP/1.1",
      "Host: " .. wrk.host .. ":" .. wrk.port,
      "Content-Type: application/json",
      "Accept: application/json",
   }
   local key = os.getenv("NBO_BENCH_API_KEY")
   if key ~= nil and key ~= "" then
      head[#head + 1] = "Authorization: Bearer " .. key
   end
   head[#head + 1] = "Content-Length: " .. string.len(body)
   suffix = table.concat(head, "\r\n") .. "\r\n\r\n" .. body
   math.randomseed(os.time() * 1000 + (thread_number or 0) * 7919)
end

local think = tonumber(os.getenv("NBO_BENCH_THINK_MS") or "")
if think ~= nil and think > 0 then
   function delay()
      -- wrk takes whole milliseconds: rounded, the mean stays the one asked for
      return math.floor(-think * math.log(1 - math.random()) + 0.5)
   end
end

function request()
   local at = (math.random(n) - 1) * width
   local id = string.sub(ids, at + 1, at + width)
   if not uniform then
      id = string.match(id, "^[^ ]+")
   end
   return prefix .. id .. suffix
end

function done(summary, latency, requests)
   local e = summary.errors
   local seconds = summary.duration / 1e6
   io.write(string.format(
      'WRK_RESULT {"requests":%d,"duration_s":%.3f,"rps":%.1f,"bytes":%d,'
         .. '"mean_ms":%.3f,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"p999_ms":%.3f,"max_ms":%.3f,'
         .. '"non2xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
      summary.requests, seconds, summary.requests / seconds, summary.bytes,
      latency.mean / 1000, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
      latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000,
      e.status, e.connect, e.read, e.write, e.timeout))
end
