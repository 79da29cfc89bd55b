"""`python -m tasks COMMAND`: stepcache from the command line.

Commands: run, enqueue, status, follow, backfill, cancel, limits, top, reconcile, cache-counts, workers
(`python -m tasks COMMAND -h`). Tables and progress bars are drawn by tasks/display.py (rich): plain text
without escape codes when the output is not a terminal.
Exit codes: 0 done (a followed job succeeded), 1 a followed job failed or was cancelled (or `run --once`
did not finish), 2 bad input or configuration, 3 a server could not be reached (or no worker answered);
every error is one line on stderr, without a traceback. A command whose standard output is closed early
(`status org/ds | head`) stops quietly with 141, as a program killed by SIGPIPE would (128 + 13). A
command pings the servers it needs first (tasks/reachability.py): down, they cost it seconds, not minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from kombu.exceptions import OperationalError as BrokerError
from pymongo.errors import PyMongoError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import orchestrator
from common.events import Event, EventType, JobFailed, JobProgress, JobState
from common.exceptions import InvalidArgumentsError, ServerUnreachableError, StepcacheError
from common.follow import follow as follow_job
from common.queue import JobStatus
from common.queue.limiter import Policy
from tasks.display import ProgressBar, make_console, make_table, print_line, print_table, steps_known
from tasks.reachability import Server, check_reachable
from tasks.top import SORT_COLUMNS

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a program a closed pipe stopped
ALL_SERVERS = (Server.REDIS, Server.MONGODB, Server.BROKER)
# What each command talks to, pinged before it runs (run starts its own servers; api answers 503 for a
# server down; workers says by itself who did not answer).
SERVERS_NEEDED: dict[str, tuple[Server, ...]] = {
    "follow": (Server.REDIS, Server.MONGODB),
    "status": (Server.REDIS, Server.MONGODB),
    "top": (Server.REDIS, Server.MONGODB),
    "cache-counts": (Server.MONGODB,),
    "backfill": ALL_SERVERS,
    "enqueue": ALL_SERVERS,
    "cancel": ALL_SERVERS,
    "limits": ALL_SERVERS,
    "reconcile": ALL_SERVERS,
    "prune": ALL_SERVERS,
}


def follow(job_id: str, out: TextIO = sys.stdout) -> int:
    """Show the job's progress until it ends; the exit code says how it ended."""
    from tasks.queue import get_queue

    outcome = EXIT_OK
    with ProgressBar(make_console(out)) as bar:
        queue = get_queue()
        for event in follow_job(queue.job, queue.events, job_id):
            if isinstance(event, JobProgress):
                bar.update(event.fraction, event.message)
            else:
                bar.print(describe(event))
            if isinstance(event, JobState) and JobStatus(event.status).is_terminal:
                outcome = EXIT_OK if event.status == JobStatus.SUCCESS else EXIT_JOB_FAILED
            elif event.type in (EventType.JOB_FAILED, EventType.JOB_CANCELLED):
                outcome = EXIT_JOB_FAILED
    return outcome


def describe(event: Event) -> str:
    """One line about an event of a followed job."""
    if isinstance(event, JobProgress):
        return f"{event.fraction:.0%}" + (f" {event.message}" if event.message else "")
    if isinstance(event, JobState):
        return f"{event.step} {event.dataset}: {event.status} (attempts: {event.attempts})"
    if isinstance(event, JobFailed):
        return f"failed: {event.error_code}: {event.message}"
    return event.type.removeprefix("job.")


def backfill(dataset: str, out: TextIO = sys.stdout) -> int:
    """Enqueue what the graph expects of the dataset and the cache lacks, is obsolete or stale."""
    from tasks.queue import get_queue

    jobs = orchestrator.backfill(get_queue(), dataset)
    for job in jobs:
        out.write(f"{job.job_id}  {job.step}  {job.dataset}  {job.config or ''}  {job.split or ''}\n")
    if not jobs:
        out.write(f"{dataset}: nothing to backfill\n")
    return EXIT_OK


def enqueue(step: str, dataset: str, config: str | None, split: str | None, priority: str, out: TextIO) -> int:
    from tasks.steps import get_step_task

    kwargs = {name: value for name, value in (("config", config), ("split", split)) if value is not None}
    result = get_step_task(step).apply_async([dataset], kwargs, priority=priority)
    out.write(f"{result.id}\n")
    return EXIT_OK


