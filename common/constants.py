"""Every MongoDB collection name and Redis key prefix stepcache uses, in one place."""

CACHE_COLLECTION = "cachedResponses"
CACHE_COUNTS_COLLECTION = "cacheCounts"  # entries per (kind, http_status, error_code), kept as they change
JOBS_COLLECTION = "jobs"

# Redis keys of one namespace share the hash tag `{namespace}` so a Lua script touching them is cluster-safe.
REDIS_PREFIX = "stepcache"
GENERATIONS_COLLECTION = "redisGenerations"  # each Redis master's generation, as the ledger last saw it
