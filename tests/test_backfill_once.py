"""A changed dataset is recomputed once, parent before children (issue 24, item 6; the viewer's issue #2596).

A backfill enqueues only the stale entries none of whose ancestors is stale or being computed; their
descendants follow through the steps' ends, each once its parents have their new output. Real Redis,
MongoDB-protocol server and Celery worker; the ledger says what ran and when.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common import cache, orchestrator, sources
from common.config import get_config
from common.lifecycle import Lifecycle, Outcome
from common.processing_graph import get_processing_graph
from common.queue import Job
from common.sources import get_source
from tasks import cli, samples
from tasks.api.cached import stand_in
from tasks.api.errors import ResponseNotReadyError
from tasks.queue import get_queue
from tests.conftest import Stores, use_settings
from tests.test_pipeline import content, run_pipeline, use_pipeline_settings, wait_until_settled
from tests.test_queue import make_queue
from tests.waiting import eventually, past_grace

ROOT = "dataset-config-names"
PARQUET_AND_INFO = "config-parquet-and-info"
Key = tuple[str, str | None, str | None]


@pytest.fixture
def mirror(stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "mirror"
    root.mkdir()
    use_pipeline_settings(monkeypatch, tmp_path, f"file://{root}")
    monkeypatch.setattr(sources, "MANIFEST_TTL_SECONDS", 0.0)  # a change is seen at once, not within a second
    yield root
    get_config.cache_clear()


def change_a_file(mirror: Path, dataset: str, relative: str, text: str) -> None:
    """Another content and a later modification time: the mirror's manifest, so its revision, changes."""
    path = samples.write(mirror / dataset / relative, text)
    later = path.stat().st_mtime + 10
    os.utime(path, (later, later))


CSV_ROWS = "id,text,score,flag\n" + "".join(f"{i},new {i},{i * 0.25},{i % 3 == 0}\n" for i in range(160))
CHANGES = [
    pytest.param(samples.csv_dataset, "train.csv", CSV_ROWS, 160 + 2, id="one-config"),
    pytest.param(
        samples.multi_config_dataset, "data/fr/train.csv", "word\n" + "mot\n" * 40, 2 + 40 + 1, id="two-configs"
    ),
]


def key_of(job: Job) -> Key:
    return (job.step, job.config, job.split)


def feeds(parent: Key, child: Key) -> bool:
    """Whether an entry of a parent step is an input of this entry of its child step: a dataset-level entry
    feeds every config and split, and takes in every one; a config-level one feeds its splits."""
    return all(a is None or b is None or a == b for a, b in zip(parent[1:], child[1:], strict=True))


def source_revision(dataset: str) -> str:
    return get_source().revision(dataset)


def started_since(dataset: str, before: set[str]) -> list[Job]:
    return [job for job in get_queue().jobs(dataset) if job.job_id not in before and job.started_at is not None]


@pytest.mark.parametrize(("make", "relative", "text", "rows"), CHANGES)
def test_a_changed_file_then_a_backfill_runs_each_step_once_in_graph_order(
    mirror: Path,
    celery_worker: object,
    default_graph: None,
    make: Callable[[Path], str],
    relative: str,
    text: str,
    rows: int,
) -> None:
    dataset = make(mirror)
    run_pipeline(dataset)
    before = {job.job_id for job in get_queue().jobs(dataset)}
    change_a_file(mirror, dataset, relative, text)
    revision = source_revision(dataset)

    planned = orchestrator.backfill(get_queue(), dataset)

    assert [key_of(job) for job in planned] == [(ROOT, None, None)]  # every other entry is below it
    eventually(
        lambda: all(e.dataset_git_revision == revision for e in cache.get_dataset_responses(dataset)),
        "every entry at the new revision",
    )
    entries = wait_until_settled(dataset)
    ran = started_since(dataset, before)
    runs = Counter(key_of(job) for job in ran)
    assert runs == Counter(set(entries)), f"runs per entry after the change: {sorted(runs.items())}"
    graph = get_processing_graph()
    for child in ran:
        for parent in ran:
            if parent.step in graph.get_step(child.step).parents and feeds(key_of(parent), key_of(child)):
                assert parent.finished_at is not None and child.started_at is not None
                assert parent.finished_at <= child.started_at, f"{key_of(child)} started before {key_of(parent)} ended"
    assert all(entry.dataset_git_revision == revision for entry in entries.values())
    assert content(entries, "dataset-size")["size"]["dataset"]["num_rows"] == rows
    assert orchestrator.backfill(get_queue(), dataset) == []


