-- reap: take back expired leases. A cancelled job ('c:') is forgotten; a job that never started (its
-- message was lost) or has attempts left is parked again; a started job out of attempts is forgotten
-- and returned as crashed.
-- ARGV[1] max attempts, ARGV[2] default limit, ARGV[3] queued lease TTL (ms), ARGV[4] batch size
-- Returns {crashed {job, payload, ...}, requeued {job, token of the expired lease, ...}, dispatched}.
local now = now_ms()
local crashed, requeued = {}, {}
for _, job in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))) do
  local lease = redis.call('HGET', LEASES, job)
  local payload = redis.call('HGET', JOBS, job)
  redis.call('HDEL', LEASES, job)
  redis.call('ZREM', EXPIRY, job)
  if lease and string.sub(lease, 1, 1) == 'c' then
    forget(job)
  elseif payload then
    local started = lease and string.sub(lease, 1, 1) == 's'
    local attempts = tonumber(redis.call('HGET', ATTEMPTS, job) or '0')
    if started and attempts >= tonumber(ARGV[1]) then
      forget(job)
      crashed[#crashed + 1] = job
      crashed[#crashed + 1] = payload
    else
      -- It keeps owning its cache entry: its blocked twin still waits for it to end.
      park(job, cjson.decode(payload)['rank'])
      requeued[#requeued + 1] = job
      requeued[#requeued + 1] = lease and string.sub(lease, 3) or ''
    end
  end
end
return {crashed, requeued, promote(ARGV[2], ARGV[3], now)}
