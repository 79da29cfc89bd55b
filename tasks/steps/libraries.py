"""dataset-compatible-libraries: how to load the dataset with `datasets`, pandas, Polars, DuckDB and
Croissant, in the viewer's format: `{"libraries": [{"language", "library", "function", "loading_codes":
[{"config_name", "arguments", "code"}]}], "formats": [format]}`.

pandas, Polars and DuckDB read the dataset's Parquet export, one file per split, where the API serves it:
`<API_PUBLIC_URL>/parquet-files/<path>` (`http://localhost:<API_PORT>` when API_PUBLIC_URL is empty), the
paths dataset-parquet lists (a gated or private dataset's files need the signed URLs /parquet gives).
`datasets` and Croissant load it from the Hub (COMMON_HF_ENDPOINT when it is one, else huggingface.co).
`formats` is the format of the `datasets` builder config-info names, or else that of most of the
repository's data files (dataset-filetypes). It reads the configs' config-parquet and config-info entries
and dataset-filetypes: all its ancestors, so all in the cache when it runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import islice
from typing import Any
from urllib.parse import quote, urlsplit

from common.config import get_config
from tasks.step_task import StepJob
from tasks.steps.gathered import ancestor_content, current_entries, dataset_configs

MAX_CONFIGS = 100
FORMATS = {  # a data file's extension: the format `datasets` reads it as
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
    ".tar": "webdataset",
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"), "imagefolder"),
    **dict.fromkeys((".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a"), "audiofolder"),
}
BUILDERS = {  # the `datasets` builder a config is read with (config-info says): its format
    "csv": "csv",
    "json": "json",
    "parquet": "parquet",
    "arrow": "arrow",
    "text": "text",
    "imagefolder": "imagefolder",
    "audiofolder": "audiofolder",
    "webdataset": "webdataset",
}
READERS = {  # library: (import line, the function reading a Parquet file's URL)
    "pandas": ("import pandas as pd", "pd.read_parquet"),
    "polars": ("import polars as pl", "pl.read_parquet"),
    "duckdb": ("import duckdb", "duckdb.read_parquet"),
}


def api_base() -> str:
    """Where the API serves the Parquet files: API_PUBLIC_URL, else this host's API port."""
    api = get_config().api
    public = str(getattr(api, "public_url", "") or "")
    return public.rstrip("/") or f"http://localhost:{api.port}"


def hub_base() -> str:
    endpoint = get_config().common.hf_endpoint
    return endpoint.rstrip("/") if urlsplit(endpoint).scheme in ("http", "https") else "https://huggingface.co"


def record_set(dataset: str, config: str) -> str:
    """A config's Croissant record set: its name, unless it is the dataset's (ids must differ)."""
    return config if config != dataset else f"record_set_{config}"


def main_format(filetypes: Iterable[dict[str, Any]]) -> list[str]:
    """The format of most data files (a compressed file counted by its own extension), or none."""
    counts: dict[str, int] = {}
    for filetype in filetypes:
        name = FORMATS.get(str(filetype.get("extension")))
        if name is not None:
            counts[name] = counts.get(name, 0) + int(filetype.get("count") or 0)
    return [max(counts, key=lambda name: (counts[name], name))] if counts else []


def datasets_library(dataset: str, configs: list[str], several: bool) -> dict[str, Any]:
    """`load_dataset` of each config: with its name when the dataset has several."""
    codes = [
        {
            "config_name": config,
            "arguments": {"config_name": config} if several else {},
            "code": f"from datasets import load_dataset\n\nds = load_dataset({_py(dataset)}"
            + (f", {_py(config)})" if several else ")"),
        }
        for config in configs
    ]
    return {"language": "python", "library": "datasets", "function": "load_dataset", "loading_codes": codes}


def parquet_library(library: str, files: dict[str, dict[str, str]], base: str) -> dict[str, Any]:
    """The loading codes of a library that reads a Parquet file by its URL, one per config."""
    importing, function = READERS[library]
    codes = []
    for config, splits in files.items():
        first = next(iter(splits))
        if len(splits) == 1:
            reading = f"df = {function}({_py(base + '/parquet-files/' + splits[first])})"
        else:
            reading = f"splits = {_py(splits)}\ndf = {function}({_py(base + '/parquet-files/')} + splits[{_py(first)}])"
        if library == "duckdb":
            reading += ".df()"
        codes.append({"config_name": config, "arguments": {"splits": splits}, "code": f"{importing}\n\n{reading}"})
    return {"language": "python", "library": library, "function": function, "loading_codes": codes}


def croissant_library(dataset: str, configs: list[str], partial: bool) -> dict[str, Any]:
    comment = "\n# The Parquet export of this dataset is partial" if partial else ""
    url = f"{hub_base()}/api/datasets/{dataset}/croissant"
    codes = [
        {
            "config_name": config,
            "arguments": {"record_set": record_set(dataset, config), "partial": partial},
            "code": f"from mlcroissant import Dataset\n{comment}\nds = Dataset(jsonld={_py(url)})\n"
            f"records = ds.records({_py(record_set(dataset, config))})",
        }
        for config in configs
    ]
    return {"language": "python", "library": "mlcroissant", "function": "Dataset", "loading_codes": codes}


def _py(value: Any) -> str:
    """A Python literal of a string or a mapping of strings (JSON's is one)."""
    return json.dumps(value, ensure_ascii=False)


def dataset_compatible_libraries(job: StepJob) -> dict[str, Any]:
    """{"libraries": [{"language", "library", "function", "loading_codes": [{"config_name", "arguments",
    "code"}]}], "formats": [format]}"""
    job.previous_step("dataset-modalities")  # the revision this answer is about
    filetypes = ancestor_content("dataset-filetypes", job.dataset)
    entries = current_entries(job, ["config-parquet", "config-info"])
    job.progress.update(1, 1, f"{len(entries)} entries")  # one read of the cache: the end
    files: dict[str, dict[str, str]] = {}  # config: {split: path}, the first file of each split
    partial, builders = False, []
    for entry in entries:
        if entry.kind == "config-info":
            info = entry.content.get("dataset_info")
            builders.append(info.get("builder_name") if isinstance(info, dict) else None)
            continue
        partial = partial or bool(entry.content.get("partial"))
        for file in entry.content.get("parquet_files") or []:
            files.setdefault(str(file["config"]), {}).setdefault(str(file["split"]), quote(str(file["path"]), safe="/"))
    files = dict(islice(files.items(), MAX_CONFIGS))
    configs = list(files)
    libraries = []
    if configs:
        base = api_base()
        libraries = [
            datasets_library(job.dataset, configs, several=len(dataset_configs(job)) > 1),
            *(parquet_library(library, files, base) for library in READERS),
            croissant_library(job.dataset, configs, partial),
        ]
    builder = next((name for name in builders if isinstance(name, str)), None)
    formats = [BUILDERS[builder]] if builder in BUILDERS else main_format(filetypes.get("filetypes") or [])
    return {"libraries": libraries, "formats": formats}
