-- release_and_promote: free the job's slot if it still holds it (fencing by token), then lease free
-- slots to the best waiting jobs.
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] default limit, ARGV[4] queued lease TTL (ms)
-- Returns {released (1 or 0), dispatched}.
local job, token = ARGV[1], ARGV[2]
local lease = redis.call('HGET', LEASES, job)
local released = 0
if lease and string.sub(lease, 3) == token then
  forget(job)
  released = 1
end
return {released, promote(ARGV[3], ARGV[4], now_ms())}
