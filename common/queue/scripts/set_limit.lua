-- set_limit: set (ARGV[3] a number) or clear (ARGV[3] empty) the namespace's limit, then promote:
-- raising a limit dispatches waiting jobs at once; 0 pauses the namespace.
-- ARGV[1] default limit, ARGV[2] queued lease TTL (ms), ARGV[3] the new limit or ''
if ARGV[3] == '' then
  redis.call('DEL', LIMIT)
else
  redis.call('SET', LIMIT, ARGV[3])
end
return promote(ARGV[1], ARGV[2], now_ms())
