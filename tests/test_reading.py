"""Reading datasets with `datasets`, from a local mirror and from a Hub-compatible server, in every format."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import get_config
from common.exceptions import ConfigNotFoundError, DatasetNotFoundError, EmptyDatasetError, SplitNotFoundError
from common.progress import Progress
from common.reading import Split, config_names, open_split, split_names
from common.sources import DatasetSource, HubSource, LocalMirror, get_source
from common.tables import column_kind, features, features_of
from tasks import samples
from tasks.step_task import StepJob
from tasks.steps.parquet import convert
from tests import formats
from tests.hub_server import HubServer


@pytest.fixture(params=["mirror", "hub"])
def source_root(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[DatasetSource, Path, HubServer | None]]:
    """A directory to write repositories in, and the source that serves it: a mirror, or a local Hub."""
    root = tmp_path / "repos"
    root.mkdir()
    monkeypatch.setenv("COMMON_HF_CACHE_DIRECTORY", str(tmp_path / "hf-cache"))
    if request.param == "mirror":
        monkeypatch.setenv("COMMON_HF_ENDPOINT", str(root))
        get_config.cache_clear()
        yield get_source(), root, None
    else:
        request.getfixturevalue("stores")  # the Hub's breaker keeps its state in Redis
        with HubServer(root) as server:
            monkeypatch.setenv("COMMON_HF_ENDPOINT", server.url)
            get_config.cache_clear()
            yield get_source(), root, server
    get_config.cache_clear()


def opened(source: DatasetSource, dataset: str, config: str, split: str) -> Split:
    return open_split(source, source.locate(dataset, source.revision(dataset)), config, split)


@pytest.mark.parametrize("kind", list(formats.EXPECTED))
def test_every_format_and_layout_reads_the_same_way(
    kind: str, source_root: tuple[DatasetSource, Path, HubServer | None]
) -> None:
    source, root, _ = source_root
    write, splits, first_row, types = formats.EXPECTED[kind]
    dataset = write(root)
    location = source.locate(dataset, source.revision(dataset))
    assert config_names(source, location) == list(splits)
    assert {config: split_names(source, location, config) for config in splits} == splits
    config = next(iter(splits))
    split = open_split(source, location, config, splits[config][0])
    described = {f["name"]: f["type"] for f in features(split.features)}
    assert {name: t.get("dtype", t["_type"]) for name, t in described.items()} == types
    rows = [row for table in split.batches(7) for row in split.embed(table).to_pylist()]
    assert first_row.items() <= rows[0].items()
    if types == formats.NUMBERS:
        assert rows == formats.ROWS  # every row, in order, across shards and batches
    for name, feature in split.features.items():
        if column_kind(feature) in ("image", "audio"):
            assert all(row[name]["bytes"] for row in rows)  # embedded, whatever the source


def test_missing_datasets_configs_and_splits_are_typed(
    source_root: tuple[DatasetSource, Path, HubServer | None],
) -> None:
    source, root, _ = source_root
    with pytest.raises(DatasetNotFoundError):
        source.revision("fmt/nothing")
    dataset = formats.csv_repo(root)
    location = source.locate(dataset, source.revision(dataset))
    with pytest.raises(ConfigNotFoundError):
        split_names(source, location, "nope")
    with pytest.raises(ConfigNotFoundError):
        open_split(source, location, "nope", "train")
    with pytest.raises(SplitNotFoundError):
        open_split(source, location, "default", "nope")
    empty = samples.empty_dataset(root)
    with pytest.raises(EmptyDatasetError):
        config_names(source, source.locate(empty, source.revision(empty)))


def test_media_files_are_read_only_by_embed_and_kept_byte_for_byte(
    source_root: tuple[DatasetSource, Path, HubServer | None],
) -> None:
    """A stream's rows name their media files; embedding reads them, inside the source's call. From a Hub,
    `datasets` would decode them in a thread pool of its own, ahead of the rows asked for (outside the call
    that points the libraries at the source: the suite once saw such a thread ask huggingface.co), and
    re-encode them (the Parquet export would not hold the dataset's own files)."""
    source, root, _ = source_root
    dataset = formats.imagefolder_repo(root)
    split = opened(source, dataset, "default", "train")
    batch = next(split.batches(7))
    assert all(cell["bytes"] is None and cell["path"] for cell in batch.column("image").to_pylist())
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("datasets_decode")]
    files = {path.name: path.read_bytes() for path in (root / dataset).rglob("*.png")}
    embedded = split.embed(batch).column("image").to_pylist()
    assert [files[cell["path"].rsplit("/", 1)[-1]] for cell in embedded] == [cell["bytes"] for cell in embedded]


def bytes_read_by_this_process() -> int:
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


