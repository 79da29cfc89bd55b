"""The processing steps as Celery tasks, one per step of the graph, named exactly after the step.

`tasks.steps.dataset_config_names` is the task of the step `dataset-config-names`, and so on. A user
adds a step with the :func:`step` decorator, in a module the worker imports (`celery -A tasks worker
-I mymodule`) and the enqueuing process imports too::

    from tasks.steps import step

    @step("dataset-row-count", input_type="dataset", parents=["dataset-config-names"])
    def dataset_row_count(job: StepJob) -> dict[str, Any]:
        return {"rows": 42}

    dataset_row_count.delay("org/dataset")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from celery import Celery
from celery.local import Proxy

from common.processing_graph import (
    InputType,
    ProcessingStep,
    QueueName,
    get_processing_graph,
    register_step,
)
from tasks.queue import remember_app, stepcache_app, stepcache_apps
from tasks.step_task import StepFunction, StepJob, StepTask

__all__ = ["StepJob", "StepTask", "add_step", "get_step_task", "register_tasks", "step"]

_functions: dict[str, StepFunction | None] = {}  # what computes each step


def register_tasks(app: Celery) -> None:
    """Give `app` a task per step of the graph; steps added later get theirs on every such app."""
    remember_app(app)
    for processing_step in get_processing_graph():
        _register(app, processing_step)


def _register(app: Celery, processing_step: ProcessingStep) -> None:
    if processing_step.name in app.tasks:
        return
    # One class per app and step: Celery binds a task class to the app that registers it.
    cls = type(
        processing_step.python_name,
        (StepTask,),
        {
            "name": processing_step.name,
            "step": processing_step,
            "function": staticmethod(function) if (function := _functions.get(processing_step.name)) else None,
        },
    )
    app.register_task(cls())


def add_step(processing_step: ProcessingStep, function: StepFunction | None) -> StepTask:
    """Register the step's function, and its task on every stepcache app; returns its task on the
    current stepcache app (resolved on use: a test's or `run`'s app as much as tasks.app)."""
    _functions[processing_step.name] = function
    for app in stepcache_apps():
        _register(app, processing_step)
    return _task_of(processing_step.name)


def _task_of(name: str) -> StepTask:
    return cast(StepTask, Proxy(lambda: stepcache_app().tasks[name]))


def get_step_task(name: str, app: Celery | None = None) -> StepTask:
    """The task of a step of the graph (UnknownStepError for any other name), on `app` or the current
    stepcache app."""
    get_processing_graph().get_step(name)
    return cast(StepTask, stepcache_app(app).tasks[name])


def step(
    name: str,
    input_type: InputType | str,
    parents: Sequence[str] = (),
    queue: QueueName | str = QueueName.LIGHT,
    job_runner_version: int = 1,
    fan_out: str | Callable[..., object] | None = None,
) -> Callable[[StepFunction], StepTask]:
    """Add a step to the processing graph, computed by the decorated function; returns its task.
    `fan_out` says where its content lists what its finer children run on (see ProcessingStep)."""

    def decorator(function: StepFunction) -> StepTask:
        processing_step = register_step(
            ProcessingStep(
                name,
                InputType(input_type),
                parents=tuple(parents),
                job_runner_version=job_runner_version,
                queue=QueueName(queue),
                fan_out=fan_out,  # type: ignore[arg-type]
            )
        )
        return add_step(processing_step, function)

    return decorator


def _builtin(name: str, function: StepFunction) -> StepTask:
    return add_step(get_processing_graph().get_step(name), function)


# The built-in steps' functions live in modules named after what they compute (configs, first_rows,
# parquet, statistics, validity): the names below are the steps' tasks.
from tasks.steps import configs, first_rows, parquet, statistics, validity  # noqa: E402

dataset_config_names = _builtin("dataset-config-names", configs.dataset_config_names)
config_split_names = _builtin("config-split-names", configs.config_split_names)
split_first_rows = _builtin("split-first-rows", first_rows.split_first_rows)
config_parquet_and_info = _builtin("config-parquet-and-info", parquet.config_parquet_and_info)
config_parquet = _builtin("config-parquet", parquet.config_parquet)
config_info = _builtin("config-info", parquet.config_info)
config_size = _builtin("config-size", parquet.config_size)
dataset_size = _builtin("dataset-size", parquet.dataset_size)
split_descriptive_statistics = _builtin("split-descriptive-statistics", statistics.split_descriptive_statistics)
dataset_is_valid = _builtin("dataset-is-valid", validity.dataset_is_valid)

# The steps the viewer's clients read, derived from the entries above (issue 25).
from tasks.steps import (  # noqa: E402
    browse,
    croissant,
    filetypes,
    gathered,
    hub_cache,
    image_urls,
    libraries,
    modalities,
)

dataset_split_names = _builtin("dataset-split-names", gathered.dataset_split_names)
dataset_parquet = _builtin("dataset-parquet", gathered.dataset_parquet)
dataset_info = _builtin("dataset-info", gathered.dataset_info)
dataset_configs_settled = _builtin("dataset-configs-settled", validity.dataset_configs_settled)
config_is_valid = _builtin("config-is-valid", validity.config_is_valid)
split_is_valid = _builtin("split-is-valid", validity.split_is_valid)
split_image_url_columns = _builtin("split-image-url-columns", image_urls.split_image_url_columns)
dataset_filetypes = _builtin("dataset-filetypes", filetypes.dataset_filetypes)
dataset_compatible_libraries = _builtin("dataset-compatible-libraries", libraries.dataset_compatible_libraries)
dataset_croissant_crumbs = _builtin("dataset-croissant-crumbs", croissant.dataset_croissant_crumbs)
dataset_modalities = _builtin("dataset-modalities", modalities.dataset_modalities)
dataset_hub_cache = _builtin("dataset-hub-cache", hub_cache.dataset_hub_cache)
config_parquet_metadata = _builtin("config-parquet-metadata", browse.config_parquet_metadata)
split_duckdb_index = _builtin("split-duckdb-index", browse.split_duckdb_index)
