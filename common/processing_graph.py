"""The processing graph: which steps exist, what each one reads, and which cache entries they make.

A step's parents are the steps whose cached responses it needs; when a job ends, the steps below it in
the graph are enqueued (fan-out when a child is finer than its parent, fan-in when it is coarser and must
wait for all of them). A step with finer children declares where its content lists them (`fan_out`: the
configs of a dataset-level step, the splits of a config-level one), so that no other code needs to know
any step's content. The graph is validated whole when it is built, so a bad spec stops the process at
import time instead of surfacing as a job that never runs.

A user adds a step at import time of their module, before workers start, with :func:`register_step`.
Code that reads the graph calls :func:`get_processing_graph` every time instead of capturing the
module-level variable, which :func:`register_step` replaces.
"""

from __future__ import annotations

import heapq
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from common.exceptions import (
    InvalidStepSpecError,
    ProcessingGraphCycleError,
    UnknownParentStepError,
    UnknownStepError,
)

_STEP_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

_E = TypeVar("_E", bound=StrEnum)


class InputType(StrEnum):
    DATASET = "dataset"
    CONFIG = "config"
    SPLIT = "split"


class QueueName(StrEnum):
    LIGHT = "light"
    HEAVY = "heavy"


FanOut = str | Callable[[Mapping[str, Any]], Iterable[str]]
LEVEL = {InputType.DATASET: 0, InputType.CONFIG: 1, InputType.SPLIT: 2}


def read_field_path(content: Mapping[str, Any], path: str) -> list[Any]:
    """The values at a dotted field path; a list on the way is read item by item:
    `config_names.config` of {"config_names": [{"config": "a"}, {"config": "b"}]} is ["a", "b"]."""
    values: list[Any] = [content]
    for part in path.split("."):
        found: list[Any] = []
        for value in values:
            items = value if isinstance(value, (list, tuple)) else [value]
            found += [item[part] for item in items if isinstance(item, Mapping) and part in item]
        values = found
    return [item for value in values for item in (value if isinstance(value, (list, tuple)) else [value])]


class CacheKey(NamedTuple):
    kind: str
    dataset: str
    config: str | None
    split: str | None


