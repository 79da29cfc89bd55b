"""stepcache's Celery side: `app` (built by `create_app`, tasks/factory.py), the step tasks, the signals, the CLI.

`celery -A tasks worker` starts a worker that consumes every queue (`-Q light` or `-Q heavy` for one).
A bad setting stops the import with one line.
"""

from __future__ import annotations

from tasks.factory import create_app

app = create_app()

__all__ = ["app", "create_app"]
