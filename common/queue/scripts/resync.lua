-- resync: make Redis agree with the ledger about one job, after Redis lost its data or rolled back to an
-- older state (a snapshot, a replica behind its master). An end in the ledger always wins: the job is
-- forgotten. Otherwise the newer side wins. Redis keeps what it decided since the ledger's last word (a journal entry not written yet, an end or cancel to apply, a fence as new
-- as the ledger's). Otherwise it takes the ledger's state: an ended job is forgotten (never run again), an
-- unfinished one restored at its place in line, a started one with its lease under its own token, its
-- attempt's start fence and its cache entry's ownership (restore started jobs first). Safe to repeat.
-- The namespace's fences go on past the ledger's, whatever the clock says.
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] the ledger's status, ARGV[4] the ledger's fence, ARGV[5] lease
-- token ('' unless started), ARGV[6] attempts, ARGV[7] started lease TTL (ms), ARGV[8] age
-- Returns 1 when Redis took the ledger's state, 0 when it kept its own.
local job, payload, status, fence = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local ended = status == 'success' or status == 'error' or status == 'cancelled'
local rec = redis.call('HGET', OUTBOX, job)
if ended then
  -- The ledger's end is final: whatever Redis decided since is an attempt that cannot be (a message of the
  -- snapshot confirmed again). An end or cancel record still to apply stays (its apply is idempotent).
  local known = redis.call('HEXISTS', JOBS, job) == 1 or (rec and string.sub(rec, 1, 9) == 'dispatch|')
  forget(job)
  if rec and string.sub(rec, 1, 9) == 'dispatch|' then redis.call('HDEL', OUTBOX, job) end
  tidy() -- a namespace left with nothing keeps no key
  return known and 1 or 0
end
if tonumber(redis.call('GET', SEQUENCE) or '0') < fence then
  redis.call('SET', SEQUENCE, fmt(fence))
end
if journaled(job) or (rec and string.sub(rec, 1, 9) ~= 'dispatch|') then
  return 0
end
local newest = tonumber(redis.call('HGET', AGES, job) or '0')
local lease = redis.call('HGET', LEASES, job)
if lease then newest = math.max(newest, tonumber(string.sub(lease, 3)) or 0) end
newest = math.max(newest, tonumber(start_fence(job)))
local known = redis.call('HEXISTS', JOBS, job) == 1
if status == 'started' then
  -- Redis' started attempt is the ledger's, or the ledger's wins: a start it refused does not run.
  if known and lease and string.sub(lease, 3) == ARGV[5] and start_fence(job) == ARGV[4] then
    return 0
  end
elseif known and newest >= fence then
  return 0
end
forget(job)
redis.call('HDEL', OUTBOX, job) -- a dispatch of an older state
next_fence(now_ms()) -- the sequence may be gone: fences go on from the clock
redis.call('HSET', JOBS, job, payload)
redis.call('HSET', ATTEMPTS, job, ARGV[6])
redis.call('HSET', AGES, job, ARGV[8])
if status == 'started' then
  redis.call('HSET', LEASES, job, 's:' .. ARGV[5])
  redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[7]), job)
  redis.call('HSET', OWNERS, decode(payload)['unicity_id'], job)
  redis.call('HSET', RUNNERS, job, '|' .. ARGV[4] .. '|' .. ARGV[6])
else
  pend(job, payload)
  park_or_block(job, payload)
end
return 1
