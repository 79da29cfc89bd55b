-- confirm: at task start, turn the job's dispatched lease into a started one, once per dispatch. The same
-- delivery asking again (its answer was lost) gets the same answer; any other delivery is dropped.
-- ARGV[1] job id, ARGV[2] the message's lease token, ARGV[3] delivery id, ARGV[4] started lease TTL (ms),
-- ARGV[5] the worker's name (for the ledger)
-- Returns {'run', attempt, attempt's fence, its journal entry ('' when repeated)} | {'drop'} (a redelivered,
-- stale, cancelled or ended job's message).
local job, token, delivery = ARGV[1], ARGV[2], ARGV[3]
local lease = redis.call('HGET', LEASES, job)
if lease == 'q:' .. token then
  local now = now_ms()
  local fence = fmt(next_fence(now))
  local attempt = redis.call('HINCRBY', ATTEMPTS, job, 1)
  redis.call('HSET', LEASES, job, 's:' .. token)
  local payload = redis.call('HGET', JOBS, job)
  local key = decode(payload)['unicity_id']
  redis.call('HSET', OWNERS, key, job)
  if redis.call('HGET', PENDING, key) == job then
    redis.call('HDEL', PENDING, key) -- started: an identical job enqueued now computes a newer entry
  end
  local entry = journal('started', job, tonumber(fence), now, payload, attempt, token, ARGV[5])
  redis.call('ZADD', EXPIRY, now + tonumber(ARGV[4]), job)
  redis.call('HSET', RUNNERS, job, delivery .. '|' .. fence .. '|' .. attempt)
  redis.call('HDEL', OUTBOX, job) -- its dispatch was delivered: the started attempt supersedes it
  return {'run', attempt, fence, entry}
end
if lease == 's:' .. token then
  local runner = redis.call('HGET', RUNNERS, job)
  if runner and string.sub(runner, 1, #delivery + 1) == delivery .. '|' then
    local _, _, fence, attempt = string.find(runner, '^.*|(%d+)|(%d+)$')
    return {'run', tonumber(attempt), fence, ''}
  end
end
return {'drop'}
