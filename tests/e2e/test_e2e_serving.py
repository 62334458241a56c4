"""End to end through the real router, Ray Serve pools, TP over gloo and KV over UCX."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from router.client import build_request, generate, get_status
from tests.checkpoints import EOS_ID, load_hf_model
from tests.e2e import (
    RunningCluster,
    cancel_mid_stream,
    running_cluster,
    small_config,
    wait_free,
)

pytestmark = pytest.mark.usefixtures("ray_session")

PROMPT_LENS = (3, 7, 12, 17, 24, 33, 41, 50)
NEW_TOKENS = 16


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_tokens(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = load_hf_model(path)
    out = []
    for prompt in prompts:
        with torch.no_grad():
            seq = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
        out.append(seq[0, len(prompt):].tolist())
    return out


def _generate_all(address: str, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = pool.map(lambda p: generate(address, p, max_tokens=NEW_TOKENS, timeout=120), prompts)
        return [c.token_ids for c in done]




def _wait_leased(address: str, within: float = 2.0) -> int:
    start = time.monotonic()
    while time.monotonic() - start < within:
        leased = get_status(address).prefill.replicas[0].kv_blocks_leased
        if leased:
            return leased
        time.sleep(0.05)
    return 0


@pytest.fixture(scope="module")
def llama(hf_checkpoint: Callable[[str], Path]) -> Path:
    return hf_checkpoint("llama")


@pytest.fixture(scope="module")
def tp2(llama: Path) -> Iterator[RunningCluster]:
    cfg = small_config(str(llama), kv_transfer={"lease_seconds": 3})
    with running_cluster(cfg) as cl:
        yield cl


def test_prefill_tp2_decode_tp1_matches_transformers(tp2: RunningCluster, llama: Path) -> None:
    prompts = _prompts()
    expected = [tuple(t) for t in _hf_tokens(llama, prompts)]
    assert _generate_all(tp2.address, prompts) == expected
    wait_free(tp2.address, within=2.0)


def test_stream_is_incremental_with_usage_and_finish_reasons(tp2: RunningCluster) -> None:
    prompt = _prompts()[2]
    with grpc.insecure_channel(tp2.address) as ch:
        stream = router_pb2_grpc.RouterStub(ch).Generate(build_request(prompt, max_tokens=12, ignore_eos=True))
        messages = list(stream)
    assert len(messages) >= 2  # the first token travels before decoding finishes
    assert len(messages[0].token_ids) == 1
    assert sum(len(m.token_ids) for m in messages) == 12
    last = messages[-1]
    assert last.finish_reason == router_pb2.LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 12)
    assert all(m.finish_reason == router_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])


def test_stop_string_and_eos_finish_with_stop(tp2: RunningCluster) -> None:
    prompt = _prompts()[3]
    full = generate(tp2.address, prompt, max_tokens=12, ignore_eos=True, timeout=60)
    stop = full.text[len(full.text) // 2:][:3]
    if stop.strip():
        cut = generate(tp2.address, prompt, max_tokens=12, ignore_eos=True, stop=[stop], timeout=60)
        assert cut.finish_reason == "stop"
        assert stop not in cut.text and full.text.startswith(cut.text)
    eos_prompt = next((p for p in _prompts() if EOS_ID in generate(tp2.address, p, max_tokens=NEW_TOKENS).token_ids), None)
    if eos_prompt is not None:
        done = generate(tp2.address, eos_prompt, max_tokens=NEW_TOKENS, timeout=60)
        assert done.finish_reason == "stop" and done.token_ids[-1] == EOS_ID


def test_cancel_mid_stream_frees_every_block_within_1s(tp2: RunningCluster) -> None:
    cancel_mid_stream(tp2.address, _prompts()[7])
    assert wait_free(tp2.address, within=1.0) <= 1.0


def test_deadline_exceeded_frees_blocks(tp2: RunningCluster) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(tp2.address, _prompts()[7], max_tokens=400, ignore_eos=True, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_free(tp2.address, within=2.0)


def test_lease_expires_when_decode_never_pulls(tp2: RunningCluster) -> None:
    replica = get_status(tp2.address).prefill.replicas[0]
    with grpc.insecure_channel(replica.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        sampling = worker_pb2.WorkerSampling(max_tokens=4, top_p=1.0, top_k=-1)
        reply = stub.Prefill(worker_pb2.PrefillRequest(
            request_id="never-pulled", prompt_token_ids=_prompts()[5], sampling=sampling), timeout=30)
    assert len(reply.kv.shards) == 2 and reply.kv.shards[0].block_ids
    assert _wait_leased(tp2.address) == len(reply.kv.shards[0].block_ids)
    wait_free(tp2.address, within=3.0 + 2.0)  # the lease is 3 s


def test_injected_transfer_failure_gives_clear_status_and_frees_blocks(tp2: RunningCluster) -> None:
    from ray import serve

    from deploy.serve_app import PREFILL_APP

    serve.get_app_handle(PREFILL_APP).fail_next_pulls.remote(1).result()
    with pytest.raises(grpc.RpcError) as err:
        generate(tp2.address, _prompts()[4], max_tokens=8, timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "transfer" in (err.value.details() or "").lower()
    wait_free(tp2.address, within=2.0)
    assert len(generate(tp2.address, _prompts()[4], max_tokens=8, timeout=60).token_ids) == 8


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_invalid_arguments_name_the_field(tp2: RunningCluster, sampling: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(tp2.address, [1, 2, 3], timeout=10, **sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    assert len(generate(tp2.address, [1, 2, 3], max_tokens=2, timeout=30).token_ids) == 2


def test_health_serving_with_both_pools(tp2: RunningCluster) -> None:
    with grpc.insecure_channel(tp2.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_prefill_tp1_matches_transformers(hf_checkpoint: Callable[[str], Path]) -> None:
    path = hf_checkpoint("qwen2")
    prompts = _prompts()
    expected = [tuple(t) for t in _hf_tokens(path, prompts)]
    cfg = small_config(str(path), prefill={"tensor_parallel_size": 1})
    with running_cluster(cfg) as cl:
        with grpc.insecure_channel(cl.address) as ch:  # NOT_SERVING never leaks into a started cluster
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert _generate_all(cl.address, prompts) == expected
        wait_free(cl.address, within=2.0)
