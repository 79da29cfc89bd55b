-- borrow: lease up to ARGV[4] slots beyond the namespace's limit, if it may borrow and stays under its
-- ceiling, to its best waiting jobs whose workers have idle slots (ARGV[5], per pool of workers); the
-- jobs of a pool without any keep their place. A slot under its limit is leased first, as `promote` does.
-- ARGV[1] default limit, ARGV[2] queued lease TTL (ms), ARGV[3] the default borrow ('1': may),
-- ARGV[4] slots, ARGV[5] idle slots per pool (JSON object), ARGV[6] the pool of each step whose pool is
-- not the default one (JSON object), ARGV[7] the default pool (of a step not in ARGV[6])
-- Returns {promoted, borrowed, whether the namespace still wants to borrow (prelude's `wants`)}.
local now = now_ms()
local promoted, dispatched = promote(ARGV[1], ARGV[2], now), {}
local idle, pool_of = cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local left = 0
for _, slots in pairs(idle) do left = left + slots end
local room = math.min(tonumber(ARGV[4]), ceiling() - redis.call('HLEN', LEASES))
local passed = {}
if wants(ARGV[1], ARGV[3]) ~= '' then
  while room > 0 and left > 0 and #passed < 100 do
    local job = next_waiting()
    if not job then break end
    local pool = pool_of[step_of(redis.call('HGET', JOBS, job))] or ARGV[7]
    if (idle[pool] or 0) > 0 then
      dispatch(job, ARGV[2], now, dispatched, true)
      idle[pool], left, room = idle[pool] - 1, left - 1, room - 1
    else
      passed[#passed + 1] = job
    end
  end
end
for _, job in ipairs(passed) do park(job) end
return {promoted, dispatched, wants(ARGV[1], ARGV[3])}
