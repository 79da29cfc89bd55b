"""stepcache's Celery side: the app, the step tasks, the signal handlers and the CLI."""
