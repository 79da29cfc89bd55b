-- reap: take back expired leases, then lease free slots, and hand back the outbox records nobody applied.
-- A cancelled job ('c:') ends as cancelled; a started job out of attempts ends as crashed; any other
-- (its worker died, or its message was lost) is parked again at its old place in line.
-- ARGV[1] max attempts, ARGV[2] default limit, ARGV[3] queued lease TTL (ms), ARGV[4] batch size,
-- ARGV[5] grace (ms): records older than this were left behind by their caller, ARGV[6] the default borrow
-- Returns {records {job, record, ...}, dispatched, idle (1 when the namespace has nothing left),
--          requeued {job, ...}, crashed {job, ...}, journal entries not written to the ledger yet, 1 when
--          the oldest of them is older than the grace (its writer is gone), a fence of this pass (every
--          attempt of a requeued job that started before it has a smaller one; any later, a larger one),
--          whether the namespace wants to borrow}.
local now = now_ms()
local fresh, requeued, crashed = {}, {}, {}
for _, job in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))) do
  local lease = redis.call('HGET', LEASES, job) or ''
  local payload = redis.call('HGET', JOBS, job)
  local kind, token = string.sub(lease, 1, 1), string.sub(lease, 3)
  local attempt = tonumber(redis.call('HGET', ATTEMPTS, job) or '0')
  redis.call('HDEL', LEASES, job)
  redis.call('ZREM', EXPIRY, job)
  if not payload then
    -- nothing to do: a lease without a job cannot be made, but an old version may have left one
  elseif kind == 'c' then
    forget(job)
    local fence = next_fence(now)
    record(job, 'end', fence, token, now, attempt, 'cancelled', '', payload)
    journal('cancelled', job, fence, now, payload, attempt, token)
  elseif kind == 's' and attempt >= tonumber(ARGV[1]) then
    forget(job)
    local fence = next_fence(now)
    record(job, 'end', fence, token, now, attempt, 'crashed', 'JobManagerCrashedError', payload)
    journal('error', job, fence, now, payload, attempt, token, '', 'JobManagerCrashedError')
    crashed[#crashed + 1] = job
  else
    -- It keeps owning its cache entry: its blocked twin still waits for it to end.
    redis.call('HDEL', RUNNERS, job)
    park(job)
    pend(job, payload)
    redis.call('HDEL', OUTBOX, job) -- a dispatch whose message was lost: superseded
    journal('waiting', job, next_fence(now), now, payload, attempt)
    requeued[#requeued + 1] = job
  end
  fresh[job] = true
end
local dispatched = promote(ARGV[2], ARGV[3], now)
for i = 1, #dispatched, 3 do fresh[dispatched[i]] = true end
local records = {}
local entries = redis.call('HGETALL', OUTBOX)
for i = 1, #entries, 2 do
  local job, rec = entries[i], entries[i + 1]
  local _, _, at = string.find(rec, '^%a+|%d+|[^|]*|(%d+)|')
  if fresh[job] or tonumber(at) <= now - tonumber(ARGV[5]) then
    records[#records + 1] = job
    records[#records + 1] = rec
  end
end
-- An entry that does not decode counts as left behind: the writer drops it (and says so).
local head = redis.call('LINDEX', JOURNAL, 0)
local stale = 0
if head then
  local decoded, entry = pcall(cjson.decode, head)
  local at = decoded and type(entry) == 'table' and tonumber(entry[3])
  if not at or at <= now - tonumber(ARGV[5]) then stale = 1 end
end
local pass = #requeued > 0 and fmt(next_fence(now)) or '0'
return {records, dispatched, tidy(), requeued, crashed, redis.call('LLEN', JOURNAL), stale, pass, wants(ARGV[2], ARGV[6])}
