-- cancel: forget waiting and dispatched jobs (recording their cancellation), then lease the freed slots.
-- A started job keeps its slot as 'c:<token>' until its attempt ends or its lease expires: its process
-- may still be running (or dying from a revoke), and the limit holds until it is gone.
-- ARGV[1] default limit, ARGV[2] queued lease TTL (ms), ARGV[3..] job ids
-- Returns {records {job, record, ...} of the jobs cancelled now, started {job, ...}, dispatched, a fence of
-- this cancel (every attempt of these jobs started before it has a smaller one)}.
local now = now_ms()
local records, started = {}, {}
for i = 3, #ARGV do
  local job = ARGV[i]
  local lease = redis.call('HGET', LEASES, job)
  local payload = redis.call('HGET', JOBS, job)
  if lease and string.sub(lease, 1, 1) ~= 'q' then
    redis.call('HSET', LEASES, job, 'c:' .. string.sub(lease, 3))
    started[#started + 1] = job
  elseif payload then
    forget(job)
    local fence = next_fence(now)
    record(job, 'cancel', fence, '', now, 0, 'cancelled', '', payload)
    journal('cancelled', job, fence, now, payload)
    records[#records + 1] = job
    records[#records + 1] = redis.call('HGET', OUTBOX, job)
  end
end
local dispatched = promote(ARGV[1], ARGV[2], now)
return {records, started, dispatched, fmt(next_fence(now))}
