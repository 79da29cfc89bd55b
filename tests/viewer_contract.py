"""The dataset viewer's published OpenAPI document as a contract: does one real HTTP answer conform to it?

The document is huggingface/dataset-viewer's `docs/source/openapi.json` (Apache-2.0), kept next to the
checkout at `../shared/reference/dataset-viewer-openapi.json` (VIEWER_OPENAPI_DOCUMENT names another copy).
:func:`load` reads it; :meth:`Contract.check` checks a status, headers and body against the operation's
documented response for that status, and returns every :class:`Violation` it finds (an empty list:
the answer conforms), so that a test can print a table rather than stop at the first.

What is checked, for `GET <path>`:

- the status code is one of the operation's `responses` (an exact code, else an `NXX` range, else
  `default`); when it is not, only the headers every documented response of the operation requires are
  checked, since there is no response to check the rest against;
- every header of that response marked `required: true` is present, and every header present validates
  against the header's `schema` (so `X-Error-Code` is one of the codes it lists), with two readings:
  `Access-Control-Allow-Origin` is required only when the request carried an `Origin` (CORS concerns
  cross-origin requests; a server may allow fewer origins than the viewer's `*`), and then is `*` or that
  origin; `X-Error-Code` is required on every error (4xx, 5xx) answered with a JSON body (the document
  marks it optional on 500 only because a plain-text 500 may lack it);
- the answer's media type (`Content-Type` without its parameters) is one the response documents, and the
  body (JSON, or the text of a `text/plain` answer) validates against that media type's schema.

How the schemas are read. They are JSON Schema 2020-12 (the dialect of OpenAPI 3.1), `$ref`s resolved
against the whole document (non-schema objects, such as responses, headers and examples, are resolved
by JSON pointer, following chains). Read literally, 12 of the document's 441 response examples fail its
own schemas, and it contradicts itself about one error code; the checks read it as follows, the same way
everywhere (each reading can be switched off, to show what it is needed for):

1. `nullable: true` (OpenAPI 3.0; in 3.1 an unknown keyword, which 2020-12 ignores) also allows null:
   `{..., "nullable": true}` is read `{"anyOf": [{...}, {"type": "null"}]}`. It is on ValueCell and on
   ArrayXDFeature's shape items. No example holds a null cell, so no example needs this reading; a
   first-rows answer with an empty CSV field (a null cell) does: without it, null is no Cell at all.
2. `oneOf` is read as `anyOf`, everywhere: at least one branch must match. Where branches cannot overlap,
   the two are the same; where they do, the document means a union, not exclusivity: an integer is both
   the `integer` and the `number` branch of ValueCell, a string is a ValueCell and a JsonCell of Cell, a
   list is a ListCell, a SequenceCell and a JsonCell... Every example with rows needs this (11 of the 12).
3. An `enum` of strings some of whose members are descriptions rather than names (a member holding a
   space, a parenthesis or a bracket: only ValueFeature's `dtype`) allows the names each member describes,
   checked by a `pattern`: a plain member is itself; `X (alias Y)` is X or Y; `(a|b|c)` is one of a, b, c;
   `(tzstring)` is any non-empty time zone without `]`; `(precision, scale)` is two integers, `(10, 2)`.
   So `float32 (alias float)` allows `float32` and `float`, `timestamp[(s|ms|us|ns), tz=(tzstring)]`
   allows `timestamp[us, tz=UTC]`, and a name no member describes (`float128`, `string_view`) is refused.
   Any other enum is read as written. The examples with `float64` or `timestamp[s]` need this (4).
4. An `X-Error-Code-<Name>` schema whose `const` differs from the value the document's example `<Name>`
   says the header holds allows both: `X-Error-Code-ResponseNotReadyError` is
   `const: ResponseNotReadyError`, while the example ResponseNotReadyError says the header contains
   `ResponseNotReady` (what the viewer sends). No other schema is concerned.

5. On a 5xx answer, X-Error-Code may also be the code of an error a step cached (a dataset's own error:
   `DatasetGenerationError`, `EmptyDatasetError`, `ParentStepFailedError`...; :func:`step_error_codes`).
   The viewer's own code answers a cached error with the code its step stored (`get_json_error_response`
   in libapi), while its document lists only the API's codes (ResponseNotReady, UnexpectedError): read
   literally, no dataset could ever fail. The document is incomplete here, not the answers. Likewise
   `ResponseNotReady`, which libapi raises from every endpoint that reads a cache entry still computed:
   the document lists it for most, not for /rows, /search and /filter (whose 500 descriptions still say
   "the response still hasn't been generated").

Still failing under the reading: one example, `/filter`'s 'Filter on float inequality', which lacks the
`partial` that PaginatedResponse requires (the example is wrong, not the reading: stepcache's own /filter
answers carry it). Any other X-Error-Code on a 500 must be one of the codes listed for it
(ResponseNotReady(Error), UnexpectedError, on /first-rows StreamingRowsError).

One choice beyond the quirks: `format: uri`, an annotation only in 2020-12 by default, is asserted (a
client fetches those URLs as given): the value must be an absolute URI, a scheme then `:` and no
whitespace (RFC 3986); a relative reference such as `assets/org/ds/...` is not one. (Within a Cell union
a DictCell accepts any object of cells, so this bites on /parquet's `url`, not on an image's `src`.)

:func:`response_examples` lists every example of every response (the media types' `example` and
`examples`, and the headers'), and :meth:`Contract.check_example` validates one.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from jsonschema.exceptions import ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

DOCUMENT_PATH = Path(
    os.environ.get(
        "VIEWER_OPENAPI_DOCUMENT",
        Path(__file__).resolve().parents[2] / "shared" / "reference" / "dataset-viewer-openapi.json",
    )
)
BASE_URI = "urn:dataset-viewer-openapi"
ERROR_CODE = "X-Error-Code"
ALLOW_ORIGIN = "Access-Control-Allow-Origin"
MAX_BODY_VIOLATIONS = 8  # per answer; the rest are counted
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]*")
_DESCRIPTIVE = re.compile(r"[\s(\[]")
NULLABLE, ONE_OF, DESCRIBED_ENUM = "nullable: true allows null", "oneOf read as anyOf", "described enum as names"
ERROR_CODE_AS_SAID = "X-Error-Code as its example says"
STEP_ERROR_CODES = "X-Error-Code of a cached step error"
_DESCRIBED: dict[str, list[str]] = {}  # the patterns of reading 3, and the members they were read from
READINGS = frozenset({NULLABLE, ONE_OF, DESCRIBED_ENUM, ERROR_CODE_AS_SAID, STEP_ERROR_CODES})  # the docstring's
_SAID = re.compile(r"header 'x-error-code' contains '([^']+)'", re.IGNORECASE)


@dataclass(frozen=True)
class Violation:
    """One way an answer (or an example) departs from the document: `kind` groups them in a summary
    (status, header, X-Error-Code, content-type, body), `detail` says what and where."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class Example:
    """An example the document gives for a response: where, its value, and the schema it illustrates."""

    where: str  # e.g. "GET /splits 500 application/json 'response not ready'"
    schema_pointer: str  # JSON pointer of its schema in the document
    value: Any


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def dtype_pattern(members: list[str]) -> str:
    """The regular expression of the names an enum of descriptions allows (reading 3 of the docstring)."""
    alternatives: list[str] = []
    for member in members:
        alias = re.fullmatch(r"(\S+) \(alias (\S+)\)", member)
        if alias:
            alternatives.extend(re.escape(name) for name in alias.groups())
            continue
        pattern = re.escape(member)
        pattern = pattern.replace(re.escape("(precision, scale)"), r"\(-?\d+,\ ?-?\d+\)")
        pattern = pattern.replace(re.escape("(tzstring)"), r"[^\]\s][^\]]*")
        # an escaped `(a|b|c)`: backslash-parenthesis, names separated by backslash-bar, backslash-parenthesis
        pattern = re.sub(
            r"\\\(((?:[a-z0-9]+\\\|)+[a-z0-9]+)\\\)",
            lambda found: "(?:" + found.group(1).replace("\\|", "|") + ")",
            pattern,
        )
        alternatives.append(pattern)
    read = "^(?:" + "|".join(alternatives) + ")$"
    _DESCRIBED[read] = members
    return read


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "prefixItems")
_SCHEMA_VALUES = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)


