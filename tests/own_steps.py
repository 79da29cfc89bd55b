"""A step only some test workers know: they import this module (`-I tests.own_steps`), others do not."""

from __future__ import annotations

import os
import time
from typing import Any

from tasks.steps import StepJob, step


@step("test-own-sleep", input_type="dataset", queue="heavy")
def test_own_sleep(job: StepJob) -> dict[str, Any]:
    time.sleep(float(os.environ.get("TEST_SLEEP_SECONDS", "0.05")))
    return {"dataset": job.dataset, "pid": os.getpid()}