@dataclass(frozen=True)
class ProcessingStep:
    name: str
    input_type: InputType
    parents: tuple[str, ...] = ()
    job_runner_version: int = 1
    queue: QueueName = QueueName.LIGHT
    # Where the content lists the configs (of a dataset-level step) or splits (of a config-level step) its
    # finer children run on: a dotted field path (lists read item by item) or a function of the content.
    fan_out: FanOut | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _STEP_NAME.fullmatch(self.name):
            raise InvalidStepSpecError(f"step name {self.name!r} is not lowercase words of [a-z0-9] joined by '-'")
        # Specs may come from plain data (a list, strings), so coerce to the types the rest of the code
        # relies on; the dataclass is frozen, hence object.__setattr__.
        object.__setattr__(self, "input_type", _coerce(InputType, self.input_type, self.name, "input type"))
        object.__setattr__(self, "queue", _coerce(QueueName, self.queue, self.name, "queue"))
        # A bare string is iterable too and would silently become one parent per character.
        if isinstance(self.parents, str) or not isinstance(self.parents, (list, tuple)):
            raise InvalidStepSpecError(
                f"step {self.name!r}: parents must be a list or tuple of step names, got {self.parents!r}"
            )
        parents = tuple(self.parents)
        if not all(isinstance(parent, str) for parent in parents):
            raise InvalidStepSpecError(f"step {self.name!r}: every parent must be a step name (str)")
        if len(set(parents)) != len(parents):
            raise InvalidStepSpecError(f"step {self.name!r} lists a parent twice: {list(parents)}")
        object.__setattr__(self, "parents", parents)
        # bool is an int subclass; True as a version is a mistake, not version 1.
        version = self.job_runner_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidStepSpecError(
                f"step {self.name!r}: job_runner_version must be an integer >= 1, got {version!r}"
            )
        fan_out = self.fan_out
        if isinstance(fan_out, str) and not _FIELD_PATH.fullmatch(fan_out):
            raise InvalidStepSpecError(f"step {self.name!r}: fan_out {fan_out!r} is not a dotted field path")
        if fan_out is not None and not isinstance(fan_out, str) and not callable(fan_out):
            raise InvalidStepSpecError(f"step {self.name!r}: fan_out must be a field path or a function")
        if fan_out is not None and self.input_type is InputType.SPLIT:
            raise InvalidStepSpecError(f"step {self.name!r} is split-level: it has nothing finer to fan out to")

    def names_in(self, content: Mapping[str, Any]) -> list[str]:
        """The configs or splits this step's content lists for its finer children, in order, once each.
        InvalidStepSpecError when it has no fan_out, or the content does not list names (str)."""
        if self.fan_out is None:
            raise InvalidStepSpecError(f"step {self.name!r} declares no fan_out")
        try:
            if isinstance(self.fan_out, str):
                values = read_field_path(content, self.fan_out)
            else:
                listed = self.fan_out(content)
                if isinstance(listed, (str, bytes, Mapping)):  # iterating would give characters or keys
                    raise TypeError(f"it returned a {type(listed).__name__}, not a list of names")
                values = list(listed)
        except Exception as error:
            raise InvalidStepSpecError(f"step {self.name!r}: its fan_out failed: {error}") from None
        if not all(isinstance(value, str) for value in values):
            raise InvalidStepSpecError(f"step {self.name!r}: its fan_out must list names (str), got {values!r}")
        return list(dict.fromkeys(values))

    @property
    def python_name(self) -> str:
        """The name as a Python identifier, e.g. ``dataset_config_names`` for a task attribute."""
        return self.name.replace("-", "_")


def _coerce(enum: type[_E], value: object, step: str, what: str) -> _E:
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    accepted = ", ".join(repr(member.value) for member in enum)
    raise InvalidStepSpecError(f"step {step!r}: {what} {value!r} is not one of {accepted}")


