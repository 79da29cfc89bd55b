-- renew: a started job's heartbeat extends its lease, if it still holds it.
-- ARGV[1] job id, ARGV[2] lease token, ARGV[3] started lease TTL (ms)
-- Returns 1 when renewed, 0 when the lease is gone or held under another token.
if redis.call('HGET', LEASES, ARGV[1]) ~= 's:' .. ARGV[2] then
  return 0
end
redis.call('ZADD', EXPIRY, now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
