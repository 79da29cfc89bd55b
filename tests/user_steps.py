"""Steps a user would write in a module of their own: a dataset-level step that lists tables, a config-level
step per table (fan-out declared by a field path), and a dataset-level total (fan-in). The worker imports
the module with `celery -A tasks worker -I tests.user_steps`, the enqueuing process by importing it."""

from __future__ import annotations

from typing import Any

from tasks.steps import StepJob, step

TABLES = {"users": 3, "orders": 5, "items": 7}


@step("test-user-tables", input_type="dataset", fan_out="tables.name")
def test_user_tables(job: StepJob) -> dict[str, Any]:
    return {"tables": [{"name": name} for name in TABLES]}


@step("test-user-table-rows", input_type="config", parents=["test-user-tables"])
def test_user_table_rows(job: StepJob) -> dict[str, Any]:
    job.progress.update(1, 1, f"counted {job.config}")
    return {"table": job.config, "rows": TABLES[job.config or ""]}


@step("test-user-total", input_type="dataset", parents=["test-user-table-rows"])
def test_user_total(job: StepJob) -> dict[str, Any]:
    rows = [job.previous_step("test-user-table-rows", config=name)["rows"] for name in TABLES]
    return {"rows": sum(rows)}
