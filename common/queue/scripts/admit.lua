-- admit: park a job in its namespace's waiting room (or behind its started twin), then lease free
-- slots to the best waiting jobs. An identical pending job (waiting or dispatched, not started) is
-- the answer instead: it computes the same cache entry.
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] default limit, ARGV[4] queued lease TTL (ms), ARGV[5] revision,
-- ARGV[6] the default borrow ('1': a namespace may borrow)
-- Returns {admitted (1, or 0 when the job or its pending twin is already known), dispatched, the job's id
-- (the twin's, when it has one), whether the namespace wants to borrow (prelude's `wants`)}.
local job, payload = ARGV[1], ARGV[2]
local key = decode(payload)['unicity_id']
local twin = redis.call('HGET', PENDING, key)
if twin and twin ~= job and redis.call('HEXISTS', JOBS, twin) == 1 then
  return {0, {}, twin, ''}
end
-- A job with a record left to apply (a cancel, an end) was decided: admitting it again would overwrite
-- that decision with a dispatch.
if redis.call('HEXISTS', OUTBOX, job) == 1 or redis.call('HSETNX', JOBS, job, payload) == 0 then
  return {0, {}, job, ''}
end
local now = now_ms()
local age = next_fence(now)
redis.call('HSET', AGES, job, fmt(age))
redis.call('HSET', PENDING, key, job)
journal('created', job, age, now, payload, 0, '', '', '', ARGV[5])
park_or_block(job, payload)
local dispatched = promote(ARGV[3], ARGV[4], now)
return {1, dispatched, job, wants(ARGV[3], ARGV[6])}