def read_schema(schema: Any, readings: frozenset[str] = READINGS) -> Any:
    """A schema read as the docstring says (the readings named: NULLABLE, ONE_OF, DESCRIBED_ENUM), its
    subschemas too."""
    if not isinstance(schema, dict):
        return schema
    read: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword in _SCHEMA_MAPS and isinstance(value, dict):
            read[keyword] = {name: read_schema(subschema, readings) for name, subschema in value.items()}
        elif keyword in (*_SCHEMA_LISTS, "oneOf") and isinstance(value, list):
            read[keyword] = [read_schema(subschema, readings) for subschema in value]
        elif keyword in _SCHEMA_VALUES:
            read[keyword] = read_schema(value, readings)
        else:
            read[keyword] = value
    if ONE_OF in readings and "oneOf" in read:
        union = read.pop("oneOf")
        if "anyOf" in read:  # both (not in the document): the union joins the conditions
            read["allOf"] = [*read.get("allOf", []), {"anyOf": union}]
        else:
            read["anyOf"] = union
    members = read.get("enum")
    described = isinstance(members, list) and all(isinstance(member, str) for member in members)
    if DESCRIBED_ENUM in readings and described and any(_DESCRIPTIVE.search(member) for member in members or []):
        del read["enum"]
        read["pattern"] = dtype_pattern(members or [])
    if NULLABLE in readings and read.get("nullable") is True:
        del read["nullable"]
        return {"anyOf": [read, {"type": "null"}]}
    return read


