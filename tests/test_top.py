"""`python -m tasks top` and the namespace gauges over a seeded limiter, and the CLI's output when piped."""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from common import cache
from common.config import get_config
from common.event_bus import EventBus
from common.events import JOB_KEY_FIELDS, JobProgress, JobSucceeded
from common.metrics import LiveCollector
from common.queue import JobStatus, Queue
from common.queue.jobs import Job, Priority, unicity_id
from common.queue.limiter import Policy
from common.queue.queue import age_of
from common.redis_connection import get_redis
from tasks import cli
from tasks.top import format_wait
from tests.conftest import Stores, use_settings
from tests.test_queue import RecordingDispatcher, make_queue
from tests.waiting import eventually

pytestmark = pytest.mark.redis_topologies

STEP = "dataset-config-names"
OLD_WAIT = 90.0  # seconds the oldest job of "gamma" has waited when the test starts
ESCAPE = "\x1b"


@dataclass(frozen=True)
class Seeded:
    queue: Queue
    dispatcher: RecordingDispatcher


@pytest.fixture
def seeded(stores: Stores, clean_env: pytest.MonkeyPatch) -> Seeded:
    """alpha: 5 jobs under the default limit of 2, one started; beta: limit 1, 3 jobs; gamma: paused, a
    high-priority job just now and a normal one that has waited 90 s; idle: only an override."""
    use_settings(clean_env, {"QUEUE_MAX_JOBS_PER_NAMESPACE": "2"})
    jobs, dispatcher = make_queue(limit=2)
    queue = jobs.queue
    for i in range(5):
        queue.enqueue(STEP, f"alpha/ds{i}")
    first = dispatcher.take()[0]
    assert jobs.start(first.payload, first.token, "test-worker")
    queue.set_limit("beta", 1)
    for i in range(3):
        queue.enqueue(STEP, f"beta/ds{i}")
    queue.set_limit("gamma", 0)
    queue.enqueue(STEP, "gamma/new", priority="high")
    old = Job(
        job_id=str(uuid.uuid4()),
        step=STEP,
        dataset="gamma/old",
        namespace="gamma",
        status=JobStatus.WAITING,
        unicity_id=unicity_id(STEP, "gamma/old", None, None),
        priority=Priority.NORMAL,
        created_at=datetime.now(UTC) - timedelta(seconds=OLD_WAIT),
    )
    # As a rebuild from the ledger does: the job is parked at its creation time's place in line.
    assert queue.limiter.resync([(old, age_of(old))]) == 1
    queue.set_limit("idle", 5)
    return Seeded(queue, dispatcher)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def rows_of(output: str) -> dict[str, list[str]]:
    """The table's rows by their first cell (the total row under 'total')."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["namespace", "limit"])
    assert set(lines[header + 1]) == {"-"}
    rows = {}
    for line in lines[header + 2 :]:
        if line.startswith("*"):
            break  # the caption
        if set(line) == {"-"}:
            continue  # above the total
        cells = line.split()
        rows["total" if cells[0] == "total" else cells[0]] = cells
    return rows


def test_the_limiter_overview_has_the_seeded_figures(seeded: Seeded) -> None:
    overview = seeded.queue.limiter.overview()
    assert sorted(overview) == ["alpha", "beta", "gamma", "idle"]
    figures = {name: (o.limit, o.overridden, o.waiting, o.queued, o.started) for name, o in overview.items()}
    assert figures == {
        "alpha": (2, False, 3, 1, 1),
        "beta": (1, True, 2, 1, 0),
        "gamma": (0, True, 2, 0, 0),
        "idle": (5, True, 0, 0, 0),
    }
    # The oldest wait is the old job's, not the one first in line (the high-priority one).
    assert overview["gamma"].oldest_wait == pytest.approx(OLD_WAIT, abs=10)
    assert overview["alpha"].oldest_wait is not None and 0 <= overview["alpha"].oldest_wait < 10
    assert overview["idle"].oldest_wait is None
    assert overview["alpha"].counts == seeded.queue.counts()["alpha"]
    assert seeded.queue.limiter.overview(["beta"]).keys() == {"beta"}


def test_top_once_prints_the_table_sorted_by_waiting(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    seeded.queue.set_policy("alpha", Policy(weight=2))
    output = run_cli(capsys, "top", "--once")
    assert ESCAPE not in output
    rows = rows_of(output)
    assert list(rows) == ["alpha", "beta", "gamma", "idle", "total"]  # ties (beta, gamma): by name
    # namespace, limit, weight, waiting, queued, started, share of the started, borrowed, oldest wait
    assert rows["alpha"] == ["alpha", "2", "2", "3", "1", "1", "100%", "0", "0s"]
    assert rows["beta"] == ["beta", "1*", "1", "2", "1", "0", "0%", "0", "0s"]
    assert rows["gamma"][:8] == ["gamma", "0*", "1", "2", "0", "0", "0%", "0"]
    assert re.fullmatch(r"1m[23]\ds", rows["gamma"][8]), rows["gamma"]
    assert rows["idle"] == ["idle", "5*", "1", "0", "0", "0", "0%", "0", "-"]
    assert rows["total"][:4] == ["total", "(4", "namespaces)", "7"]
    assert rows["total"][4:7] == ["2", "1", "0"]
    assert "*: a limit override" in output


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("namespace", ["alpha", "beta", "gamma", "idle"]),
        ("waiting", ["alpha", "beta", "gamma", "idle"]),
        ("queued", ["alpha", "beta", "gamma", "idle"]),
        ("started", ["alpha", "beta", "gamma", "idle"]),
        ("oldest", ["gamma", "alpha", "beta", "idle"]),
    ],
)
def test_top_sorts(seeded: Seeded, capsys: pytest.CaptureFixture[str], sort: str, order: list[str]) -> None:
    assert list(rows_of(run_cli(capsys, "top", "--once", "--sort", sort))) == [*order, "total"]
    payload = json.loads(run_cli(capsys, "top", "--json", "--sort", sort))
    assert [row["namespace"] for row in payload["namespaces"]] == order


def test_top_sorts_other_orders(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    seeded.queue.set_limit("beta", 3)  # beta: 3 queued, more than alpha's 1
    assert list(rows_of(run_cli(capsys, "top", "--once", "--sort", "queued")))[:2] == ["beta", "alpha"]
    assert list(rows_of(run_cli(capsys, "top", "--once", "--sort", "waiting")))[:2] == ["alpha", "gamma"]


def test_top_limit_shows_the_top_rows_and_the_total_of_all(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    rows = rows_of(run_cli(capsys, "top", "--once", "--limit", "2"))
    assert list(rows) == ["alpha", "beta", "total"]
    assert rows["total"][:7] == ["total", "(4", "namespaces,", "2", "not", "shown)", "7"]
    payload = json.loads(run_cli(capsys, "top", "--json", "--limit", "1"))
    assert [row["namespace"] for row in payload["namespaces"]] == ["alpha"]
    assert payload["total"]["waiting"] == 7


def test_top_json_has_the_same_figures(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    payload = json.loads(run_cli(capsys, "top", "--json"))
    assert payload["sort"] == "waiting"
    by_name = {row.pop("namespace"): row for row in payload["namespaces"]}
    gamma_wait = by_name["gamma"].pop("oldest_wait_seconds")
    assert gamma_wait == pytest.approx(OLD_WAIT, abs=10)
    assert by_name["idle"].pop("oldest_wait_seconds") is None
    assert 0 <= by_name["alpha"].pop("oldest_wait_seconds") < 10
    assert 0 <= by_name["beta"].pop("oldest_wait_seconds") < 10
    assert [(row.pop("weight"), row.pop("borrowed")) for row in by_name.values()] == [(1.0, 0)] * 4
    assert by_name == {
        "alpha": {"limit": 2, "override": False, "waiting": 3, "queued": 1, "started": 1},
        "beta": {"limit": 1, "override": True, "waiting": 2, "queued": 1, "started": 0},
        "gamma": {"limit": 0, "override": True, "waiting": 2, "queued": 0, "started": 0},
        "idle": {"limit": 5, "override": True, "waiting": 0, "queued": 0, "started": 0},
    }
    total = payload["total"]
    assert total.pop("oldest_wait_seconds") == gamma_wait
    assert total == {"namespaces": 4, "waiting": 7, "queued": 2, "started": 1, "borrowed": 0}


def test_top_without_a_terminal_prints_a_table_per_refresh_until_interrupted(seeded: Seeded) -> None:
    from tasks.top import top

    out = io.StringIO()
    keys = io.StringIO()  # not a terminal: no key is read
    calls = []
    overview = seeded.queue.limiter.overview

    def counted() -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C: top exits 0
        return overview()

    seeded.queue.limiter.overview = counted  # type: ignore[method-assign]
    assert top(interval=0.01, out=out, keys=keys, limiter=seeded.queue.limiter) == 0
    assert out.getvalue().count("stepcache top") == 2
    assert len(re.findall(r"^alpha +2 +1 +3 +1 +1 ", out.getvalue(), re.MULTILINE)) == 2
    assert ESCAPE not in out.getvalue()


def test_waits_read_as_people_read_them() -> None:
    assert [format_wait(s) for s in (None, 0.4, 59.9, 60, 185, 3600 * 2 + 7 * 60, 86400 * 4 + 3 * 3600)] == [
        "-",
        "0s",
        "59s",
        "1m00s",
        "3m05s",
        "2h07m",
        "4d03h",
    ]


def test_the_gauges_label_only_the_top_namespaces_and_sum_all(seeded: Seeded) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    registry.register(LiveCollector(seeded.queue.limiter.overview, lambda: [], top=2))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }

    def labelled(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: value for (metric, labels), value in samples.items() if metric == name}

    # Top 2 by waiting: alpha (3), then beta (2, and one running) before gamma (2, none running).
    assert labelled("stepcache_jobs_waiting") == {(("namespace", "alpha"),): 3, (("namespace", "beta"),): 2}
    assert labelled("stepcache_jobs_running") == {
        (("namespace", "alpha"), ("state", "queued")): 1,
        (("namespace", "alpha"), ("state", "started")): 1,
        (("namespace", "beta"), ("state", "queued")): 1,
        (("namespace", "beta"), ("state", "started")): 0,
    }
    assert labelled("stepcache_namespace_limit") == {(("namespace", "alpha"),): 2, (("namespace", "beta"),): 1}
    assert set(labelled("stepcache_oldest_wait_seconds")) == {(("namespace", "alpha"),), (("namespace", "beta"),)}
    assert samples[("stepcache_jobs_waiting_all", ())] == 7
    assert labelled("stepcache_jobs_running_all") == {(("state", "queued"),): 2, (("state", "started"),): 1}
    assert samples[("stepcache_oldest_wait_seconds_all", ())] == pytest.approx(OLD_WAIT, abs=10)
    assert samples[("stepcache_namespaces", ())] == 4
    assert samples[("stepcache_leases_in_use", ())] == 3


def test_piped_status_and_follow_have_no_escape_codes(seeded: Seeded) -> None:
    cache.upsert_response(STEP, "alpha/ds0", {"config_names": []}, duration=0.5)
    out = io.StringIO()
    assert cli.status("alpha/ds0", out) == cli.EXIT_OK
    text = out.getvalue()
    assert ESCAPE not in text and "\r" not in text
    assert re.search(rf"^{STEP} +200 +0\.50s", text, re.MULTILINE), text
    assert re.search(r"^job +step +config", text, re.MULTILINE), text

    job = seeded.queue.jobs("alpha/ds1")[0]
    out = io.StringIO()
    outcome: list[int] = []
    follower = threading.Thread(target=lambda: outcome.append(cli.follow(job.job_id, out)), daemon=True)
    follower.start()
    eventually(lambda: "alpha/ds1: queued" in out.getvalue(), "the job's state")
    events = EventBus(get_redis(get_config().queue.redis_url))
    key = job.model_dump(include=JOB_KEY_FIELDS)
    for current, message in ((1, "half"), (1, "half"), (2, "all")):
        events.publish(JobProgress(**key, current=current, total=2, fraction=current / 2, message=message))
    events.publish(JobSucceeded(**key))
    follower.join(timeout=30)
    assert outcome == [cli.EXIT_OK]
    lines = out.getvalue().splitlines()
    assert ESCAPE not in out.getvalue() and "\r" not in out.getvalue()
    # One line per change of the bar, none repeated, then how it ended.
    assert lines[1:] == [" 50% half", "100% all", "succeeded"], lines


def test_limits_sets_and_shows_a_borrowing_policy(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    output = run_cli(capsys, "limits", "set", "beta", "--borrow", "--ceiling", "3", "--weight", "2.5")
    assert "borrowing idle capacity by default (QUEUE_BORROW): no" in output
    assert rows_of(output)["beta"][:5] == ["beta", "1", "(override)", "yes", "3"]
    assert rows_of(output)["beta"][5] == "2.5"
    output = run_cli(capsys, "limits", "set", "beta", "--no-borrow")  # the ceiling and weight stay
    assert rows_of(output)["beta"][:6] == ["beta", "1", "(override)", "no", "3", "2.5"]
    assert seeded.queue.limiter.policy("beta") == Policy(borrow=False, ceiling=3, weight=2.5)
    output = run_cli(capsys, "limits", "clear", "beta")
    assert seeded.queue.limiter.policy("beta") == Policy()
    assert rows_of(output)["beta"][:3] == ["beta", "2", "default"]  # its limit cleared too
