"""stepcache's HTTP API (`python -m tasks api`): the cache, the jobs and the assets, read over HTTP.

`create_api()` builds the FastAPI app; every route module adds its own routes. Settings come from the
API_ prefix (common.config.ApiConfig) beside the others.
"""

from __future__ import annotations

from tasks.api.app import create_api

__all__ = ["create_api"]
