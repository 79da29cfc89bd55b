"""The `where` and `orderby` parameters of /filter, checked by a SQL parser before DuckDB sees them.

sqlglot parses each (dialect duckdb) and every node of the tree must be of a whitelisted type, with no
argument beyond those listed for it: column references to the split's columns, literals (numbers, strings,
TRUE/FALSE, NULL), comparisons, IS [NOT] NULL, [NOT] BETWEEN, [NOT] IN (literals), [NOT] [I]LIKE 'pattern',
AND/OR/NOT, arithmetic (+ - * / % and unary minus) and parentheses; in `orderby`, comma-separated items of
arithmetic over columns with ASC/DESC and NULLS FIRST/LAST. Anything else (function calls, casts,
subqueries, a second statement, comments, ...) raises InvalidParameterError. The accepted expression is
rendered again by sqlglot with every identifier quoted, so that DuckDB reads exactly the tree checked here:
chained comparisons (`a < b = c`, which sqlglot reads as `(a < b) = c` and DuckDB refuses) need their
parentheses written, and `orderby` items get their ASC/DESC and NULLS FIRST/LAST spelled out.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import NoReturn

from sqlglot import Dialect, TokenType, exp

from tasks.api.errors import InvalidParameterError

MAX_LENGTH = 2_000
MAX_DEPTH = 64
_CLIP = 100
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_BINARY = frozenset({"this", "expression"})
_UNARY = frozenset({"this"})
# Each allowed node type, with the arguments it may carry (flags left False or None do not count).
_ARITHMETIC: dict[type[exp.Expr], frozenset[str]] = {
    exp.Column: _UNARY,
    exp.Literal: frozenset({"this", "is_string"}),
    exp.Null: frozenset(),
    exp.Paren: _UNARY,
    exp.Neg: _UNARY,
    **{kind: _BINARY for kind in (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)},
}
_CONDITION: dict[type[exp.Expr], frozenset[str]] = {
    **_ARITHMETIC,
    exp.Boolean: _UNARY,
    exp.Not: _UNARY,
    **{kind: _BINARY for kind in (exp.And, exp.Or, exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE, exp.Is)},
    exp.Between: frozenset({"this", "low", "high"}),
    exp.In: frozenset({"this", "expressions"}),
    exp.Like: frozenset({"this", "expression", "negate"}),
    exp.ILike: frozenset({"this", "expression", "negate"}),
}
_OPERATORS = (exp.Neg, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)
_PREDICATES = (exp.EQ, exp.NEQ, exp.LT, exp.LTE, exp.GT, exp.GTE, exp.Is, exp.Between, exp.In, exp.Like, exp.ILike)
_REFUSED: tuple[tuple[type[exp.Expr] | tuple[type[exp.Expr], ...], str], ...] = (
    ((exp.Cast, exp.TryCast), "casts (CAST, ::) are not allowed"),
    ((exp.Query, exp.Subquery, exp.Exists), "subqueries are not allowed"),
    ((exp.Placeholder, exp.Parameter), "parameters are not allowed"),
    (exp.Window, "window functions are not allowed"),
    (exp.Case, "CASE is not allowed"),
    (exp.Star, "* is not allowed"),
    (exp.DPipe, "string concatenation (||) is not allowed"),
    ((exp.JSONExtract, exp.JSONExtractScalar), "JSON operators (->, ->>) are not allowed"),
    ((exp.Array, exp.Struct, exp.Tuple), "list, struct and row values are not allowed"),
)


def _clip(text: str) -> str:
    return text if len(text) <= _CLIP else text[:_CLIP] + "..."


def _refuse(parameter: str, reason: str) -> NoReturn:
    raise InvalidParameterError(f"Parameter '{parameter}' is invalid: {reason}")


def _describe(node: exp.Expr) -> str:
    for kinds, reason in _REFUSED:
        if isinstance(node, kinds):
            return reason
    if isinstance(node, exp.Anonymous):
        return f"function calls are not allowed ({_clip(node.name)})"
    if isinstance(node, exp.Func):
        return f"function calls are not allowed ({node.sql_name().lower()})"
    return f"{node.key.upper()} is not allowed"


def _set_args(node: exp.Expr) -> set[str]:
    """The names of the arguments `node` carries (flags left False or None, and empty lists, do not count)."""
    return {key for key, value in node.args.items() if value is not None and value is not False and value != []}


def _is_literal(node: exp.Expr | None) -> bool:
    if isinstance(node, exp.Neg):
        return isinstance(node.this, exp.Literal) and not node.this.is_string
    return isinstance(node, exp.Literal | exp.Boolean | exp.Null)


def _check(param: str, root: exp.Expr, allowed: dict[type[exp.Expr], frozenset[str]], columns: Collection[str]) -> None:
    """Refuses unless every node under `root` has an allowed type (exactly) and no argument beyond its own."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            _refuse(param, f"expressions may not be nested deeper than {MAX_DEPTH}")
        kind = type(node)
        if kind not in allowed:
            _refuse(param, _describe(node))
        if isinstance(node, exp.Column):
            ident = node.this
            if (
                _set_args(node) != {"this"}
                or not isinstance(ident, exp.Identifier)
                or _set_args(ident) - {"this", "quoted"}
            ):
                _refuse(param, f"only plain column names are allowed, not {_clip(node.sql())}")
            if ident.name not in columns:
                _refuse(param, f"unknown column '{_clip(ident.name)}'")
            continue
        if isinstance(node, exp.In) and node.args.get("query"):
            _refuse(param, "subqueries are not allowed")
        if extra := sorted(_set_args(node) - allowed[kind]):
            _refuse(param, f"{node.key.upper()} with {', '.join(extra)} is not allowed")
        if isinstance(node, _OPERATORS + _PREDICATES) and any(
            isinstance(child, (*_PREDICATES, exp.And, exp.Or, exp.Not)) for child in node.iter_expressions()
        ):  # sqlglot reads `a < b = c` as `(a < b) = c`; DuckDB refuses it: both need the parentheses written
            _refuse(param, "comparisons cannot be chained or be operands without parentheses")
        if isinstance(node, exp.Literal) and not node.is_string and not _NUMBER.fullmatch(node.this):
            _refuse(param, f"not a number: {_clip(node.this)}")
        if isinstance(node, exp.In) and not all(_is_literal(item) for item in node.expressions or [None]):
            _refuse(param, "IN takes a non-empty list of literals")
        if isinstance(node, exp.Like | exp.ILike) and not (
            isinstance(node.expression, exp.Literal) and node.expression.is_string
        ):
            _refuse(param, "the pattern of LIKE and ILIKE must be a string literal")
        if isinstance(node, exp.Is) and not isinstance(node.expression, exp.Null):
            _refuse(param, "IS is only allowed in IS NULL and IS NOT NULL")
        stack.extend((child, depth + 1) for child in node.iter_expressions())


