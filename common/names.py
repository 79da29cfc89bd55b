"""Which dataset, config and split names stepcache accepts.

Names end up in Redis keys (``stepcache:{namespace}:...``, where the namespace is a hash tag)
and in asset paths (``<base>/<dataset>/--/<config>/<split>``), so they are checked before use.

Dataset
    ``org/name`` or a canonical ``name``, whose namespace is the name itself. Each part is
    1..96 characters of ``[A-Za-z0-9._-]``, does not start or end with ``-`` or ``.`` and does
    not contain ``--`` or ``..``. Otherwise :class:`InvalidDatasetNameError`.
Config and split
    A non-empty string of at most :data:`MAX_CONFIG_OR_SPLIT_LENGTH` characters (unicode
    letters are fine) without ``/``, ``\\``, ``--`` (the asset path separator), control
    characters or line/paragraph separators, and without leading or trailing whitespace; ``.``
    and ``..`` are refused. Otherwise :class:`InvalidConfigNameError` / :class:`InvalidSplitNameError`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from common.exceptions import InvalidConfigNameError, InvalidDatasetNameError, InvalidSplitNameError

MAX_DATASET_PART_LENGTH = 96
MAX_CONFIG_OR_SPLIT_LENGTH = 256
_MAX_QUOTED_LENGTH = 100

# One part of a dataset name: no "--" or "..", no leading or trailing "-" or ".".
_DATASET_PART = re.compile(rf"(?![-.])(?!.*(?:--|\.\.))[A-Za-z0-9._-]{{1,{MAX_DATASET_PART_LENGTH}}}(?<![-.])")
_DATASET_RULES = (
    f"expected 'org/name' or 'name', each part 1 to {MAX_DATASET_PART_LENGTH} characters of "
    "[A-Za-z0-9._-], not starting or ending with '-' or '.', and without '--' or '..'"
)
_SEGMENT_RULES = (
    f"expected a non-empty string of at most {MAX_CONFIG_OR_SPLIT_LENGTH} characters without '/', "
    "'\\', '--', control characters or leading/trailing whitespace, other than '.' and '..'"
)
# Control characters, and the line and paragraph separators that str.splitlines() breaks on.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED_LENGTH else text[: _MAX_QUOTED_LENGTH - 3] + "..."


@dataclass(frozen=True)
class DatasetName:
    """A validated dataset name; build it with :func:`parse_dataset`.

    ``full`` is the name as given ("org/ds" or "ds"); ``namespace`` is "org", or "ds" for a canonical name.
    """

    namespace: str
    name: str
    full: str

    def __post_init__(self) -> None:
        if _split_dataset(self.full) != (self.full, self.namespace, self.name):
            raise InvalidDatasetNameError(
                f"Inconsistent DatasetName: namespace={self.namespace!r}, name={self.name!r}, "
                f"full={self.full!r}; use parse_dataset()"
            )


def _split_dataset(dataset: object) -> tuple[str, str, str]:
    """Validate ``dataset`` and return it as a plain str, with its namespace and name."""
    if isinstance(dataset, str):
        full = str.__str__(dataset)
        parts = full.split("/")
        if len(parts) <= 2 and all(_DATASET_PART.fullmatch(part) for part in parts):
            return full, parts[0], parts[-1]
    raise InvalidDatasetNameError(f"Invalid dataset name {_quote(dataset)}: {_DATASET_RULES}.")


def parse_dataset(dataset: object) -> DatasetName:
    """Validate ``dataset`` and split it into its namespace and name."""
    full, namespace, name = _split_dataset(dataset)
    return DatasetName(namespace=namespace, name=name, full=full)


def validate_dataset(dataset: object) -> str:
    """Return ``dataset`` (as a plain str) if it is a valid dataset name."""
    return parse_dataset(dataset).full


def namespace_of(dataset: str) -> str:
    """The namespace of a valid dataset name: "org" for "org/ds", "ds" for "ds"."""
    return _split_dataset(dataset)[1]


def _segment_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable config or split name, or None if it is."""
    if not value:
        return "it is empty"
    if len(value) > MAX_CONFIG_OR_SPLIT_LENGTH:
        return f"it has {len(value)} characters"
    if value in (".", ".."):
        return "it is a relative path component"
    for forbidden in ("/", "\\", "--"):
        if forbidden in value:
            return f"it contains {forbidden!r}"
    if any(unicodedata.category(char) in _FORBIDDEN_CATEGORIES for char in value):
        return "it contains a control character or a line separator"
    if value != value.strip():
        return "it has leading or trailing whitespace"
    return None


def _validate_segment(value: object, kind: str, error: type[InvalidConfigNameError | InvalidSplitNameError]) -> str:
    if isinstance(value, str):
        text = str.__str__(value)
        problem = _segment_problem(text)
        if problem is None:
            return text
    else:
        problem = f"it is a {type(value).__name__}, not a str"
    raise error(f"Invalid {kind} name {_quote(value)} ({problem}): {_SEGMENT_RULES}.")


def validate_config(config: object) -> str:
    """Return ``config`` (as a plain str) if it is a valid config name."""
    return _validate_segment(config, "config", InvalidConfigNameError)


def validate_split(split: object) -> str:
    """Return ``split`` (as a plain str) if it is a valid split name."""
    return _validate_segment(split, "split", InvalidSplitNameError)


def validate_key(dataset: object, config: object | None, split: object | None) -> tuple[str, str | None, str | None]:
    """Validate a (dataset, config, split) key; config and split may be None, but not split alone."""
    valid_dataset = validate_dataset(dataset)
    if config is None:
        if split is not None:
            raise InvalidSplitNameError(f"Split {_quote(split)} given without a config for {valid_dataset!r}.")
        return valid_dataset, None, None
    valid_config = validate_config(config)
    return valid_dataset, valid_config, None if split is None else validate_split(split)
