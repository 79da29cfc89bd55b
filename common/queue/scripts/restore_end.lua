-- restore_end: a job whose end Redis forgot (it lost its data, or rolled back to before the end) gets that
-- end back, as end.lua recorded it, instead of whatever older state Redis has of it: the reaper applies the
-- record (next steps, events: idempotently) and the journal tells the ledger. Two cases: a started job
-- whose cache entry its own attempt wrote (it reached its end), and an ended job whose effects the ledger
-- says are pending. Nothing when Redis decided about the job since (a journal entry, an end or a cancel).
-- ARGV[1] job id, ARGV[2] payload, ARGV[3] lease token, ARGV[4] attempts, ARGV[5] the end's fence (its
-- cache entry's), ARGV[6] ending ('success' | 'error' | 'crashed'), ARGV[7] error code, ARGV[8] when it ended
-- (ms, the Redis clock; '0': now): the record's time, which its children's dedupe starts from
-- Returns 1 when recorded, 0 when Redis knew the end or decided about the job since.
local job, payload = ARGV[1], ARGV[2]
local rec = redis.call('HGET', OUTBOX, job)
if (rec and string.sub(rec, 1, 9) ~= 'dispatch|') or journaled(job) then
  return 0
end
forget(job)
local now = now_ms()
next_fence(now) -- the sequence may be gone: fences go on from the clock
local fence, attempt = tonumber(ARGV[5]), tonumber(ARGV[4])
local ended = tonumber(ARGV[8]) > 0 and math.min(tonumber(ARGV[8]), now) or now
record(job, 'end', fence, ARGV[3], ended, attempt, ARGV[6], ARGV[7], payload)
journal(STATUS_OF[ARGV[6]], job, fence, ended, payload, attempt, ARGV[3], '', ARGV[7])
return 1
