"""dataset-croissant-crumbs: the parts of the dataset's Croissant JSON-LD (https://mlcommons.org/croissant)
the viewer computes, from dataset-info: a file set of Parquet files per config (in the Hub repository's
Parquet branch, as the viewer lays it out: `<config>/<split>/NNNN.parquet`), and per config a record set of
its splits and one of its rows, a field per column whose type Croissant can say (others are named in the
record set's description). The Hub adds the rest (name, license, creators...) to make the whole document.

At most MAX_CONFIGS configs and MAX_COLUMNS fields per record set, so that the answer stays small.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import islice
from typing import Any
from urllib.parse import quote

from tasks.step_task import StepJob
from tasks.steps.libraries import hub_base, record_set

MAX_CONFIGS = 100
MAX_COLUMNS = 1_000
UNSAFE_ID = re.compile(r"[^a-zA-Z0-9\-_.]")
VALUE_TYPES = {
    "bool": "sc:Boolean",
    "string": "sc:Text",
    "large_string": "sc:Text",
    "binary": "sc:Text",
    "date32": "sc:Date",
    "date64": "sc:Date",
    **{f"int{bits}": f"cr:Int{bits}" for bits in (8, 16, 32, 64)},
    **{f"uint{bits}": f"cr:UInt{bits}" for bits in (8, 16, 32, 64)},
    "float16": "cr:Float16",
    "float32": "cr:Float32",
    "float64": "cr:Float64",
    **{f"timestamp[{unit}]": "sc:DateTime" for unit in ("s", "ms", "us", "ns")},
    **{f"time{size}[{unit}]": "sc:Time" for size, unit in (("32", "s"), ("32", "ms"), ("64", "us"), ("64", "ns"))},
}
LISTS = ("List", "LargeList", "Sequence")
CROISSANT_TERMS = [
    "arrayShape", "citeAs", "column", "containedIn", "dataBiases", "dataCollection", "extract", "field",
    "fileObject", "fileProperty", "fileSet", "format", "includes", "isArray", "isLiveDataset", "jsonPath", "key",
    "md5", "parentField", "path", "personalSensitiveInformation", "recordSet", "references", "regex", "repeated",
    "replace", "separator", "source", "subField", "transform",
]  # fmt: skip
CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/",
    "dct": "http://purl.org/dc/terms/",
    "sc": "https://schema.org/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    **{name: f"cr:{name}" for name in CROISSANT_TERMS},
    "conformsTo": "dct:conformsTo",
}


def unique_id(name: str, ids: set[str]) -> str:
    """`name` made a Croissant id (no `/`, nothing but [a-zA-Z0-9-_.]) that is not in `ids` yet; added."""
    escaped = UNSAFE_ID.sub("_", name)
    while escaped in ids:
        escaped += "_0"
    ids.add(escaped)
    return escaped


def columns_of(features: Any) -> list[tuple[str, Any]]:
    """(name, type) of each column: features as first rows lists them ([{name, type}]) or as `datasets`
    serializes them ({name: type})."""
    if isinstance(features, Mapping):
        return list(features.items())
    return [(item["name"], item.get("type")) for item in features or [] if isinstance(item, Mapping)]


def _source(file_set: str, column: str, path: list[str]) -> dict[str, Any]:
    source: dict[str, Any] = {"fileSet": {"@id": file_set}, "extract": {"column": column}}
    if path:
        source["transform"] = [{"jsonPath": part} for part in path] if len(path) > 1 else {"jsonPath": path[0]}
    return source


def field_of(
    file_set: str, field_id: str, column: str, feature: Any, ids: set[str], path: list[str] | None = None
) -> dict[str, Any] | None:
    """The Croissant field of a column (or of a struct's sub-field at `path`); None when Croissant has no
    type for it."""
    path = path or []
    kind = feature.get("_type") if isinstance(feature, Mapping) else None
    if kind == "Value" and feature.get("dtype") in VALUE_TYPES:
        data_type = VALUE_TYPES[feature["dtype"]]
    elif kind == "ClassLabel":
        data_type = "sc:Integer"
    elif kind in ("Image", "Audio", "Video"):
        source = _source(file_set, column, path)
        if kind == "Image":
            transform = source.get("transform")
            source["transform"] = [transform, {"jsonPath": "bytes"}] if transform else {"jsonPath": "bytes"}
        data_type = {"Image": "sc:ImageObject", "Audio": "sc:AudioObject", "Video": "sc:VideoObject"}[kind]
        return {"@type": "cr:Field", "@id": field_id, "dataType": data_type, "source": source}
    elif kind in LISTS:
        inner = field_of(file_set, field_id, column, feature.get("feature"), ids, path)
        if inner is None:
            return None
        return {**inner, "isArray": True, "arrayShape": str(feature.get("length", -1))}
    elif isinstance(feature, Mapping) and kind is None:  # a struct: a sub-field per key
        sub_fields = [
            field_of(file_set, f"{field_id}/{unique_id(name, ids)}", column, value, ids, [*path, name])
            for name, value in feature.items()
        ]
        kept = [sub for sub in sub_fields if sub is not None]
        return {"@type": "cr:Field", "@id": field_id, "subField": kept} if kept else None
    else:
        return None
    return {"@type": "cr:Field", "@id": field_id, "dataType": data_type, "source": _source(file_set, column, path)}


def crumbs(dataset: str, infos: list[Mapping[str, Any]], partial: bool, more_configs: bool) -> dict[str, Any]:
    repository = "repo"
    ids = {repository}
    distribution: list[dict[str, Any]] = [
        {
            "@type": "cr:FileObject",
            "@id": repository,
            "name": repository,
            "description": "The Hugging Face git repository.",
            "contentUrl": f"{hub_base()}/datasets/{dataset}/tree/{quote('refs/convert/parquet', safe='')}",
            "encodingFormat": "git+https",
            "sha256": "https://github.com/mlcommons/croissant/issues/80",
        }
    ]
    record_sets: list[dict[str, Any]] = []
    for info in infos:
        config = str(info.get("config_name"))
        splits = [str(split) for split in info.get("splits") or {}]
        file_set = unique_id(f"parquet-files-for-config-{config}", ids)
        distribution.append(
            {
                "@type": "cr:FileSet",
                "@id": file_set,
                "containedIn": {"@id": repository},
                "encodingFormat": "application/x-parquet",
                "includes": f"{config}/*/*.parquet",
            }
        )
        rows = unique_id(record_set(dataset, config), ids)
        split_set = f"{rows}_splits"
        record_sets.append(
            {
                "@type": "cr:RecordSet",
                "dataType": "cr:Split",
                "key": {"@id": f"{split_set}/split_name"},
                "@id": split_set,
                "name": split_set,
                "description": f"Splits for the {rows} config.",
                "field": [{"@type": "cr:Field", "@id": f"{split_set}/split_name", "dataType": "sc:Text"}],
                "data": [{f"{split_set}/split_name": split} for split in splits],
            }
        )
        splits_pattern = "|".join(re.escape(split) for split in splits)
        fields: list[dict[str, Any]] = [
            {
                "@type": "cr:Field",
                "@id": f"{rows}/split",
                "dataType": "sc:Text",
                "source": {
                    "fileSet": {"@id": file_set},
                    "extract": {"fileProperty": "fullpath"},
                    "transform": {"regex": f"{re.escape(config)}/(?:partial-)?({splits_pattern})/.+parquet$"},
                },
                "references": {"field": {"@id": f"{split_set}/split_name"}},
            }
        ]
        skipped: list[str] = []
        column_ids: set[str] = set()
        for column, feature in columns_of(info.get("features")):
            field = field_of(file_set, f"{rows}/{unique_id(column, column_ids)}", column, feature, ids)
            if field is None:
                skipped.append(column)
            else:
                fields.append(field)
        if len(fields) > MAX_COLUMNS:
            skipped.append(f"{len(fields) - MAX_COLUMNS} more (at most {MAX_COLUMNS} fields)")
            fields = fields[:MAX_COLUMNS]
        description = f"{dataset} - '{config}' subset" + (" (partial)" if partial else "")
        if more_configs:
            description += f" (only the first {MAX_CONFIGS} subsets are included in this metadata)"
        details = [f"{len(splits)} splits: {', '.join(splits)}"] if len(splits) > 1 else []
        if skipped:
            details.append(f"{len(skipped)} skipped column{'s' if len(skipped) > 1 else ''}: {', '.join(skipped)}")
        if details:
            description += "\n\nAdditional information:" + "".join(f"\n- {line}" for line in details)
        record_sets.append({"@type": "cr:RecordSet", "@id": rows, "description": description, "field": fields})
    return {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.1",
        "distribution": distribution,
        "recordSet": record_sets,
    }


def dataset_croissant_crumbs(job: StepJob) -> dict[str, Any]:
    """{"@context", "@type", "conformsTo", "distribution", "recordSet"}"""
    info = job.previous_step("dataset-info")
    by_config = info.get("dataset_info") or {}
    infos = [value for value in islice(by_config.values(), MAX_CONFIGS) if isinstance(value, Mapping)]
    job.progress.update(1, 1, f"{len(infos)} config(s)")
    return crumbs(job.dataset, infos, bool(info.get("partial")), len(by_config) > MAX_CONFIGS)
