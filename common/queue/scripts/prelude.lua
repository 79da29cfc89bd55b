-- Shared by every limiter script; all of them take the same KEYS, one namespace's keys (one hash tag):
--   KEYS[1]  leases    hash  job -> "q:<token>" (dispatched, not started) | "s:<token>" (started)
--                            | "c:<token>" (cancelled while started: holds its slot until it ends)
--   KEYS[2]  expiry    zset  job -> lease expiry, Redis server time in ms
--   KEYS[3]  waiting   zset  job -> priority rank * RANK_WEIGHT + age (lowest runs first)
--   KEYS[4]  jobs      hash  job -> payload (JSON), while the job is waiting, blocked or leased
--   KEYS[5]  attempts  hash  job -> how many times the job started
--   KEYS[6]  limit     string  this namespace's override of the default limit (absent: default)
--   KEYS[7]  sequence  string  the last fence handed out in this namespace
--   KEYS[8]  owners    hash  unicity id -> the job that started computing that cache entry, until it ends
--   KEYS[9]  blocked   hash  unicity id -> the identical job waiting for the owner to end
--   KEYS[10] ages      hash  job -> the fence of its admission: its place in line, kept when requeued
--   KEYS[11] outbox    hash  job -> a decision whose effects outside Redis are not applied yet:
--                            "kind|fence|token|at ms|attempt|status|error code|payload"
--   KEYS[12] runners   hash  job -> "delivery|fence|attempt" of its started attempt
--   KEYS[13] pending   hash  unicity id -> the waiting or dispatched job that computes it next (dedupe)
--   KEYS[14] journal   list  the ledger's transitions not written to MongoDB yet, oldest first, each a JSON
--                            array of strings: [status, fence, at ms, job, attempt, token, worker, error
--                            code, revision, payload] (status 'created': the job's admission, waiting)
--   KEYS[15] policy    hash  this namespace's borrowing overrides: borrow ('1' may, '0' may not; absent:
--                            the default), ceiling (the most slots it ever holds), weight (its share of
--                            borrowed capacity; absent: 1)
-- Fences only grow within a namespace, also after its keys expired or Redis lost them: they are at least
-- the Redis clock in microseconds since FENCE_EPOCH_MS. Every effect outside Redis is conditional on one.
local LEASES, EXPIRY, WAITING, JOBS, ATTEMPTS, LIMIT, SEQUENCE, OWNERS, BLOCKED, AGES, OUTBOX, RUNNERS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local PENDING, JOURNAL, POLICY = KEYS[13], KEYS[14], KEYS[15]
local RANK_WEIGHT = 1e15
-- Low priorities age: a waiting job goes before jobs of the next priority up once it has waited this long
-- more than they have (one hour per rank, in fence microseconds), so steady traffic never starves it.
local AGING_PER_RANK = 3600e6
local RANKS = 3
local FENCE_EPOCH_MS = 1700000000000
-- An idle namespace's sequence outlives its other keys this long: fences handed out in a burst may run
-- a little ahead of the clock, and the next fence must still be larger.
local SEQUENCE_LINGER_MS = 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(number)
  return string.format('%d', number)
end

local function next_fence(now)
  local fence = math.max(tonumber(redis.call('GET', SEQUENCE) or '0') + 1, (now - FENCE_EPOCH_MS) * 1000)
  redis.call('SET', SEQUENCE, fmt(fence))
  return fence
end

local function limit(default_limit)
  local override = redis.call('GET', LIMIT)
  if override then return tonumber(override) end
  return tonumber(default_limit)
end

-- A payload is [step, dataset, config, split, rank] (JobPayload.compact); older versions wrote an object.
local function decode(payload)
  local p = cjson.decode(payload)
  if p['unicity_id'] then return p end
  local function text(value)
    if value == nil or value == cjson.null then return '' end
    return value
  end
  return {unicity_id = p[1] .. ',' .. p[2] .. ',' .. text(p[3]) .. ',' .. text(p[4]), rank = p[5]}