def status(dataset: str, out: TextIO) -> int:
    from common import cache
    from tasks.queue import get_queue

    console = make_console(out)
    entries = cache.get_dataset_responses(dataset)
    cache_table = make_table(
        ["kind", "config", "split", "status", "error", "duration", "updated"],
        [
            [
                e.kind,
                e.config or "",
                e.split or "",
                e.http_status,
                e.error_code or "",
                f"{e.duration:.2f}s" if e.duration is not None else "",
                e.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for e in entries
        ],
        console,
        right={"duration"},
        title=f"cache of {dataset}:",
    )
    print_table(console, cache_table)
    jobs = get_queue().jobs(dataset)[-50:]
    jobs_table = make_table(
        ["job", "step", "config", "split", "priority", "status", "attempts", "error"],
        [
            [j.job_id, j.step, j.config or "", j.split or "", j.priority, j.status, j.attempts, j.error_code or ""]
            for j in jobs
        ],
        console,
        right={"attempts"},
        title=f"jobs of {dataset} (the latest {len(jobs)}):",
    )
    print_line(console, "")
    print_table(console, jobs_table)
    return EXIT_OK


def cancel(dataset: str, revoke: bool, out: TextIO) -> int:
    from tasks.queue import get_queue

    cancelled = get_queue().cancel(dataset, revoke_started=revoke)
    out.write(f"{len(cancelled)} job(s) of {dataset} cancelled\n")
    return EXIT_OK


def limits(action: str, namespace: str | None, value: int | None, out: TextIO, policy: Policy | None = None) -> int:
    from common.config import get_config
    from tasks.queue import get_queue

    queue = get_queue()
    policy = policy or Policy()
    changes_policy = any(field is not None for field in (policy.borrow, policy.ceiling, policy.weight))
    if action == "set":
        if namespace is None or (value is None and not changes_policy):
            raise InvalidArgumentsError(
                "limits set NAMESPACE N: both are needed (or a policy: --borrow, --no-borrow, --ceiling N, --weight W)"
            )
        if value is not None:
            queue.set_limit(namespace, value)
        if changes_policy:
            queue.set_policy(namespace, policy)
    elif action == "clear":
        if namespace is None:
            raise InvalidArgumentsError("limits clear NAMESPACE: the namespace is needed")
        queue.set_limit(namespace, None)
        queue.set_policy(namespace, None)
    console = make_console(out)
    settings = get_config().queue
    print_line(console, f"default (QUEUE_MAX_JOBS_PER_NAMESPACE): {settings.max_jobs_per_namespace}")
    print_line(console, f"borrowing idle capacity by default (QUEUE_BORROW): {'yes' if settings.borrow else 'no'}")
    rows = [
        [
            name,
            f"{o.limit}{' (override)' if o.overridden else ''}",
            "default" if o.policy.borrow is None else ("yes" if o.policy.borrow else "no"),
            "" if o.policy.ceiling is None else o.policy.ceiling,
            f"{o.weight:g}",
            o.waiting,
            o.queued,
            o.started,
            o.borrowed,
        ]
        for name, o in sorted(queue.limiter.overview().items())
    ]
    headers = ["namespace", "limit", "borrow", "ceiling", "weight", "waiting", "queued", "started", "borrowed"]
    print_table(console, make_table(headers, rows, console, right=headers[3:]))
    return EXIT_OK


def reconcile(out: TextIO) -> int:
    """Make Redis agree with the ledger, the newer side winning (the reaper also does it by itself when
    Redis lost its data or rolled back)."""
    from tasks.queue import get_queue

    restored = get_queue().reconcile()
    out.write(f"{restored} job(s) took the ledger's state\n")
    return EXIT_OK


def cache_counts(recount: bool, out: TextIO) -> int:
    """The cache entries per kind, status and error code, as kept (the metrics' figures), or counted again
    and kept (`--recount`: the repair of counts a crash left off, as each worker does when it starts)."""
    from common import cache
    from common.cache_counts import kept_counts

    counts = cache.recount_entries() if recount else kept_counts()
    console = make_console(out)
    rows = [[c.kind, c.http_status, c.error_code or "", c.count] for c in counts]
    print_table(console, make_table(["kind", "status", "error", "entries"], rows, console, right={"entries"}))
    return EXIT_OK


def prune(dry_run: bool, out: TextIO) -> int:
    from common.sources import get_source
    from tasks import removal

    gone = removal.prune(get_source(), dry_run)
    verb = "would remove" if dry_run else "removed"
    out.write("".join(f"{verb} {dataset}\n" for dataset in gone) or "every dataset of the cache is in the source\n")
    return EXIT_OK


def workers(out: TextIO) -> int:
    """The workers in the registry (common/registry.py) beside those that answer Celery's ping, then the
    registered API processes; exit 3 when no worker answers."""
    from common.registry import Role, get_registry
    from tasks import app

    records = get_registry().live()
    replies = app.control.inspect(timeout=2.0).ping() or {}
    # Asked by name, the answers come as soon as every worker that answered the ping gave its own.
    inspector = app.control.inspect(timeout=2.0, destination=sorted(replies)) if replies else None
    active = (inspector.active() or {}) if inspector else {}
    consumed = (inspector.active_queues() or {}) if inspector else {}
    registered = {
        record.node or f"{record.host}:{record.pid}": record for record in records if record.role == Role.WORKER
    }
    rows = []
    for name in sorted(registered.keys() | replies.keys()):
        record, answers = registered.get(name), name in replies
        queues = record.queues if record else [queue["name"] for queue in consumed.get(name, [])]
        running = len(active.get(name, [])) if answers else ""
        seen = "registry+ping" if record and answers else "registry" if record else "ping"
        if record is None:
            rows.append([name, "", "", ",".join(queues), "", running, "", "", "", seen])
            continue
        started = record.started_at.strftime("%Y-%m-%d %H:%M:%S")
        details = [record.host, record.pid, ",".join(queues), record.concurrency or "", running, record.version]
        rows.append([name, *details, record.metrics_url or "", started, seen])
    console = make_console(out)
    if rows:
        headers = [
            "worker",
            "host",
            "pid",
            "queues",
            "concurrency",
            "running",
            "version",
            "metrics",
            "started",
            "seen by",
        ]
        print_table(console, make_table(headers, rows, console, right={"pid", "concurrency", "running"}))
        for line in steps_known(records):
            print_line(console, line)
    apis = [record for record in records if record.role == Role.API]
    if apis:
        api_rows = [
            [r.host, r.pid, r.version, r.metrics_url or "", r.started_at.strftime("%Y-%m-%d %H:%M:%S")] for r in apis
        ]
        print_line(console, "")
        headers = ["API host", "pid", "version", "metrics", "started"]
        print_table(console, make_table(headers, api_rows, console, right={"pid"}))
    if not replies:
        print_line(console, "no worker answered a ping" + ("" if registered else ", and none is in the registry"))
        return EXIT_UNREACHABLE
    return EXIT_OK


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors (its commands' too) as one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"stepcache: {self.prog}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m tasks", description="stepcache from the command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    follow_parser = commands.add_parser("follow", help="show a job's progress until it ends")
    follow_parser.add_argument("job_id", metavar="JOB", help="the job id (what step.delay returned)")
    follow_parser.set_defaults(run=lambda args: follow(args.job_id, sys.stdout))
    backfill_parser = commands.add_parser(
        "backfill", help="enqueue the dataset's missing, obsolete, stale or retryable cache entries"
    )
    backfill_parser.add_argument("dataset", metavar="DATASET", help="org/name or name")
    backfill_parser.set_defaults(run=lambda args: backfill(args.dataset, sys.stdout))

    run_parser = commands.add_parser("run", help="run everything locally on embedded defaults (make run)")
    run_parser.add_argument("--once", action="store_true", help="exit when the sample pipelines are done")
    run_parser.add_argument("--home", type=Path, default=None, help="where local data goes (default: .stepcache)")
    run_parser.add_argument("--flower-port", type=_port, default=5555, help="Flower's port (default: 5555)")
    run_parser.add_argument("--api-port", type=_port, default=8000, help="the HTTP API's port (default: 8000)")
    run_parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of your own steps, loaded by every process it starts (repeat for more)",
    )
    run_parser.set_defaults(run=_run)

    api_parser = commands.add_parser("api", help="serve the cache, jobs and assets over HTTP (uvicorn)")
    api_parser.add_argument("--host", default=None, help="the address to listen on (default: API_HOST)")
    api_parser.add_argument("--port", type=_port, default=None, help="the port (default: API_PORT)")
    api_parser.add_argument("--workers", type=_positive, default=None, help="processes (default: API_WORKERS)")
    api_parser.set_defaults(run=_api)

    enqueue_parser = commands.add_parser("enqueue", help="enqueue one step for a dataset, config or split")
    enqueue_parser.add_argument("step", metavar="STEP", help="a step of the graph, e.g. dataset-config-names")
    enqueue_parser.add_argument("dataset", metavar="DATASET", help="org/name or name")
    enqueue_parser.add_argument("--config", default=None)
    enqueue_parser.add_argument("--split", default=None)
    enqueue_parser.add_argument("--priority", default="normal", help="low, normal (default) or high")
    enqueue_parser.set_defaults(
        run=lambda args: enqueue(args.step, args.dataset, args.config, args.split, args.priority, sys.stdout)
    )

    status_parser = commands.add_parser("status", help="a dataset's cache entries and jobs, as tables")
    status_parser.add_argument("dataset", metavar="DATASET")
    status_parser.set_defaults(run=lambda args: status(args.dataset, sys.stdout))

    cancel_parser = commands.add_parser("cancel", help="cancel a dataset's waiting and queued jobs")
    cancel_parser.add_argument("dataset", metavar="DATASET")
    cancel_parser.add_argument("--revoke", action="store_true", help="also stop its started jobs (SIGTERM)")
    cancel_parser.set_defaults(run=lambda args: cancel(args.dataset, args.revoke, sys.stdout))

    limits_parser = commands.add_parser("limits", help="show, set or clear per-namespace limits")
    limits_parser.add_argument("action", nargs="?", choices=["show", "set", "clear"], default="show")
    limits_parser.add_argument("namespace", nargs="?", default=None)
    limits_parser.add_argument("value", nargs="?", type=_non_negative, default=None, help="the limit; 0 pauses")
    limits_parser.add_argument(
        "--borrow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="at its limit, the namespace may (or may not) borrow idle capacity (default: QUEUE_BORROW)",
    )
    limits_parser.add_argument(
        "--ceiling", type=_non_negative, default=None, help="the most slots it holds, borrowed ones included"
    )
    limits_parser.add_argument(
        "--weight", type=_weight, default=None, help="its share of borrowed capacity against other borrowers (1)"
    )
    limits_parser.set_defaults(
        run=lambda args: limits(
            args.action, args.namespace, args.value, sys.stdout, Policy(args.borrow, args.ceiling, args.weight)
        )
    )

    reconcile_parser = commands.add_parser("reconcile", help="make Redis' limiter state agree with the ledger")
    reconcile_parser.set_defaults(run=lambda args: reconcile(sys.stdout))
    counts_parser = commands.add_parser("cache-counts", help="the cache entries per kind, status and error code")
    counts_parser.add_argument("--recount", action="store_true", help="count the whole cache again and keep that")
    counts_parser.set_defaults(run=lambda args: cache_counts(args.recount, sys.stdout))
    prune_parser = commands.add_parser(
        "prune", help="remove the entries, jobs and files of datasets the source no longer has"
    )
    prune_parser.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    prune_parser.set_defaults(run=lambda args: prune(args.dry_run, sys.stdout))
    workers_parser = commands.add_parser(
        "workers", help="the registered workers and API processes, and the workers that answer a ping"
    )
    workers_parser.set_defaults(run=lambda args: workers(sys.stdout))

    top_parser = commands.add_parser(
        "top",
        help="a live view of the namespaces: limit, waiting, queued, started, oldest wait",
        description="A live view of the namespaces the limiter knows, refreshed every --interval seconds. Keys: "
        "n, w, u, s, o sort by namespace, waiting, queued, started, oldest wait; r reverses; q or Ctrl-C quits. "
        "When the output is not a terminal, a table is printed at every refresh.",
    )
    top_parser.add_argument(
        "--sort", choices=SORT_COLUMNS, default="waiting", help="the order (default: waiting; numbers descending)"
    )
    top_parser.add_argument("--limit", type=_positive, default=None, metavar="N", help="the top N rows, plus a total")
    top_parser.add_argument("--once", action="store_true", help="print the table once and exit")
    top_parser.add_argument("--json", action="store_true", help="print the figures as JSON once and exit")
    top_parser.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="SECONDS", help="refresh period (default: 1)"
    )
    top_parser.set_defaults(run=_top)
    return parser


