"""The absolute URLs the API gives out, and those of the exported Parquet files.

`public_base_url(request)` is API_PUBLIC_URL, or, when it is empty, the request's own base URL (its scheme,
host and root path: behind a proxy, only API_TRUSTED_PROXIES' forwarded scheme is believed, so set
API_PUBLIC_URL there). A Parquet file is at `<base>/parquet-files/<its path>`, its path being the one its
config-parquet entry holds (`<dataset>/--/<revision>/--/<config>/<split>/0000.parquet`, relative to
WORKER_PARQUET_DIRECTORY), percent-encoded. For a gated or private dataset the URL is signed as the assets'
are (tasks.api.assets: same key, same TTL and rounding of `expires`), over `"/parquet-files/<path,
percent-decoded>\\n<expires>"`: the leading `/` keeps a Parquet signature from ever being an asset's (an
asset's signed path never starts with one), and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from fastapi import Request

from common.config import get_config
from common.sources import Access
from tasks.api.assets import expiry, key_id, signature, signing_key

PARQUET_FILES_PREFIX = "/parquet-files"


def public_base_url(request: Request) -> str:
    """The base of the absolute URLs the API gives out, without a trailing slash."""
    configured = get_config().api.public_url
    return configured or str(request.base_url).rstrip("/")


def parquet_signed_path(path: str) -> str:
    """What a Parquet file's signature covers: its route path, percent-decoded."""
    return f"{PARQUET_FILES_PREFIX}/{path}"


@dataclass(frozen=True)
class ParquetLinks:
    """The URLs of one answer's Parquet files: under `base`, signed until `expires` when it is set."""

    base: str
    expires: int | None = None
    key: bytes = field(default=b"", repr=False)
    key_id: str = ""

    def url(self, path: str) -> str:
        url = f"{self.base}{PARQUET_FILES_PREFIX}/{quote(path, safe='/')}"
        if self.expires is None:
            return url
        return f"{url}?expires={self.expires}&signature={signature(self.key, parquet_signed_path(path), self.expires)}"

    @property
    def tag(self) -> tuple[str, int | None, str]:
        """What the answer's ETag must change with: the base, the expiry and the signing key."""
        return self.base, self.expires, self.key_id


def parquet_links(request: Request, access: Access) -> ParquetLinks:
    """Plain URLs for a public dataset; signed ones, valid API_ASSETS_URL_TTL_SECONDS or more, otherwise."""
    base = public_base_url(request)
    if access == "public":
        return ParquetLinks(base)
    settings = get_config()
    expires = expiry(settings.api.assets_url_ttl_seconds)
    return ParquetLinks(base, expires, signing_key(settings), key_id(settings))
