"""Asset files (images, audio) that responses point to, stored under ASSETS_STORAGE_DIRECTORY.

A cell's file goes to `<dataset>/--/<revision>/--/<config>/<split>/<row>/<column>/<name>` and is served
at the same path under ASSETS_BASE_URL. Every part of the path is a validated name (the dataset, config
and split rules of common.names, a hex revision, a row number, and the column's name when it passes the
split-name rules or else its index), so no cell can write outside the storage directory.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from common.config import get_config
from common.exceptions import InvalidSplitNameError
from common.names import validate_dataset, validate_key, validate_split
from common.storage import written_whole

_REVISION = re.compile(r"[0-9a-f]{1,64}")
AUDIO_SIGNATURES = (
    (b"RIFF", "wav", "audio/wav"),
    (b"fLaC", "flac", "audio/flac"),
    (b"OggS", "ogg", "audio/ogg"),
)


@dataclass(frozen=True)
class CellLocation:
    dataset: str
    revision: str
    config: str
    split: str
    row: int
    column: str
    column_index: int

    def relative_directory(self) -> Path:
        validate_key(self.dataset, self.config, self.split)
        if not _REVISION.fullmatch(self.revision):
            raise ValueError(f"a revision is a hex digest, not {self.revision!r}")
        try:
            column = validate_split(self.column)
        except InvalidSplitNameError:
            column = f"column-{self.column_index}"
        return Path(
            validate_dataset(self.dataset),
            "--",
            self.revision,
            "--",
            self.config,
            self.split,
            str(int(self.row)),
            column,
        )


def _target(location: CellLocation, name: str) -> tuple[Path, str]:
    """Where the cell's file goes, and its URL."""
    settings = get_config().assets
    relative = location.relative_directory() / name
    return settings.storage_path / relative, f"{settings.base_url.rstrip('/')}/{quote(relative.as_posix())}"


def _write(path: Path, data: bytes) -> None:
    """Write the file whole at once (the API writes the cells of the rows it serves while others read)."""
    with written_whole(path) as temporary:
        temporary.write_bytes(data)


def store_image(
    location: CellLocation, data: bytes, reuse: bool = False, max_pixels: int | None = None
) -> dict[str, object]:
    """Write the image as JPEG; returns its URL and size, as a viewer shows an image cell. With `reuse`, a
    file already written for the cell (the same revision's same row and column) is kept, not encoded again.
    An image of more than `max_pixels` (its header says) is refused before it is decoded: ValueError."""
    from PIL import Image

    path, url = _target(location, "image.jpg")
    if reuse and path.is_file():
        with Image.open(path) as stored:  # its header only
            width, height = stored.size
        return {"src": url, "height": height, "width": width}
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"{width} x {height} pixels: more than {max_pixels}")
        output = io.BytesIO()
        image.convert("RGB").save(output, format="JPEG", quality=90)
    _write(path, output.getvalue())
    return {"src": url, "height": height, "width": width}


def store_audio(location: CellLocation, data: bytes, reuse: bool = False) -> list[dict[str, str]]:
    """Write the audio file as it is; returns its URL and type, as a viewer shows an audio cell (with
    `reuse`, a file already written for the cell is kept)."""
    extension, mime = "mp3", "audio/mpeg"
    for signature, known_extension, known_mime in AUDIO_SIGNATURES:
        if data.startswith(signature):
            extension, mime = known_extension, known_mime
    path, url = _target(location, f"audio.{extension}")
    if not (reuse and path.is_file()):
        _write(path, data)
    return [{"src": url, "type": mime}]
