-- unlease: give back the slot of a job whose message could not be published, and park it again at its
-- place in line, so that a later promotion (a release, or the reaper's pass) dispatches it anew.
-- ARGV[1] job id, ARGV[2] lease token
-- Returns the fence of this decision (for the ledger: waiting again), or 0 when the job no longer held
-- this dispatched lease.
local job = ARGV[1]
if redis.call('HGET', LEASES, job) ~= 'q:' .. ARGV[2] then
  return 0
end
redis.call('HDEL', LEASES, job)
redis.call('ZREM', EXPIRY, job)
redis.call('HDEL', OUTBOX, job)
park(job)
local now = now_ms()
local fence = next_fence(now)
journal('waiting', job, fence, now, redis.call('HGET', JOBS, job))
return fmt(fence)
