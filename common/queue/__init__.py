"""The queue: the job ledger in MongoDB and the per-namespace concurrency limiter on Redis."""

from common.queue.jobs import Dispatch, Job, JobPayload, JobStatus, Priority
from common.queue.queue import Dispatcher, Queue

__all__ = ["Dispatch", "Dispatcher", "Job", "JobPayload", "JobStatus", "Priority", "Queue"]
