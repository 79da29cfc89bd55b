"""What the command line draws, with rich: consoles, tables and a progress bar.

On a terminal: styles, and a progress bar redrawn in place. Anywhere else (a pipe, a file, a test's
StringIO): plain text without escape codes, each table as aligned columns under a line of dashes, and a
progress line written only when what it says changes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from types import TracebackType
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from common.registry import ProcessRecord, Role

PLAIN_WIDTH = 4096  # a piped table is never wrapped or cut to fit a width
# Lines under the headers and at the end of a section (before a total), and nothing else.
PLAIN_BOX = box.Box("    \n    \n -- \n    \n -- \n    \n    \n    \n", ascii=True)
TERMINAL_BOX = box.Box("    \n    \n ── \n    \n ── \n    \n    \n    \n")


def is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class CommandConsole(Console):
    """rich's Console, except for a closed output: rich exits 1 then (the CLI's "a job failed"); this one
    raises BrokenPipeError, for the CLI to exit as it says (tasks/cli.py)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError("the output was closed")


def make_console(out: TextIO) -> Console:
    """A console writing to `out`: a terminal's gets styles and live drawing, any other plain text only
    (whatever FORCE_COLOR or TTY_COMPATIBLE say)."""
    terminal = is_terminal(out)
    return CommandConsole(
        file=out,
        force_terminal=terminal,
        force_interactive=None if terminal else False,
        force_jupyter=False,
        color_system="auto" if terminal else None,
        width=None if terminal else PLAIN_WIDTH,
        markup=False,
        emoji=False,
        highlight=False,
    )


def make_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    console: Console,
    right: Collection[str] = (),
    title: str | None = None,
) -> Table:
    """A table of these rows (cells shown as `str` shows them, never as markup); `right`: the headers of
    the columns aligned to the right."""
    table = Table(
        title=title,
        title_justify="left",
        box=TERMINAL_BOX if console.is_terminal else PLAIN_BOX,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="bold" if console.is_terminal else "",
        title_style="bold" if console.is_terminal else "",
    )
    for header in headers:
        table.add_column(header, justify="right" if header in right else "left")
    for row in rows:
        add_row(table, row)
    return table


def add_row(table: Table, row: Sequence[object], style: str | None = None, end_section: bool = False) -> None:
    table.add_row(*(Text(str(cell)) for cell in row), style=style, end_section=end_section)


def print_table(console: Console, table: Table) -> None:
    """Print a table; on a non-terminal, without the spaces that pad its lines' ends."""
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    console.file.flush()


def print_line(console: Console, line: str) -> None:
    """One line of text as it is: no markup, no wrapping."""
    console.print(Text(line), soft_wrap=True)


class ProgressBar:
    """A progress bar: rich's Progress on a terminal, redrawn in place with lines printed above it; on any
    other output, a line `NN% message` each time that line changes (never the same line twice in a row)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last: str | None = None

    def __enter__(self) -> ProgressBar:
        if self.console.is_terminal:
            self._progress = Progress(
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.description}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=1.0)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, fraction: float, message: str | None = None) -> None:
        fraction = max(0.0, min(1.0, fraction))
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=fraction, description=message or "")
            return
        line = f"{fraction:4.0%}" + (f" {message}" if message else "")
        if line != self._last:
            self._last = line
            print_line(self.console, line)

    def print(self, line: str) -> None:
        """A line of its own (above the bar, on a terminal)."""
        print_line(self._progress.console if self._progress is not None else self.console, line)
        self._last = None


def steps_known(records: Iterable[ProcessRecord]) -> list[str]:
    """Which steps each worker can run, in lines: those every worker knows once, then what each worker
    knows beyond them (a worker started without a module of steps shows as the one lacking them)."""
    workers = sorted((r for r in records if r.role == Role.WORKER), key=lambda r: r.node or r.process_id)
    if not workers:
        return []
    shared = set.intersection(*(set(worker.steps) for worker in workers))
    who = "every worker knows" if len(workers) > 1 else f"{workers[0].node or workers[0].process_id} knows"
    lines = [f"{who} {len(shared)} steps: {', '.join(sorted(shared)) or '-'}"]
    for worker in workers:
        if extra := sorted(set(worker.steps) - shared):
            lines.append(f"{worker.node or worker.process_id} also knows: {', '.join(extra)}")
    return lines
