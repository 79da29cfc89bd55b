"""Dataset, config and split names: examples, and properties that keep paths and Redis keys safe."""

from __future__ import annotations

import os
import tempfile
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.exceptions import (
    InvalidConfigNameError,
    InvalidDatasetNameError,
    InvalidInputError,
    InvalidSplitNameError,
)
from common.names import (
    MAX_CONFIG_OR_SPLIT_LENGTH,
    DatasetName,
    namespace_of,
    parse_dataset,
    validate_config,
    validate_dataset,
    validate_key,
    validate_split,
)

BASE = os.path.join(tempfile.gettempdir(), "stepcache-assets")

ACCEPTED_DATASETS = ["squad", "org/ds", "Org-1/ds.v2_x", "a" * 96, f"{'o' * 96}/{'d' * 96}", "a.b-c_d/0"]
REJECTED_DATASETS: list[object] = [
    None,
    123,
    b"squad",
    ["org/ds"],
    "",
    " ",
    "a b",
    " squad",
    "squad ",
    "ä/b",
    "ds\u00e9",
    "a/b/c",
    "/x",
    "x/",
    "/",
    ".",
    "..",
    "../x",
    "x/..",
    "org/.",
    "a--b",
    "a..b",
    "-a",
    "a-",
    ".a",
    "a.",
    "org/ds\n",
    "org\\ds",
    "org/ds\x00",
    "a" * 97,
    f"org/{'d' * 97}",
    f"{'o' * 97}/ds",
    "{org}/ds",
]
ACCEPTED_SEGMENTS = [
    "default",
    "train",
    "français",
    "en-US",
    "3.0.0",
    "a.b",
    "...",
    "a b",
    "日本語",
    "x" * 256,
]
REJECTED_SEGMENTS: list[object] = [
    None,
    1,
    b"train",
    "",
    " ",
    " train",
    "train ",
    "\ttrain",
    "a/b",
    "a\\b",
    "/",
    ".",
    "..",
    "a--b",
    "--",
    "a\x00b",
    "a\nb",
    "a\rb",
    "\x7f",
    "a\x85b",
    "a\u2028b",
    "x" * 257,
]

# Strategies: arbitrary text, and text built to be accepted most of the time.
_PART = st.from_regex(r"[A-Za-z0-9_](?:[A-Za-z0-9_]|[.-][A-Za-z0-9_]){0,30}", fullmatch=True)
MOSTLY_VALID_DATASETS = st.one_of(_PART, st.builds(lambda org, name: f"{org}/{name}", _PART, _PART))
DATASET_CANDIDATES = st.one_of(
    MOSTLY_VALID_DATASETS,
    MOSTLY_VALID_DATASETS,
    st.from_regex(r"[A-Za-z0-9._/ -]{0,12}", fullmatch=True),
    st.text(max_size=12),
)
MOSTLY_VALID_SEGMENTS = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp", "Zs"), exclude_characters="/\\-"),
    min_size=1,
    max_size=MAX_CONFIG_OR_SPLIT_LENGTH,
)
SEGMENT_CANDIDATES = st.one_of(
    MOSTLY_VALID_SEGMENTS,
    MOSTLY_VALID_SEGMENTS,
    st.from_regex(r"[a-z. /\\-]{0,6}", fullmatch=True),
    st.text(),
)


def _accepted(validate: Callable[[object], str]) -> Callable[[object], bool]:
    def accepts(value: object) -> bool:
        try:
            validate(value)
        except InvalidInputError:
            return False
        return True

    return accepts


ACCEPTED_DATASET_STRINGS = DATASET_CANDIDATES.filter(_accepted(validate_dataset))
ACCEPTED_CONFIGS = SEGMENT_CANDIDATES.filter(_accepted(validate_config))
ACCEPTED_SPLITS = SEGMENT_CANDIDATES.filter(_accepted(validate_split))


def _redis_hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first '{' and the next '}', if non-empty."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start != -1 and end > start + 1 else key


def _has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


@pytest.mark.parametrize("dataset", ACCEPTED_DATASETS)
def test_an_accepted_dataset_name_is_returned_unchanged(dataset: str) -> None:
    assert validate_dataset(dataset) == dataset


@pytest.mark.parametrize("dataset", REJECTED_DATASETS, ids=repr)
def test_a_malformed_dataset_name_is_refused(dataset: object) -> None:
    with pytest.raises(InvalidDatasetNameError, match="expected 'org/name' or 'name'"):
        parse_dataset(dataset)


def test_a_canonical_dataset_is_its_own_namespace() -> None:
    assert parse_dataset("squad") == DatasetName(namespace="squad", name="squad", full="squad")
    assert namespace_of("squad") == "squad"


def test_an_org_dataset_belongs_to_the_org_namespace() -> None:
    assert parse_dataset("org/ds") == DatasetName(namespace="org", name="ds", full="org/ds")
    assert namespace_of("org/ds") == "org"


