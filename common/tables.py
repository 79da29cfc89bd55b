"""Describing a dataset's columns the way a viewer shows them, from its `datasets` features.

A feature is described by `datasets`'s own serialization (`{"_type": "Value", "dtype": "int64"}`,
`{"_type": "ClassLabel", "names": [...]}`, `{"_type": "Image"}`...), so a reader of the cache can rebuild
it with `datasets.Features.from_dict`. The features travel with the data: the Parquet files a step writes
carry them in their schema's metadata, as `datasets` writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from common.reading import feature_type

if TYPE_CHECKING:
    from datasets import Features

NUMBER_DTYPES = ("int", "uint", "float", "double", "half")
STRING_DTYPES = ("string", "large_string")


def features(features: Features) -> list[dict[str, Any]]:
    """[{"feature_idx", "name", "type"}], one per column."""
    described = features.to_dict()
    return [
        {"feature_idx": index, "name": name, "type": _without_decode(described[name])}
        for index, name in enumerate(features)
    ]


def _without_decode(described: Any) -> Any:
    """A step reads media undecoded; how a reader decodes them is the reader's business."""
    if isinstance(described, dict):
        return {key: _without_decode(value) for key, value in described.items() if key != "decode"}
    if isinstance(described, list):
        return [_without_decode(value) for value in described]
    return described


def column_kind(feature: Any) -> str:
    """One of: number, string, bool, class_label, image, audio, other."""
    kind = feature_type(feature)
    if kind == "ClassLabel":
        return "class_label"
    if kind in ("Image", "Audio"):
        return kind.lower()
    if kind != "Value":
        return "other"
    dtype = str(feature.dtype)
    if dtype == "bool":
        return "bool"
    if dtype.startswith(NUMBER_DTYPES):
        return "number"
    if dtype in STRING_DTYPES:
        return "string"
    return "other"


def features_of(schema: pa.Schema) -> Features:
    """The features a Parquet or Arrow schema carries (`datasets`'s metadata), or those its types imply."""
    from datasets import Features

    return Features.from_arrow_schema(schema)