end

-- A payload's step.
local function step_of(payload)
  local p = cjson.decode(payload)
  return p['step'] or p[1]
end

-- Record a decision in the outbox; the caller applies its effects, or the reaper does if it cannot.
local function record(job, kind, fence, token, now, attempt, status, code, payload)
  redis.call('HSET', OUTBOX, job, table.concat(
    {kind, fmt(fence), token or '', fmt(now), fmt(attempt or 0), status or '', code or '', payload or ''}, '|'))
end

-- The ledger follows Redis: every transition a script decides is journaled here, in the same script, and
-- written to MongoDB in bulk by common/queue/journal.py (idempotent and fenced, so in any order, twice).
-- The ledger status an ending gives.
local STATUS_OF = {success = 'success', error = 'error', crashed = 'error', cancelled = 'cancelled'}

local function journal(status, job, fence, now, payload, attempt, token, worker, code, revision)
  local entry = cjson.encode({status, fmt(fence), fmt(now), job, fmt(attempt or 0), token or '', worker or '',
    code or '', revision or '', payload})
  redis.call('RPUSH', JOURNAL, entry)
  return entry
end

-- Whether a journal entry not written yet names the job: Redis decided about it since (a restore from a
-- ledger that does not say so yet must not bring it back).
local function journaled(job)
  for _, entry in ipairs(redis.call('LRANGE', JOURNAL, 0, -1)) do
    if string.find(entry, job, 1, true) then return true end
  end
  return false
end

-- The start fence of the job's started attempt ('0' when unknown), from its runner "delivery|fence|attempt".
local function start_fence(job)
  local runner = redis.call('HGET', RUNNERS, job)
  if not runner then return '0' end
  local _, _, fence = string.find(runner, '|(%d+)|%d+$')
  return fence or '0'
end

-- Whether the attempt that started at this fence is the job's started attempt ('0': any attempt).
local function runs(job, fence)
  return fence == '0' or fence == '' or start_fence(job) == fence
end

-- The job computes its cache entry next, unless an identical pending job already does (dedupe).
local function pend(job, payload)
  redis.call('HSETNX', PENDING, decode(payload)['unicity_id'], job)
end

-- Waiting jobs are ordered by priority rank, then by age (the fence of their admission).
local function park(job)
  local rank = decode(redis.call('HGET', JOBS, job))['rank']
  redis.call('ZADD', WAITING, tonumber(rank) * RANK_WEIGHT + tonumber(redis.call('HGET', AGES, job)), job)
end

-- A job whose identical twin started waits outside the waiting room until the twin ends:
-- one cache entry is never computed twice at once.
local function park_or_block(job, payload)
  local key = decode(payload)['unicity_id']
  local owner = redis.call('HGET', OWNERS, key)
  if owner and owner ~= job then
    redis.call('HSET', BLOCKED, key, job)
  else
    park(job)
  end
end

-- Drop every trace of the job but its outbox record; if it owned its cache entry, its blocked twin is parked.
local function forget(job)
  local payload = redis.call('HGET', JOBS, job)
  redis.call('HDEL', LEASES, job)
  redis.call('ZREM', EXPIRY, job)
  redis.call('ZREM', WAITING, job)
  redis.call('HDEL', ATTEMPTS, job)
  redis.call('HDEL', RUNNERS, job)
  if not payload then return end
  local key = decode(payload)['unicity_id']
  if redis.call('HGET', PENDING, key) == job then
    redis.call('HDEL', PENDING, key)
  end
  if redis.call('HGET', BLOCKED, key) == job then
    redis.call('HDEL', BLOCKED, key)
  end
  if redis.call('HGET', OWNERS, key) == job then
    redis.call('HDEL', OWNERS, key)
    local twin = redis.call('HGET', BLOCKED, key)
    if twin then
      redis.call('HDEL', BLOCKED, key)
      park(twin)
    end
  end
  redis.call('HDEL', JOBS, job)
  redis.call('HDEL', AGES, job)
