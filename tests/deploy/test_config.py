"""deploy/config.py: YAML -> frozen dataclasses, with one precise error line per problem; the worker
configs built from them (deploy/serve_app.py, deploy/colocated_app.py)."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from deploy.colocated_app import colocated_worker_config
from deploy.config import (
    DEFAULT_MODEL_DIR,
    ConfigError,
    DecodeAutoscaling,
    DeployConfig,
    PrefillAutoscaling,
    apply_overrides,
    check_against_model,
    diff_configs,
    load_config,
    parse_config,
    reference_table,
)
from deploy.config import main as config_main
from deploy.serve_app import decode_worker_config, prefill_worker_config
from engine.config import EngineConfig
from router.config import RouterConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
ROUTER_KEYS = ("host, port, internal_host, max_inflight, max_queued_prompt_tokens, "
               "default_max_tokens, heartbeat_seconds, api_keys, tls, http, metrics_port, migration")


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write config.yaml in a temp cwd and return its name, so errors read `config.yaml: ...`."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str) -> str:
        (tmp_path / "config.yaml").write_text(text)
        return "config.yaml"
    return _write


# (YAML text, the exact error it must produce)
BAD = [
    # unknown keys
    ("decode:\n  quantizaton: int8\n",
     "config.yaml: decode.quantizaton: unknown key (did you mean 'quantization'?)"),
    ("router:\n  colour: red\n",
     f"config.yaml: router.colour: unknown key (valid keys in 'router': {ROUTER_KEYS})"),
    ("prefill:\n  block_size: 32\n",
     "config.yaml: prefill.block_size: unknown key (did you mean 'model.block_size'?)"),
    ("tensor_parallel_size: 2\n",
     "config.yaml: tensor_parallel_size: unknown key (did you mean 'prefill.tensor_parallel_size' "
     "or 'decode.tensor_parallel_size'?)"),
    ("modle:\n  dtype: float32\n", "config.yaml: modle: unknown key (did you mean 'model'?)"),
    ("prefill:\n  autoscaling:\n    min_replica: 1\n",
     "config.yaml: prefill.autoscaling.min_replica: unknown key (did you mean 'min_replicas'?)"),
    # wrong types
    ("router:\n  port: http\n",
     "config.yaml: router.port: expected an integer between 0 and 65535, got 'http'"),
    ("router:\n  port: null\n",
     "config.yaml: router.port: expected an integer between 0 and 65535, got null"),
    ("prefill:\n  replicas: 1.5\n", "config.yaml: prefill.replicas: expected an integer >= 1, got 1.5"),
    ("decode:\n  replicas: yes\n", "config.yaml: decode.replicas: expected an integer >= 1, got true"),
    ("kv_transfer:\n  timeout_seconds: 10s\n",
     "config.yaml: kv_transfer.timeout_seconds: expected a number > 0, got '10s'"),
    ("router:\n  heartbeat_seconds: .inf\n",
     "config.yaml: router.heartbeat_seconds: expected a finite number, got inf"),
    ("router:\n  api_keys: secret\n", "config.yaml: router.api_keys: expected a list, got 'secret'"),
    ("router:\n  api_keys: [ok, 3]\n", "config.yaml: router.api_keys[1]: expected a string, got 3"),
    ("model:\n  path: 7\n", "config.yaml: model.path: expected a string, got 7"),
    ("model:\n  path: ''\n", "config.yaml: model.path: expected a non-empty string, got ''"),
    ("ray:\n  address: ' '\n", "config.yaml: ray.address: expected a non-empty string, got ' '"),
    ("prefill:\n  resources:\n    custom: [gpu_a]\n",
     "config.yaml: prefill.resources.custom: expected a mapping of name: number, got a list"),
    # out of range
    ("router:\n  port: 70000\n",
     "config.yaml: router.port: expected an integer between 0 and 65535, got 70000"),
    ("kv_transfer:\n  lease_seconds: -1\n",
     "config.yaml: kv_transfer.lease_seconds: expected a number > 0, got -1"),
    ("kv_transfer:\n  lease_seconds: 0.0\n",
     "config.yaml: kv_transfer.lease_seconds: expected a number > 0, got 0.0"),
    ("decode:\n  autoscaling:\n    target: 1.5\n",
     "config.yaml: decode.autoscaling.target: expected a number > 0 and <= 1, got 1.5"),
    ("prefill:\n  resources:\n    custom: {gpu_a: -1}\n",
     "config.yaml: prefill.resources.custom.gpu_a: expected a number >= 0, got -1"),
    ("decode:\n  max_num_seqs: 0\n", "config.yaml: decode.max_num_seqs: expected an integer >= 1, got 0"),
    # bad enums
    ("prefill:\n  tensor_parallel_size: 3\n",
     "config.yaml: prefill.tensor_parallel_size: expected one of 1, 2, 4, 8, got 3"),
    ("prefill:\n  tensor_parallel_size: '2'\n",
     "config.yaml: prefill.tensor_parallel_size: expected one of 1, 2, 4, 8, got '2'"),
    ("decode:\n  quantization: int4\n",
     "config.yaml: decode.quantization: expected one of 'none', 'int8', 'fp8', got 'int4'"),
    ("model:\n  dtype: fp16\n",
     "config.yaml: model.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'fp16'"),
    ("decode:\n  device: tpu\n", "config.yaml: decode.device: expected one of 'cpu', 'cuda', got 'tpu'"),
    # bad nesting
    ("prefill: 4\n", "config.yaml: prefill: expected a mapping, got 4"),
    ("prefill:\n  - tensor_parallel_size: 2\n", "config.yaml: prefill: expected a mapping, got a list"),
    ("prefill:\n  resources: 2\n", "config.yaml: prefill.resources: expected a mapping, got 2"),
    ("decode:\n  autoscaling: true\n", "config.yaml: decode.autoscaling: expected a mapping, got true"),
    # YAML syntax errors, with the line
    ("prefill:\n  replicas: [1\n",
     "config.yaml: line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>' "
     "(while parsing a flow sequence started at line 2)"),
    ("prefill:\n\treplicas: 2\n",
     "config.yaml: line 2, column 1: invalid YAML: found character '\\t' that cannot start any token"),
    ("router:\n  port: 1\n  host: a: b\n",
     "config.yaml: line 3, column 10: invalid YAML: mapping values are not allowed here"),
    ("prefill:\n  replicas: 1\n  replicas: 2\n",
     "config.yaml: prefill.replicas: duplicate key (lines 2 and 3)"),
    # top level not a mapping
    ("- model\n- router\n", "config.yaml: top level: expected a mapping, got a list"),
    ("just words\n", "config.yaml: top level: expected a mapping, got 'just words'"),
    # cross-field checks
    ("decode:\n  quantization: fp8\n",
     "config.yaml: decode.quantization: fp8 needs a Hopper/Ada GPU (decode.device: cuda) and "
     "cannot run on CPU; use int8 or none"),
    ("decode:\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n",
     "config.yaml: decode.autoscaling: min_replicas (3) must be <= max_replicas (2)"),
    ("prefill:\n  replicas: 5\n  autoscaling: {}\n",
     "config.yaml: prefill.replicas: must be between autoscaling.min_replicas and "
     "autoscaling.max_replicas (1 <= replicas <= 4), got 5"),
    ("prefill:\n  device: cuda\n",
     "config.yaml: prefill.resources.num_gpus: prefill.device is cuda but num_gpus is 0, so Ray "
     "would give the ranks no GPU; set num_gpus: 1"),
    ("router:\n  tls: {key: k.pem}\n", "config.yaml: router.tls: cert and key must be set together"),
    ("router:\n  tls: {client_ca: ca.pem}\n",
     "config.yaml: router.tls.client_ca: client certificates need TLS: set cert and key"),
    ("model:\n  max_model_len: 100000\n",
     "config.yaml: prefill.num_kv_blocks: 1024 blocks of 16 tokens cannot hold one request of "
     "model.max_model_len = 100000 tokens; need at least 6250\n"
     "config.yaml: decode.num_kv_blocks: 2048 blocks of 16 tokens cannot hold one request of "
     "model.max_model_len = 100000 tokens; need at least 6250"),
    # several problems are reported together
    ("prefill:\n  tensor_parallel_size: 3\n  replica: 2\ndecode:\n  num_kv_blocks: -5\n",
     "config.yaml: prefill.tensor_parallel_size: expected one of 1, 2, 4, 8, got 3\n"
     "config.yaml: prefill.replica: unknown key (did you mean 'replicas'?)\n"
     "config.yaml: decode.num_kv_blocks: expected an integer >= 1, got -5"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e.split(": ", 2)[1] for _, e in BAD])
def test_malformed_config_gives_precise_error(write, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(text))
    assert str(info.value) == expected


def test_error_carries_issues_with_lines(write) -> None:
    text = "model:\n  dtype: float32\ndecode:\n  replicas: 1\n  quantizaton: int8\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(text))
    (issue,) = info.value.issues
    assert (issue.path, issue.line) == ("decode.quantizaton", 5)
    assert isinstance(info.value, ValueError) and info.value.source == "config.yaml"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: cannot read the file: No such file"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "null\n"])
def test_empty_file_is_defaults(write, text: str) -> None:
    assert load_config(write(text)) == DeployConfig()


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == DeployConfig() == parse_config({}, "x") == parse_config(None, "x")
    assert cfg.model.path == DEFAULT_MODEL_DIR and Path(DEFAULT_MODEL_DIR).parent.name == "engine"
    assert (cfg.model.dtype, cfg.model.block_size, cfg.model.max_model_len) == ("float32", 16, None)
    assert (cfg.router.host, cfg.router.port, cfg.router.api_keys) == ("127.0.0.1", 50051, ())
    assert cfg.router.tls.cert is None and cfg.router.heartbeat_seconds == 1.0
    assert (cfg.prefill.tensor_parallel_size, cfg.prefill.replicas, cfg.prefill.device) == (2, 1, "cpu")
    assert cfg.prefill.resources.num_cpus == 0.5 and cfg.prefill.autoscaling is None
    assert (cfg.decode.tensor_parallel_size, cfg.decode.quantization) == (1, "none")
    assert cfg.decode.num_kv_blocks == 2048 and cfg.decode.autoscaling is None
    assert (cfg.kv_transfer.backend, cfg.kv_transfer.lease_seconds) == ("ucx", 30.0)
    assert (cfg.ray.address, cfg.ray.namespace) == (None, "pdserve")


def test_null_section_is_defaults_but_null_autoscaling_is_off(write) -> None:
    cfg = load_config(write("prefill:\ndecode:\n  autoscaling: {}\n"))
    assert cfg.prefill == DeployConfig().prefill
    assert cfg.decode.autoscaling == DecodeAutoscaling()
    cfg = load_config(write("prefill:\n  autoscaling: {max_replicas: 3, target: 100}\n"))
    assert cfg.prefill.autoscaling == PrefillAutoscaling(max_replicas=3, target=100)
    assert load_config(write("decode:\n  autoscaling: null\n")).decode.autoscaling is None


def test_values_are_typed_and_frozen(write) -> None:
    cfg = load_config(write(
        "kv_transfer:\n  lease_seconds: 5\nprefill:\n  resources: {num_gpus: 1, custom: {b: 2, a: 1}}\n"
        "  device: cuda\nrouter:\n  api_keys: [k1, k2]\n"))
    assert type(cfg.kv_transfer.lease_seconds) is float and cfg.kv_transfer.lease_seconds == 5.0
    assert cfg.prefill.resources.custom == (("a", 1.0), ("b", 2.0))
    assert cfg.prefill.resources.ray_resources() == {"a": 1.0, "b": 2.0}
    assert cfg.router.api_keys == ("k1", "k2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prefill.replicas = 3  # type: ignore[misc]
    assert hash(cfg) == hash(parse_config(cfg.to_dict(), "again"))
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Ray ships it to actors (control plane only)


def test_relative_paths_resolve_against_the_yaml_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "c.yaml"
    path.write_text("model:\n  path: ../models/tiny\nrouter:\n  tls: {cert: c.pem, key: /abs/k.pem}\n")
    cfg = load_config(str(path))
    assert Path(cfg.model.path).resolve() == (tmp_path / "models" / "tiny").resolve()
    assert cfg.router.tls.cert == str(tmp_path / "conf" / "c.pem")
    assert cfg.router.tls.key == "/abs/k.pem"


def test_every_example_loads_and_round_trips() -> None:
    assert {p.name for p in EXAMPLES} == {"local-cpu.yaml", "one-node-8gpu.yaml", "multi-node.yaml"}
    for path in EXAMPLES:
        cfg = load_config(str(path))
        assert parse_config(cfg.to_dict(), "dict") == cfg
        assert parse_config(yaml.safe_load(cfg.to_yaml()), "yaml") == cfg
        assert diff_configs(cfg, cfg) == []


def test_example_8gpu_layout() -> None:
    cfg = load_config(str(REPO / "deploy" / "examples" / "one-node-8gpu.yaml"))
    p, d = cfg.prefill, cfg.decode
    assert (p.tensor_parallel_size, p.replicas, p.device) == (4, 1, "cuda")
    assert (d.tensor_parallel_size, d.replicas, d.quantization, d.device) == (1, 4, "int8", "cuda")
    gpus = p.tensor_parallel_size * p.replicas + d.tensor_parallel_size * d.replicas
    assert gpus * p.resources.num_gpus == 8
    assert p.resources.ray_resources() == {"pd_prefill": 1.0}
    assert d.resources.ray_resources() == {"pd_decode": 1.0}


def test_local_cpu_example_runs_on_cpu() -> None:
    cfg = load_config(str(REPO / "deploy" / "examples" / "local-cpu.yaml"))
    assert cfg.prefill.device == cfg.decode.device == "cpu" and cfg.ray.address is None
    assert cfg.model.path == DEFAULT_MODEL_DIR


def test_round_trip_defaults_and_changes() -> None:
    cfg = DeployConfig()
    assert parse_config(cfg.to_dict(), "d") == cfg
    data = cfg.to_dict()
    data["decode"]["replicas"] = 3
    data["decode"]["autoscaling"] = {"max_replicas": 6}
    data["prefill"]["resources"]["custom"] = {"prefill_node": 0.5}
    data["router"]["api_keys"] = ["k"]
    new = parse_config(data, "d")
    assert new.decode.replicas == 3 and new.decode.autoscaling == DecodeAutoscaling(max_replicas=6)
    assert diff_configs(cfg, new) == [
        "router.api_keys", "prefill.resources.custom.prefill_node", "decode.replicas",
        "decode.autoscaling"]
    assert diff_configs(new, cfg) == [
        "router.api_keys", "prefill.resources.custom.prefill_node", "decode.replicas",
        "decode.autoscaling"]
    newer = parse_config({"decode": {"replicas": 3, "autoscaling": {"max_replicas": 5}}}, "d")
    assert diff_configs(new, newer)[-1] == "decode.autoscaling.max_replicas"


def test_check_against_model() -> None:
    cfg = parse_config({"prefill": {"tensor_parallel_size": 4}}, "c.yaml")
    resolved = check_against_model(cfg, num_kv_heads=8, max_pos=4096)
    assert resolved.model.max_model_len == 4096 and resolved.prefill == cfg.prefill
    assert check_against_model(cfg, num_kv_heads=2, max_pos=4096, num_heads=8).prefill == cfg.prefill
    assert check_against_model(cfg, num_kv_heads=1, max_pos=4096, num_heads=4).prefill == cfg.prefill
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, num_kv_heads=6, max_pos=4096, source="c.yaml", num_heads=12)
    assert str(info.value) == ("c.yaml: prefill.tensor_parallel_size: 4 neither divides the model's "
                               "6 KV heads nor is a multiple of them (replicated KV heads)")
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, num_kv_heads=2, max_pos=4096, source="c.yaml", num_heads=6)
    assert str(info.value) == ("c.yaml: prefill.tensor_parallel_size: 4 does not divide the "
                               "model's 6 attention heads")
    decode = parse_config({"decode": {"tensor_parallel_size": 8}}, "c.yaml")
    with pytest.raises(ConfigError, match="c.yaml: decode.tensor_parallel_size: 8 does not divide"):
        check_against_model(decode, num_kv_heads=2, max_pos=4096, source="c.yaml", num_heads=4)
    long = parse_config({"model": {"max_model_len": 8192}}, "c.yaml")
    with pytest.raises(ConfigError) as info:
        check_against_model(long, num_kv_heads=8, max_pos=4096, source="c.yaml")
    assert str(info.value) == ("c.yaml: model.max_model_len: 8192 exceeds the model's "
                               "max_position_embeddings (4096)")
    with pytest.raises(ConfigError, match="prefill.num_kv_blocks: 1024 blocks of 16 tokens cannot"):
        check_against_model(cfg, num_kv_heads=8, max_pos=131072)


def test_docs_table_is_current() -> None:
    """docs/config.md embeds reference_table(); regenerate with `python -m deploy.config --table`."""
    doc = (REPO / "docs" / "config.md").read_text()
    assert reference_table() in doc
    rows = [r for r in reference_table().splitlines()[2:]]
    assert len(rows) == 72 and all(r.count(" | ") >= 3 and not r.endswith("|  |") for r in rows)


def test_overrides_apply_on_top_of_the_file(write) -> None:
    path = write("prefill:\n  replicas: 1\ndecode:\n")
    cfg = load_config(path, ["prefill.replicas=3", "decode.quantization=int8",
                             "router.api_keys=[a, b]", "prefill.autoscaling={max_replicas: 5}",
                             "ray.address=null"])
    assert cfg.prefill.replicas == 3 and cfg.decode.quantization == "int8"
    assert cfg.router.api_keys == ("a", "b") and cfg.ray.address is None
    assert cfg.prefill.autoscaling == PrefillAutoscaling(max_replicas=5)
    assert load_config(None, ["router.port=0"]).router.port == 0
    assert apply_overrides({"a": 1}, ["b.c=2"]) == {"a": 1, "b": {"c": 2}}
    with pytest.raises(ConfigError) as info:
        load_config(path, ["decode.quantizaton=int8"])
    assert str(info.value) == ("config.yaml: decode.quantizaton: unknown key "
                               "(did you mean 'quantization'?)")
    with pytest.raises(ConfigError, match=r"override 'prefill\.replicas': expected KEY=VALUE"):
        load_config(path, ["prefill.replicas"])


def test_anchors_and_merge_keys(write) -> None:
    text = ("prefill:\n  device: cuda\n  resources: &gpu {num_cpus: 2, num_gpus: 1}\n"
            "decode:\n  device: cuda\n  resources: {<<: *gpu, num_cpus: 4}\n")
    cfg = load_config(write(text))
    assert (cfg.prefill.resources.num_cpus, cfg.prefill.resources.num_gpus) == (2.0, 1.0)
    assert (cfg.decode.resources.num_cpus, cfg.decode.resources.num_gpus) == (4.0, 1.0)
    with pytest.raises(ConfigError, match="prefill.resources: expected a mapping, got a list"):
        load_config(write("prefill: &p\n  resources: [*p]\n"))  # recursive alias terminates


def test_odd_keys_are_reported_not_crashed(write) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write("1: x\nprefill:\n  resources:\n    custom: {1: 2, a: 1}\n"))
    assert str(info.value).splitlines() == [
        "config.yaml: 1: unknown key (valid top-level keys: serving_mode, model, router, prefill, "
        "decode, kv_transfer, ray)",
        "config.yaml: prefill.resources.custom: expected a string, got 1"]


def test_defaults_fit_the_default_model() -> None:
    # engine/default_model/train.py: num_kv_heads=4, max_positions=512
    cfg = check_against_model(DeployConfig(), num_kv_heads=4, max_pos=512)
    assert cfg.model.max_model_len == 512
    local = load_config(str(REPO / "deploy" / "examples" / "local-cpu.yaml"))
    assert check_against_model(local, num_kv_heads=4, max_pos=512).model.max_model_len == 512


def test_command_line_check(write, capsys: pytest.CaptureFixture[str]) -> None:
    assert config_main([write("decode:\n  replicas: 2\n")]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"]["replicas"] == 2
    assert config_main([write("decode:\n  replicas: 0\n")]) == 2
    assert capsys.readouterr().err == (
        "config.yaml: decode.replicas: expected an integer >= 1, got 0\n")
    assert config_main(["--table"]) == 0 and capsys.readouterr().out == reference_table()


def test_yaml_defaults_are_the_runtime_configs_defaults() -> None:
    cfg, engine = DeployConfig(), EngineConfig("m")
    router = RouterConfig(vocab_size=1, context_len=1)
    assert (cfg.model.block_size, cfg.model.dtype, cfg.prefill.max_num_batched_tokens) == (
        engine.block_size, engine.dtype, engine.max_num_batched_tokens) == (16, "float32", 512)
    assert (cfg.decode.max_num_seqs, cfg.decode.quantization, cfg.decode.device) == (
        engine.max_num_seqs, engine.quantization, engine.device)
    assert cfg.router.heartbeat_seconds == router.heartbeat_seconds == 1.0
    assert (cfg.router.port, cfg.router.max_inflight, cfg.router.default_max_tokens) == (
        router.port, router.max_inflight, router.default_max_tokens)


def test_worker_configs_embed_the_engine_they_pass_on() -> None:
    cfg = parse_config({"model": {"block_size": 8, "dtype": "bfloat16"},
                        "prefill": {"max_num_batched_tokens": 64, "num_kv_blocks": 100},
                        "decode": {"quantization": "int8", "max_num_seqs": 8, "num_kv_blocks": 300},
                        "router": {"heartbeat_seconds": 2.0}}, "x")
    prefill, decode = prefill_worker_config(cfg, "r:1"), decode_worker_config(cfg, "r:1")
    model = cfg.model.path
    assert prefill.engine == EngineConfig(model, dtype="bfloat16", block_size=8, num_blocks=100,
                                          max_num_batched_tokens=64)
    assert decode.engine == EngineConfig(model, dtype="bfloat16", block_size=8, num_blocks=300,
                                         max_num_seqs=8, quantization="int8")
    assert prefill.heartbeat_seconds == decode.heartbeat_seconds == 2.0
    colocated = colocated_worker_config(cfg, "r:1").decode  # decodes, and prefills in 64-token chunks
    assert colocated.engine == dataclasses.replace(decode.engine, max_num_batched_tokens=64)
