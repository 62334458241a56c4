"""pdserve deploy configuration: one YAML file -> frozen dataclasses.

    load_config(path | None) -> DeployConfig      # None (or an empty file) = every default
    parse_config(data, source) -> DeployConfig    # the same from an already-parsed mapping
    check_against_model(cfg, num_kv_heads, max_pos) -> DeployConfig   # once the model is known
    cfg.to_dict() / cfg.to_yaml(); diff_configs(old, new) -> changed key paths

Every key is a dataclass field: its type hint is the type rule, its metadata holds the doc line and
the range (gt / ge / le / nonempty). One generic validator walks the fields, so every error names
the file and the dotted key:  `config.yaml: prefill.tensor_parallel_size: expected one of 1, 2, 4,
8, got 3`.  Unknown keys are errors, with a suggestion.  A ConfigError lists every problem found.
Workers never see YAML; they get these dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parent / "default_model")

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda"]
TPSize = Literal[1, 2, 4, 8]
Quantization = Literal["none", "int8", "fp8"]
Backend = Literal["ucx", "torch"]
ServingMode = Literal["disaggregated", "colocated"]
FloatMap = tuple[tuple[str, float], ...]  # written in YAML as a mapping; stored as sorted pairs


def opt(default: T, doc: str, **rules: Any) -> T:
    """A config key: default, one doc line, rules (gt, ge, le: numbers; nonempty: str; shown: str)."""
    return field(default=default, metadata={"doc": doc, **rules})


def section(cls: type[T], doc: str) -> T:
    """A nested section, defaulting to all of its own defaults."""
    return field(default_factory=cls, metadata={"doc": doc})


# ---------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class ModelSettings:
    path: str = opt(DEFAULT_MODEL_DIR, "Hugging Face model directory (config.json, *.safetensors, "
                    "tokenizer.json); a relative path is relative to the YAML file",
                    nonempty=True, shown="`deploy/default_model` (bundled tiny model)")
    dtype: Dtype = opt("float32", "weights, activations and KV cache dtype of both pools")
    block_size: int = opt(16, "tokens per KV block, shared by both pools", ge=1, le=1024)
    max_model_len: int | None = opt(None, "longest prompt + completion accepted, in tokens",
                                    ge=1, shown="model's `max_position_embeddings`")
    name: str | None = opt(None, "the served model's id: the `model` of OpenAI requests and what "
                           "`GET /v1/models` lists", nonempty=True,
                           shown="the name of the `model.path` directory")

    @property
    def served_name(self) -> str:
        return self.name or Path(self.path).name


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str | None = opt(None, "PEM server certificate chain; enables TLS (needs `key`)")
    key: str | None = opt(None, "PEM private key of `cert`")
    client_ca: str | None = opt(None, "PEM CA bundle; when set, clients must present a cert it signed")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    port: int | None = opt(8000, "OpenAI-compatible HTTP port (`/v1/completions`, "
                           "`/v1/chat/completions`, `/v1/models`, `/health`) on `router.host`, "
                           "with the gRPC port's TLS and API keys (0 = pick a free port); "
                           "null = off", ge=0, le=65535)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    host: str = opt("127.0.0.1", "interface the public gRPC and HTTP servers bind to",
                    nonempty=True)
    port: int = opt(50051, "public gRPC port (0 = pick a free one)", ge=0, le=65535)
    internal_host: str = opt("127.0.0.1", "interface of the internal registry server workers "
                             "heartbeat to (`auto` = this node's IP as Ray reports it)",
                             nonempty=True)
    max_inflight: int = opt(256, "requests admitted at once; more get RESOURCE_EXHAUSTED", ge=1)
    max_queued_prompt_tokens: int = opt(65536, "prompt tokens waiting for prefill before "
                                        "admission refuses new requests", ge=1)
    default_max_tokens: int = opt(256, "`max_tokens` of a request that sets none", ge=1)
    heartbeat_seconds: float = opt(1.0, "replica heartbeat period; a replica silent for 3 "
                                   "periods is forgotten", gt=0)
    api_keys: tuple[str, ...] = opt((), "accepted `authorization: Bearer <key>` values; "
                                    "empty = no auth")
    tls: TLSConfig = section(TLSConfig, "TLS for the public ports (all null = plaintext)")
    http: HttpConfig = section(HttpConfig, "the OpenAI-compatible HTTP door into the same "
                               "request flow")
    metrics_port: int | None = opt(None, "Prometheus `/metrics` over HTTP on `host` (TTFT/TPOT/ITL "
                                   "histograms, queues, KV use, KV transfers; 0 = pick a free "
                                   "port); null = off", ge=0, le=65535)
    migration: bool = opt(True, "a decode replica that dies mid-stream: prefill the prompt + the "
                          "tokens already sent again and continue on another replica (false = "
                          "the request ends UNAVAILABLE)")


@dataclass(frozen=True, slots=True)
class ResourcesConfig:
    num_cpus: float = opt(0.5, "Ray CPUs per rank", ge=0)
    num_gpus: float = opt(0.0, "Ray GPUs per rank (use 1 with `device: cuda`)", ge=0)
    custom: FloatMap = opt((), "Ray custom resources per rank, e.g. `{prefill_node: 0.01}` to "
                           "pin the pool to nodes started with that resource", ge=0)

    def ray_resources(self) -> dict[str, float]:
        """`custom` as the dict Ray's `resources=` option takes."""
        return dict(self.custom)