end

-- A namespace with no job and nothing left to apply or to journal keeps no key but its limit override.
local function tidy()
  if redis.call('HLEN', JOBS) == 0 and redis.call('HLEN', OUTBOX) == 0 and redis.call('LLEN', JOURNAL) == 0 then
    redis.call('PEXPIRE', SEQUENCE, SEQUENCE_LINGER_MS)
    return 1
  end
  return 0
end

-- The waiting job to run next, taken out of the waiting room: of the oldest job of each priority, the one
-- whose age, less AGING_PER_RANK per rank above the highest, is the oldest (within a priority: the oldest).
local function next_waiting()
  local best, best_score
  for rank = 0, RANKS - 1 do
    local low, high = rank * RANK_WEIGHT, (rank + 1) * RANK_WEIGHT
    local head = redis.call('ZRANGEBYSCORE', WAITING, fmt(low), '(' .. fmt(high), 'WITHSCORES', 'LIMIT', 0, 1)
    if #head > 0 then
      local score = tonumber(head[2]) - low + rank * AGING_PER_RANK
      if not best_score or score < best_score then best, best_score = head[1], score end
    end
  end
  if best then redis.call('ZREM', WAITING, best) end
  return best
end

-- Lease a slot to a waiting job (taken out of the waiting room) under a new fence that is its message's
-- token, record the dispatch ('borrowed' in its status field: a slot beyond the limit, its message
-- published after every other), and add {job, token, payload} to `dispatched`.
local function dispatch(job, queued_ttl_ms, now, dispatched, borrowed)
  local token = fmt(next_fence(now))
  local payload = redis.call('HGET', JOBS, job)
  redis.call('HSET', LEASES, job, 'q:' .. token)
  redis.call('ZADD', EXPIRY, now + tonumber(queued_ttl_ms), job)
  record(job, 'dispatch', tonumber(token), token, now, 0, borrowed and 'borrowed' or '', '', payload)
  journal('queued', job, tonumber(token), now, payload)
  dispatched[#dispatched + 1] = job
  dispatched[#dispatched + 1] = token
  dispatched[#dispatched + 1] = payload
end

-- The most slots the namespace ever holds, borrowed or not (its policy's ceiling; none: no bound).
local function ceiling()
  return tonumber(redis.call('HGET', POLICY, 'ceiling') or '1e18')
end

-- Lease free slots (under its limit and its ceiling) to the best waiting jobs, each under a new fence that
-- is its message's token, and record each dispatch; returns {job, token, payload, ...}, which the caller
-- publishes to Celery.
local function promote(default_limit, queued_ttl_ms, now)
  local dispatched = {}
  local free = math.min(limit(default_limit), ceiling()) - redis.call('HLEN', LEASES)
  while free > 0 do
    local job = next_waiting()
    if not job then break end
    dispatch(job, queued_ttl_ms, now, dispatched)
    free = free - 1
  end
  return dispatched
end

-- Borrowing (common/queue/borrowing.py): a namespace at its limit, with jobs waiting, may lease more
-- slots, with capacity of the fleet that no other namespace waits for, up to its ceiling. Whether it may:
-- its policy's borrow, else the default (ARGV '1' or '').
local function may_borrow(default_borrow)
  local own = redis.call('HGET', POLICY, 'borrow')
  if own then return own == '1' end
  return default_borrow == '1'
end

-- '' when the namespace does not want to borrow now; else '<its slots held per unit of weight> <its
-- weight>': borrowers are served the fewest slots held per weight first.
local function wants(default_limit, default_borrow)
  local leases, own = redis.call('HLEN', LEASES), limit(default_limit)
  if own <= 0 or leases < own or leases >= ceiling() or not may_borrow(default_borrow) then return '' end
  if redis.call('ZCARD', WAITING) == 0 then return '' end
  local weight = tonumber(redis.call('HGET', POLICY, 'weight') or '1')
  return string.format('%.6f %.6f', leases / weight, weight)
end
