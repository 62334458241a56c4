"""pdserve deploy configuration: one YAML file -> frozen dataclasses (deploy/schema.py).

    load_config(path | None) -> DeployConfig      # None (or an empty file) = every default
    parse_config(data, source) -> DeployConfig    # the same from an already-parsed mapping
    check_against_model(cfg, num_kv_heads, max_pos) -> DeployConfig   # once the model is known
    cfg.to_dict() / cfg.to_yaml(); diff_configs(old, new) -> changed key paths

The generic validator (deploy/validator.py) checks every key against the schema, so every error
names the file and the dotted key:  `config.yaml: prefill.tensor_parallel_size: expected one of 1,
2, 4, 8, got 3`.  Unknown keys are errors, with a suggestion.  A ConfigError lists every problem
found. This module adds the checks across keys and against the model. Workers never see YAML; they
get these dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from deploy.schema import (
    DEFAULT_MODEL_DIR,
    DecodeAutoscaling,
    DeployConfig,
    ModelSection,
    PrefillAutoscaling,
)
from deploy.validator import ConfigError, Issue, line_of, validate
from deploy.yaml_io import apply_overrides, diff_plain, parse_yaml, reference_rows

# The names importers use, whether defined here or in the schema / validator modules.
__all__ = [
    "DEFAULT_MODEL_DIR", "ConfigError", "DecodeAutoscaling", "DeployConfig", "Issue",
    "PrefillAutoscaling", "apply_overrides", "check_against_model", "check_model_dir",
    "diff_configs", "load_config", "parse_config", "reference_table",
]


# ---------------------------------------------------------------- cross-field checks


def _cross_check(cfg: DeployConfig) -> list[Issue]:
    out: list[Issue] = []
    if cfg.decode.quantization == "fp8" and cfg.decode.device != "cuda":
        out.append(Issue("decode.quantization", "fp8 needs a Hopper/Ada GPU (decode.device: cuda) "
                         "and cannot run on CPU; use int8 or none"))
    for name, pool in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        if pool.device == "cuda" and pool.resources.num_gpus <= 0:
            out.append(Issue(f"{name}.resources.num_gpus", f"{name}.device is cuda but num_gpus is "
                             "0, so Ray would give the ranks no GPU; set num_gpus: 1"))
        out += _check_scaling(name, pool.replicas, pool.autoscaling)
        if cfg.model.max_model_len is not None:
            out += _check_capacity(name, pool.num_kv_blocks, cfg.model)
    colocated = cfg.serving_mode == "colocated" or cfg.decode.local_prefill_max_tokens > 0
    if colocated and cfg.decode.tensor_parallel_size > 1:
        out.append(Issue("decode.tensor_parallel_size", "a colocated decode replica (serving_mode: "
                         "colocated or decode.local_prefill_max_tokens > 0) runs TP 1 only; set 1"))
    if cfg.serving_mode == "colocated" and cfg.decode.autoscaling is not None:
        out.append(Issue("decode.autoscaling", "not supported with serving_mode: colocated yet; "
                         "set a fixed decode.replicas"))
    tls = cfg.router.tls
    if (tls.cert is None) != (tls.key is None):
        out.append(Issue("router.tls", "cert and key must be set together"))
    if tls.client_ca is not None and tls.cert is None:
        out.append(Issue("router.tls.client_ca", "client certificates need TLS: set cert and key"))
    return out


def _check_scaling(name: str, replicas: int,
                   scaling: PrefillAutoscaling | DecodeAutoscaling | None) -> list[Issue]:
    if scaling is None:
        return []
    lo, hi = scaling.min_replicas, scaling.max_replicas
    if lo > hi:
        return [Issue(f"{name}.autoscaling", f"min_replicas ({lo}) must be <= max_replicas ({hi})")]
    if not lo <= replicas <= hi:
        return [Issue(f"{name}.replicas", f"must be between autoscaling.min_replicas and "
                      f"autoscaling.max_replicas ({lo} <= replicas <= {hi}), got {replicas}")]
    return []


def _check_capacity(name: str, num_blocks: int, model: ModelSection) -> list[Issue]:
    need = -(-typing.cast(int, model.max_model_len) // model.block_size)
    if num_blocks >= need:
        return []
    return [Issue(f"{name}.num_kv_blocks", f"{num_blocks} blocks of {model.block_size} tokens "
                  f"cannot hold one request of model.max_model_len = {model.max_model_len} "
                  f"tokens; need at least {need}")]


def _check_tp(name: str, tp: int, num_heads: int, num_kv_heads: int) -> list[Issue]:
    key = f"{name}.tensor_parallel_size"
    if num_heads and num_heads % tp:
        return [Issue(key, f"{tp} does not divide the model's {num_heads} attention heads")]
    if num_kv_heads % tp and tp % num_kv_heads:
        return [Issue(key, f"{tp} neither divides the model's {num_kv_heads} KV heads nor is a "
                      "multiple of them (replicated KV heads)")]
    return []


def check_against_model(cfg: DeployConfig, num_kv_heads: int, max_pos: int,
                        source: str = "config", num_heads: int = 0) -> DeployConfig:
    """Checks that need the model's config.json; returns cfg with `model.max_model_len` filled in.

    Each pool's tensor_parallel_size must divide num_heads (0 = not checked), and either divide
    num_kv_heads or be a multiple of it (then ranks hold replicated KV heads); max_model_len must
    not exceed max_pos; one max-length request must fit in each pool's KV.
    """
    model = dataclasses.replace(cfg.model, max_model_len=cfg.model.max_model_len or max_pos)
    issues: list[Issue] = []
    for name, pool in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        issues += _check_tp(name, pool.tensor_parallel_size, num_heads, num_kv_heads)
        issues += _check_capacity(name, pool.num_kv_blocks, model)
    if typing.cast(int, model.max_model_len) > max_pos:
        issues.insert(0, Issue("model.max_model_len", f"{model.max_model_len} exceeds the model's "
                               f"max_position_embeddings ({max_pos})"))
    if issues:
        raise ConfigError(source, issues)
    return dataclasses.replace(cfg, model=model)


def check_model_dir(cfg: DeployConfig, source: str = "config") -> None:
    """model.path must be a directory with a config.json: checked where the model is loaded (the
    router's host), not when a file is validated, since a file may be meant for other machines."""
    folder = Path(cfg.model.path)
    if not folder.exists():
        raise ConfigError(source, [Issue("model.path", f"{folder} does not exist")])
    if not (folder / "config.json").is_file():
        raise ConfigError(source, [Issue("model.path", f"{folder} has no config.json (not a "
                                         "Hugging Face model directory)")])


# ---------------------------------------------------------------- loading


def parse_config(data: object, source: str, lines: dict[str, int] | None = None) -> DeployConfig:
    """Validate already-parsed YAML data (None = defaults). Raises ConfigError listing every issue."""
    lines = lines or {}
    cfg, issues = validate(DeployConfig, data, lines)
    if cfg is None:
        raise ConfigError(source, issues)
    issues = [dataclasses.replace(i, line=line_of(lines, i.path)) for i in _cross_check(cfg)]
    if issues:
        raise ConfigError(source, issues)
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> DeployConfig:
    """Read a YAML file (None = the embedded default). Relative paths inside resolve against it.

    overrides: `key.path=VALUE` strings applied on top of the file (VALUE is YAML: `2`, `null`,
    `[a, b]`, `{x: 1}`), e.g. a CLI's `--set prefill.replicas=2`.
    """
    source = "defaults" if path is None else str(path)
    data: object = None
    lines: dict[str, int] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(source, [Issue("", f"cannot read the file: {e.strerror or e}")]) from e
        data, lines = parse_yaml(text, source)
    if overrides:
        data = apply_overrides(data, overrides, source)
    cfg = parse_config(data, source, lines)
    return cfg if path is None else _resolve_paths(cfg, Path(path).resolve().parent)


def _resolve_paths(cfg: DeployConfig, base: Path) -> DeployConfig:
    def fix(p: str | None) -> str | None:
        return None if p is None else str(base / os.path.expanduser(p))  # absolute p wins

    model = dataclasses.replace(cfg.model, path=typing.cast(str, fix(cfg.model.path)))
    t = cfg.router.tls
    tls = dataclasses.replace(t, cert=fix(t.cert), key=fix(t.key), client_ca=fix(t.client_ca))
    return dataclasses.replace(cfg, model=model,
                               router=dataclasses.replace(cfg.router, tls=tls))


def diff_configs(old: DeployConfig, new: DeployConfig) -> list[str]:
    """Dotted key paths whose value differs (schema order), e.g. ['decode.replicas']."""
    return diff_plain(old.to_dict(), new.to_dict())


def reference_table() -> str:
    """The markdown table of every key: type, default, meaning (docs/config.md embeds it)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += list(reference_rows(DeployConfig))
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str]) -> int:
    """`python -m deploy.config [FILE]`: validate FILE and print it with defaults filled in;
    `python -m deploy.config --table`: print the reference table."""
    if argv[:1] == ["--table"]:
        print(reference_table(), end="")
        return 0
    try:
        print(load_config(argv[0] if argv else None).to_yaml(), end="")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
