-- confirm: at task start, turn the job's dispatched lease into a started one, once.
-- ARGV[1] job id, ARGV[2] the message's lease token, ARGV[3] started lease TTL (ms)
-- Returns {'run', attempt} | {'drop'} (a redelivered, stale or parked job's message) |
--         {'orphan'} (Redis knows nothing of the job: finished, cancelled, or Redis lost its data).
local job, token = ARGV[1], ARGV[2]
local lease = redis.call('HGET', LEASES, job)
if lease == 'q:' .. token then
  redis.call('HSET', LEASES, job, 's:' .. token)
  redis.call('HSET', OWNERS, unicity(redis.call('HGET', JOBS, job)), job)
  redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[3]), job)
  return {'run', redis.call('HINCRBY', ATTEMPTS, job, 1)}
end
if lease or redis.call('HEXISTS', JOBS, job) == 1 then
  return {'drop'}
end
return {'orphan'}
