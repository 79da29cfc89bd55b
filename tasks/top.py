"""`python -m tasks top`: the namespaces the limiter knows, live.

One row per namespace with work or a limit override: its limit (`*`: an override), its weight among borrowers,
its waiting, queued and started jobs, its share of the started jobs, the slots it holds beyond its limit
(borrowed: common/queue/borrowing.py), and how long its oldest waiting job has waited (on the Redis clock). A
total row sums every namespace, shown or not; under it, the steps the live workers know (and what some know
beyond the others). Keys on a terminal: n, w, u, s, o sort by namespace, waiting, queued, started, oldest
wait; r reverses; q or Ctrl-C quits. `--once` prints the table once, `--json` the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.queue.limiter import NamespaceLimiter, NamespaceOverview
from common.registry import ProcessRecord, Registry, Role, get_registry
from tasks.display import add_row, make_console, make_table, print_line, print_table, steps_known

SORT_COLUMNS = ("namespace", "waiting", "queued", "started", "oldest")
SORT_KEYS = {"n": "namespace", "w": "waiting", "u": "queued", "s": "started", "o": "oldest"}
HEADERS = ["namespace", "limit", "weight", "waiting", "queued", "started", "share", "borrowed", "oldest wait"]
LIVE_MARGIN_LINES = 8  # a live view without --limit shows what fits: the terminal's height less these


@dataclass(frozen=True)
class Source:
    """What top reads at each refresh: the namespaces (the limiter) and the live workers (the registry)."""

    limiter: NamespaceLimiter
    registry: Registry


@dataclass(frozen=True)
class Row:
    namespace: str
    figures: NamespaceOverview


@dataclass(frozen=True)
class Total:
    namespaces: int
    waiting: int
    queued: int
    started: int
    oldest_wait: float | None
    borrowed: int = 0


def sort_rows(overview: Mapping[str, NamespaceOverview], sort: str, reverse: bool = False) -> list[Row]:
    """Namespaces in alphabetical order, or the largest figure first (ties: alphabetical); `reverse` flips it.
    Namespaces where nothing waits come last by oldest wait."""
    rows = sorted((Row(name, figures) for name, figures in overview.items()), key=lambda row: row.namespace)
    if sort != "namespace":
        rows.sort(key=lambda row: _figure(row.figures, sort), reverse=True)  # stable: ties stay alphabetical
    return rows[::-1] if reverse else rows


def _figure(figures: NamespaceOverview, sort: str) -> float:
    if sort == "oldest":
        return -1.0 if figures.oldest_wait is None else figures.oldest_wait
    value: int = getattr(figures, sort)
    return value


def total_of(overview: Mapping[str, NamespaceOverview]) -> Total:
    waits = [o.oldest_wait for o in overview.values() if o.oldest_wait is not None]
    return Total(
        namespaces=len(overview),
        waiting=sum(o.waiting for o in overview.values()),
        queued=sum(o.queued for o in overview.values()),
        started=sum(o.started for o in overview.values()),
        oldest_wait=max(waits) if waits else None,
        borrowed=sum(o.borrowed for o in overview.values()),
    )


def format_share(started: int, total: int) -> str:
    """A namespace's share of the started jobs, in percent ('-' when none started)."""
    return f"{100 * started / total:.0f}%" if total else "-"


def format_wait(seconds: float | None) -> str:
    """A wait as people read it: 42s, 3m05s, 2h07m, 4d03h; '-' when nothing waits."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def render(
    overview: Mapping[str, NamespaceOverview],
    console: Console,
    sort: str = "waiting",
    limit: int | None = None,
    reverse: bool = False,
    title: str | None = None,
    workers: Sequence[ProcessRecord] = (),
) -> Table:
    rows = sort_rows(overview, sort, reverse)
    shown = rows if limit is None else rows[:limit]
    table = make_table(HEADERS, [], console, right=HEADERS[1:], title=title)
    total = total_of(overview)
    for index, row in enumerate(shown):
        o = row.figures
        limit_text = f"{o.limit}{'*' if o.overridden else ''}"
        cells = [
            row.namespace,
            limit_text,
            f"{o.weight:g}",
            o.waiting,
            o.queued,
            o.started,
            format_share(o.started, total.started),
            o.borrowed,
            format_wait(o.oldest_wait),
        ]
        add_row(table, cells, end_section=index == len(shown) - 1)
    hidden = f", {len(rows) - len(shown)} not shown" if len(shown) < len(rows) else ""
    add_row(
        table,
        [
            f"total ({total.namespaces} namespaces{hidden})",
            "",
            "",
            total.waiting,
            total.queued,
            total.started,
            "",
            total.borrowed,
            format_wait(total.oldest_wait),
        ],
        style="bold" if console.is_terminal else None,
    )
    notes = ["*: a limit override (python -m tasks limits)"] if any(o.overridden for o in overview.values()) else []
    notes += steps_known(workers)
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def to_json(
    overview: Mapping[str, NamespaceOverview],
    sort: str = "waiting",
    limit: int | None = None,
    reverse: bool = False,
    workers: Sequence[ProcessRecord] = (),
) -> dict[str, Any]:
    """The figures for scripts: the namespaces in the table's order (the top `limit`), the total of all, and
    the live workers (queues, concurrency, the steps each knows)."""
    rows = sort_rows(overview, sort, reverse)
    total = total_of(overview)
    return {
        "sort": sort,
        "namespaces": [
            {
                "namespace": row.namespace,
                "limit": row.figures.limit,
                "override": row.figures.overridden,
                "waiting": row.figures.waiting,
                "queued": row.figures.queued,
                "started": row.figures.started,
                "weight": row.figures.weight,
                "borrowed": row.figures.borrowed,
                "oldest_wait_seconds": row.figures.oldest_wait,
            }
            for row in (rows if limit is None else rows[:limit])
        ],
        "total": {
            "namespaces": total.namespaces,
            "waiting": total.waiting,
            "queued": total.queued,
            "started": total.started,
            "borrowed": total.borrowed,
            "oldest_wait_seconds": total.oldest_wait,
        },
        "workers": [
            {"node": w.node, "queues": list(w.queues), "concurrency": w.concurrency, "steps": list(w.steps)}
            for w in workers
            if w.role == Role.WORKER
        ],
    }


class KeyReader:
    """Single keys from a terminal, read in cbreak mode (no Enter needed; Ctrl-C still interrupts), the
    terminal's settings restored on exit. Not a terminal: no keys, `read` only waits."""

    def __init__(self, stream: TextIO) -> None:
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if stream.isatty():
                self.fd = stream.fileno()
        self._saved: list[Any] | None = None

    def __enter__(self) -> KeyReader:
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *_: object) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self, timeout: float) -> str:
        """The keys pressed within `timeout` seconds ('' if none: after the whole timeout)."""
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        return os.read(self.fd, 64).decode(errors="ignore") if ready else ""


