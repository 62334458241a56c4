"""A generic YAML validator: a tree of frozen dataclasses is the schema.

    opt(default, doc, **rules) / section(cls, doc)      # how a schema declares its keys
    validate(cls, data, lines) -> (instance | None, issues)
    parse_yaml(text, source) -> (data, {dotted key: line})
    apply_overrides(data, ["a.b=VALUE"]); to_plain(value, cls); diff_plain(a, b)
    reference_rows(cls) -> markdown table rows

A field's type hint is its type rule (int, float, str, bool, Literal, `X | None`, tuple[X, ...],
FloatMap, a nested dataclass); its metadata holds the doc line and the range (gt / ge / le:
numbers, nonempty: str, shown: how the docs show the default). Every error names the dotted key
and, when known, its line; unknown keys are errors with a suggestion. Nothing here knows pdserve's
keys: deploy/schema.py declares them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

FloatMap = tuple[tuple[str, float], ...]  # written in YAML as a mapping; stored as sorted pairs


def opt(default: T, doc: str, **rules: Any) -> T:
    """A config key: default, one doc line, rules (gt, ge, le: numbers; nonempty: str; shown: str)."""
    return field(default=default, metadata={"doc": doc, **rules})


def section(cls: type[T], doc: str) -> T:
    """A nested section, defaulting to all of its own defaults."""
    return field(default_factory=cls, metadata={"doc": doc})


def default_of(cls: type, name: str) -> Any:
    """The default a dataclass declares for one field, so a schema can take it instead of
    repeating it (the runtime config it feeds stays the one place it is written)."""
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    if found.default is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no plain default")
    return found.default


# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Issue:
    path: str  # dotted key, e.g. "prefill.replicas"; "" = the whole file
    message: str
    line: int | None = None  # 1-based line in the YAML file, when known


class ConfigError(ValueError):
    """Every problem found in one config; str() is one `source: key: message` line per issue."""

    def __init__(self, source: str, issues: Sequence[Issue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        super().__init__("\n".join(_format(source, i) for i in self.issues))


def _format(source: str, issue: Issue) -> str:
    return f"{source}: {issue.path}: {issue.message}" if issue.path else f"{source}: {issue.message}"


def show(value: object) -> str:
    """A value as the YAML author wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def line_of(lines: dict[str, int], path: str) -> int | None:
    """The line of a dotted key, else of its nearest enclosing section."""
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


# ---------------------------------------------------------------- the walk


def validate(cls: type[T], data: object, lines: dict[str, int]) -> tuple[T | None, list[Issue]]:
    """An instance of `cls` from parsed YAML (None = all defaults), or None and every issue."""
    walk = _Walk(cls, lines)
    return walk.build(cls, data, ""), walk.issues


class _Walk:
    """One validation pass: collects issues; `lines` maps dotted keys to YAML lines."""

    def __init__(self, root: type, lines: dict[str, int]) -> None:
        self.root = root
        self.lines = lines
        self.issues: list[Issue] = []

    def fail(self, path: str, message: str) -> None:
        self.issues.append(Issue(path, message, line_of(self.lines, path)))

    def build(self, cls: type[T], data: object, path: str) -> T | None:
        """A dataclass from a mapping (None = all defaults); None when anything is wrong."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            where = "" if path else "top level: "
            self.fail(path, f"{where}expected a mapping, got {show(data)}")
            return None
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        rules = {f.name: f.metadata for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        before, kwargs = len(self.issues), {}
        for key, value in data.items():
            if key not in names:
                self.fail(join(path, key), f"unknown key ({self.suggest(key, names, path)})")
                continue
            kwargs[key] = self.value(hints[key], value, join(path, key), rules[key])
        return cls(**kwargs) if len(self.issues) == before else None

    def value(self, hint: Any, value: object, path: str, rules: Any) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            inner = next(a for a in args if a is not type(None))
            return None if value is None else self.value(inner, value, path, rules)
        if origin is Literal:
            if not any(type(value) is type(a) and value == a for a in args):
                self.fail(path, f"expected one of {', '.join(show(a) for a in args)}, "
                          f"got {show(value)}")
            return value
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type, hint), value, path)
        if origin is tuple:
            return self.sequence(args, value, path, rules)
        return self.scalar(hint, value, path, rules)

    def sequence(self, args: tuple[Any, ...], value: object, path: str, rules: Any) -> Any:
        if args[0] == tuple[str, float]:  # FloatMap
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping of name: number, got {show(value)}")
                return ()
            pairs = [(self.scalar(str, k, path, {}), self.scalar(float, v, join(path, k), rules))
                     for k, v in value.items()]
            return tuple(sorted(pairs, key=lambda kv: str(kv[0])))
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {show(value)}")
            return ()
        return tuple(self.value(args[0], v, f"{path}[{i}]", rules) for i, v in enumerate(value))

    def scalar(self, hint: Any, value: object, path: str, rules: Any) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if hint is int or hint is float:
            right_type = is_int or (hint is float and isinstance(value, float))
        else:
            right_type = isinstance(value, hint)
        nouns = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        expected = f"expected {nouns[hint]}{bounds(rules)}, got {show(value)}"
        if not right_type:
            self.fail(path, expected)
        elif isinstance(value, float) and not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {show(value)}")
        elif (is_int or isinstance(value, float)) and not _in_bounds(value, rules):  # type: ignore[arg-type]
            self.fail(path, expected)
        elif isinstance(value, str) and rules.get("nonempty") and not value.strip():
            self.fail(path, f"expected a non-empty string, got {show(value)}")
        return float(value) if hint is float and right_type else value  # type: ignore[arg-type]

    def suggest(self, key: object, names: list[str], path: str) -> str:
        close = difflib.get_close_matches(str(key), names, n=1)
        if close:
            return f"did you mean '{close[0]}'?"
        elsewhere = [p for p in schema_paths(self.root, "") if p.rpartition(".")[2] == str(key)]
        if elsewhere:
            return "did you mean " + " or ".join(f"'{p}'" for p in elsewhere[:3]) + "?"
        where = f"valid keys in '{path}'" if path else "valid top-level keys"
        return f"{where}: {', '.join(names)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounds(rules: Any) -> str:
    """A field's range as words: ` >= 1`, ` between 0 and 65535`, or ``."""
    lo, hi = rules.get("ge"), rules.get("le")
    if lo is not None and hi is not None:
        return f" between {_num(lo)} and {_num(hi)}"
    if rules.get("gt") is not None:
        tail = f" and <= {_num(hi)}" if hi is not None else ""
        return f" > {_num(rules['gt'])}{tail}"
    if lo is not None:
        return f" >= {_num(lo)}"
    return f" <= {_num(hi)}" if hi is not None else ""


def _in_bounds(x: float, rules: Any) -> bool:
    gt, ge, le = rules.get("gt"), rules.get("ge"), rules.get("le")
    return (gt is None or x > gt) and (ge is None or x >= ge) and (le is None or x <= le)


def section_type(hint: Any) -> type | None:
    """The dataclass behind a field's hint (unwrapping `X | None`), or None for a leaf."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return typing.cast(type, candidate)
    return None


def schema_paths(cls: type, prefix: str) -> Iterator[str]:
    """Every dotted key of a schema, sections included."""
    for name, hint in typing.get_type_hints(cls).items():
        path = join(prefix, name)
        yield path
        sub = section_type(hint)
        if sub is not None:
            yield from schema_paths(sub, path)
