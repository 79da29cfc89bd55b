-- applied: the effects of these outbox records are applied; drop each record unless a newer decision
-- about its job replaced it meanwhile. An end's effects (its next steps among them) being applied is
-- journaled: until the ledger says so, a repair gives the end back to be applied again (idempotently).
-- ARGV pairs: job id, the record's fence
-- Returns 1 when the namespace has nothing left (its keys are gone or going).
for i = 1, #ARGV, 2 do
  local job = ARGV[i]
  local rec = redis.call('HGET', OUTBOX, job)
  if rec and string.find(rec, '^%a+|' .. ARGV[i + 1] .. '|') then
    redis.call('HDEL', OUTBOX, job)
    local _, _, kind, status, payload = string.find(rec, '^(%a+)|%d+|[^|]*|%d+|%d+|(%a*)|[^|]*|(.*)$')
    if kind == 'end' and status ~= 'cancelled' then
      journal('applied', job, tonumber(ARGV[i + 1]), now_ms(), payload)
    end
  end
end
return tidy()
