"""YAML in and out for a dataclass schema (deploy/validator.py walks the parsed data).

    parse_yaml(text, source) -> (data, {dotted key: line})   # duplicate keys are errors
    apply_overrides(data, ["a.b=VALUE"])                      # a CLI's `--set`
    to_plain(value, cls) -> YAML-able data; diff_plain(a, b) -> changed dotted keys
    reference_rows(cls) -> markdown rows: key, type, default, meaning
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import yaml

from deploy.validator import ConfigError, FloatMap, Issue, bounds, join, section_type


def parse_yaml(text: str, source: str) -> tuple[object, dict[str, int]]:
    """The document's data and the line of every mapping key; ConfigError on bad YAML."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        dupes: list[Issue] = []
        _key_lines(node, "", lines, dupes)
        if dupes:
            raise ConfigError(source, dupes)
        return (loader.construct_document(node) if node is not None else None), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = e.problem or e.context or "cannot parse"
        if e.problem and e.context and e.context_mark and e.context_mark is not mark:
            what += f" ({e.context} started at line {e.context_mark.line + 1})"
        raise ConfigError(source, [Issue(where, f"invalid YAML: {what}", mark and mark.line + 1)]) \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [Issue("", f"invalid YAML: {e}")]) from None
    finally:
        loader.dispose()


def _key_lines(node: yaml.Node | None, prefix: str, out: dict[str, int], dupes: list[Issue]) -> None:
    """Record the line of every mapping key (before merges are applied); flag duplicate keys."""
    if not isinstance(node, yaml.MappingNode) or prefix.count(".") > 8:  # deeper: not a schema's
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        path, line = join(prefix, key_node.value), key_node.start_mark.line + 1
        if path in out:
            dupes.append(Issue(path, f"duplicate key (lines {out[path]} and {line})", line))
        out[path] = line
        _key_lines(value_node, path, out, dupes)


def apply_overrides(data: object, overrides: Sequence[str], source: str = "--set") -> object:
    """A copy of parsed YAML data with each `a.b.c=VALUE` set (sections created as needed)."""
    if not overrides or not isinstance(data, dict | None):
        return data  # a non-mapping top level is reported by the validator
    out = copy.deepcopy(data) if data is not None else {}
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(source, [Issue("", f"override {item!r}: expected KEY=VALUE")])
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # not YAML on its own: keep the string; validation judges it
        _set_path(out, key.strip().split("."), value)
    return out


def _set_path(node: dict[Any, Any], keys: list[str], value: object) -> None:
    for name in keys[:-1]:
        if node.get(name) is None:
            node[name] = {}
        if not isinstance(node[name], dict):
            return  # `prefill: 4` plus `prefill.replicas=2`: the validator reports `prefill`
        node = node[name]
    node[keys[-1]] = value


# ---------------------------------------------------------------- dumping and diffs


def to_plain(value: object, hint: Any) -> object:
    """A schema value as plain YAML-able data (sections as mappings, tuples as lists)."""
    sub = section_type(hint)
    if sub is not None and value is not None:
        hints = typing.get_type_hints(sub)
        return {f.name: to_plain(getattr(value, f.name), hints[f.name])
                for f in dataclasses.fields(sub)}
    if hint == FloatMap:
        return dict(typing.cast(FloatMap, value))
    if isinstance(value, tuple):
        return list(value)
    return value


_MISSING = object()


def diff_plain(a: object, b: object, path: str = "") -> list[str]:
    """Dotted key paths whose value differs between two plain trees (in key order)."""
    out: list[str] = []
    _diff(a, b, path, out)
    return out


def _diff(a: object, b: object, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            _diff(a.get(key, _MISSING), b.get(key, _MISSING), join(path, key), out)
    elif a != b:
        out.append(path)


# ---------------------------------------------------------------- reference table


def reference_rows(cls: type, prefix: str = "") -> Iterator[str]:
    """One markdown row per key: `key` | type | default | meaning (sections, then their keys)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, hint, meta = join(prefix, f.name), hints[f.name], f.metadata
        is_factory = f.default_factory is not dataclasses.MISSING
        shown = meta.get("shown") or ("" if is_factory else _md(_show_default(f.default, hint)))
        yield f"| `{path}` | {_type_name(hint, meta)} | {shown} | {meta['doc']} |"
        sub = section_type(hint)
        if sub is not None:
            yield from reference_rows(sub, path)


def _show_default(default: object, hint: Any) -> str:
    value = to_plain(default, hint)
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _type_name(hint: Any, meta: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return f"{_type_name(inner, meta)} or null"
    if origin is Literal:
        return _md(" | ".join(f"`{a}`" for a in args))
    if dataclasses.is_dataclass(hint):
        return "section"
    if hint == FloatMap:
        return f"mapping of str: float{_md(bounds(meta))}"
    if origin is tuple:
        return f"list of {args[0].__name__}{_md(bounds(meta))}"
    return f"{hint.__name__}{_md(bounds(meta))}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")
