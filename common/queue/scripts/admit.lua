-- admit: park a job in its namespace's waiting room (or behind its started twin), then lease free
-- slots to the best waiting jobs.
-- ARGV[1] job id, ARGV[2] payload (JSON), ARGV[3] default limit, ARGV[4] queued lease TTL (ms)
-- Returns {admitted (1, or 0 when the job is already known), dispatched}.
local job, payload = ARGV[1], ARGV[2]
-- A job with a record left to apply (a cancel, an end) was decided: admitting it again would overwrite
-- that decision with a dispatch.
if redis.call('HEXISTS', OUTBOX, job) == 1 or redis.call('HSETNX', JOBS, job, payload) == 0 then
  return {0, {}}
end
local now = now_ms()
redis.call('HSET', AGES, job, fmt(next_fence(now)))
park_or_block(job, payload)
return {1, promote(ARGV[3], ARGV[4], now)}
