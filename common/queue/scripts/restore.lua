-- restore: rebuild one job's state from the ledger after Redis lost it (reconcile), unless Redis
-- already knows the job. A started job gets back its lease under its own token, so its worker's
-- heartbeats and release still match, and owns its cache entry again; any other job is parked, or
-- blocked behind its started twin (restore started jobs first).
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] lease token ('' unless started), ARGV[4] attempts,
-- ARGV[5] started lease TTL (ms)
-- Returns 1 when restored, 0 when Redis already knew the job.
local job = ARGV[1]
if redis.call('HSETNX', JOBS, job, ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', ATTEMPTS, job, ARGV[4])
if ARGV[3] ~= '' then
  redis.call('HSET', LEASES, job, 's:' .. ARGV[3])
  redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[5]), job)
  redis.call('HSET', OWNERS, unicity(ARGV[2]), job)
else
  park_or_block(job, ARGV[2])
end
return 1
