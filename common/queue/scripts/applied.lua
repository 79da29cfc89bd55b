-- applied: the effects of these outbox records are applied; drop each record unless a newer decision
-- about its job replaced it meanwhile.
-- ARGV pairs: job id, the record's fence
-- Returns 1 when the namespace has nothing left (its keys are gone or going).
for i = 1, #ARGV, 2 do
  local rec = redis.call('HGET', OUTBOX, ARGV[i])
  if rec and string.find(rec, '^%a+|' .. ARGV[i + 1] .. '|') then
    redis.call('HDEL', OUTBOX, ARGV[i])
  end
end
return tidy()
