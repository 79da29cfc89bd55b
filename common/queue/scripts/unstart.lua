-- unstart: an attempt whose start could not be made durable (MongoDB down) gives its job back, unstarted:
-- its attempt is not counted, and the job waits again at its place in line (keeping its cache entry's
-- ownership, as a requeue does) for a later promotion (a release, or the reaper's pass: not at once, so
-- an outage does not spin dispatches). Nothing unless this attempt (token and start fence) holds the lease.
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] the attempt's start fence
-- Returns 1 when given back, 0 otherwise.
local job = ARGV[1]
if redis.call('HGET', LEASES, job) ~= 's:' .. ARGV[2] or start_fence(job) ~= ARGV[3] then
  return 0
end
local payload = redis.call('HGET', JOBS, job)
redis.call('HDEL', LEASES, job)
redis.call('ZREM', EXPIRY, job)
redis.call('HDEL', RUNNERS, job)
redis.call('HINCRBY', ATTEMPTS, job, -1)
park(job)
pend(job, payload)
local now = now_ms()
journal('waiting', job, next_fence(now), now, payload, tonumber(redis.call('HGET', ATTEMPTS, job)))
return 1
