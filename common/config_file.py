"""The settings file named by STEPCACHE_CONFIG: TOML (`.toml`) or YAML (`.yaml`, `.yml`), a section per
environment prefix (`[queue] max_jobs_per_namespace = 2` sets what QUEUE_MAX_JOBS_PER_NAMESPACE sets).

The file is read by pydantic-settings' own sources (:class:`TomlConfigSettingsSource`,
:class:`YamlConfigSettingsSource`), one per settings class, each keeping its own section; common.config
puts that source below the environment. What the file holds is checked as it is read: an unknown
section or key, a section that is not a table, a file that does not parse, is missing or has another
suffix raise a one-line :class:`ConfigError` naming the file and what it accepts. Values are never
echoed here: a secret's line could be the one that does not parse.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any, NoReturn

from pydantic_settings import BaseSettings, TomlConfigSettingsSource, YamlConfigSettingsSource

from common.exceptions import ConfigError

CONFIG_FILE_VARIABLE = "STEPCACHE_CONFIG"
FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}


def config_file_path() -> Path | None:
    """The file STEPCACHE_CONFIG names, None when it is unset or empty."""
    named = os.environ.get(CONFIG_FILE_VARIABLE, "")
    if not named:
        return None
    path = Path(named).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"invalid configuration: {CONFIG_FILE_VARIABLE}={named}: not a .toml, .yaml or .yml file")
    if not path.is_file():
        raise ConfigError(f"invalid configuration: {CONFIG_FILE_VARIABLE}={named}: no such file")
    return path


def section_name(settings_cls: type[BaseSettings]) -> str:
    """The section of a settings class in the file: its environment prefix, lower case (QUEUE_: queue)."""
    return str(settings_cls.model_config.get("env_prefix", "")).rstrip("_").lower()


def file_source(settings_cls: type[BaseSettings], sections: Collection[str]) -> TomlSection | YamlSection | None:
    """The source of the class's section of the STEPCACHE_CONFIG file (None without a file); `sections`
    are the sections a file may have."""
    path = config_file_path()
    if path is None:
        return None
    if FORMATS[path.suffix.lower()] == "TOML":
        return TomlSection(settings_cls, path, sections)
    return YamlSection(settings_cls, path, sections)


def value_in_file(settings_cls: type[BaseSettings], field: str, sections: Collection[str]) -> tuple[Path, Any] | None:
    """The file and the value it gives the field, when it gives one (to say where a bad value came from)."""
    source = file_source(settings_cls, sections)
    if source is None or field not in source.init_kwargs:
        return None
    return source.path, source.init_kwargs[field]


class _Section:
    """What the TOML and YAML sources share: the file's data cut to one section, checked as it is read."""

    format = ""
    table = ""  # what the format calls a group of key-values

    def _prepare(self, settings_cls: type[BaseSettings], path: Path, sections: Collection[str]) -> None:
        # Set before the library's __init__, which reads the file through _read_file.
        self.path = path
        self.section = section_name(settings_cls)
        self.sections = sections
        self.accepted = list(settings_cls.model_fields)

    def _section(self, data: object) -> dict[str, Any]:
        if not isinstance(data, dict):
            self._refuse(f"must be a {self.format} {self.table} of sections ({', '.join(self.sections)})")
        for name in data:
            if name not in self.sections:
                known = ", ".join(self.sections)
                self._refuse(f"{name}: not a section{_close(name, self.sections)}; the sections are {known}")
        settings = data.get(self.section)
        if settings is None:  # no section of this prefix (or YAML's empty `queue:`): the file sets none of it
            return {}
        if not isinstance(settings, dict):
            self._refuse(f"{self.section}: must be a {self.format} {self.table} of settings")
        for key in settings:
            if key not in self.accepted:
                accepted = ", ".join(self.accepted)
                self._refuse(
                    f"{self.section}.{key}: not a setting{_close(key, self.accepted)}; {self.section} takes {accepted}"
                )
        return settings

    def _refuse(self, what: str) -> NoReturn:
        raise ConfigError(f"invalid configuration: {self.path}: {what}") from None


class TomlSection(_Section, TomlConfigSettingsSource):
    """One table of a TOML settings file (`[queue]` for QUEUE_); a file without it sets nothing there."""

    format, table = "TOML", "table"

    def __init__(self, settings_cls: type[BaseSettings], path: Path, sections: Collection[str]) -> None:
        self._prepare(settings_cls, path, sections)
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as error:  # its message names a line and column, not the text there
            self._refuse(f"not valid TOML: {error}")
        except (OSError, UnicodeDecodeError) as error:
            self._refuse(f"cannot be read: {_reason(error)}")
        return self._section(data)


class YamlSection(_Section, YamlConfigSettingsSource):
    """One mapping of a YAML settings file (`queue:` for QUEUE_); a file without it sets nothing there."""

    format, table = "YAML", "mapping"

    def __init__(self, settings_cls: type[BaseSettings], path: Path, sections: Collection[str]) -> None:
        self._prepare(settings_cls, path, sections)
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        import yaml  # only when a YAML file is named (as the library does): 10 ms off every other start

        try:
            data = super()._read_file(file_path)
        except yaml.MarkedYAMLError as error:  # said by its problem and place: str() would quote the line
            mark = error.problem_mark
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            self._refuse(f"not valid YAML: {error.problem or type(error).__name__}{where}")
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
            self._refuse(f"cannot be read: {_reason(error)}")
        return self._section(data)


def _close(name: object, accepted: Collection[str]) -> str:
    close = difflib.get_close_matches(str(name), accepted, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split())
