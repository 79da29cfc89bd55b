"""The README and docs/ are true: every relative link resolves (file and anchor), and the README's
ten-line example runs against a real system."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tasks import samples
from tests.api_server import api_server
from tests.test_api_auth import mirror  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {linked.name}"


def test_the_readme_example_runs(mirror: Path, celery_worker: object) -> None:  # noqa: F811
    samples.csv_dataset(mirror, "demo/csv")
    example = re.search(r"## In ten lines.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert example is not None
    code = example.group(1)
    assert len(code.strip().splitlines()) <= 10
    printed: list[object] = []
    with api_server() as url:
        exec(code.replace("http://localhost:8000", url), {"print": lambda *values: printed.append(values)})
    assert printed[0] == (200, {"config_names": [{"dataset": "demo/csv", "config": "default"}]})
    splits = printed[1][0]
    assert isinstance(splits, dict) and ("splits" in splits or splits.get("error_code") == "ResponseNotReady")
    assert httpx.URL(url).host == "127.0.0.1"
