-- wrk script: spread requests over the benchmark app's routes, GET /r{k}/{n}.
-- Usage: wrk -t1 -c64 -d10s -s benchmarks/rotate.lua http://127.0.0.1:PORT -- ROUTES [RESPONSES]
-- With RESPONSES, the thread stops once that many answers arrived (wrk still waits out -d;
-- its summary has the exact count).
local routes = 200
local limit = 0
local n = 0
local answered = 0

function init(args)
  routes = tonumber(args[1] or "200")
  limit = tonumber(args[2] or "0")
end

function request()
  n = n + 1
  return wrk.format("GET", "/r" .. (n % routes) .. "/" .. n)
end

function response(status, headers, body)
  answered = answered + 1
  if limit > 0 and answered >= limit then
    wrk.thread:stop()
  end
end
