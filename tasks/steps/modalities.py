"""dataset-modalities: what kinds of data the dataset holds (the viewer's modalities: image, audio, text,
video, geospatial, 3d, tabular, timeseries, document), from its entries (all in the cache: it follows
dataset-filetypes, which follows dataset-is-valid); a failed one says nothing:

- each config's config-info features: an Image or Audio column, a string column (text), a Pdf (document), at
  least two number columns and no media (tabular), a list of float32 not named like an embedding
  (timeseries);
- split-image-url-columns (its first MAX_SPLITS splits): a column of image URLs (image);
- dataset-filetypes: the extensions of the repository's files, each kind counted only when it is at least a
  tenth of the files of known kinds (images need 10 files beside files of rows: a README's figures are not
  a dataset of images).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tasks.step_task import StepJob
from tasks.steps.croissant import LISTS, columns_of
from tasks.steps.gathered import current_entries

IMAGE = {".apng", ".avif", ".gif", ".jpg", ".jpeg", ".jfif", ".pjpeg", ".pjp", ".png", ".svg", ".webp", ".bmp"}
IMAGE |= {".ico", ".cur", ".tif", ".tiff"}
AUDIO = {".aac", ".flac", ".mp3", ".m4a", ".oga", ".wav", ".weba", ".opus", ".spx", ".wma", ".aiff", ".ape", ".mka"}
AUDIO |= {".wv", ".tak", ".ogg"}
VIDEO = {".m4v", ".m4p", ".ogv", ".mov", ".mkv", ".avi", ".wmv", ".flv", ".3gp", ".mpg", ".mpeg", ".mp4", ".webm"}
GEOSPATIAL = {".shp", ".shx", ".dbf", ".prj", ".cpg", ".kml", ".kmz", ".gpx", ".geojson", ".topojson", ".gml"}
GEOSPATIAL |= {".geoparquet", ".fgb", ".img", ".bil", ".bip", ".bsq", ".gpkg", ".mbtiles", ".pmtiles"}
THREE_D = {".fbx", ".dae", ".dxf", ".obj", ".stl", ".ply", ".gltf", ".glb", ".usdz"}
BY_EXTENSION = [
    (IMAGE, "image"),
    (AUDIO, "audio"),
    (VIDEO, "video"),
    (GEOSPATIAL, "geospatial"),
    (THREE_D, "3d"),
    ({".txt"}, "text"),
    ({".pdf"}, "document"),
]
ROWS = {".parquet", ".csv", ".tsv", ".json", ".jsonl", ".arrow"}  # files of many rows each
KNOWN = ROWS.union(*(extensions for extensions, _ in BY_EXTENSION))
MAX_SPLITS = 10  # image URL columns: the first splits are enough


def from_features(features: Any) -> set[str]:
    found: set[str] = set()
    numbers = 0
    for name, feature in columns_of(features):
        found |= _visit(feature)
        dtype = str(feature.get("dtype", "")) if isinstance(feature, Mapping) else ""
        if isinstance(feature, Mapping) and feature.get("_type") == "Value" and ("int" in dtype or "float" in dtype):
            numbers += 1
        inner = feature.get("feature") if isinstance(feature, Mapping) and feature.get("_type") in LISTS else None
        if "emb" not in name and isinstance(inner, Mapping) and inner.get("dtype") == "float32":
            found.add("timeseries")
    if numbers >= 2 and not found & {"image", "audio"}:
        found.add("tabular")
    return found


def _visit(feature: Any) -> set[str]:
    """The modalities a feature and the features inside it say."""
    if isinstance(feature, list):
        return set().union(*(_visit(item) for item in feature))
    if not isinstance(feature, Mapping):
        return set()
    kind = feature.get("_type")
    if kind in ("Image", "Audio", "Video"):
        return {str(kind).lower()}
    if kind == "Pdf":
        return {"document"}
    if kind in ("Translation", "TranslationVariableLanguages"):
        return {"text"}
    if kind == "Value":
        return {"text"} if feature.get("dtype") in ("string", "large_string") else set()
    return set().union(*(_visit(value) for value in feature.values() if isinstance(value, (Mapping, list))))


def from_filetypes(filetypes: Iterable[Mapping[str, Any]]) -> set[str]:
    listed = [item for item in filetypes if isinstance(item.get("count"), int)]
    total = sum(item["count"] for item in listed if item.get("extension") in KNOWN)
    has_rows = any(item["count"] for item in listed if item.get("extension") in ROWS)
    found = set()
    for item in listed:
        extension, count = item.get("extension"), item["count"]
        if count < round(0.1 * total) or (extension in IMAGE and count < (10 if has_rows else 1)):
            continue
        found |= {modality for extensions, modality in BY_EXTENSION if extension in extensions}
    return found


def dataset_modalities(job: StepJob) -> dict[str, Any]:
    """{"modalities": [modality]}, sorted"""
    filetypes = job.previous_step("dataset-filetypes")
    entries = current_entries(job, ["config-info", "split-image-url-columns"])
    job.progress.update(1, 1, f"{len(entries)} entries")  # one read of the cache: the end
    found = from_filetypes(filetypes.get("filetypes") or [])
    for entry in entries:
        if entry.kind == "config-info":
            info = entry.content.get("dataset_info")
            found |= from_features(info.get("features") if isinstance(info, Mapping) else None)
    url_columns = [entry for entry in entries if entry.kind == "split-image-url-columns"][:MAX_SPLITS]
    if any(entry.content.get("columns") for entry in url_columns):
        found.add("image")
    return {"modalities": sorted(found)}