def test_the_first_rows_of_a_big_file_read_only_its_beginning(
    source_root: tuple[DatasetSource, Path, HubServer | None],
) -> None:
    source, root, server = source_root
    path = root / "big" / "csv" / "train.csv"
    path.parent.mkdir(parents=True)
    with path.open("w") as file:
        file.write("id,text\n")
        for start in range(0, 600_000, 100_000):
            file.write("".join(f"{i},{'x' * 40}\n" for i in range(start, start + 100_000)))
    size = path.stat().st_size  # 30 MB
    split = opened(source, "big/csv", "default", "train")
    before = bytes_read_by_this_process()
    first = next(split.batches(101))
    assert first.num_rows == 101 and first.column("id")[100].as_py() == 100
    if server is None:
        assert bytes_read_by_this_process() - before < size / 10
    else:  # over HTTP ranges, which fsspec reads ahead in blocks of 5 MiB
        assert 0 < sum(sent for name, sent in server.bytes_sent.items() if "big/csv" in name) <= 2.2 * 2**20 * 5


def first_rows(source: DatasetSource, dataset: str) -> list[dict[str, object]]:
    split = opened(source, dataset, "default", "train")
    return [row for table in itertools.islice(split.batches(7), 1) for row in table.to_pylist()]


def test_sources_meet_in_one_process_in_any_order_and_at_once(
    stores: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call reads from its own source, whatever other sources (a mirror, another Hub, the default one)
    were created or read before it, are read at the same time, or left in the libraries' settings; a split
    opened first still reads from its own source after builders of the same format were made for others."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("COMMON_HF_CACHE_DIRECTORY", str(tmp_path / "hf-cache"))
    get_config.cache_clear()
    formats.csv_repo(tmp_path / "mirror")
    with HubServer(tmp_path / "a") as a, HubServer(tmp_path / "b") as b:
        formats.csv_repo(a.root)
        formats.jsonl_repo(b.root)
        formats.csv_repo(b.root, "fmt/other")  # a CSV: a builder of the same module as Hub A's
        hub_a = HubSource(a.url, None)
        first_opened = opened(hub_a, "fmt/csv", "default", "train")
        mirror = LocalMirror(tmp_path / "mirror")
        HubSource("https://huggingface.co", None)  # creating a source points the libraries nowhere
        hub_b = HubSource(b.url, None)
        reads = [
            (mirror, "fmt/csv"),
            (hub_b, "fmt/jsonl"),
            (hub_a, "fmt/csv"),
            (mirror, "fmt/csv"),
            (hub_a, "fmt/csv"),
            (hub_b, "fmt/other"),
        ]
        assert [first_rows(source, dataset) for source, dataset in reads] == [formats.ROWS[:7]] * len(reads)
        assert next(first_opened.batches(7)).to_pylist() == formats.ROWS[:7]
        # What an earlier test, or a thread of one, may leave in the libraries' process-wide settings:
        for module in (datasets.config, hub_constants):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "https://huggingface.co")
        monkeypatch.setattr(hub_constants, "ENDPOINT", "https://huggingface.co")
        assert first_rows(hub_b, "fmt/jsonl") == formats.ROWS[:7]
        with ThreadPoolExecutor(len(reads)) as pool:
            assert list(pool.map(lambda read: first_rows(*read), reads * 3)) == [formats.ROWS[:7]] * len(reads) * 3
        assert a.requests and b.requests
    get_config.cache_clear()


def test_a_conversion_past_its_cap_is_partial_and_says_how_much_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.steps import parquet

    monkeypatch.setattr(parquet, "BATCH_ROWS", 7)
    mirror = LocalMirror(tmp_path)
    dataset = formats.sharded_repo(tmp_path)
    split = opened(mirror, dataset, "default", "train")
    rows, converted, partial = convert(split, tmp_path / "out" / "all.parquet", max_bytes=10**9)
    assert (rows, partial) == (30, False) and pq.read_table(tmp_path / "out" / "all.parquet").num_rows == 30
    split = opened(mirror, dataset, "default", "train")
    rows, converted, partial = convert(split, tmp_path / "out" / "some.parquet", max_bytes=1)
    assert (rows, partial) == (1, True) and converted > 0  # the cap falls in the first batch: one row kept
    assert pq.read_table(tmp_path / "out" / "some.parquet").num_rows == rows


