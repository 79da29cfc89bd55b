-- restore: rebuild one job's state from the ledger after Redis lost it (reconcile), unless Redis
-- already knows the job. A started job gets back its lease under its own token, so its worker's
-- heartbeats and end still match, and owns its cache entry again; any other job is parked at its age,
-- or blocked behind its started twin (restore started jobs first).
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] lease token ('' unless started), ARGV[4] attempts,
-- ARGV[5] started lease TTL (ms), ARGV[6] age (the fence its creation time gives)
-- Returns 1 when restored, 0 when Redis already knew the job or its end.
local job, payload = ARGV[1], ARGV[2]
-- A job with a record not applied yet (an end, a cancel), or a journal entry not written yet, was decided
-- about since: the ledger has not caught up.
if redis.call('HEXISTS', OUTBOX, job) == 1 or journaled(job) or redis.call('HSETNX', JOBS, job, payload) == 0 then
  return 0
end
local now = now_ms()
next_fence(now) -- the sequence may be gone: fences go on from the clock
redis.call('HSET', ATTEMPTS, job, ARGV[4])
redis.call('HSET', AGES, job, ARGV[6])
if ARGV[3] ~= '' then
  redis.call('HSET', LEASES, job, 's:' .. ARGV[3])
  redis.call('ZADD', EXPIRY, now + tonumber(ARGV[5]), job)
  redis.call('HSET', OWNERS, decode(payload)['unicity_id'], job)
else
  pend(job, payload)
  park_or_block(job, payload)
end
return 1