def read_document(document: dict[str, Any], readings: frozenset[str] = READINGS) -> dict[str, Any]:
    """A copy of the document whose schemas (the components' and the `schema` of every media type, header
    and parameter) are read as the docstring says; examples are values, left as they are."""

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        return {
            key: copy.deepcopy(value)
            if key in ("example", "examples")
            else read_schema(value, readings)
            if key == "schema"
            else walk(value)
            for key, value in node.items()
        }

    read: dict[str, Any] = walk({key: value for key, value in document.items() if key != "components"})
    components = dict(document.get("components", {}))
    schemas = components.pop("schemas", {})
    read["components"] = {
        **walk(components),
        "schemas": {name: read_schema(schema, readings) for name, schema in schemas.items()},
    }
    if ERROR_CODE_AS_SAID in readings:
        for name, value in said_error_codes(document).items():
            schema = read["components"]["schemas"][name]
            schema["enum"] = [schema.pop("const"), value]
    return read


def said_error_codes(document: dict[str, Any]) -> dict[str, str]:
    """Reading 4: the X-Error-Code schemas (by name) whose `const` differs from the value the document's
    example of the same name says the header holds, and that value."""
    components = document.get("components", {})
    said = {}
    for name, example in components.get("examples", {}).items():
        found = _SAID.search(str(example.get("summary", "")) + " " + str(example.get("description", "")))
        schema = components.get("schemas", {}).get(f"X-Error-Code-{name}")
        if found and isinstance(schema, dict) and schema.get("const") not in (None, found.group(1)):
            said[f"X-Error-Code-{name}"] = found.group(1)
    return said


def _is_uri(value: object) -> bool:
    return not isinstance(value, str) or _URI.fullmatch(value) is not None