def test_a_canonical_name_and_its_org_twin_are_different_datasets() -> None:
    assert parse_dataset("ds") != parse_dataset("ds/ds")
    assert parse_dataset("ds/ds").full == "ds/ds"


def test_a_dataset_name_that_does_not_match_its_parts_cannot_be_built() -> None:
    with pytest.raises(InvalidDatasetNameError):
        DatasetName(namespace="org", name="other", full="org/ds")


def test_the_error_message_quotes_the_bad_value_and_truncates_it() -> None:
    with pytest.raises(InvalidDatasetNameError) as caught:
        validate_dataset("bad name" * 100)
    message = str(caught.value)
    assert "'bad namebad name" in message
    assert "bad name" * 20 not in message
    assert len(message) < 350


def test_an_invalid_name_is_an_invalid_input_and_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_dataset("a/b/c")
    assert issubclass(InvalidDatasetNameError, InvalidInputError)


def test_a_str_subclass_comes_back_as_a_plain_str() -> None:
    class Name(str):
        pass

    assert type(validate_dataset(Name("org/ds"))) is str
    assert type(parse_dataset(Name("org/ds")).full) is str
    assert type(validate_config(Name("default"))) is str


@pytest.mark.parametrize("name", ACCEPTED_SEGMENTS)
def test_an_accepted_config_or_split_name_is_returned_unchanged(name: str) -> None:
    assert validate_config(name) == name
    assert validate_split(name) == name


@pytest.mark.parametrize("name", REJECTED_SEGMENTS, ids=repr)
def test_a_malformed_config_or_split_name_is_refused(name: object) -> None:
    with pytest.raises(InvalidConfigNameError, match="Invalid config name"):
        validate_config(name)
    with pytest.raises(InvalidSplitNameError, match="Invalid split name"):
        validate_split(name)


def test_a_config_error_says_what_is_wrong() -> None:
    with pytest.raises(InvalidConfigNameError, match=r"'a--b' \(it contains '--'\)"):
        validate_config("a--b")
    with pytest.raises(InvalidConfigNameError, match=r"None \(it is a NoneType, not a str\)"):
        validate_config(None)


def test_a_key_validates_each_of_its_parts() -> None:
    assert validate_key("org/ds", None, None) == ("org/ds", None, None)
    assert validate_key("org/ds", "default", None) == ("org/ds", "default", None)
    assert validate_key("org/ds", "default", "train") == ("org/ds", "default", "train")
    with pytest.raises(InvalidDatasetNameError):
        validate_key("a/b/c", "default", "train")
    with pytest.raises(InvalidConfigNameError):
        validate_key("org/ds", "..", "train")
    with pytest.raises(InvalidSplitNameError):
        validate_key("org/ds", "default", "a/b")


def test_a_split_without_a_config_is_refused() -> None:
    with pytest.raises(InvalidSplitNameError, match="without a config"):
        validate_key("org/ds", None, "train")


@settings(deadline=None)
@given(dataset=ACCEPTED_DATASET_STRINGS, config=ACCEPTED_CONFIGS, split=ACCEPTED_SPLITS)
def test_an_asset_path_built_from_accepted_names_stays_inside_its_base(dataset: str, config: str, split: str) -> None:
    path = os.path.normpath(os.path.join(BASE, dataset, "--", config, split))
    assert path.startswith(BASE + os.sep)
    components = os.path.relpath(path, BASE).split(os.sep)
    assert components == [*dataset.split("/"), "--", config, split]
    assert len(components) == dataset.count("/") + 4


@settings(deadline=None)
@given(dataset=ACCEPTED_DATASET_STRINGS, config=ACCEPTED_CONFIGS, split=ACCEPTED_SPLITS)
def test_a_redis_key_built_from_accepted_names_is_hashed_on_the_namespace(
    dataset: str, config: str, split: str
) -> None:
    namespace = namespace_of(dataset)
    waiting = f"stepcache:{{{namespace}}}:waiting"
    assert not any(char.isspace() or char in "{}" for char in namespace)
    assert not _has_control_character(waiting)
    assert _redis_hash_tag(waiting) == namespace
    entry = f"stepcache:{{{namespace}}}:{dataset}:{config}:{split}"
    assert _redis_hash_tag(entry) == namespace
    assert not _has_control_character(entry)
    assert entry.splitlines() == [entry]


@settings(deadline=None)
@given(dataset=DATASET_CANDIDATES)
def test_an_accepted_dataset_name_round_trips(dataset: str) -> None:
    try:
        parsed = parse_dataset(dataset)
    except InvalidDatasetNameError:
        return
    assert parsed.full == dataset
    assert parsed.namespace == dataset.split("/")[0] == namespace_of(dataset)
    assert parsed.name == dataset.split("/")[-1]
    assert parse_dataset(parsed.full) == parsed
