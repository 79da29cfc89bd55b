-- Shared by every limiter script; all of them take the same KEYS, one namespace's keys (one hash tag):
--   KEYS[1] leases    hash  job id -> "q:<token>" (dispatched, not started) | "s:<token>" (started)
--                           | "c:<token>" (cancelled while started: holds its slot until it is gone)
--   KEYS[2] expiry    zset  job id -> lease expiry, Redis server time in ms
--   KEYS[3] waiting   zset  job id -> priority rank * 1e15 + admission sequence (lowest runs first)
--   KEYS[4] jobs      hash  job id -> job payload (JSON), kept while the job is waiting or leased
--   KEYS[5] attempts  hash  job id -> how many times the job started
--   KEYS[6] limit     string  this namespace's override of the default limit (absent: default)
--   KEYS[7] sequence  string  counter for admission order and lease tokens
--   KEYS[8] owners    hash  unicity id -> the job that started computing that cache entry, until it ends
--   KEYS[9] blocked   hash  unicity id -> the identical job waiting for the owner to end
local LEASES, EXPIRY, WAITING, JOBS, ATTEMPTS, LIMIT, SEQUENCE, OWNERS, BLOCKED =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local RANK_WEIGHT = 1e15

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function limit(default_limit)
  local override = redis.call('GET', LIMIT)
  if override then return tonumber(override) end
  return tonumber(default_limit)
end

-- Waiting jobs are ordered by priority rank, then by admission order.
local function park(job, rank)
  redis.call('ZADD', WAITING, tonumber(rank) * RANK_WEIGHT + redis.call('INCR', SEQUENCE), job)
end

local function unicity(payload)
  return cjson.decode(payload)['unicity_id']
end

-- A job whose identical twin started waits outside the waiting room until the twin ends:
-- one cache entry is never computed twice at once.
local function park_or_block(job, payload)
  local key = unicity(payload)
  local owner = redis.call('HGET', OWNERS, key)
  if owner and owner ~= job then
    redis.call('HSET', BLOCKED, key, job)
  else
    park(job, cjson.decode(payload)['rank'])
  end
end

-- Drop every trace of the job; if it owned its cache entry, the twin blocked behind it is parked.
local function forget(job)
  local payload = redis.call('HGET', JOBS, job)
  redis.call('HDEL', LEASES, job)
  redis.call('ZREM', EXPIRY, job)
  redis.call('ZREM', WAITING, job)
  redis.call('HDEL', JOBS, job)
  redis.call('HDEL', ATTEMPTS, job)
  if not payload then return end
  local key = unicity(payload)
  if redis.call('HGET', BLOCKED, key) == job then
    redis.call('HDEL', BLOCKED, key)
  end
  if redis.call('HGET', OWNERS, key) == job then
    redis.call('HDEL', OWNERS, key)
    local twin = redis.call('HGET', BLOCKED, key)
    if twin then
      redis.call('HDEL', BLOCKED, key)
      park(twin, cjson.decode(redis.call('HGET', JOBS, twin))['rank'])
    end
  end
end

-- Lease free slots to the best waiting jobs; returns {job, token, payload, job, token, payload, ...},
-- which the caller publishes to Celery.
local function promote(default_limit, queued_ttl_ms, now)
  local dispatched = {}
  local free = limit(default_limit) - redis.call('HLEN', LEASES)
  while free > 0 do
    local head = redis.call('ZPOPMIN', WAITING)
    if #head == 0 then break end
    local job = head[1]
    -- The token fences this dispatch: a message or a worker holding an older token has no lease.
    local token = redis.call('INCR', SEQUENCE) .. '.' .. now
    redis.call('HSET', LEASES, job, 'q:' .. token)
    redis.call('ZADD', EXPIRY, now + tonumber(queued_ttl_ms), job)
    dispatched[#dispatched + 1] = job
    dispatched[#dispatched + 1] = token
    dispatched[#dispatched + 1] = redis.call('HGET', JOBS, job)
    free = free - 1
  end
  return dispatched
end
