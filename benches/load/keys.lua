-- wrk script for the load benchmark: POSTs a small JSON body to the video endpoint, cycling
-- through the benchmark's keys (one per request, each thread from its own offset) with an
-- allowed CORS Origin. The requests are formatted once in init, so wrk's cost per request is the
-- same whichever target it loads.
--
-- wrk -s keys.lua URL -- KEYS_FILE ORIGIN
local requests = {}
local next_index = 1

function init(args)
  local body = '{"video_url":"https://media.example/clip.mp4","preset":"720p"}'
  for key in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("POST", "/api/v1/video/process/", {
      ["X-API-Key"] = key,
      ["Origin"] = args[2],
      ["Content-Type"] = "application/json",
      ["User-Agent"] = "keygate-load/1",
    }, body)
  end
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
  next_index = math.random(#requests)
end

function request()
  next_index = next_index + 1
  if next_index > #requests then
    next_index = 1
  end
  return requests[next_index]
end

-- One machine-readable line per run: requests/s, p50 and p99 in microseconds, the count of
-- responses that were not 2xx/3xx plus socket errors (any of which voids the run), and the
-- number of requests completed.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.1f p50_us=%d p99_us=%d bad=%d requests=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.status + e.connect + e.read + e.write + e.timeout, summary.requests))
end