def _parse(param: str, text: str, into: type[exp.Expr], prefix: str = "") -> tuple[exp.Expr, int]:
    """The one expression `prefix + text` is, and its number of commas; whatever sqlglot raises is a refusal."""
    if not text.strip():
        _refuse(param, "it is empty")
    if len(text) > MAX_LENGTH:
        _refuse(param, f"it is longer than {MAX_LENGTH} characters")
    if "--" in text or "/*" in text:
        _refuse(param, "comments (-- and /*) are not allowed")
    if "\x00" in text:
        _refuse(param, "NUL characters are not allowed")
    try:
        dialect = Dialect.get_or_raise("duckdb")
        tokens = dialect.tokenize(prefix + text)
        if any(token.token_type == TokenType.SEMICOLON for token in tokens):
            _refuse(param, "only one expression is allowed (no ';')")
        if any(token.comments for token in tokens):
            _refuse(param, "comments are not allowed")
        trees = dialect.parser().parse_into(into, tokens, prefix + text)
    except InvalidParameterError:
        raise
    except RecursionError:
        _refuse(param, "it is too deeply nested")
    except Exception as error:  # sqlglot's ParseError and TokenError, and anything else it may raise
        errors = getattr(error, "errors", None) or [{}]
        detail = errors[0].get("description") or "unterminated quote?"
        _refuse(param, f"it is not a valid SQL expression ({_clip(str(detail))})")
    tree = trees[0] if len(trees) == 1 else None
    if not isinstance(tree, into):
        _refuse(param, _describe(tree) if tree is not None else "it must be exactly one expression")
    return tree, sum(token.token_type == TokenType.COMMA for token in tokens)


def _render(param: str, tree: exp.Expr) -> str:
    try:
        return tree.sql(dialect="duckdb", identify=True, comments=False)
    except Exception:
        _refuse(param, "it cannot be rendered as DuckDB SQL")


def where_clause(where: str, columns: Collection[str]) -> str:
    """The boolean expression `where` over `columns`, checked and rendered again, to put after WHERE."""
    tree, commas = _parse("where", where, exp.Condition)
    _check("where", tree, _CONDITION, columns)
    if commas != sum(len(node.expressions) - 1 for node in tree.find_all(exp.In)):
        _refuse("where", "empty list items are not allowed")
    return _render("where", tree.transform(_case_folded))


def _case_folded(node: exp.Expr) -> exp.Expr:
    """`a ILIKE p` as `lower(a) LIKE lower(p)`: DuckDB's ILIKE backtracks on `%`, exponentially in their
    number, and cannot be interrupted meanwhile (`'%e%e%e%q'` on a 2,000-character cell: minutes)."""
    if not isinstance(node, exp.ILike):
        return node
    negate = bool(node.args.get("negate"))
    return exp.Like(this=exp.Lower(this=node.this), expression=exp.Lower(this=node.expression), negate=negate)


def orderby_clause(orderby: str, columns: Collection[str]) -> str:
    """The ordering `orderby` over `columns`, checked and rendered again with explicit directions and
    NULLS FIRST/LAST (DuckDB's defaults when not given), to put after ORDER BY."""
    order, commas = _parse("orderby", orderby, exp.Order, prefix="ORDER BY ")
    if _set_args(order) != {"expressions"} or commas != len(order.expressions) - 1:
        _refuse("orderby", "it must be a comma-separated list of ordering items")
    items = []
    for item in order.expressions:
        if not isinstance(item, exp.Ordered):
            _refuse("orderby", _describe(item))
        if extra := sorted(_set_args(item) - {"this", "desc", "nulls_first"}):
            _refuse("orderby", f"{', '.join(extra).upper()} is not allowed")
        _check("orderby", item.this, _ARITHMETIC, columns)
        if item.this.find(exp.Column) is None:
            _refuse("orderby", "each item must reference a column (positions like 1 are not allowed)")
        direction = "DESC" if item.args.get("desc") else "ASC"
        nulls = "FIRST" if item.args.get("nulls_first") else "LAST"
        items.append(f"{_render('orderby', item.this)} {direction} NULLS {nulls}")
    return ", ".join(items)