class Contract:
    """The document, its `$ref`s resolved, and validators of its schemas read with `readings` (all three by
    default; none reads them as written, in plain 2020-12: nullable ignored, oneOf exclusive, enums literal)."""

    def __init__(self, document: dict[str, Any], readings: frozenset[str] = READINGS) -> None:
        self.document = document
        self.readings = readings
        self.schemas = read_document(document, readings)
        self.registry: Registry[Any] = Registry().with_resource(BASE_URI, DRAFT202012.create_resource(self.schemas))
        self.format_checker = jsonschema.FormatChecker(formats=())
        self.format_checker.checks("uri")(_is_uri)
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    # -- the document ------------------------------------------------------------------------------------

    def pointer(self, pointer: str, read: bool = False) -> Any:
        """The node at a JSON pointer (`#/components/...` or `/components/...`) of the document (`read`:
        of the document with its schemas read)."""
        node: Any = self.schemas if read else self.document
        for token in pointer.removeprefix("#").lstrip("/").split("/") if pointer.strip("#/") else []:
            token = token.replace("~1", "/").replace("~0", "~")
            node = node[int(token)] if isinstance(node, list) else node[token]
        return node

    def resolve(self, node: Any, pointer: str) -> tuple[Any, str]:
        """A non-schema object with its `$ref` chain followed: the object and its pointer."""
        seen = set()
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            target = node["$ref"]
            if not target.startswith("#") or target in seen:
                raise ValueError(f"cannot resolve {target!r} (at {pointer})")
            seen.add(target)
            pointer = target.removeprefix("#")
            node = self.pointer(pointer)
        return node, pointer

    def operation(self, path: str, method: str = "get") -> tuple[dict[str, Any], str] | None:
        operations = self.document.get("paths", {}).get(path)
        if not isinstance(operations, dict) or method not in operations:
            return None
        found: tuple[dict[str, Any], str] = self.resolve(operations[method], f"/paths/{_escape(path)}/{method}")
        return found

    def documented_statuses(self, path: str, method: str = "get") -> list[str]:
        found = self.operation(path, method)
        return list(found[0].get("responses", {})) if found else []

    def response(self, path: str, status: int, method: str = "get") -> tuple[dict[str, Any], str] | None:
        """The documented response for this status (exact code, else `5XX`-like range, else `default`)."""
        found = self.operation(path, method)
        if found is None:
            return None
        operation, pointer = found
        responses = operation.get("responses", {})
        for key in (str(status), f"{str(status)[0]}XX", f"{str(status)[0]}xx", "default"):
            if key in responses:
                resolved: tuple[dict[str, Any], str] = self.resolve(
                    responses[key], f"{pointer}/responses/{_escape(key)}"
                )
                return resolved
        return None

    def headers(self, response: dict[str, Any], pointer: str) -> dict[str, tuple[dict[str, Any], str]]:
        """The response's headers by name, each resolved, with its pointer."""
        return {
            name: self.resolve(header, f"{pointer}/headers/{_escape(name)}")
            for name, header in response.get("headers", {}).items()
        }

    def validator(self, schema_pointer: str) -> jsonschema.protocols.Validator:
        if schema_pointer not in self._validators:
            schema = {"$ref": f"{BASE_URI}#{schema_pointer}"}
            self._validators[schema_pointer] = jsonschema.Draft202012Validator(
                schema, registry=self.registry, format_checker=self.format_checker
            )
        return self._validators[schema_pointer]

    def allowed_values(self, schema_pointer: str) -> list[str]:
        """The `const`s and `enum` members a (header) schema lists, through its `$ref`s and branches."""
        values: list[str] = []

        def collect(schema: Any) -> None:
            if isinstance(schema, dict):
                if isinstance(schema.get("$ref"), str):
                    collect(self.pointer(schema["$ref"], read=True))
                if "const" in schema:
                    values.append(str(schema["const"]))
                values.extend(str(member) for member in schema.get("enum", []))
                for keyword in ("oneOf", "anyOf", "allOf"):
                    for branch in schema.get(keyword, []):
                        collect(branch)

        collect(self.pointer(schema_pointer, read=True))
        return values

    # -- checks ------------------------------------------------------------------------------------------

    def schema_violations(self, schema_pointer: str, instance: Any, where: str) -> list[Violation]:
        """The instance against the schema at this pointer: one violation per distinct failure (the same
        failure at several places of an array is one violation that says how many)."""
        grouped: dict[tuple[str, str, str], list[ValidationError]] = {}
        for error in self.validator(schema_pointer).iter_errors(instance):
            for cause in _explained(error):
                if cause.validator == "pattern" and cause.validator_value in _DESCRIBED:
                    described = ", ".join(_DESCRIBED[cause.validator_value])
                    cause.message = f"{cause.instance!r} is no name the enum describes ({described})"
                place = re.sub(r"\[\d+\]", "[*]", cause.json_path)
                grouped.setdefault((place, cause.message, ""), []).append(cause)
        violations = []
        for (place, _, _), errors in sorted(grouped.items()):
            if len(errors) == 1:
                violations.append(Violation(where, f"at {errors[0].json_path}: {_short(errors[0].message, 220)}"))
            else:
                count = f" ({len(errors)} places)"
                violations.append(Violation(where, f"at {place}: {_short(errors[0].message, 220)}{count}"))
        if len(violations) > MAX_BODY_VIOLATIONS:
            rest = len(violations) - MAX_BODY_VIOLATIONS
            violations = [*violations[:MAX_BODY_VIOLATIONS], Violation(where, f"... and {rest} more")]
        return violations

    def check(
        self,
        path: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        origin: str | None = None,
        method: str = "get",
    ) -> list[Violation]:
        """Every way this answer to `METHOD path` departs from the document (empty: it conforms).
        `origin` is the request's Origin header, if it had one."""
        headers = {name.lower(): value for name, value in headers.items()}
        operation = self.operation(path, method)
        if operation is None:
            return [Violation("operation", f"the document has no {method.upper()} {path}")]
        found = self.response(path, status, method)
        if found is None:
            documented = ", ".join(self.documented_statuses(path, method))
            violations = [Violation("status", f"{status} is not documented (documented: {documented})")]
            return violations + self._common_headers(path, method, headers, origin)
        response, pointer = found
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        is_error = status >= 400
        violations = []
        for name, (header, header_pointer) in self.headers(response, pointer).items():
            value = headers.get(name.lower())
            required = bool(header.get("required", False))
            if name == ALLOW_ORIGIN:
                required = origin is not None
            if name == ERROR_CODE and is_error and media_type == "application/json":
                required = True
            if value is None:
                if required:
                    violations.append(Violation("header", f"{name} is missing"))
                continue
            if name == ALLOW_ORIGIN and origin is not None and value not in ("*", origin):
                violations.append(Violation("header", f"{name} is {value!r}, neither '*' nor the Origin {origin!r}"))
            if (
                name == ERROR_CODE
                and status >= 500
                and STEP_ERROR_CODES in self.readings
                and (value in step_error_codes() or self._not_ready_unlisted(value, f"{header_pointer}/schema"))
            ):
                continue  # reading 5
            if "schema" in header and not self.validator(f"{header_pointer}/schema").is_valid(value):
                if name == ERROR_CODE:
                    allowed = ", ".join(self.allowed_values(f"{header_pointer}/schema"))
                    violations.append(
                        Violation(ERROR_CODE, f"{value!r} is not one documented for {status} ({allowed})")
                    )
                else:
                    for violation in self.schema_violations(f"{header_pointer}/schema", value, "header"):
                        violations.append(Violation("header", f"{name} {violation.detail}"))
        content = response.get("content", {})
        if not content:
            return violations
        if media_type not in content:
            listed = ", ".join(content)
            shown = media_type or "none"
            violations.append(Violation("content-type", f"{shown} is not documented for {status} ({listed})"))
            return violations
        schema_pointer = f"{pointer}/content/{_escape(media_type)}/schema"
        if media_type == "application/json":
            try:
                instance = json.loads(body)
            except ValueError as error:
                return [*violations, Violation("body", f"not JSON: {error}")]
        else:
            instance = body.decode("utf-8", errors="replace")
        if "schema" in content[media_type]:
            violations.extend(self.schema_violations(schema_pointer, instance, "body"))
        return violations

    def _not_ready_unlisted(self, value: str, pointer: str) -> bool:
        """ResponseNotReady, where the header's schema lists no not-ready code at all (reading 5)."""
        allowed = self.allowed_values(pointer)
        return value == "ResponseNotReady" and not any(code.startswith("ResponseNotReady") for code in allowed)

    def check_answer(self, path: str, answer: httpx.Response) -> list[Violation]:
        """:meth:`check` for an httpx answer (its request's Origin header taken as the origin)."""
        return self.check(
            path, answer.status_code, answer.headers, answer.content, answer.request.headers.get("origin")
        )

    def _common_headers(
        self, path: str, method: str, headers: Mapping[str, str], origin: str | None
    ) -> list[Violation]:
        """The headers every documented response of the operation requires (an undocumented status)."""
        required: set[str] | None = None
        for key in self.documented_statuses(path, method):
            found = self.response(path, int(key), method) if key.isdigit() else None
            if found is None:
                continue
            names = {
                name
                for name, (header, _) in self.headers(*found).items()
                if header.get("required") and name != ERROR_CODE
            }
            required = names if required is None else required & names
        violations = []
        for name in sorted(required or ()):
            if name == ALLOW_ORIGIN and origin is None:
                continue
            if name.lower() not in headers:
                violations.append(Violation("header", f"{name} is missing"))
        return violations

    def check_example(self, example: Example) -> list[Violation]:
        return self.schema_violations(example.schema_pointer, example.value, "example")