def _keys_until(reader: KeyReader, deadline: float) -> Iterator[str]:
    while (remaining := deadline - time.monotonic()) > 0:
        yield from reader.read(remaining)


def top(
    sort: str = "waiting",
    limit: int | None = None,
    once: bool = False,
    as_json: bool = False,
    interval: float = 1.0,
    out: TextIO = sys.stdout,
    keys: TextIO | None = None,
    limiter: NamespaceLimiter | None = None,
    registry: Registry | None = None,
) -> int:
    """Show the namespaces: once (`once`, `as_json`), live on a terminal, or a table every `interval`
    seconds on any other output, until q or Ctrl-C."""
    if limiter is None:
        from tasks.queue import get_queue

        limiter = get_queue().limiter
    source = Source(limiter, registry or get_registry())
    if as_json:
        out.write(json.dumps(to_json(limiter.overview(), sort, limit, workers=source.registry.live())) + "\n")
        return 0
    console = make_console(out)
    if once:
        print_table(console, render(limiter.overview(), console, sort, limit, workers=source.registry.live()))
        return 0
    with contextlib.suppress(KeyboardInterrupt), KeyReader(sys.stdin if keys is None else keys) as reader:
        if console.is_terminal:
            _live(source, console, reader, sort, limit, interval)
        else:
            _batch(source, console, reader, sort, limit, interval)
    return 0


def _title(overview: Mapping[str, NamespaceOverview], sort: str, reverse: bool, help_keys: bool) -> str:
    order = f"sorted by {sort}{' (reversed)' if reverse else ''}"
    keys = "  [n w u s o] sort  [r] reverse  [q] quit" if help_keys else ""
    return f"stepcache top  {datetime.now():%H:%M:%S}  {len(overview)} namespaces, {order}{keys}"


def _live(source: Source, console: Console, reader: KeyReader, sort: str, limit: int | None, interval: float) -> None:
    reverse = False
    fleet: list[ProcessRecord] = []

    def view(overview: Mapping[str, NamespaceOverview]) -> RenderableType:
        margin = LIVE_MARGIN_LINES + len(steps_known(fleet))  # the caption's lines too
        fits = limit if limit is not None else max(1, console.size.height - margin)
        title = _title(overview, sort, reverse, reader.fd is not None)
        return Group(Text(title, style="bold"), render(overview, console, sort, fits, reverse, workers=fleet))

    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            overview, fleet = source.limiter.overview(), source.registry.live()
            live.update(view(overview), refresh=True)
            for key in _keys_until(reader, time.monotonic() + interval):
                if key in ("q", "Q"):
                    return
                if key in SORT_KEYS or key == "r":
                    if key == "r":
                        reverse = not reverse
                    else:
                        sort, reverse = SORT_KEYS[key], False
                    live.update(view(overview), refresh=True)


def _batch(source: Source, console: Console, reader: KeyReader, sort: str, limit: int | None, interval: float) -> None:
    """Like `top -b`: a table per refresh, one after the other."""
    while True:
        overview = source.limiter.overview()
        print_line(console, _title(overview, sort, False, False))
        print_table(console, render(overview, console, sort, limit, workers=source.registry.live()))
        print_line(console, "")
        for key in _keys_until(reader, time.monotonic() + interval):
            if key in ("q", "Q"):
                return
