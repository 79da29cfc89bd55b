-- restore_end: a started job whose end Redis lost with its data (its cache entry, newer than its start,
-- says it ended) gets that end back, as end.lua recorded it, instead of its lease: the reaper applies the
-- record (next steps, events) and the journal tells the ledger. Nothing when Redis knows the job.
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] lease token, ARGV[4] attempts, ARGV[5] the end's fence (its
-- cache entry's), ARGV[6] ending ('success' | 'error'), ARGV[7] error code
-- Returns 1 when recorded, 0 when Redis knew the job or its end.
local job, payload = ARGV[1], ARGV[2]
if redis.call('HEXISTS', OUTBOX, job) == 1 or redis.call('HEXISTS', JOBS, job) == 1 or journaled(job) then
  return 0
end
local now = now_ms()
next_fence(now) -- the sequence may be gone: fences go on from the clock
local fence, attempt = tonumber(ARGV[5]), tonumber(ARGV[4])
record(job, 'end', fence, ARGV[3], now, attempt, ARGV[6], ARGV[7], payload)
journal(STATUS_OF[ARGV[6]], job, fence, now, payload, attempt, ARGV[3], '', ARGV[7])
return 1
