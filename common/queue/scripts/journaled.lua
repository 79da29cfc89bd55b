-- journaled: the first entries of the journal are written to MongoDB: drop them, unless another writer
-- did already (the head is no longer the first entry read; what follows is written again, harmlessly).
-- ARGV[1] the first entry read, ARGV[2] how many were read
-- Returns 1 when the namespace has nothing left (its keys are gone or going).
if redis.call('LINDEX', JOURNAL, 0) == ARGV[1] then
  redis.call('LTRIM', JOURNAL, tonumber(ARGV[2]), -1)
end
return tidy()