def _whole_number(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        expected = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise argparse.ArgumentTypeError(f"expected a whole number {expected}, not {text!r}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative(text: str) -> int:
    return _whole_number(text, 0)


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"a weight is a number more than 0 and at most 1000, not {text!r}")
    return value


def _port(text: str) -> int:
    return _whole_number(text, 1, 65535)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds more than 0, not {text!r}")
    return value


def _top(args: argparse.Namespace) -> int:
    from tasks.top import top

    return top(
        sort=args.sort, limit=args.limit, once=args.once, as_json=args.json, interval=args.interval, out=sys.stdout
    )


def _run(args: argparse.Namespace) -> int:
    from tasks.run import DEFAULT_HOME, run

    return run(
        home=args.home or DEFAULT_HOME,
        once=args.once,
        flower_port=args.flower_port,
        api_port=args.api_port,
        imports=args.imports,
    )


def _api(args: argparse.Namespace) -> int:
    from tasks.api.serve import serve_api

    return serve_api(host=args.host, port=args.port, workers=args.workers)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        check_reachable(SERVERS_NEEDED.get(args.command, ()))
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here, and not as a traceback at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except ServerUnreachableError as error:
        print(f"stepcache: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except StepcacheError as error:
        print(f"stepcache: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RedisConnectionError, RedisTimeoutError, PyMongoError, BrokerError) as error:
        reason = " ".join(str(error).split(" (configured timeouts", 1)[0].split())[:200]
        print(f"stepcache: a server could not be reached: {type(error).__name__}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


def _stdout_closed() -> int:
    """The reader of the output went away (`| head`): what is left to print goes nowhere, quietly (Python's
    advice: https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test's captured output): nothing to redirect
        pass
    return EXIT_STDOUT_CLOSED