class ProcessingGraph:
    """An immutable, validated DAG of steps; lists of steps are in topological order, except parents()."""

    def __init__(self, steps: Iterable[ProcessingStep]) -> None:
        declared = tuple(steps)
        by_name: dict[str, ProcessingStep] = {}
        for step in declared:
            if not isinstance(step, ProcessingStep):
                raise InvalidStepSpecError(f"not a ProcessingStep: {step!r}")
            if step.name in by_name:
                raise InvalidStepSpecError(f"step {step.name!r} is declared twice")
            by_name[step.name] = step
        for step in declared:
            for parent in step.parents:
                if parent not in by_name:
                    raise UnknownParentStepError(f"step {step.name!r} names an unknown parent {parent!r}")
            # Every job chain starts from a dataset name alone; a config- or split-level root would
            # have no step upstream to tell it which configs or splits exist.
            if not step.parents and step.input_type is not InputType.DATASET:
                raise InvalidStepSpecError(
                    f"step {step.name!r} has no parents, so it must be dataset-level, not {step.input_type}"
                )
            if step.parents and not any(_enqueues(by_name[parent], step) for parent in step.parents):
                raise InvalidStepSpecError(
                    f"step {step.name!r} ({step.input_type}-level) would never be enqueued: its parents are "
                    f"coarser and declare no fan_out saying where their content lists its {step.input_type}s"
                )
        self._declared = declared
        self._by_name = by_name
        self._order = _kahn(declared)
        self._position = {step.name: index for index, step in enumerate(self._order)}
        children: dict[str, list[str]] = {name: [] for name in by_name}
        for step in self._order:
            for parent in step.parents:
                children[parent].append(step.name)
        self._children = {name: tuple(names) for name, names in children.items()}
        # Which step's content lists the configs (a dataset-level step) and the splits (a config-level one)
        # each step runs on: the parent it fans out from, or what its first parent that has one runs on.
        self._sources: dict[str, tuple[ProcessingStep | None, ProcessingStep | None]] = {}
        for step in self._order:
            self._sources[step.name] = _sources_of(step, [by_name[parent] for parent in step.parents], self._sources)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, ProcessingStep):
            return self._by_name.get(item.name) == item
        return isinstance(item, str) and item in self._by_name

    def __iter__(self) -> Iterator[ProcessingStep]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"ProcessingGraph({[step.name for step in self._order]})"

    @property
    def steps(self) -> tuple[ProcessingStep, ...]:
        return self._order

    def get_step(self, name: str) -> ProcessingStep:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name)
            raise UnknownStepError(f"unknown processing step {name!r}; known steps: {known}") from None

    def topological_order(self) -> list[ProcessingStep]:
        return list(self._order)

    def roots(self) -> list[ProcessingStep]:
        return [step for step in self._order if not step.parents]

    def parents(self, name: str) -> list[ProcessingStep]:
        """Direct parents, in the order the step declares them."""
        return [self._by_name[parent] for parent in self.get_step(name).parents]

    def children(self, name: str) -> list[ProcessingStep]:
        self.get_step(name)
        return [self._by_name[child] for child in self._children[name]]

    def ancestors(self, name: str) -> list[ProcessingStep]:
        return self._closure(name, lambda step: step.parents)

    def descendants(self, name: str) -> list[ProcessingStep]:
        return self._closure(name, lambda step: self._children[step.name])

    def _closure(self, name: str, neighbours: Callable[[ProcessingStep], Iterable[str]]) -> list[ProcessingStep]:
        start = self.get_step(name)
        seen: set[str] = set()
        pending = list(neighbours(start))
        while pending:
            current = pending.pop()
            if current not in seen:
                seen.add(current)
                pending.extend(neighbours(self._by_name[current]))
        return sorted((self._by_name[found] for found in seen), key=lambda step: self._position[step.name])

    def with_step(self, step: ProcessingStep) -> ProcessingGraph:
        """A new graph with ``step`` added, validated whole; ``self`` is left as it was."""
        return ProcessingGraph((*self._declared, step))

    def sources(self, name: str) -> tuple[ProcessingStep | None, ProcessingStep | None]:
        """The steps whose content lists the configs and the splits this step runs on (None: none does)."""
        self.get_step(name)
        return self._sources[name]

    def expected_entries(self, dataset: str, listed: Mapping[str, Sequence[str]] | Listing) -> list[CacheKey]:
        """The cache keys every step should have filled for ``dataset``: `listed(source, config)` says what a
        fanning-out step's entry lists (configs of the dataset, splits of a config); a mapping
        {config: [splits]} says the same for every such step."""
        if isinstance(listed, Mapping):
            listed = _same_listing(listed)
        keys: list[CacheKey] = []
        for step in self._order:
            config_source, split_source = self._sources[step.name]
            if step.input_type is InputType.DATASET:
                keys.append(CacheKey(step.name, dataset, None, None))
                continue
            configs = listed(config_source, None) if config_source is not None else []
            if step.input_type is InputType.CONFIG:
                keys.extend(CacheKey(step.name, dataset, config, None) for config in configs)
            elif split_source is not None:
                keys.extend(
                    CacheKey(step.name, dataset, config, split)
                    for config in configs
                    for split in listed(split_source, config)
                )
        return keys


Listing = Callable[[ProcessingStep, str | None], Sequence[str]]


def _same_listing(configs: Mapping[str, Sequence[str]]) -> Listing:
    for config, splits in configs.items():
        # A str is a Sequence[str]: "train" would otherwise expand to the splits t, r, a, i, n.
        if isinstance(splits, str):
            raise TypeError(f"splits of config {config!r} must be a sequence of names, not a str")

    def listed(source: ProcessingStep, config: str | None) -> Sequence[str]:
        return list(configs) if config is None else configs.get(config, [])

    return listed


