-- renew: a started job's heartbeat extends its lease, if it still holds it. A job cancelled while it
-- runs ('c:') keeps its slot the same way until its process ends: the limit counts it until then.
-- Before an attempt writes its outcome it asks for a fence (ARGV[4] = '1'): the cache entry and the
-- ledger keep it, and refuse anything older.
-- Two deliveries of one message share its token: the attempt is the one whose start fence the job's runner
-- names (ARGV[5]; '0': any attempt of the token).
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] started lease TTL (ms), ARGV[4] '1' to get a fence,
-- ARGV[5] the attempt's start fence
-- Returns {'running' | 'cancelled', fence or '', the start fence of the lease's attempt} | {'lost'}.
local lease = redis.call('HGET', LEASES, ARGV[1])
local state
if not runs(ARGV[1], ARGV[5]) then
  return {'lost'}
elseif lease == 's:' .. ARGV[2] then
  state = 'running'
elseif lease == 'c:' .. ARGV[2] then
  state = 'cancelled'
else
  return {'lost'}
end
local now = now_ms()
redis.call('ZADD', EXPIRY, now + tonumber(ARGV[3]), ARGV[1])
local start = start_fence(ARGV[1])
if ARGV[4] == '1' then
  return {state, fmt(next_fence(now)), start}
end
return {state, '', start}
