-- renew: a started job's heartbeat extends its lease, if it still holds it. A job cancelled while it
-- runs ('c:') keeps its slot the same way until its process ends: the limit counts it until then.
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] started lease TTL (ms)
-- Returns 1 when renewed, 2 when renewed for a cancelled job, 0 when the lease is gone or not this token's.
local lease = redis.call('HGET', LEASES, ARGV[1])
local renewed = 0
if lease == 's:' .. ARGV[2] then
  renewed = 1
elseif lease == 'c:' .. ARGV[2] then
  renewed = 2
else
  return 0
end
redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[3]), ARGV[1])
return renewed
