-- admit: park a job in its namespace's waiting room (or behind its started twin), then lease free
-- slots to the best waiting jobs.
-- ARGV[1] job id, ARGV[2] payload (JSON), ARGV[3] default limit, ARGV[4] queued lease TTL (ms)
-- Returns {admitted (1, or 0 when the job is already known), dispatched}.
local job = ARGV[1]
if redis.call('HSETNX', JOBS, job, ARGV[2]) == 0 then
  return {0, {}}
end
park_or_block(job, ARGV[2])
return {1, promote(ARGV[3], ARGV[4], now_ms())}