@dataclass(frozen=True, slots=True)
class PrefillAutoscaling:
    min_replicas: int = opt(1, "fewest replicas", ge=0)
    max_replicas: int = opt(4, "most replicas", ge=1)
    target: int = opt(2048, "queued prompt tokens per replica the policy aims for", ge=1)
    upscale_delay_s: float = opt(5.0, "load must stay high this long before adding a replica", ge=0)
    downscale_delay_s: float = opt(30.0, "load must stay low this long before removing one", ge=0)


@dataclass(frozen=True, slots=True)
class DecodeAutoscaling:
    min_replicas: int = opt(1, "fewest replicas", ge=0)
    max_replicas: int = opt(4, "most replicas", ge=1)
    target: float = opt(0.7, "fraction of KV blocks in use per replica the policy aims for",
                        gt=0, le=1)
    upscale_delay_s: float = opt(5.0, "load must stay high this long before adding a replica", ge=0)
    downscale_delay_s: float = opt(30.0, "load must stay low this long before removing one", ge=0)


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    tensor_parallel_size: TPSize = opt(2, "ranks (processes) per prefill replica")
    replicas: int = opt(1, "replicas at start", ge=1)
    num_kv_blocks: int = opt(1024, "KV blocks per rank", ge=1)
    max_num_batched_tokens: int = opt(512, "prompt tokens per forward step (chunked prefill)", ge=1)
    torch_threads: int = opt(1, "`torch.set_num_threads` per rank", ge=1)
    device: Device = opt("cpu", "where the ranks run")
    resources: ResourcesConfig = section(ResourcesConfig, "Ray resources of each rank")
    autoscaling: PrefillAutoscaling | None = opt(None, "queue-driven autoscaling; null = fixed "
                                                 "`replicas`, `{}` = on with defaults")
    cpu_affinity: tuple[int, ...] = opt((), "CPU cores every rank's process is pinned to "
                                        "(`os.sched_setaffinity`); empty = not pinned", ge=0)


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    tensor_parallel_size: TPSize = opt(1, "ranks per decode replica")
    replicas: int = opt(1, "replicas at start", ge=1)
    quantization: Quantization = opt("none", "decode weights: `int8` weight-only (CPU or GPU), "
                                     "`fp8` (Hopper/Ada GPU only)")
    num_kv_blocks: int = opt(2048, "KV blocks per rank", ge=1)
    max_num_seqs: int = opt(64, "most sequences in the running batch", ge=1)
    torch_threads: int = opt(1, "`torch.set_num_threads` per rank", ge=1)
    device: Device = opt("cpu", "where the ranks run")
    resources: ResourcesConfig = section(ResourcesConfig, "Ray resources of each rank")
    autoscaling: DecodeAutoscaling | None = opt(None, "KV-use-driven autoscaling; null = fixed "
                                                "`replicas`, `{}` = on with defaults")
    cpu_affinity: tuple[int, ...] = opt((), "CPU cores every replica's process is pinned to "
                                        "(`os.sched_setaffinity`); empty = not pinned", ge=0)
    local_prefill_max_tokens: int = opt(0, "conditional disaggregation: a prompt with at most this "
                                        "many tokens not already cached on the chosen decode "
                                        "replica is prefilled there (no KV transfer); 0 = off",
                                        ge=0)


