"""Issue 25, "Prove it": stepcache's answers against the dataset viewer's published OpenAPI document.

Two parts. The reading of the document (tests/viewer_contract.py's docstring) is proven on the document
itself: every example of every response validates under it, except the ones listed below with why, and
each reading is needed. Then, over real HTTP, every endpoint both the viewer and stepcache serve is asked,
at every level the viewer documents, for datasets written to a local mirror (CSV, Parquet, images with
labels, audio, two configs, a 0-row split, a gated one with its JWT) once the in-process worker computed
them, and with bad parameters (missing, empty, unknown dataset with and without a token, unknown config or
split) and unready, gated or unreadable datasets; every answer is checked against the document, and also
against the status the document's examples give for its situation (an unknown config: its
"inexistent config" example, 404). The conformance table (endpoint x case) is printed and written to
/tmp/contract_table.txt (CONTRACT_TABLE names another file). Full conformance is asserted: it is the target.

Run alone (about 30 s; -s prints the table): `.venv/bin/pytest tests/test_viewer_contract.py -s`.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest

from tasks import samples
from tasks.queue import get_queue
from tests.api_server import api_client
from tests.test_api_auth import token
from tests.test_parquet_download import mirror  # noqa: F401  (the fixture: a mirror, JWTs, signed URLs)
from tests.test_pipeline import wait_until_settled
from tests.viewer_contract import (
    DESCRIBED_ENUM,
    DOCUMENT_PATH,
    ERROR_CODE_AS_SAID,
    NULLABLE,
    ONE_OF,
    READINGS,
    Contract,
    Example,
    Violation,
    load,
    response_examples,
)

TABLE = Path(os.environ.get("CONTRACT_TABLE", "/tmp/contract_table.txt"))
ORIGIN = "https://viewer.example"
WAITING = "waiting/csv"  # the dataset never computed: its namespace runs no job
SETTLE_SECONDS = 240.0
# The endpoints the viewer documents that stepcache serves too (the viewer's others: /rows, /search, /filter,
# /opt-in-out-urls, /presidio-entities).
SHARED_ENDPOINTS = (
    *("/splits", "/first-rows", "/rows", "/search", "/filter"),
    *("/parquet", "/is-valid", "/info", "/size", "/statistics"),
)
# What a query of /search or /filter asks of every dataset (a word, a condition on no column: any split has them)
QUERIES = {"/search": {"query": "one"}, "/filter": {"where": "1 = 1"}}
# Examples of the document that fail even under the reading, and why.
KNOWN_EXAMPLE_FAILURES = {
    "GET /filter 200 application/json 'Filter on float inequality (julien-c/titanic-survival)'": (
        "the example has no `partial`, which PaginatedResponse requires (its sibling examples have it)"
    ),
}

pytestmark = pytest.mark.skipif(not DOCUMENT_PATH.is_file(), reason=f"no viewer OpenAPI document at {DOCUMENT_PATH}")


# -- the reading, proven on the document's own examples ------------------------------------------------------


def failing_examples(contract: Contract, examples: list[Example]) -> dict[str, list[Violation]]:
    failing: dict[str, list[Violation]] = {}
    for example in examples:
        violations = contract.check_example(example)
        if violations:
            failing.setdefault(example.where, []).extend(violations)
    return failing


def test_every_example_of_every_response_validates_under_the_reading() -> None:
    contract = load()
    examples = list(response_examples(contract))
    assert len(examples) > 100 and any(example.where.startswith("GET /first-rows 200") for example in examples)
    failing = failing_examples(contract, examples)
    literal = failing_examples(load(readings=frozenset()), examples)
    print(f"\n{len(examples)} examples of responses; {len(literal)} fail the document read as written:")
    for where, violations in literal.items():
        print(f"  {where}\n    " + "\n    ".join(str(violation) for violation in violations[:3]))
    print(f"{len(failing)} fail under the reading:")
    for where, violations in failing.items():
        print(f"  {where}: {'; '.join(map(str, violations))}\n    why: {KNOWN_EXAMPLE_FAILURES.get(where, '?')}")
    assert set(failing) == set(KNOWN_EXAMPLE_FAILURES), failing
    assert len(literal) > len(failing)


def test_each_reading_is_needed() -> None:
    """Without each reading, something the document says is valid fails: its examples for oneOf and the
    described dtypes; for nullable, no example holds a null cell, so a first-rows example with one null
    cell (what a CSV's empty field is) stands in; for the error code, the header its example names."""
    contract = load()
    examples = list(response_examples(contract))
    baseline = set(failing_examples(contract, examples))
    for reading in (ONE_OF, DESCRIBED_ENUM):
        without = set(failing_examples(load(readings=READINGS - {reading}), examples)) - baseline
        print(f"\nwithout {reading!r}: {len(without)} more examples fail, e.g. {sorted(without)[:2]}")
        assert without, reading
    first_rows = next(e for e in examples if e.where.startswith("GET /first-rows 200") and "imdb" in e.where)
    with_null = copy.deepcopy(first_rows.value)
    with_null["rows"][0]["row"]["text"] = None
    null_cell = Example(f"{first_rows.where}, a cell null", first_rows.schema_pointer, with_null)
    assert contract.check_example(null_cell) == []
    assert load(readings=READINGS - {NULLABLE}).check_example(null_cell) != []
    assert contract.check_example(first_rows) == []
    # The dtype reading allows the names the descriptions describe, not any string.
    value_feature = copy.deepcopy(with_null)
    value_feature["features"][0]["type"] = {"_type": "Value", "dtype": "float128"}
    assert any(
        "dtype" in str(v) for v in contract.check_example(Example("float128", null_cell.schema_pointer, value_feature))
    )
    not_ready = {"Cache-Control": "no-store", "Content-Type": "application/json", "X-Error-Code": "ResponseNotReady"}
    body = b'{"error": "not ready"}'
    assert contract.check("/first-rows", 500, not_ready, body) == []
    assert [
        v.kind for v in load(readings=READINGS - {ERROR_CODE_AS_SAID}).check("/first-rows", 500, not_ready, body)
    ] == ["X-Error-Code"]


def test_the_checks_of_an_answer() -> None:
    """check() on made-up answers: each kind of violation is found, and a conforming answer has none."""
    contract = load()
    ok_headers = {
        "Cache-Control": "max-age=120",
        "Access-Control-Allow-Origin": "*",
        "Content-Type": "application/json",
    }
    body = b'{"preview": true, "viewer": true, "search": false, "filter": false, "statistics": true}'
    assert contract.check("/is-valid", 200, ok_headers, body, origin=ORIGIN) == []
    assert [v.kind for v in contract.check("/is-valid", 202, ok_headers, body)] == ["status"]
    missing = contract.check("/is-valid", 200, {"Content-Type": "application/json"}, body, origin=ORIGIN)
    assert sorted(str(v) for v in missing) == [
        "header: Access-Control-Allow-Origin is missing",
        "header: Cache-Control is missing",
    ]
    assert (
        contract.check("/is-valid", 200, {"Cache-Control": "no-cache", "Content-Type": "application/json"}, body) == []
    )
    elsewhere = {**ok_headers, "Access-Control-Allow-Origin": "https://elsewhere.example"}
    assert [v.kind for v in contract.check("/is-valid", 200, elsewhere, body, origin=ORIGIN)] == ["header"]
    error = b'{"error": "not ready"}'
    for code, expected in (("ResponseNotReady", []), ("ResponseNotReadyError", []), ("NotReady", ["X-Error-Code"])):
        headers = {**ok_headers, "X-Error-Code": code}
        assert [v.kind for v in contract.check("/splits", 500, headers, error)] == expected, code
    assert [str(v) for v in contract.check("/splits", 500, ok_headers, error)] == ["header: X-Error-Code is missing"]
    assert [v.kind for v in contract.check("/splits", 200, {**ok_headers, "Content-Type": "text/html"}, b"")] == [
        "content-type"
    ]
    bad = contract.check("/splits", 200, ok_headers, b'{"splits": [{"dataset": "d", "config": "c"}]}')
    assert [str(v) for v in bad] == ["body: at $.splits[0]: 'split' is a required property"]


# -- over real HTTP ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    label: str
    name: str
    config: str
    split: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One request: a label, its query parameters, its headers, and the statuses the document gives for the
    situation (by its examples; empty: any it documents)."""

    label: str
    params: dict[str, str]
    headers: dict[str, str]
    expected: frozenset[int]
    order: int  # the requests that might enqueue a backfill (an unknown name) go after the others


@dataclass
class Row:
    endpoint: str
    level: str
    case: str
    status: int
    violations: list[Violation]


def levels(contract: Contract, path: str) -> tuple[list[str], set[str]]:
    """The levels (dataset, config, split) the operation documents, from its parameters, and the names
    of its required parameters."""
    found = contract.operation(path)
    assert found is not None, path
    operation, pointer = found
    parameters = [contract.resolve(p, f"{pointer}/parameters/{i}")[0] for i, p in enumerate(operation["parameters"])]
    by_name = {p["name"]: p for p in parameters if p.get("in") == "query"}
    required = {name for name, p in by_name.items() if p.get("required")}
    documented = []
    if "config" not in required:
        documented.append("dataset")
    if "config" in by_name and "split" not in required:
        documented.append("config")
    if "split" in by_name:
        documented.append("split")
    return documented, required


def at_level(level: str, dataset: str, config: str, split: str) -> dict[str, str]:
    params = {"dataset": dataset, "config": config, "split": split}
    return {
        name: params[name] for name in ("dataset", "config", "split")[: ("dataset", "config", "split").index(level) + 1]
    }


def described(contract: Contract, path: str, words: str) -> frozenset[int]:
    """The statuses of the operation whose description says `words` (where no example shows the situation:
    /rows's 500 is "an error in the dataset itself", without an example of one)."""
    statuses = set()
    for status in contract.documented_statuses(path):
        found = contract.response(path, int(status)) if status.isdigit() else None
        if found is not None and words in found[0].get("description", ""):
            statuses.add(int(status))
    return frozenset(statuses)


def documented_for(contract: Contract, path: str, *names: str) -> frozenset[int]:
    """The statuses of the operation that have an example of this situation: an example whose key contains
    one of `names`, or that is the component example of one of those names."""
    statuses = set()
    for status in contract.documented_statuses(path):
        found = contract.response(path, int(status)) if status.isdigit() else None
        for content in found[0].get("content", {}).values() if found else ():
            for key, example in content.get("examples", {}).items():
                component = str(example.get("$ref", "")).rsplit("/", 1)[-1]
                if any(name in key or name == component for name in names):
                    statuses.add(int(status))
    return frozenset(statuses)


def cases(
    contract: Contract, path: str, level: str, required: set[str], ready: list[Dataset], more: dict[str, Dataset]
) -> list[Case]:
    """The requests at this level of the operation, each with the statuses of the document's examples of its
    situation (none: no example, any documented status is checked)."""

    def expected(*names: str) -> frozenset[int]:
        return documented_for(contract, path, *names)

    def case(label: str, dataset: Dataset, statuses: frozenset[int], headers: dict[str, str] | None = None) -> Case:
        params = at_level(level, dataset.name, dataset.config, dataset.split)
        return Case(label, params, dataset.headers if headers is None else headers, statuses, 0)

    found = [case(dataset.label, dataset, frozenset({200})) for dataset in ready]
    # A dataset whose files cannot be read: its own error (500) where a step reads them, and 200 where none
    # does (its split names come from the file names) or where an answer lists its failed configs.
    failing = expected("error in the dataset itself") | described(contract, path, "error in the dataset itself")
    found.append(case("failing (corrupted)", more["failing"], failing | {200}))
    found.append(case("not ready", more["not ready"], expected("ResponseNotReadyError")))
    found.append(case("gated, no JWT", more["gated"], expected("not authenticated or authorized"), {}))
    csv = ready[0]
    good = at_level(level, csv.name, csv.config, csv.split)
    if level in ("config", "split"):
        unknown_config = {**good, "config": "no-such-config"}
        found.append(Case("unknown config", unknown_config, {}, expected("InexistentConfigError"), 1))
    if level == "split":
        unknown_split = {**good, "split": "no-such-split"}
        found.append(Case("unknown split", unknown_split, {}, expected("InexistentSplitError"), 1))
    unknown = {**good, "dataset": "org/no-such-dataset"}
    found.append(Case("unknown dataset", unknown, {}, expected("inexistent dataset, and not authenticated"), 2))
    with_token = {"Authorization": f"Bearer {token('org/no-such-dataset')}"}
    by_token = expected("inexistent dataset, while authenticated")
    found.append(Case("unknown dataset + token", unknown, with_token, by_token, 2))
    for name in ("dataset", "config", "split"):
        if name in good and name in required:
            missing = {key: value for key, value in good.items() if key != name}
            found.append(Case(f"missing {name}", missing, {}, expected("missing"), 2))
            found.append(Case(f"{name}= (empty)", {**good, name: ""}, {}, expected("empty"), 2))
    return [replace(case, params={**case.params, **QUERIES.get(path, {})}) for case in found]


@pytest.fixture
def client(mirror: Path) -> Iterator[httpx.Client]:  # noqa: F811
    with api_client() as client:
        client.headers["Origin"] = ORIGIN
        yield client


def write_datasets(root: Path) -> tuple[list[Dataset], dict[str, Dataset]]:
    """The mirror's datasets: those to compute and serve (the first is CSV), and the others by role."""
    samples.write(root / "org" / "emptysplit" / "train.csv", "id,text\n1,one\n2,two\n")
    samples.write(root / "org" / "emptysplit" / "test.csv", "id,text\n")
    gated = samples.csv_dataset(root, "org/gated")
    (root / gated / ".gated").write_text("")
    ready = [
        Dataset("CSV", samples.csv_dataset(root), "default", "test"),  # its test split has an empty cell
        Dataset("Parquet", samples.parquet_dataset(root), "default", "train"),
        Dataset("images + labels", samples.image_dataset(root), "default", "train"),
        Dataset("audio", samples.audio_dataset(root), "default", "train"),
        Dataset("two configs", samples.multi_config_dataset(root), "fr", "test"),
        Dataset("0-row split", "org/emptysplit", "default", "test"),
        Dataset("gated + JWT", gated, "default", "train", {"Authorization": f"Bearer {token(gated)}"}),
    ]
    more = {
        "failing": Dataset("failing", samples.corrupted_dataset(root), "default", "train"),
        "not ready": Dataset("not ready", samples.csv_dataset(root, WAITING), "default", "train"),
        "gated": Dataset("gated", gated, "default", "train"),
    }
    return ready, more


def render(rows: list[Row], document: Path) -> str:
    columns = list(dict.fromkeys(f"{row.endpoint} {row.level}" for row in rows))
    labels = list(dict.fromkeys(row.case for row in rows))
    cell = {(f"{row.endpoint} {row.level}", row.case): row for row in rows}
    width = max(len(label) for label in labels)
    conform = sum(not row.violations for row in rows)
    lines = [
        f"stepcache against the dataset viewer's OpenAPI document ({document})",
        f"{conform} of {len(rows)} answers conform; ok = conforms, xN = N violations, . = not a case there",
        "",
        " " * width + " | " + " | ".join(columns),
    ]
    for label in labels:
        marks = []
        for column in columns:
            row = cell.get((column, label))
            mark = "." if row is None else "ok" if not row.violations else f"x{len(row.violations)}"
            marks.append(mark.center(len(column)))
        lines.append(label.ljust(width) + " | " + " | ".join(marks))
    lines += ["", "Per endpoint:"]
    for endpoint in dict.fromkeys(row.endpoint for row in rows):
        of = [row for row in rows if row.endpoint == endpoint]
        good = sum(not row.violations for row in of)
        verdict = "conforms" if good == len(of) else "does not conform"
        lines.append(f"  {endpoint:<12} {verdict:<17} {good:>3} of {len(of)} answers conform")
    lines += ["", "Violations by kind (answers):"]
    kinds = Counter(str(violation) for row in rows for violation in row.violations)
    lines += [f"  {count:>4}  {kind}" for kind, count in kinds.most_common()]
    lines += ["", "Answers:"]
    for row in rows:
        verdict = "conforms" if not row.violations else f"{len(row.violations)} violation(s)"
        lines.append(f"  {row.endpoint} [{row.level}] {row.case}: {row.status}, {verdict}")
        lines += [f"      - {violation}" for violation in row.violations]
    return "\n".join(lines) + "\n"


def answers(client: httpx.Client, contract: Contract, shared: list[str], mirror: Path) -> list[Row]:  # noqa: F811
    """Write the datasets, let the worker compute those to serve, then ask every case and check its answer."""
    ready, more = write_datasets(mirror)
    for dataset in [*ready, more["failing"]]:  # a first request enqueues its backfill (not checked)
        first = client.get("/splits", params={"dataset": dataset.name}, headers=dataset.headers)
        assert first.status_code in (200, 202, 500), (dataset.name, first.status_code, first.text)
    started = time.monotonic()
    for dataset in [*ready, more["failing"]]:
        wait_until_settled(dataset.name, timeout=max(30.0, SETTLE_SECONDS - (time.monotonic() - started)))
    planned = []
    for path in shared:
        documented, required = levels(contract, path)
        for level in documented:
            planned += [(path, level, case) for case in cases(contract, path, level, required, ready, more)]
    rows = {}
    for path, level, case in sorted(planned, key=lambda item: item[2].order):
        answer = client.get(path, params=case.params, headers=case.headers)
        violations = contract.check_answer(path, answer)
        if case.expected and answer.status_code not in case.expected:
            expected = " or ".join(map(str, sorted(case.expected)))
            violations.insert(0, Violation("situation", f"{answer.status_code}, where the document answers {expected}"))
        assert (path, level, case.label) not in rows, f"two cases named {case.label!r}"
        rows[(path, level, case.label)] = Row(path, level, case.label, answer.status_code, violations)
    return [rows[(path, level, case.label)] for path, level, case in planned]


def test_every_shared_endpoint_conforms_to_the_viewer_contract(
    client: httpx.Client,
    mirror: Path,  # noqa: F811
    celery_worker: object,
) -> None:
    contract = load()
    served = set(client.get("/openapi.json").json()["paths"])
    shared = [path for path in contract.document["paths"] if path in served]
    assert shared == list(SHARED_ENDPOINTS), f"the endpoints both serve changed: {shared}"
    queue = get_queue()
    queue.set_limit(WAITING.split("/")[0], 0)  # its jobs wait: never computed while the test runs
    try:
        rows = answers(client, contract, shared, mirror)
    finally:
        queue.cancel(WAITING)
    table = render(rows, DOCUMENT_PATH)
    TABLE.write_text(table)
    print("\n" + table)
    failing = [row for row in rows if row.violations]
    assert not failing, (
        f"{len(failing)} of {len(rows)} answers do not conform to the viewer's contract (table: {TABLE}):\n"
        + table.split("\nAnswers:")[0]
    )