def response_examples(contract: Contract) -> Iterator[Example]:
    """Every example of every response of every operation: its media types' `example` and `examples`
    (each `$ref` resolved), and its headers' (an example shared by several responses comes once each)."""
    for path, operations in contract.document.get("paths", {}).items():
        for method in operations:
            found = contract.operation(path, method)
            if found is None or not isinstance(found[0], dict) or "responses" not in found[0]:
                continue
            for status in found[0]["responses"]:
                response = contract.response(path, int(status), method) if status.isdigit() else None
                if response is None:
                    continue
                body, pointer = response
                where = f"{method.upper()} {path} {status}"
                for media_type, content in body.get("content", {}).items():
                    schema = f"{pointer}/content/{_escape(media_type)}/schema"
                    yield from _examples_of(
                        contract, content, f"{pointer}/content/{_escape(media_type)}", f"{where} {media_type}", schema
                    )
                for name, (header, header_pointer) in contract.headers(body, pointer).items():
                    yield from _examples_of(
                        contract, header, header_pointer, f"{where} header {name}", f"{header_pointer}/schema"
                    )


def _examples_of(
    contract: Contract, holder: dict[str, Any], pointer: str, where: str, schema: str
) -> Iterator[Example]:
    if "schema" not in holder:
        return
    if "example" in holder:
        yield Example(f"{where} (example)", schema, holder["example"])
    for name, example in holder.get("examples", {}).items():
        resolved, _ = contract.resolve(example, f"{pointer}/examples/{_escape(name)}")
        if "value" in resolved:
            yield Example(f"{where} {name!r}", schema, resolved["value"])