@dataclass(frozen=True, slots=True)
class KVTransferConfig:
    backend: Backend = opt("ucx", "`ucx` (ucxx: shm/tcp/cuda_ipc/RDMA) or `torch` "
                           "(torch.distributed: gloo on CPU, NCCL on GPU)")
    lease_seconds: float = opt(30.0, "prefill keeps a request's KV blocks this long for the pull",
                               gt=0)
    timeout_seconds: float = opt(10.0, "decode gives up on a pull after this long", gt=0)
    streaming: bool = opt(False, "chunk-wise KV streaming: decode pulls each prefill chunk's KV "
                          "while the next chunk is computed (`prefill.max_num_batched_tokens` "
                          "per pull), hiding the transfer behind prefill")
    same_host_read: bool = opt(True, "ucx, CPU caches: a decode rank on the prefill rank's host "
                               "copies the blocks out of the prefill's KV pool itself (a memfd "
                               "it maps read-only through /proc; same user and pid namespace), "
                               "one memcpy instead of the UCX payload; falls back to the "
                               "payload where it cannot map the pool")
    host: str = opt("127.0.0.1", "interface KV sources bind to (`auto` = this node's IP as Ray "
                    "reports it; needed across nodes)", nonempty=True)


@dataclass(frozen=True, slots=True)
class RayConfig:
    address: str | None = opt(None, "Ray cluster to join (`auto`, `ray://head:10001`); "
                              "null = start a local Ray", nonempty=True)
    namespace: str = opt("pdserve", "Ray namespace of the Serve application", nonempty=True)


