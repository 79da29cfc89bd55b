"""Reading a split's files into an Arrow table, and describing its columns the way a viewer shows them.

Image and audio folders become a binary column (`image` or `audio`) and, when the files sit in label
folders, a `label` column of class indices; what a column holds travels in the Arrow field's metadata
(`stepcache.type`: Image, Audio or ClassLabel with its names), so it survives the Parquet conversion.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from common.exceptions import DatasetGenerationError
from common.sources import SplitFiles

TYPE_KEY = b"stepcache.type"
NAMES_KEY = b"stepcache.names"
BLOCK_SIZE = 64 << 20  # a cell (a whole line) must fit in one block: 64 MB


def read_split(split: SplitFiles) -> pa.Table:
    """Every row of the split, as one table; DatasetGenerationError when a file cannot be read."""
    try:
        if split.format in ("image", "audio"):
            return _media_table(split)
        readers = {
            "csv": lambda path: pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=BLOCK_SIZE)),
            "json": lambda path: pajson.read_json(path, read_options=pajson.ReadOptions(block_size=BLOCK_SIZE)),
            "parquet": pq.read_table,
        }
        tables = [readers[split.format](str(path)) for path in split.files]
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowException, OSError, ValueError) as error:
        raise DatasetGenerationError(
            f"cannot read the {split.format} files of the split: {error}", cause=error
        ) from error


def _media_table(split: SplitFiles) -> pa.Table:
    column = split.format  # "image" or "audio"
    media = pa.field(column, pa.binary(), metadata={TYPE_KEY: column.capitalize().encode()})
    arrays: list[pa.Array] = [pa.array([path.read_bytes() for path in split.files], pa.binary())]
    fields = [media]
    labels = [label for label in split.labels if label is not None]
    if labels and len(labels) == len(split.files):
        names = sorted(set(labels))
        fields.append(
            pa.field("label", pa.int64(), metadata={TYPE_KEY: b"ClassLabel", NAMES_KEY: json.dumps(names).encode()})
        )
        arrays.append(pa.array([names.index(label) for label in labels], pa.int64()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def feature_type(field: pa.Field) -> dict[str, Any]:
    """How a viewer describes the column: its `_type` and, for plain values, its `dtype`."""
    metadata = field.metadata or {}
    kind = metadata.get(TYPE_KEY, b"").decode()
    if kind == "ClassLabel":
        return {"_type": "ClassLabel", "names": json.loads(metadata[NAMES_KEY])}
    if kind in ("Image", "Audio"):
        return {"_type": kind}
    return _value_type(field.type)


def _value_type(arrow_type: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return {"_type": "Sequence", "feature": _value_type(arrow_type.value_type)}
    if pa.types.is_struct(arrow_type):
        return {"_type": "Struct", "fields": {f.name: _value_type(f.type) for f in arrow_type}}
    dtype = "string" if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) else str(arrow_type)
    return {"_type": "Value", "dtype": dtype}


def features(schema: pa.Schema) -> list[dict[str, Any]]:
    return [
        {"feature_idx": index, "name": field.name, "type": feature_type(field)} for index, field in enumerate(schema)
    ]


def column_kind(field: pa.Field) -> str:
    """One of: number, string, bool, class_label, image, audio, other."""
    kind: str = (field.metadata or {}).get(TYPE_KEY, b"").decode()
    if kind == "ClassLabel":
        return "class_label"
    if kind in ("Image", "Audio"):
        return kind.lower()
    if pa.types.is_boolean(field.type):
        return "bool"
    if pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
        return "number"
    if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
        return "string"
    return "other"
