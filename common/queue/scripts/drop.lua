-- drop: forget a job the ledger says has ended, whatever Redis holds of it (Redis was rebuilt from a
-- ledger that lagged behind), then lease the freed slot to the best waiting jobs.
-- ARGV[1] job id, ARGV[2] default limit, ARGV[3] queued lease TTL (ms)
-- Returns dispatched.
forget(ARGV[1])
redis.call('HDEL', OUTBOX, ARGV[1])
return promote(ARGV[2], ARGV[3], now_ms())
