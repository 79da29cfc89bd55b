-- restore: rebuild one job's state from the ledger after Redis lost it (reconcile), unless Redis
-- already knows the job. A started job gets back its lease under its own token, so its worker's
-- heartbeats and release still match; any other job is parked.
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] rank, ARGV[4] lease token ('' unless started),
-- ARGV[5] attempts, ARGV[6] started lease TTL (ms)
-- Returns 1 when restored, 0 when Redis already knew the job.
local job = ARGV[1]
if redis.call('HSETNX', JOBS, job, ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', ATTEMPTS, job, ARGV[5])
if ARGV[4] ~= '' then
  redis.call('HSET', LEASES, job, 's:' .. ARGV[4])
  redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[6]), job)
else
  park(job, ARGV[3])
end
return 1