def _sources_of(
    step: ProcessingStep,
    parents: Sequence[ProcessingStep],
    known: Mapping[str, tuple[ProcessingStep | None, ProcessingStep | None]],
) -> tuple[ProcessingStep | None, ProcessingStep | None]:
    config_source: ProcessingStep | None = None
    split_source: ProcessingStep | None = None
    fanned: tuple[ProcessingStep | None, ProcessingStep | None]
    for parent in parents:
        finer = LEVEL[step.input_type] - LEVEL[parent.input_type]
        if finer == 1 and parent.fan_out is not None:
            fanned = (parent, None) if step.input_type is InputType.CONFIG else (known[parent.name][0], parent)
        else:
            fanned = known[parent.name]
        config_source = config_source or fanned[0]
        split_source = split_source or fanned[1]
    if step.input_type is InputType.DATASET:
        return None, None
    return config_source, split_source if step.input_type is InputType.SPLIT else None


def _enqueues(parent: ProcessingStep, child: ProcessingStep) -> bool:
    """Whether the parent's end enqueues the child: same level, coarser child (fan-in), or a child one level
    finer whose configs or splits the parent's content lists (fan-out)."""
    finer = LEVEL[child.input_type] - LEVEL[parent.input_type]
    return finer <= 0 or (finer == 1 and parent.fan_out is not None)


def _kahn(declared: tuple[ProcessingStep, ...]) -> tuple[ProcessingStep, ...]:
    # Ties go to the earliest declared step so the order (and what gets enqueued first) never depends
    # on set or dict iteration details.
    index = {step.name: position for position, step in enumerate(declared)}
    waiting_on = {step.name: len(step.parents) for step in declared}
    children: dict[str, list[str]] = {step.name: [] for step in declared}
    for step in declared:
        for parent in step.parents:
            children[parent].append(step.name)
    ready = [index[step.name] for step in declared if not step.parents]
    heapq.heapify(ready)
    order: list[ProcessingStep] = []
    while ready:
        step = declared[heapq.heappop(ready)]
        order.append(step)
        for child in children[step.name]:
            waiting_on[child] -= 1
            if waiting_on[child] == 0:
                heapq.heappush(ready, index[child])
    if len(order) < len(declared):
        raise ProcessingGraphCycleError(f"the steps' parents form a cycle: {_find_cycle(declared, order)}")
    return tuple(order)


def _find_cycle(declared: tuple[ProcessingStep, ...], ordered: list[ProcessingStep]) -> str:
    # Every step Kahn's algorithm left behind has a parent that was also left behind, so walking up
    # from any of them must come back to a step already seen: that loop is a cycle.
    by_name = {step.name: step for step in declared}
    left = {step.name for step in declared} - {step.name for step in ordered}
    current = next(step.name for step in declared if step.name in left)
    walked: list[str] = []
    while current not in walked:
        walked.append(current)
        current = next(parent for parent in by_name[current].parents if parent in left)
    cycle = walked[walked.index(current) :][::-1]
    # Read from the cycle's earliest declared step, the one a person editing the specs looks at first.
    position = {step.name: index for index, step in enumerate(declared)}
    first = cycle.index(min(cycle, key=position.__getitem__))
    cycle = cycle[first:] + cycle[:first]
    return " -> ".join([*cycle, cycle[0]])


