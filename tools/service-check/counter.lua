-- Distinct job ids: thread k sends k*10^9 + 1, + 2, ... (1 in CRASH_EVERY
-- of each thread's requests is a crashing input).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("first", threads * 1000000000)
end
function init(args)
  id = first
end
function request()
  id = id + 1
  return wrk.format("GET", "/job/" .. id)
end
