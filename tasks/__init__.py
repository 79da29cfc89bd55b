"""stepcache's Celery side: `app`, the step tasks (tasks.steps), the signal handlers, the CLI.

`celery -A tasks worker -Q light,heavy` starts a worker. A bad setting stops the import with one line.
"""

from __future__ import annotations

from celery import Celery

from common.config import get_config_or_exit

get_config_or_exit()
app = Celery("stepcache")
app.config_from_object("celeryconfig")

import tasks.signals  # noqa: E402  (connects the signal handlers)
import tasks.steps  # noqa: E402,F401  (registers one task per processing step)

__all__ = ["app"]
