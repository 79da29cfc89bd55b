"""`python -m tasks COMMAND`: stepcache from the command line.

Exit codes: 0 done (a followed job succeeded), 1 a followed job failed or was cancelled, 2 bad input or
configuration (one line on stderr, no traceback), 3 a server could not be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from pymongo.errors import PyMongoError
from redis.exceptions import ConnectionError as RedisConnectionError

from common.events import Event, EventType, JobFailed, JobProgress, JobState
from common.exceptions import StepcacheError
from common.queue import JobStatus

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
BAR_WIDTH = 30


def progress_bar(fraction: float, message: str | None = None) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}" + (f" {message}" if message else "")


def follow(job_id: str, out: TextIO = sys.stdout) -> int:
    """Show the job's progress until it ends; the exit code says how it ended."""
    from tasks.queue import get_queue

    outcome = EXIT_OK
    for event in get_queue().follow(job_id):
        out.write("\r\033[K" + describe(event))
        if not isinstance(event, JobProgress):
            out.write("\n")
        out.flush()
        if isinstance(event, JobState) and JobStatus(event.status).is_terminal:
            outcome = EXIT_OK if event.status == JobStatus.SUCCESS else EXIT_JOB_FAILED
        elif event.type in (EventType.JOB_FAILED, EventType.JOB_CANCELLED):
            outcome = EXIT_JOB_FAILED
    return outcome


def describe(event: Event) -> str:
    """One line about an event of a followed job."""
    if isinstance(event, JobProgress):
        return progress_bar(event.fraction, event.message)
    if isinstance(event, JobState):
        return f"{event.step} {event.dataset}: {event.status} (attempts: {event.attempts})"
    if isinstance(event, JobFailed):
        return f"failed: {event.error_code}: {event.message}"
    return event.type.removeprefix("job.")


def backfill(dataset: str, out: TextIO = sys.stdout) -> int:
    """Enqueue what the graph expects of the dataset and the cache lacks, is obsolete or stale."""
    from tasks.queue import get_queue

    jobs = get_queue().backfill(dataset)
    for job in jobs:
        out.write(f"{job.job_id}  {job.step}  {job.dataset}  {job.config or ''}  {job.split or ''}\n")
    if not jobs:
        out.write(f"{dataset}: nothing to backfill\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tasks", description="stepcache from the command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    follow_parser = commands.add_parser("follow", help="show a job's progress until it ends")
    follow_parser.add_argument("job_id", metavar="JOB", help="the job id (what step.delay returned)")
    follow_parser.set_defaults(run=lambda args: follow(args.job_id))
    backfill_parser = commands.add_parser(
        "backfill", help="enqueue the dataset's missing, obsolete, stale or retryable cache entries"
    )
    backfill_parser.add_argument("dataset", metavar="DATASET", help="org/name or name")
    backfill_parser.set_defaults(run=lambda args: backfill(args.dataset))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except StepcacheError as error:
        print(f"stepcache: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RedisConnectionError, PyMongoError) as error:
        reason = str(error).split(" (configured timeouts", 1)[0][:200]
        print(f"stepcache: a server could not be reached: {type(error).__name__}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