DEFAULT_STEPS: tuple[ProcessingStep, ...] = (
    ProcessingStep("dataset-config-names", InputType.DATASET, fan_out="config_names.config"),
    ProcessingStep("config-split-names", InputType.CONFIG, ("dataset-config-names",), fan_out="splits.split"),
    ProcessingStep("split-first-rows", InputType.SPLIT, ("config-split-names",), job_runner_version=2),
    ProcessingStep(
        "config-parquet-and-info",
        InputType.CONFIG,
        ("dataset-config-names",),
        queue=QueueName.HEAVY,
        job_runner_version=2,
    ),
    ProcessingStep("config-parquet", InputType.CONFIG, ("config-parquet-and-info",), fan_out="parquet_files.split"),
    ProcessingStep("config-info", InputType.CONFIG, ("config-parquet-and-info",), job_runner_version=2),
    ProcessingStep("config-size", InputType.CONFIG, ("config-parquet-and-info",), job_runner_version=2),
    ProcessingStep("dataset-size", InputType.DATASET, ("config-size",), job_runner_version=2),
    ProcessingStep(
        "split-descriptive-statistics",
        InputType.SPLIT,
        ("config-parquet",),
        queue=QueueName.HEAVY,
        job_runner_version=2,
    ),
    # The steps the viewer's clients read, derived from the entries above (issue 25). Each has one parent,
    # or only finer ones (a fan-in): so each runs once, after all of them. dataset-configs-settled lists the
    # configs once every entry of theirs is in (computed or failed): config-is-valid runs then, also for a
    # config whose conversion failed (no config-level job follows a config-level failure). The dataset-level
    # steps that read several others form a chain below dataset-is-valid, so that each reads its ancestors.
    ProcessingStep("dataset-split-names", InputType.DATASET, ("config-split-names",)),
    ProcessingStep("dataset-parquet", InputType.DATASET, ("config-parquet",)),
    ProcessingStep("dataset-info", InputType.DATASET, ("config-info",)),
    ProcessingStep("split-image-url-columns", InputType.SPLIT, ("split-first-rows",)),
    # What /rows, /search and /filter read (issue 26): row groups, and an index of each split
    ProcessingStep(
        "config-parquet-metadata", InputType.CONFIG, ("config-parquet",), fan_out="parquet_files_metadata.split"
    ),
    ProcessingStep("split-duckdb-index", InputType.SPLIT, ("config-parquet-metadata",), queue=QueueName.HEAVY),
    ProcessingStep(
        "dataset-configs-settled",
        InputType.DATASET,
        (
            "split-first-rows",
            "split-image-url-columns",
            "config-parquet",
            "config-info",
            "config-size",
            "split-descriptive-statistics",
            "config-parquet-metadata",
            "split-duckdb-index",
        ),
        fan_out="config_names.config",
    ),
    ProcessingStep("config-is-valid", InputType.CONFIG, ("dataset-configs-settled",), fan_out="splits"),
    ProcessingStep("split-is-valid", InputType.SPLIT, ("config-is-valid",)),
    ProcessingStep("dataset-is-valid", InputType.DATASET, ("config-is-valid",), job_runner_version=2),
    ProcessingStep("dataset-filetypes", InputType.DATASET, ("dataset-is-valid",)),
    ProcessingStep("dataset-modalities", InputType.DATASET, ("dataset-filetypes",)),
    ProcessingStep("dataset-compatible-libraries", InputType.DATASET, ("dataset-modalities",)),
    ProcessingStep("dataset-hub-cache", InputType.DATASET, ("dataset-compatible-libraries",)),
    ProcessingStep("dataset-croissant-crumbs", InputType.DATASET, ("dataset-info",)),
)

processing_graph: ProcessingGraph = ProcessingGraph(DEFAULT_STEPS)

# Registration is a read-modify-write of the module-level graph; two modules registering from two
# threads must not lose one of the steps.
_register_lock = threading.Lock()


def register_step(step: ProcessingStep) -> ProcessingStep:
    """Add ``step`` to the module-level graph, or raise and leave the graph as it was.

    A user adds a step at import time of their module, before workers start: a worker builds its tasks
    and routes from the graph it sees when it starts, so a step registered later is unknown to it.
    """
    global processing_graph
    with _register_lock:
        processing_graph = processing_graph.with_step(step)
    return step


def get_processing_graph() -> ProcessingGraph:
    """The current graph; call this each time, since :func:`register_step` replaces the variable."""
    return processing_graph
