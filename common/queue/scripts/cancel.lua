-- cancel: forget waiting and dispatched jobs, then lease the freed slots to the best waiting jobs.
-- A started job keeps its slot as 'c:<token>' until its worker releases it or its lease expires:
-- its process may still be running (or dying from a revoke), and the limit holds until it is gone.
-- ARGV[1] default limit, ARGV[2] queued lease TTL (ms), ARGV[3..] job ids
-- Returns {cancelled {job, ...}, dispatched}.
local cancelled = {}
for i = 3, #ARGV do
  local job = ARGV[i]
  local lease = redis.call('HGET', LEASES, job)
  if lease and string.sub(lease, 1, 1) ~= 'q' then
    redis.call('HSET', LEASES, job, 'c:' .. string.sub(lease, 3))
    cancelled[#cancelled + 1] = job
  elseif redis.call('HEXISTS', JOBS, job) == 1 then
    forget(job)
    cancelled[#cancelled + 1] = job
  end
end
return {cancelled, promote(ARGV[1], ARGV[2], now_ms())}