@dataclass(frozen=True, slots=True)
class DeployConfig:
    serving_mode: ServingMode = opt("disaggregated", "`disaggregated`: a prefill pool and a decode "
                                    "pool, KV moved between them; `colocated`: no prefill pool, "
                                    "each `decode` replica runs both phases on one engine (like a "
                                    "plain vLLM server; chunk size from "
                                    "`prefill.max_num_batched_tokens`)")
    model: ModelSettings = section(ModelSettings, "the model both pools serve")
    router: RouterConfig = section(RouterConfig, "the public router: gRPC and OpenAI HTTP")
    prefill: PrefillConfig = section(PrefillConfig, "the prefill pool")
    decode: DecodeConfig = section(DecodeConfig, "the decode pool")
    kv_transfer: KVTransferConfig = section(KVTransferConfig, "moving KV blocks prefill -> decode")
    ray: RayConfig = section(RayConfig, "the Ray cluster")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able data; `parse_config(cfg.to_dict(), ...) == cfg`."""
        return typing.cast(dict[str, Any], _to_plain(self, DeployConfig))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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


def _show(value: object) -> str:
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


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# ---------------------------------------------------------------- generic validator


class _Walk:
    """One validation pass: collects issues; `lines` maps dotted keys to YAML lines."""

    def __init__(self, lines: dict[str, int]) -> None:
        self.lines = lines
        self.issues: list[Issue] = []

    def fail(self, path: str, message: str) -> None:
        self.issues.append(Issue(path, message, self.line_of(path)))

    def line_of(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None

    def build(self, cls: type[T], data: object, path: str) -> T | None:
        """A dataclass from a mapping (None = all defaults); None when anything is wrong."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            where = "" if path else "top level: "
            self.fail(path, f"{where}expected a mapping, got {_show(data)}")
            return None
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        rules = {f.name: f.metadata for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        before, kwargs = len(self.issues), {}
        for key, value in data.items():
            if key not in names:
                self.fail(_join(path, key), f"unknown key ({_suggest(key, names, path)})")
                continue
            kwargs[key] = self.value(hints[key], value, _join(path, key), rules[key])
        return cls(**kwargs) if len(self.issues) == before else None

    def value(self, hint: Any, value: object, path: str, rules: Any) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            inner = next(a for a in args if a is not type(None))
            return None if value is None else self.value(inner, value, path, rules)
        if origin is Literal:
            if not any(type(value) is type(a) and value == a for a in args):
                self.fail(path, f"expected one of {', '.join(_show(a) for a in args)}, "
                          f"got {_show(value)}")
            return value
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type, hint), value, path)
        if origin is tuple:
            return self.sequence(args, value, path, rules)
        return self.scalar(hint, value, path, rules)

    def sequence(self, args: tuple[Any, ...], value: object, path: str, rules: Any) -> Any:
        if args[0] == tuple[str, float]:  # FloatMap
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping of name: number, got {_show(value)}")
                return ()
            pairs = [(self.scalar(str, k, path, {}), self.scalar(float, v, _join(path, k), rules))
                     for k, v in value.items()]
            return tuple(sorted(pairs, key=lambda kv: str(kv[0])))
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_show(value)}")
            return ()
        return tuple(self.value(args[0], v, f"{path}[{i}]", rules) for i, v in enumerate(value))

    def scalar(self, hint: Any, value: object, path: str, rules: Any) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if hint is int or hint is float:
            right_type = is_int or (hint is float and isinstance(value, float))
        else:
            right_type = isinstance(value, hint)
        nouns = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        expected = f"expected {nouns[hint]}{_bounds(rules)}, got {_show(value)}"
        if not right_type:
            self.fail(path, expected)
        elif isinstance(value, float) and not math.isfinite(value):
            self.fail(path, f"expected a finite number, got {_show(value)}")
        elif (is_int or isinstance(value, float)) and not _in_bounds(value, rules):  # type: ignore[arg-type]
            self.fail(path, expected)
        elif isinstance(value, str) and rules.get("nonempty") and not value.strip():
            self.fail(path, f"expected a non-empty string, got {_show(value)}")
        return float(value) if hint is float and right_type else value  # type: ignore[arg-type]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bounds(rules: Any) -> str:
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