def test_a_one_split_conversion_reports_progress_as_its_rows_and_bytes_go(
    source_root: tuple[DatasetSource, Path, HubServer | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.steps import parquet

    monkeypatch.setattr(parquet, "BATCH_ROWS", 1_000)
    source, root, _ = source_root
    rows = "".join(f"{i},text number {i}\n" for i in range(6_000))
    samples.write(root / "big" / "one" / "train.csv", "id,text\n" + rows)
    card = "---\ndataset_info:\n  splits:\n  - name: train\n    num_examples: 6000\n---\n"
    samples.write(root / "big" / "carded" / "README.md", card)
    samples.write(root / "big" / "carded" / "train.csv", "id,text\n" + rows)
    for dataset, measured in (("big/one", "bytes"), ("big/carded", "rows")):
        reports: list[dict[str, Any]] = []
        job = StepJob("job", "config-parquet-and-info", dataset, "default", None, Progress(reports.append, 0.0))
        split = opened(source, dataset, "default", "train")
        out = root.parent / "out" / f"{dataset}.parquet"
        convert(split, out, 10**9, parquet.partial_progress(job, 0, 1, "train", split.expected_size(), 10**9))
        fractions = [report["fraction"] for report in reports]
        print(dataset, measured, [f"{fraction:.2f}" for fraction in fractions], reports[-1]["message"])
        assert len(fractions) == 6 and fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] < 1
        if measured == "rows":
            assert fractions[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
            assert reports[2]["message"].startswith("converting train: 3,000 of 6,000 rows, ")
        else:  # Arrow bytes against the file's: about the same for a CSV of numbers and short text
            assert fractions[2] == pytest.approx(0.5, abs=0.25)
            assert (
                reports[2]["message"].startswith("converting train: 3,000 rows, ")
                and " of Arrow data from 0.1 MB of files" in reports[2]["message"]
            )


def test_parquet_files_carry_the_features_and_the_media_bytes(tmp_path: Path) -> None:
    mirror = LocalMirror(tmp_path)
    dataset = formats.imagefolder_repo(tmp_path)
    path = tmp_path / "out" / "0000.parquet"
    convert(opened(mirror, dataset, "default", "train"), path, max_bytes=10**9)
    table = pq.read_table(path)
    assert [column_kind(f) for f in features_of(table.schema).values()] == ["image", "class_label"]
    assert all(cell["bytes"] for cell in table.column("image").to_pylist())
    assert features_of(table.schema)["label"].names == ["cat", "dog"]


def test_a_mirrors_revision_is_its_manifest_not_its_bytes(tmp_path: Path) -> None:
    mirror = LocalMirror(tmp_path)
    dataset = formats.csv_repo(tmp_path)
    first = mirror.revision(dataset)
    assert len(first) == 40
    path = tmp_path / dataset / "data" / "train.csv"
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b"row", b"ROW"))  # same size...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...same time: same manifest
    mirror._scans.clear()
    assert mirror.revision(dataset) == first
    path.touch()
    assert mirror.revision(dataset) == first  # kept for MANIFEST_TTL_SECONDS
    mirror._scans.clear()
    assert mirror.revision(dataset) != first
    (tmp_path / dataset / ".git").mkdir()
    (tmp_path / dataset / ".git" / "x").write_text("hidden files are not part of the dataset")
    second = mirror.revision(dataset)
    mirror._scans.clear()
    assert mirror.revision(dataset) == second


