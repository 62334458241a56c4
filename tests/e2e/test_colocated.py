"""Colocated mode, conditional disaggregation and CPU pinning, end to end through the real router.

Colocated: each replica is one engine doing both phases; the router prefills and decodes a request on
the same replica, which adopts the held KV (no transfer). Conditional disaggregation: a short prompt
is prefilled on the decode replica itself, a long one goes through the prefill pool and a KV pull.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from ray import serve

from deploy.config import ConfigError, DeployConfig, parse_config
from deploy.serve_app import DECODE_APP
from router.client import generate, get_status
from tests.e2e import running_cluster, small_config, wait_free
from tests.e2e.test_e2e_serving import NEW_TOKENS, _generate_all, _hf_tokens, _prompts

e2e = pytest.mark.usefixtures("ray_session")


def test_config_keys_parse_and_are_checked() -> None:
    cfg = parse_config({"serving_mode": "colocated", "decode": {"cpu_affinity": [0, 1],
                        "local_prefill_max_tokens": 64}, "prefill": {"cpu_affinity": [0]}}, "t")
    assert cfg.serving_mode == "colocated" and cfg.decode.cpu_affinity == (0, 1)
    assert cfg.prefill.cpu_affinity == (0,) and cfg.decode.local_prefill_max_tokens == 64
    assert parse_config(cfg.to_dict(), "t") == cfg
    with pytest.raises(ConfigError, match="serving_mode: expected one of 'disaggregated', 'colocated'"):
        parse_config({"serving_mode": "mixed"}, "t")
    with pytest.raises(ConfigError, match=r"decode.cpu_affinity\[1\]: expected an integer >= 0"):
        parse_config({"decode": {"cpu_affinity": [0, -1]}}, "t")
    with pytest.raises(ConfigError, match="decode.autoscaling: not supported with serving_mode: colocated"):
        parse_config({"serving_mode": "colocated", "decode": {"autoscaling": {}}}, "t")


def _config(path: Path, mode: str, **sections: dict[str, object]) -> DeployConfig:
    data = small_config(str(path), **sections).to_dict()
    return parse_config({**data, "serving_mode": mode}, "test")


def _local_stats() -> dict[str, int]:
    return serve.get_app_handle(DECODE_APP).local_stats.remote().result()


@e2e
def test_colocated_cluster_matches_transformers_without_transfers(
        hf_checkpoint: Callable[[str], Path]) -> None:
    path = hf_checkpoint("llama")
    prompts = _prompts()
    expected = [tuple(t) for t in _hf_tokens(path, prompts)]
    core = sorted(os.sched_getaffinity(0))[0]
    cfg = _config(path, "colocated", decode={"replicas": 2, "cpu_affinity": [core]})
    with running_cluster(cfg) as cl:
        status = get_status(cl.address)
        assert len(status.prefill.replicas) == len(status.decode.replicas) == 2
        assert {r.address for r in status.prefill.replicas} == {r.address for r in status.decode.replicas}
        assert _generate_all(cl.address, prompts) == expected  # a wrong replica could not decode
        assert all(r.kv_pulls == 0 for r in get_status(cl.address).decode.replicas)
        adopted = [serve.get_app_handle(DECODE_APP).local_stats.remote().result() for _ in range(8)]
        assert all(s["pulled"] == 0 for s in adopted) and any(s["adopted"] for s in adopted)
        assert serve.get_app_handle(DECODE_APP).cores.remote().result() == [[core]]
        wait_free(cl.address, within=2.0)


@e2e
def test_conditional_disaggregation_keeps_short_prompts_local(
        hf_checkpoint: Callable[[str], Path]) -> None:
    path = hf_checkpoint("llama")
    short, long = _prompts()[1], _prompts()[7]  # 7 and 50 tokens
    expected = [tuple(t) for t in _hf_tokens(path, [short, long])]
    cfg = _config(path, "disaggregated", prefill={"tensor_parallel_size": 1},
                  decode={"local_prefill_max_tokens": 16})
    with running_cluster(cfg) as cl:
        assert generate(cl.address, short, max_tokens=NEW_TOKENS, timeout=60).token_ids == expected[0]
        assert _local_stats() == {"adopted": 1, "pulled": 0}
        assert get_status(cl.address).decode.replicas[0].kv_pulls == 0
        assert generate(cl.address, long, max_tokens=NEW_TOKENS, timeout=60).token_ids == expected[1]
        assert _local_stats() == {"adopted": 1, "pulled": 1}
        wait_free(cl.address, within=2.0)
        status = get_status(cl.address)
        assert status.decode.replicas[0].kv_pulls == 1
        assert [r.address for r in status.prefill.replicas] != [r.address for r in status.decode.replicas]
