-- end: the one way a started attempt ends (success, error, time limit, revoke, cancel). If its token still
-- holds the lease, the job is forgotten, its end recorded in the outbox, and the freed slot leased to
-- the best waiting jobs. A stale attempt changes nothing. A repeated call (its answer was lost) gets
-- the recorded end again.
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] fence (from renew), ARGV[4] status, ARGV[5] error code,
-- ARGV[6] default limit, ARGV[7] queued lease TTL (ms)
-- Returns {'ended', record, dispatched} | {'stale'}.
local job, token = ARGV[1], ARGV[2]
local lease = redis.call('HGET', LEASES, job)
if lease == 's:' .. token or lease == 'c:' .. token then
  local now = now_ms()
  local payload = redis.call('HGET', JOBS, job)
  local attempt = tonumber(redis.call('HGET', ATTEMPTS, job) or '0')
  forget(job)
  record(job, 'end', tonumber(ARGV[3]), token, now, attempt, ARGV[4], ARGV[5], payload)
  journal(STATUS_OF[ARGV[4]], job, tonumber(ARGV[3]), now, payload, attempt, token, '', ARGV[5])
  return {'ended', redis.call('HGET', OUTBOX, job), promote(ARGV[6], ARGV[7], now)}
end
local recorded = redis.call('HGET', OUTBOX, job)
-- Only this attempt's own end (its fence): an end the reaper recorded for it (crashed, cancelled) is not.
if recorded and string.find(recorded, '^end|' .. ARGV[3] .. '|' .. token .. '|') then
  return {'ended', recorded, {}}
end
return {'stale'}