@pytest.mark.parametrize("size", [1, 2, 3, 10, 1001, 20_000])
def test_the_median_is_exact_when_the_values_do_not_fit(
    size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.steps import statistics

    monkeypatch.setattr(statistics, "MEDIAN_MAX_VALUES", 7)  # forces the narrowing passes
    monkeypatch.setattr(statistics, "BATCH_ROWS", 999)
    rng = np.random.default_rng(size)
    values = np.concatenate([rng.normal(size=size // 2), np.full(size - size // 2, 0.25)])
    rng.shuffle(values)
    path = tmp_path / "values.parquet"
    pq.write_table(pa.table({"x": values}), path)
    column = statistics.Column("x", "float")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=999):
        column.add(batch.column(0))
    assert statistics._median(str(path), column) == pytest.approx(float(np.median(values)), abs=0)
    column.kept = [values[:500], values[500:]]  # a small split's numbers, kept from the first pass
    assert statistics._median(str(path), column) == pytest.approx(float(np.median(values)), abs=0)
    assert column.moments.mean == pytest.approx(values.mean())
    if size > 1:
        assert np.sqrt(column.moments.squares / (size - 1)) == pytest.approx(values.std(ddof=1))


def test_the_hub_file_cache_is_trimmed_least_recently_used_first(tmp_path: Path) -> None:
    from common.download_cache import trim

    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / "hub" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_000_000 - age * 1000, 1_000_000 - age * 1000))
    assert trim(tmp_path, 2500) == 1000
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["middle", "newest"]
    assert trim(tmp_path, 2500) == 0


def test_statistics_count_nan_and_infinities_as_nulls(tmp_path: Path) -> None:
    from tasks.steps import statistics

    path = tmp_path / "values.parquet"
    pq.write_table(pa.table({"x": [1.0, float("nan"), 3.0, float("inf"), None, 2.0]}), path)
    column = statistics.Column("x", "float")
    for batch in pq.ParquetFile(path).iter_batches():
        column.add(batch.column(0))
    described = statistics._statistics(str(path), column)
    assert (described["nan_count"], described["min"], described["max"], described["median"]) == (3, 1.0, 3.0, 2.0)
    assert sum(described["histogram"]["hist"]) == 3


def test_what_datasets_resolves_is_kept_per_revision_for_every_process_of_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common import dataset_modules

    monkeypatch.setenv("COMMON_HF_CACHE_DIRECTORY", str(tmp_path / "hf-cache"))
    get_config.cache_clear()
    mirror = LocalMirror(tmp_path / "repos")
    dataset = formats.two_configs_repo(tmp_path / "repos")
    assert split_names(mirror, mirror.locate(dataset, "rev1"), "fr") == ["train", "test"]
    (tmp_path / "repos" / dataset / "french" / "test.csv").unlink()
    assert split_names(mirror, mirror.locate(dataset, "rev1"), "fr") == ["train", "test"]  # kept for rev1
    dataset_modules._memory.clear()  # another process of the host: it finds it on disk
    assert split_names(mirror, mirror.locate(dataset, "rev1"), "fr") == ["train", "test"]
    assert split_names(mirror, mirror.locate(dataset, "rev2"), "fr") == ["train"]  # another revision
    get_config.cache_clear()


@pytest.mark.parametrize(
    "values",
    [
        [0.0] * 50 + [1.0] * 50,  # a balanced label: the two middle values differ, each tied 50 times
        [0.0] * 30 + [1.0] * 50 + [2.0] * 20,
        [1.0] * 40 + [float(np.nextafter(1.0, 2.0))] * 60,  # neighbouring floats: bins cannot split them
    ],
)
def test_the_median_ends_and_is_exact_with_ties_that_do_not_fit(
    values: list[float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.steps import statistics

    monkeypatch.setattr(statistics, "MEDIAN_MAX_VALUES", 7)
    path = tmp_path / "values.parquet"
    pq.write_table(pa.table({"x": values}), path)
    column = statistics.Column("x", "float")
    for batch in pq.ParquetFile(path).iter_batches(batch_size=33):
        column.add(batch.column(0))
    assert statistics._median(str(path), column) == float(np.median(values))


def test_a_class_label_counts_minus_one_as_no_label_and_a_float_histogram_keeps_float_bins(tmp_path: Path) -> None:
    import json

    from common.progress import Progress
    from tasks.steps.statistics import describe

    features = {"label": {"names": ["neg", "pos"], "_type": "ClassLabel"}, "p": {"dtype": "float64", "_type": "Value"}}
    schema = pa.schema(
        [("label", pa.int64()), ("p", pa.float64())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    path = tmp_path / "labels.parquet"
    rows = [{"label": label, "p": p} for label, p in [(0, 0.0), (1, 1.0), (-1, 0.25), (-1, 0.75), (7, 0.5)]]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    described = {
        s["column_name"]: s["column_statistics"] for s in describe(str(path), Progress(lambda m: None))["statistics"]
    }
    assert described["label"]["frequencies"] == {"neg": 1, "pos": 1}
    assert (described["label"]["no_label_count"], described["label"]["no_label_proportion"]) == (3, 0.6)
    assert len(described["p"]["histogram"]["hist"]) == 10  # a probability's bins, not [0, 0.5, 1]


def test_ugly_inputs_are_typed_errors_or_empty_splits(tmp_path: Path) -> None:
    from common.exceptions import DatasetGenerationError
    from tasks.samples import write

    mirror = LocalMirror(tmp_path)
    write(tmp_path / "u" / "yaml" / "README.md", "---\nconfigs: [\n---\n")
    write(tmp_path / "u" / "yaml" / "train.csv", "a\n1\n")
    with pytest.raises(DatasetGenerationError):
        config_names(mirror, mirror.locate("u/yaml", "r"))
    write(tmp_path / "u" / "empty" / "train.csv", "")
    with pytest.raises(DatasetGenerationError):
        next(opened(mirror, "u/empty", "default", "train").batches(10))
    write(tmp_path / "u" / "header" / "train.csv", "a,b\n")  # a split with no rows
    assert next(opened(mirror, "u/header", "default", "train").batches(10), None) is None
    path = tmp_path / "u" / "norows" / "train.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": pa.array([], pa.int64())}), path)  # a row group of 0 rows
    split = opened(mirror, "u/norows", "default", "train")
    assert convert(split, tmp_path / "out.parquet", 10**9) == (0, 0, False)