def _suggest(key: object, names: list[str], path: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    elsewhere = [p for p in _schema_paths(DeployConfig, "") if p.rpartition(".")[2] == str(key)]
    if elsewhere:
        return "did you mean " + " or ".join(f"'{p}'" for p in elsewhere[:3]) + "?"
    where = f"valid keys in '{path}'" if path else "valid top-level keys"
    return f"{where}: {', '.join(names)}"


def _section_type(hint: Any) -> type | None:
    """The dataclass behind a field's hint (unwrapping `X | None`), or None for a leaf."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return typing.cast(type, candidate)
    return None


def _schema_paths(cls: type, prefix: str) -> Iterator[str]:
    for name, hint in typing.get_type_hints(cls).items():
        path = _join(prefix, name)
        yield path
        sub = _section_type(hint)
        if sub is not None:
            yield from _schema_paths(sub, path)


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


def _check_capacity(name: str, num_blocks: int, model: ModelSettings) -> list[Issue]:
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
    walk = _Walk(lines or {})
    cfg = walk.build(DeployConfig, data, "")
    if cfg is None:
        raise ConfigError(source, walk.issues)
    issues = [dataclasses.replace(i, line=walk.line_of(i.path)) for i in _cross_check(cfg)]
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
        data, lines = _parse_yaml(text, source)
    if overrides:
        data = apply_overrides(data, overrides, source)
    cfg = parse_config(data, source, lines)
    return cfg if path is None else _resolve_paths(cfg, Path(path).resolve().parent)


def apply_overrides(data: object, overrides: Sequence[str], source: str = "--set") -> object:
    """A copy of parsed YAML data with each `a.b.c=VALUE` set (sections created as needed)."""
    if not overrides or not isinstance(data, dict | None):
        return data  # a non-mapping top level is reported by parse_config
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
            return  # `prefill: 4` plus `prefill.replicas=2`: parse_config reports `prefill`
        node = node[name]
    node[keys[-1]] = value


def _parse_yaml(text: str, source: str) -> tuple[object, dict[str, int]]:
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
    if not isinstance(node, yaml.MappingNode) or prefix.count(".") > 8:  # deeper: not our schema
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        path, line = _join(prefix, key_node.value), key_node.start_mark.line + 1
        if path in out:
            dupes.append(Issue(path, f"duplicate key (lines {out[path]} and {line})", line))
        out[path] = line
        _key_lines(value_node, path, out, dupes)


def _resolve_paths(cfg: DeployConfig, base: Path) -> DeployConfig:
    def fix(p: str | None) -> str | None:
        return None if p is None else str(base / os.path.expanduser(p))  # absolute p wins

    model = dataclasses.replace(cfg.model, path=typing.cast(str, fix(cfg.model.path)))
    t = cfg.router.tls
    tls = dataclasses.replace(t, cert=fix(t.cert), key=fix(t.key), client_ca=fix(t.client_ca))
    return dataclasses.replace(cfg, model=model,
                               router=dataclasses.replace(cfg.router, tls=tls))


# ---------------------------------------------------------------- dumping and diffs


def _to_plain(value: object, hint: Any) -> object:
    sub = _section_type(hint)
    if sub is not None and value is not None:
        hints = typing.get_type_hints(sub)
        return {f.name: _to_plain(getattr(value, f.name), hints[f.name])
                for f in dataclasses.fields(sub)}
    if hint == FloatMap:
        return dict(typing.cast(FloatMap, value))
    if isinstance(value, tuple):
        return list(value)
    return value


_MISSING = object()


def diff_configs(old: DeployConfig, new: DeployConfig) -> list[str]:
    """Dotted key paths whose value differs (schema order), e.g. ['decode.replicas']."""
    out: list[str] = []
    _diff(old.to_dict(), new.to_dict(), "", out)
    return out


def _diff(a: object, b: object, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            _diff(a.get(key, _MISSING), b.get(key, _MISSING), _join(path, key), out)
    elif a != b:
        out.append(path)


# ---------------------------------------------------------------- reference table (docs/config.md)


def reference_table() -> str:
    """The markdown table of every key: type, default, meaning (docs/config.md embeds it)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += list(_rows(DeployConfig, ""))
    return "\n".join(rows) + "\n"


def _rows(cls: type, prefix: str) -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, hint, meta = _join(prefix, f.name), hints[f.name], f.metadata
        is_factory = f.default_factory is not dataclasses.MISSING
        shown = meta.get("shown") or ("" if is_factory else _md(_show_default(f.default, hint)))
        yield f"| `{path}` | {_type_name(hint, meta)} | {shown} | {meta['doc']} |"
        sub = _section_type(hint)
        if sub is not None:
            yield from _rows(sub, path)


def _show_default(default: object, hint: Any) -> str:
    value = _to_plain(default, hint)
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
        return f"mapping of str: float{_md(_bounds(meta))}"
    if origin is tuple:
        return f"list of {args[0].__name__}{_md(_bounds(meta))}"
    return f"{hint.__name__}{_md(_bounds(meta))}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


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
