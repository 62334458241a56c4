"""Tensor parallelism end to end: TP decode replicas and replicated KV heads, through the real router,
Ray Serve pools (each replica a placement group of gloo ranks) and KV over UCX.

Oracle: transformers' greedy tokens on tiny checkpoints with 1, 2 and 4 KV heads (of 4 heads).
The default run has one representative case (prefill TP 2 -> decode TP 2 of a 1-KV-head model:
both pools replicate the head, decode ranks pull in parallel) and cancel / deadline on that
cluster; the full (prefill TP, decode TP) x KV heads matrix, int8 decode and a killed decode rank
are marked slow.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from pdserve.v1 import router_pb2_grpc

from router.client import build_request, generate, get_status
from router.registry import DECODE, PREFILL
from tests.checkpoints import load_hf_model, write_hf_checkpoint
from tests.e2e import RunningCluster, cancel_mid_stream, running_cluster, small_config, wait_free

pytestmark = pytest.mark.usefixtures("ray_session")

PROMPT_LENS = (3, 17, 33, 50)
NEW_TOKENS = 12
_HF: dict[Path, list[tuple[int, ...]]] = {}


@pytest.fixture(scope="module")
def kv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """kv_checkpoint(num_kv_heads) -> a llama checkpoint with 4 heads and that many KV heads."""
    cache: dict[int, Path] = {}

    def get(num_kv_heads: int) -> Path:
        if num_kv_heads not in cache:
            where = tmp_path_factory.mktemp(f"llama_kv{num_kv_heads}")
            cache[num_kv_heads] = write_hf_checkpoint(where, "llama", seed=num_kv_heads, num_kv_heads=num_kv_heads)
        return cache[num_kv_heads]

    return get


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_tokens(path: Path) -> list[tuple[int, ...]]:
    if path not in _HF:
        model = load_hf_model(path)
        with torch.no_grad():
            _HF[path] = [tuple(model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS)
                               [0, len(p):].tolist()) for p in _prompts()]
    return _HF[path]


def _config(path: Path, prefill_tp: int, decode_tp: int, kv: dict[str, object] | None = None,
            **decode: object) -> object:
    return small_config(str(path), prefill={"tensor_parallel_size": prefill_tp},
                        decode={"tensor_parallel_size": decode_tp, **decode},
                        kv_transfer={"lease_seconds": 5, **(kv or {})})


def _check_tp_sizes(address: str, prefill_tp: int, decode_tp: int) -> None:
    st = get_status(address)
    assert [r.tp_size for r in st.prefill.replicas] == [prefill_tp]
    assert [r.tp_size for r in st.decode.replicas] == [decode_tp]


def _greedy_matches(cl: RunningCluster, path: Path, prefill_tp: int, decode_tp: int) -> None:
    _check_tp_sizes(cl.address, prefill_tp, decode_tp)
    got = [generate(cl.address, p, max_tokens=NEW_TOKENS, timeout=120).token_ids for p in _prompts()]
    assert got == _hf_tokens(path)
    wait_free(cl.address, within=10.0)


@pytest.fixture(scope="module")
def kv1_tp2_tp2(kv_checkpoint: Callable[[int], Path]) -> Iterator[RunningCluster]:
    with running_cluster(_config(kv_checkpoint(1), 2, 2)) as cl:  # type: ignore[arg-type]
        yield cl


def test_decode_tp2_of_replicated_head_matches_transformers(kv1_tp2_tp2: RunningCluster,
                                                            kv_checkpoint: Callable[[int], Path]) -> None:
    _greedy_matches(kv1_tp2_tp2, kv_checkpoint(1), 2, 2)


def test_cancel_and_deadline_with_tp2_decode_free_every_block(kv1_tp2_tp2: RunningCluster) -> None:
    prompt = _prompts()[3]
    cancel_mid_stream(kv1_tp2_tp2.address, prompt)
    wait_free(kv1_tp2_tp2.address, within=10.0)
    with pytest.raises(grpc.RpcError) as err:
        generate(kv1_tp2_tp2.address, prompt, max_tokens=400, ignore_eos=True, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_free(kv1_tp2_tp2.address, within=10.0)


MATRIX = [(kv, p, d) for kv in (1, 2, 4) for p, d in ((1, 2), (2, 2), (2, 1), (4, 2)) if (kv, p, d) != (1, 2, 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("num_kv_heads", "prefill_tp", "decode_tp"), MATRIX)
def test_tp_matrix_matches_transformers(kv_checkpoint: Callable[[int], Path], num_kv_heads: int,
                                        prefill_tp: int, decode_tp: int) -> None:
    path = kv_checkpoint(num_kv_heads)
    with running_cluster(_config(path, prefill_tp, decode_tp)) as cl:  # type: ignore[arg-type]
        _greedy_matches(cl, path, prefill_tp, decode_tp)


@pytest.mark.slow
def test_streamed_kv_over_the_ucx_payload_to_tp2_decode(kv_checkpoint: Callable[[int], Path]) -> None:
    """Chunk-wise KV streaming, payload sent over UCX (no same-host read), prefill TP 4 -> decode
    TP 2 of a 2-KV-head model: every decode rank pulls each chunk of its head while prefill goes on."""
    path = kv_checkpoint(2)
    kv = {"streaming": True, "same_host_read": False}
    with running_cluster(_config(path, 4, 2, kv)) as cl:  # type: ignore[arg-type]
        _greedy_matches(cl, path, 4, 2)


@pytest.mark.slow
def test_int8_decode_tp2_keeps_first_token_and_completes(kv_checkpoint: Callable[[int], Path]) -> None:
    path = kv_checkpoint(2)
    with running_cluster(_config(path, 2, 2, quantization="int8")) as cl:  # type: ignore[arg-type]
        _check_tp_sizes(cl.address, 2, 2)
        for prompt, ref in zip(_prompts(), _hf_tokens(path), strict=True):
            done = generate(cl.address, prompt, max_tokens=NEW_TOKENS, ignore_eos=True, timeout=120)
            assert done.token_ids[0] == ref[0]
            assert len(done.token_ids) == NEW_TOKENS and done.finish_reason == "length"
        wait_free(cl.address, within=10.0)


def _tcp_pairs() -> dict[str, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of every established TCP socket (/proc/net/tcp*)."""
    pairs = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01":  # ESTABLISHED
                pairs[f[9]] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    return pairs


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def _follower_pids(address: str) -> list[int]:
    """Pids of the DecodeRank actors connected (gloo) to the decode replica serving `address`."""
    from tests.e2e.test_reliability_e2e import pid_listening_on

    pairs = _tcp_pairs()
    rank0 = pid_listening_on(address)
    ours = {pairs[i] for i in _socket_inodes(rank0) if i in pairs}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == rank0:
            continue
        try:
            if b"DecodeRank" not in (proc / "cmdline").read_bytes():
                continue
        except OSError:
            continue
        theirs = {pairs[i] for i in _socket_inodes(int(proc.name)) if i in pairs}
        if any((b, a) in ours for a, b in theirs):  # the two ends of one connection
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_killed_decode_rank_fails_over_and_frees_blocks(kv_checkpoint: Callable[[int], Path]) -> None:
    """kill -9 of a TP-2 decode replica's rank 1 mid-stream: the request migrates to the other
    decode replica with the same greedy output; every block is free afterwards."""
    path = kv_checkpoint(2)
    cfg = small_config(str(path), prefill={"tensor_parallel_size": 1},
                       decode={"tensor_parallel_size": 2, "replicas": 2}, kv_transfer={"lease_seconds": 5})
    with running_cluster(cfg) as cl:
        registry, deadline = cl.cluster.router.registry, time.monotonic() + 120
        while len(registry.ready(PREFILL)) < 1 or len(registry.ready(DECODE)) < 2:
            assert time.monotonic() < deadline, "pools not ready"
            time.sleep(0.2)
        prompt = _prompts()[1]
        expected = generate(cl.address, prompt, max_tokens=300, ignore_eos=True, timeout=120).token_ids
        got: list[int] = []
        killed = False
        with grpc.insecure_channel(cl.address) as ch:
            stream = router_pb2_grpc.RouterStub(ch).Generate(
                build_request(prompt, max_tokens=300, ignore_eos=True), timeout=120)
            for message in stream:
                got.extend(message.token_ids)
                if not killed and len(got) > 4:  # several decode steps in: past the pull
                    serving = [r for r in cl.cluster.router.registry.ready(DECODE) if r.open_streams]
                    assert len(serving) == 1
                    victims = _follower_pids(serving[0].address)
                    assert victims, "no follower rank found"
                    os.kill(victims[0], signal.SIGKILL)
                    killed = True
        assert killed and tuple(got) == tuple(expected)
        wait_free(cl.address, within=30.0)