_MISMATCH = ("type", "const", "enum")  # a branch failing these is about another kind of value


def _explained(error: ValidationError) -> list[ValidationError]:
    """The errors that explain this one. A union (anyOf, oneOf) that no branch matches is explained by the
    branch that fits best: the fewest failures of `type`, `const` or `enum` (deep ones included), then the
    fewest failures, then the deepest first failure; so an Audio feature without `sampling_rate` is
    explained by AudioFeature's `required`, not by JsonFeature's `_type`. When even that branch only
    fails on the kind of value at the union's own level, the union's error explains it (none of A, B, ...)."""
    if not error.context or error.validator not in ("anyOf", "oneOf"):
        return [error]
    branches: dict[object, list[ValidationError]] = {}
    for cause in error.context:
        branches.setdefault(cause.relative_schema_path[0], []).append(cause)
    if len(branches) < len(error.validator_value):  # some branch matched: "valid under each of" (oneOf)
        return [error]

    def fit(causes: list[ValidationError]) -> tuple[int, int, int]:
        leaves = [leaf for cause in causes for leaf in _leaves(cause)]
        depth = min(len(cause.relative_path) for cause in causes)
        return sum(leaf.validator in _MISMATCH for leaf in leaves), len(leaves), -depth

    best = min(branches.values(), key=fit)
    if all(len(cause.relative_path) == 0 and cause.validator in _MISMATCH for cause in best):
        names = [_schema_name(branch) for branch in error.validator_value]
        error.message = f"{_short(error.instance)} is none of {', '.join(names)}"
        return [error]
    return [explanation for cause in best for explanation in _explained(cause)]


def _leaves(error: ValidationError) -> list[ValidationError]:
    return [leaf for cause in error.context for leaf in _leaves(cause)] if error.context else [error]


def _schema_name(schema: Any) -> str:
    if isinstance(schema, dict):
        if isinstance(schema.get("$ref"), str):
            return str(schema["$ref"]).rsplit("/", 1)[-1]
        if "type" in schema:
            return str(schema["type"])
        if "anyOf" in schema or "oneOf" in schema:
            branches = schema.get("anyOf") or schema.get("oneOf") or []
            return " or ".join(_schema_name(branch) for branch in branches)
    return _short(schema, 40)


def _short(value: object, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@cache
@cache
def step_error_codes() -> frozenset[str]:
    """The codes stepcache's steps cache errors with (every CacheableError subclass's), for reading 5."""
    from common.exceptions import CacheableError

    codes, pending = set(), [CacheableError]
    while pending:
        cls = pending.pop()
        codes.add(cls.error_code)
        pending.extend(cls.__subclasses__())
    return frozenset(codes)


def load(path: Path = DOCUMENT_PATH, readings: frozenset[str] = READINGS) -> Contract:
    """The contract of the document at `path`, read with these readings (once per process)."""
    return Contract(json.loads(Path(path).read_text()), readings)