def computed_at_an_older_revision(mirror: Path) -> str:
    """A dataset of the mirror whose root and config-parquet-and-info entries are of another revision."""
    dataset = samples.csv_dataset(mirror)
    configs = {"config_names": [{"dataset": dataset, "config": "default"}]}
    cache.upsert_response(ROOT, dataset, configs, dataset_git_revision="old")
    cache.upsert_response(PARQUET_AND_INFO, dataset, {}, config="default", dataset_git_revision="old")
    return dataset


def test_a_backfill_while_a_parent_waits_or_runs_enqueues_none_of_its_descendants(
    mirror: Path, default_graph: None
) -> None:
    """A stale parent and its stale child: the parent only, and nothing more while it waits or runs; its
    end enqueues the child, once."""
    q, dispatcher = make_queue(limit=1)
    dataset = computed_at_an_older_revision(mirror)
    q.queue.set_limit("org", 0)
    (root,) = orchestrator.backfill(q.queue, dataset)
    assert key_of(root) == (ROOT, None, None)  # both are stale: config-parquet-and-info waits for its parent
    assert orchestrator.backfill(q.queue, dataset) == []  # the root waits
    q.queue.set_limit("org", None)
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    assert orchestrator.backfill(q.queue, dataset) == []  # the root runs
    assert [job.job_id for job in q.queue.jobs(dataset)] == [root.job_id]
    assert q.end(attempt, Outcome.success(cache.get_response(ROOT, dataset).content, revision=source_revision(dataset)))
    assert orchestrator.backfill(q.queue, dataset) == []  # its children wait
    assert Counter(key_of(job) for job in q.queue.jobs(dataset)) == {
        (ROOT, None, None): 1,
        ("config-split-names", "default", None): 1,
        (PARQUET_AND_INFO, "default", None): 1,
    }


def test_a_backfill_between_a_parents_end_and_its_next_steps_leaves_them_to_the_end(
    mirror: Path, default_graph: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent ended with its new output, its next steps not enqueued yet (the end's effects pending, as
    if its process stopped there): a backfill enqueues none of them; the end, applied by the reaper, does."""
    use_settings(monkeypatch, {"WORKER_HEARTBEAT_INTERVAL_SECONDS": "0.2"})  # the reaper's grace: 0.4 s
    q, dispatcher = make_queue(limit=1)
    dataset = computed_at_an_older_revision(mirror)
    (root,) = orchestrator.backfill(q.queue, dataset)
    (dispatch,) = dispatcher.take()
    attempt = q.start(dispatch.payload, dispatch.token, "w1")
    assert attempt is not None
    configs = cache.get_response(ROOT, dataset).content
    apply = Lifecycle.apply
    monkeypatch.setattr(Lifecycle, "apply", lambda self, records, outcome=None: False)
    assert q.end(attempt, Outcome.success(configs, revision=source_revision(dataset)))
    monkeypatch.setattr(Lifecycle, "apply", apply)
    assert cache.get_response(ROOT, dataset).dataset_git_revision == source_revision(dataset)
    assert [job.job_id for job in q.queue.in_process(dataset)] == [root.job_id]
    assert orchestrator.backfill(q.queue, dataset) == []  # config-parquet-and-info is the end's to enqueue
    # The API's and the CLI's backfills are the same.
    with pytest.raises(ResponseNotReadyError) as not_ready:  # and the entry is said to be on its way
        stand_in(PARQUET_AND_INFO, dataset, "default", None)
    assert not_ready.value.fields["job_id"] == root.job_id
    out = io.StringIO()
    assert cli.backfill(dataset, out) == 0 and out.getvalue() == f"{dataset}: nothing to backfill\n"
    past_grace()
    q.reap()  # the end's effects applied
    assert orchestrator.backfill(q.queue, dataset) == []
    children = Counter(key_of(job) for job in q.queue.jobs(dataset) if job.step != ROOT)
    assert children == {("config-split-names", "default", None): 1, (PARQUET_AND_INFO, "default", None): 1}
    assert {key_of(job) for job in q.queue.in_process(dataset)} == set(children)