@pytest.mark.slow
def test_tp2_decode_pool_applies_autoscales_and_drains(kv_checkpoint: Callable[[int], Path], tmp_path: Path) -> None:
    """`pdserve apply` raises a TP-2 decode pool's max_replicas under load: it grows to two TP-2
    replicas; without load it drains back to one; no request fails and every block ends free."""
    from deploy.apply import apply
    from tests.e2e.test_apply import _write
    from tests.e2e.test_autoscale import (
        HEARTBEAT,
        SCALE_DOWN_WITHIN,
        SCALE_UP_WITHIN,
        Load,
        _wait_for,
    )

    cfg = small_config(str(kv_checkpoint(2)), router={"heartbeat_seconds": HEARTBEAT},
                       prefill={"tensor_parallel_size": 1},
                       decode={"tensor_parallel_size": 2, "num_kv_blocks": 128, "max_num_seqs": 4,
                               "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target": 0.5,
                                               "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}})
    with running_cluster(cfg) as cl:
        load = Load(cl.address, prompt_len=8, max_tokens=60, threads=6).start()
        try:
            path = _write(tmp_path / "new.yaml", cl.cluster.cfg, decode__autoscaling__max_replicas=2)
            assert apply(str(path), timeout=120) == 0
            _wait_for(cl.address, (1, 2), SCALE_UP_WITHIN, [])
            assert [r.tp_size for r in get_status(cl.address).decode.replicas] == [2, 2]
        finally:
            load.stop()
        assert not load.errors, f"{len(load.errors)} requests failed: {load.errors[:3]}"
        _wait_for(cl.address, (1, 1), SCALE_DOWN_WITHIN + 60, [])
        wait_free(cl.address, within=30.0)
