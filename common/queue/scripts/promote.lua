-- promote: lease free slots to the best waiting jobs (after reconcile).
-- ARGV[1] default limit, ARGV[2] queued lease TTL (ms)
-- Returns dispatched.
return promote(ARGV[1], ARGV[2], now_ms())
