-- end: the one way a started attempt ends (success, error, time limit, revoke, cancel). If its token still
-- holds the lease, the job is forgotten, its end recorded in the outbox, and the freed slot leased to
-- the best waiting jobs. A stale attempt changes nothing. A repeated call (its answer was lost) gets
-- the recorded end again.
-- A job cancelled while it ran ends as cancelled whatever its attempt says: nothing follows it.
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] fence (from renew), ARGV[4] status, ARGV[5] error code,
-- ARGV[6] default limit, ARGV[7] queued lease TTL (ms), ARGV[8] the attempt's start fence ('0': any attempt
-- of this token, as a worker's main process knows it), ARGV[9] the default borrow
-- Returns {'ended', record, dispatched, whether the namespace wants to borrow} | {'stale'}.
local job, token = ARGV[1], ARGV[2]
local lease = redis.call('HGET', LEASES, job)
if (lease == 's:' .. token or lease == 'c:' .. token) and runs(job, ARGV[8]) then
  local now = now_ms()
  local payload = redis.call('HGET', JOBS, job)
  local attempt = tonumber(redis.call('HGET', ATTEMPTS, job) or '0')
  local status, code = ARGV[4], ARGV[5]
  if string.sub(lease, 1, 1) == 'c' then status, code = 'cancelled', '' end
  forget(job)
  record(job, 'end', tonumber(ARGV[3]), token, now, attempt, status, code, payload)
  journal(STATUS_OF[status], job, tonumber(ARGV[3]), now, payload, attempt, token, '', code)
  local dispatched = promote(ARGV[6], ARGV[7], now)
  return {'ended', redis.call('HGET', OUTBOX, job), dispatched, wants(ARGV[6], ARGV[9])}
end
local recorded = redis.call('HGET', OUTBOX, job)
-- Only this attempt's own end (its fence): an end the reaper recorded for it (crashed, cancelled) is not.
if recorded and string.find(recorded, '^end|' .. ARGV[3] .. '|' .. token .. '|') then
  return {'ended', recorded, {}, ''}
end
return {'stale'}
