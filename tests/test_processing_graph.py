"""The processing graph: validation of specs, navigation of the default graph, expected cache entries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import common.processing_graph as graph_module
from common.exceptions import (
    InvalidStepSpecError,
    ProcessingGraphCycleError,
    UnknownParentStepError,
    UnknownStepError,
)
from common.processing_graph import (
    DEFAULT_STEPS,
    CacheKey,
    InputType,
    ProcessingGraph,
    ProcessingStep,
    QueueName,
    get_processing_graph,
    register_step,
)

DEFAULT = ProcessingGraph(DEFAULT_STEPS)


def names(steps: list[ProcessingStep]) -> list[str]:
    return [step.name for step in steps]


@pytest.fixture
def restored_graph(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # register_step replaces the module attribute; monkeypatch puts the original back after the test.
    monkeypatch.setattr(graph_module, "processing_graph", graph_module.processing_graph)
    yield


# --- step specs ---------------------------------------------------------------------------------


def test_a_step_accepts_plain_strings_and_a_list_and_coerces_them() -> None:
    step = ProcessingStep("config-foo", "config", ["dataset-config-names"], queue="heavy")  # type: ignore[arg-type]
    assert step.input_type is InputType.CONFIG
    assert step.queue is QueueName.HEAVY
    assert step.parents == ("dataset-config-names",)
    assert step.job_runner_version == 1
    assert hash(step) == hash(
        ProcessingStep("config-foo", InputType.CONFIG, ("dataset-config-names",), 1, QueueName.HEAVY)
    )


def test_python_name_replaces_dashes_with_underscores() -> None:
    assert DEFAULT.get_step("dataset-config-names").python_name == "dataset_config_names"


@pytest.mark.parametrize("name", ["", "Dataset-info", "dataset_info", "-dataset", "dataset-", "a--b", "a b", "é"])
def test_a_bad_step_name_is_refused(name: str) -> None:
    with pytest.raises(InvalidStepSpecError, match="step name"):
        ProcessingStep(name, InputType.DATASET)


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"])
def test_a_job_runner_version_that_is_not_an_integer_of_at_least_one_is_refused(version: object) -> None:
    with pytest.raises(InvalidStepSpecError, match="job_runner_version"):
        ProcessingStep("dataset-foo", InputType.DATASET, job_runner_version=version)  # type: ignore[arg-type]


@pytest.mark.parametrize("queue", ["medium", "LIGHT", None, 1])
def test_an_unknown_queue_is_refused(queue: object) -> None:
    with pytest.raises(InvalidStepSpecError, match="queue"):
        ProcessingStep("dataset-foo", InputType.DATASET, queue=queue)  # type: ignore[arg-type]


@pytest.mark.parametrize("input_type", ["row", "Dataset", None])
def test_an_unknown_input_type_is_refused(input_type: object) -> None:
    with pytest.raises(InvalidStepSpecError, match="input type"):
        ProcessingStep("dataset-foo", input_type)  # type: ignore[arg-type]


@pytest.mark.parametrize("parents", ["dataset-config-names", ("a", "a"), (1,)])
def test_parents_that_are_a_bare_string_repeated_or_not_names_are_refused(parents: object) -> None:
    with pytest.raises(InvalidStepSpecError, match="parent"):
        ProcessingStep("config-foo", InputType.CONFIG, parents)  # type: ignore[arg-type]


# --- graph validation ---------------------------------------------------------------------------


def test_a_cycle_is_refused_with_the_steps_that_form_it() -> None:
    steps = [
        ProcessingStep("root", InputType.DATASET, fan_out="configs"),
        ProcessingStep("a", InputType.CONFIG, ("root", "c")),
        ProcessingStep("b", InputType.CONFIG, ("a",)),
        ProcessingStep("c", InputType.CONFIG, ("b",)),
        ProcessingStep("d", InputType.CONFIG, ("c",)),
    ]
    with pytest.raises(ProcessingGraphCycleError, match="a -> b -> c -> a"):
        ProcessingGraph(steps)


def test_a_step_that_is_its_own_parent_is_a_cycle() -> None:
    steps = [
        ProcessingStep("root", InputType.DATASET),
        ProcessingStep("loop", InputType.DATASET, ("root", "loop")),
    ]
    with pytest.raises(ProcessingGraphCycleError, match="loop -> loop"):
        ProcessingGraph(steps)


def test_an_unknown_parent_is_refused_naming_the_step_and_the_parent() -> None:
    steps = [ProcessingStep("root", InputType.DATASET), ProcessingStep("child", InputType.CONFIG, ("ghost",))]
    with pytest.raises(UnknownParentStepError, match=r"'child'.*'ghost'"):
        ProcessingGraph(steps)


def test_a_duplicate_step_name_is_refused() -> None:
    with pytest.raises(InvalidStepSpecError, match="'root' is declared twice"):
        ProcessingGraph([ProcessingStep("root", InputType.DATASET), ProcessingStep("root", InputType.DATASET)])


@pytest.mark.parametrize("input_type", [InputType.CONFIG, InputType.SPLIT])
def test_a_root_that_is_not_dataset_level_is_refused(input_type: InputType) -> None:
    with pytest.raises(InvalidStepSpecError, match="no parents"):
        ProcessingGraph([ProcessingStep("root", InputType.DATASET), ProcessingStep("orphan", input_type)])


def test_fan_in_to_a_coarser_step_and_fan_out_to_a_finer_one_are_both_allowed() -> None:
    graph = ProcessingGraph(
        [
            ProcessingStep("root", InputType.DATASET, fan_out="configs"),
            ProcessingStep("per-config", InputType.CONFIG, ("root",), fan_out="splits.name"),
            ProcessingStep("per-split", InputType.SPLIT, ("per-config",)),
            ProcessingStep("per-dataset", InputType.DATASET, ("per-split",)),
        ]
    )
    assert names(graph.topological_order()) == ["root", "per-config", "per-split", "per-dataset"]


@pytest.mark.parametrize(
    "steps",
    [
        [ProcessingStep("root", InputType.DATASET), ProcessingStep("per-config", InputType.CONFIG, ("root",))],
        [
            ProcessingStep("root", InputType.DATASET, fan_out="configs"),
            ProcessingStep("per-split", InputType.SPLIT, ("root",)),  # two levels finer: nothing lists its key
        ],
    ],
)
def test_a_finer_step_that_nothing_would_enqueue_is_refused(steps: list[ProcessingStep]) -> None:
    with pytest.raises(InvalidStepSpecError, match="would never be enqueued"):
        ProcessingGraph(steps)


def test_a_finer_step_needs_one_parent_that_enqueues_it_not_all() -> None:
    graph = ProcessingGraph(
        [
            ProcessingStep("root", InputType.DATASET, fan_out="configs"),
            ProcessingStep("other", InputType.DATASET, ("root",)),
            ProcessingStep("per-config", InputType.CONFIG, ("root", "other")),
        ]
    )
    assert "per-config" in graph


@pytest.mark.parametrize(
    ("fan_out", "input_type", "match"),
    [
        ("configs..name", InputType.DATASET, "not a dotted field path"),
        ("", InputType.DATASET, "not a dotted field path"),
        (42, InputType.DATASET, "a field path or a function"),
        ("splits", InputType.SPLIT, "nothing finer"),
    ],
)
def test_a_bad_fan_out_is_refused(fan_out: object, input_type: InputType, match: str) -> None:
    with pytest.raises(InvalidStepSpecError, match=match):
        ProcessingStep("a-step", input_type, ("root",) if input_type is not InputType.DATASET else (), fan_out=fan_out)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fan_out", "content", "names"),
    [
        ("configs", {"configs": ["a", "b", "a"]}, ["a", "b"]),
        ("configs.name", {"configs": [{"name": "a"}, {"name": "b"}, {"other": 1}]}, ["a", "b"]),
        ("files.meta.split", {"files": [{"meta": {"split": "train"}}, {"meta": {"split": "test"}}]}, ["train", "test"]),
        ("configs", {}, []),
        ("configs", {"configs": "abc"}, ["abc"]),
        ("configs.name", {"configs": ({"name": "a"}, {"name": "b"})}, ["a", "b"]),
        (lambda content: sorted(content["by_name"]), {"by_name": {"b": 1, "a": 2}}, ["a", "b"]),
    ],
)
def test_fan_out_reads_names_from_a_field_path_or_a_function(
    fan_out: object, content: dict[str, object], names: list[str]
) -> None:
    step = ProcessingStep("a-step", InputType.DATASET, fan_out=fan_out)  # type: ignore[arg-type]
    assert step.names_in(content) == names


@pytest.mark.parametrize(
    ("fan_out", "content"),
    [
        ("configs", {"configs": [1, 2]}),
        ("configs", {"configs": [None]}),
        (lambda content: 1 / 0, {}),
        (lambda content: content["config"], {"config": "default"}),  # a str, not a list of names
        (lambda content: content, {"a": 1}),
    ],
)
def test_fan_out_that_does_not_list_names_is_a_typed_error(fan_out: object, content: dict[str, object]) -> None:
    step = ProcessingStep("a-step", InputType.DATASET, fan_out=fan_out)  # type: ignore[arg-type]
    with pytest.raises(InvalidStepSpecError, match="a-step"):
        step.names_in(content)


# --- navigation of the default graph ------------------------------------------------------------


def test_the_default_graph_is_what_the_module_serves() -> None:
    graph = get_processing_graph()
    # Other tests register steps of their own (roots, outside the default graph).
    assert tuple(step for step in graph.steps if step.name in DEFAULT) == DEFAULT.steps
    assert len(DEFAULT) == 24
    assert "config-parquet" in graph
    assert "config-nothing" not in graph
    assert DEFAULT.get_step("config-size") in graph
    assert [step.name for step in DEFAULT if step.queue is QueueName.HEAVY] == [
        "config-parquet-and-info",
        "split-descriptive-statistics",
        "split-duckdb-index",
    ]
    assert DEFAULT.get_step("dataset-is-valid").job_runner_version >= 2  # it aggregates config-is-valid now


def test_an_unknown_step_name_is_refused_with_unknown_step_error() -> None:
    for lookup in (
        DEFAULT.get_step,
        DEFAULT.parents,
        DEFAULT.children,
        DEFAULT.ancestors,
        DEFAULT.descendants,
    ):
        with pytest.raises(UnknownStepError, match="config-nothing"):
            lookup("config-nothing")


def test_the_only_root_of_the_default_graph_is_dataset_config_names() -> None:
    assert names(DEFAULT.roots()) == ["dataset-config-names"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dataset-config-names", ["config-split-names", "config-parquet-and-info"]),
        ("config-split-names", ["split-first-rows", "dataset-split-names"]),
        ("split-first-rows", ["split-image-url-columns", "dataset-configs-settled"]),
        ("config-parquet-and-info", ["config-parquet", "config-info", "config-size"]),
        (
            "config-parquet",
            ["split-descriptive-statistics", "dataset-parquet", "config-parquet-metadata", "dataset-configs-settled"],
        ),
        ("config-parquet-metadata", ["split-duckdb-index", "dataset-configs-settled"]),
        ("split-duckdb-index", ["dataset-configs-settled"]),
        ("config-info", ["dataset-info", "dataset-configs-settled"]),
        ("config-size", ["dataset-size", "dataset-configs-settled"]),
        ("dataset-size", []),
        ("split-descriptive-statistics", ["dataset-configs-settled"]),
        ("dataset-configs-settled", ["config-is-valid"]),
        ("config-is-valid", ["split-is-valid", "dataset-is-valid"]),
        ("split-is-valid", []),
        ("dataset-is-valid", ["dataset-filetypes"]),
        ("dataset-filetypes", ["dataset-modalities"]),
        ("dataset-modalities", ["dataset-compatible-libraries"]),
        ("dataset-compatible-libraries", ["dataset-hub-cache"]),
        ("dataset-hub-cache", []),
        ("dataset-info", ["dataset-croissant-crumbs"]),
    ],
)
def test_children_of_each_default_step_are_its_direct_dependents(name: str, expected: list[str]) -> None:
    assert names(DEFAULT.children(name)) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dataset-config-names", []),
        ("config-parquet", ["config-parquet-and-info"]),
        ("dataset-size", ["config-size"]),
        ("dataset-is-valid", ["config-is-valid"]),
        ("config-is-valid", ["dataset-configs-settled"]),
        ("dataset-hub-cache", ["dataset-compatible-libraries"]),
    ],
)
def test_parents_of_a_default_step_are_the_ones_it_declares(name: str, expected: list[str]) -> None:
    assert names(DEFAULT.parents(name)) == expected


def test_ancestors_are_every_step_upstream_in_topological_order() -> None:
    assert names(DEFAULT.ancestors("dataset-is-valid")) == [
        "dataset-config-names",
        "config-split-names",
        "split-first-rows",
        "config-parquet-and-info",
        "config-parquet",
        "config-info",
        "config-size",
        "split-descriptive-statistics",
        "split-image-url-columns",
        "config-parquet-metadata",
        "split-duckdb-index",
        "dataset-configs-settled",
        "config-is-valid",
    ]
    assert names(DEFAULT.ancestors("dataset-size")) == [
        "dataset-config-names",
        "config-parquet-and-info",
        "config-size",
    ]
    assert names(DEFAULT.ancestors("dataset-config-names")) == []


def test_descendants_are_every_step_downstream_in_topological_order() -> None:
    assert names(DEFAULT.descendants("config-parquet-and-info")) == [
        "config-parquet",
        "config-info",
        "config-size",
        "dataset-size",
        "split-descriptive-statistics",
        "dataset-parquet",
        "dataset-info",
        "config-parquet-metadata",
        "split-duckdb-index",
        "dataset-configs-settled",
        "config-is-valid",
        "split-is-valid",
        "dataset-is-valid",
        "dataset-filetypes",
        "dataset-modalities",
        "dataset-compatible-libraries",
        "dataset-hub-cache",
        "dataset-croissant-crumbs",
    ]
    assert names(DEFAULT.descendants("config-split-names")) == [
        "split-first-rows",
        "dataset-split-names",
        "split-image-url-columns",
        "dataset-configs-settled",
        "config-is-valid",
        "split-is-valid",
        "dataset-is-valid",
        "dataset-filetypes",
        "dataset-modalities",
        "dataset-compatible-libraries",
        "dataset-hub-cache",
    ]
    assert names(DEFAULT.descendants("dataset-config-names")) == [s.name for s in DEFAULT.steps[1:]]
    assert names(DEFAULT.descendants("dataset-is-valid")) == [
        "dataset-filetypes",
        "dataset-modalities",
        "dataset-compatible-libraries",
        "dataset-hub-cache",
    ]
    assert DEFAULT.descendants("dataset-hub-cache") == []


def test_topological_order_puts_every_parent_before_its_children() -> None:
    order = names(DEFAULT.topological_order())
    assert sorted(order) == sorted(step.name for step in DEFAULT_STEPS)
    for step in DEFAULT_STEPS:
        for parent in step.parents:
            assert order.index(parent) < order.index(step.name), (parent, step.name)


def test_topological_order_is_deterministic_and_breaks_ties_by_declaration_order() -> None:
    assert names(DEFAULT.topological_order()) == [step.name for step in DEFAULT_STEPS]
    assert DEFAULT.steps == tuple(DEFAULT.topological_order())
    reordered = ProcessingGraph(
        [
            ProcessingStep("late-child", InputType.CONFIG, ("root",)),
            ProcessingStep("root", InputType.DATASET, fan_out="configs"),
            ProcessingStep("early-child", InputType.CONFIG, ("root",)),
        ]
    )
    assert names(reordered.topological_order()) == ["root", "late-child", "early-child"]
    assert [names(ProcessingGraph(DEFAULT_STEPS).topological_order()) for _ in range(3)] == [
        names(DEFAULT.topological_order())
    ] * 3


# --- expected cache entries ---------------------------------------------------------------------


def test_expected_entries_has_one_key_per_dataset_config_or_split_as_each_step_needs() -> None:
    configs = {"default": ["train", "test"], "extra": ["train"]}
    entries = DEFAULT.expected_entries("org/ds", configs)
    dataset_level, config_level, split_level = 12, 7, 5
    assert len(entries) == dataset_level + config_level * 2 + split_level * 3 == 41
    assert len(set(entries)) == len(entries)
    assert entries[:4] == [
        CacheKey("dataset-config-names", "org/ds", None, None),
        CacheKey("config-split-names", "org/ds", "default", None),
        CacheKey("config-split-names", "org/ds", "extra", None),
        CacheKey("split-first-rows", "org/ds", "default", "train"),
    ]
    assert set(entries) >= {
        CacheKey("split-first-rows", "org/ds", "default", "test"),
        CacheKey("split-first-rows", "org/ds", "extra", "train"),
        CacheKey("config-size", "org/ds", "extra", None),
        CacheKey("dataset-size", "org/ds", None, None),
        CacheKey("split-descriptive-statistics", "org/ds", "default", "test"),
        CacheKey("dataset-is-valid", "org/ds", None, None),
        CacheKey("config-is-valid", "org/ds", "extra", None),  # on the configs dataset-configs-settled lists
        CacheKey("split-is-valid", "org/ds", "default", "test"),  # on the splits config-is-valid lists
        CacheKey("split-image-url-columns", "org/ds", "extra", "train"),
    }
    assert entries[-1] == CacheKey("dataset-croissant-crumbs", "org/ds", None, None)


def test_expected_entries_for_a_dataset_without_configs_are_the_dataset_level_ones() -> None:
    assert DEFAULT.expected_entries("ds", {}) == [
        CacheKey(step.name, "ds", None, None) for step in DEFAULT if step.input_type is InputType.DATASET
    ]
    assert len(DEFAULT.expected_entries("ds", {})) == 12


def test_expected_entries_refuses_a_bare_string_as_the_splits_of_a_config() -> None:
    with pytest.raises(TypeError, match="'default'"):
        DEFAULT.expected_entries("ds", {"default": "train"})


# --- user-added steps ---------------------------------------------------------------------------

USER_STEP = ProcessingStep("config-user-stats", InputType.CONFIG, ("config-parquet",), queue=QueueName.HEAVY)


def test_a_step_added_with_with_step_is_a_child_of_its_parent_in_a_new_graph() -> None:
    extended = DEFAULT.with_step(USER_STEP)
    assert names(extended.children("config-parquet")) == [
        "split-descriptive-statistics",
        "dataset-parquet",
        "config-parquet-metadata",
        "dataset-configs-settled",
        "config-user-stats",
    ]
    assert extended.get_step("config-user-stats") == USER_STEP
    assert "config-user-stats" in names(extended.descendants("dataset-config-names"))
    assert len(extended.expected_entries("ds", {"default": ["train"]})) == 1 + len(
        DEFAULT.expected_entries("ds", {"default": ["train"]})
    )
    assert "config-user-stats" not in DEFAULT
    assert len(DEFAULT) == 24


def test_a_step_added_with_register_step_is_served_by_get_processing_graph(restored_graph: None) -> None:
    before = get_processing_graph()
    assert register_step(USER_STEP) is USER_STEP
    graph = get_processing_graph()
    assert graph is not before
    assert "config-user-stats" in names(graph.children("config-parquet"))
    assert "config-user-stats" not in before


def test_registering_the_same_step_twice_is_refused_and_keeps_the_first(restored_graph: None) -> None:
    register_step(USER_STEP)
    registered = get_processing_graph()
    with pytest.raises(InvalidStepSpecError, match="declared twice"):
        register_step(USER_STEP)
    assert get_processing_graph() is registered


def test_with_step_of_an_unknown_parent_raises_and_leaves_the_graph_untouched(restored_graph: None) -> None:
    before = get_processing_graph()
    steps = before.steps
    orphan = ProcessingStep("config-orphan", InputType.CONFIG, ("config-ghost",))
    with pytest.raises(UnknownParentStepError, match=r"'config-orphan'.*'config-ghost'"):
        before.with_step(orphan)
    with pytest.raises(UnknownParentStepError):
        register_step(orphan)
    assert get_processing_graph() is before
    assert before.steps == steps
    assert "config-orphan" not in before


def test_with_step_of_a_cycle_making_step_raises_and_leaves_the_graph_untouched(restored_graph: None) -> None:
    # No existing step can name a step that does not exist yet, so the only cycle one new step can
    # close runs through itself.
    before = get_processing_graph()
    size = len(before)
    loop = ProcessingStep("config-loop", InputType.CONFIG, ("config-parquet", "config-loop"))
    with pytest.raises(ProcessingGraphCycleError, match="config-loop -> config-loop"):
        before.with_step(loop)
    with pytest.raises(ProcessingGraphCycleError):
        register_step(loop)
    assert get_processing_graph() is before
    assert len(before) == size
    assert "config-loop" not in before
