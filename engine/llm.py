"""Offline batch generation: ``LLM(model).generate(prompts, params)``.

With ``tensor_parallel_size > 1`` the LLM starts one process per extra rank (torch.multiprocessing
spawn), joins them in a gloo group through a TCPStore on a free loopback port, and stops them on
``shutdown()`` (also called by the context manager and at interpreter exit). The TP group is
this process's default torch.distributed group, so one TP LLM may live per process at a time.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import BLOCK_SIZE, DTYPES, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, load_config
from engine.distributed import run_follower
from engine.engine import EngineConfig, LLMEngine, resolve_cache_config
from engine.finish import FinishReason
from engine.kv_cache import CacheConfig
from engine.main_guard import GUARD_MESSAGE, check_spawn_safe
from engine.sampling import SamplingParams
from engine.stop import truncate_at_stop
from engine.tp import TPInfo, check_tp

# followers wait on rank 0 between generate() calls, so their collective timeout must be long;
# rank 0 only ever waits for a follower's current forward pass
_FOLLOWER_TIMEOUT = timedelta(hours=24)
_RANK0_TIMEOUT = timedelta(minutes=10)
_START_TIMEOUT_S = 120.0


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None


def _follower_main(
    host: str, port: int, rank: int, world: int, cfg: EngineConfig, cache: CacheConfig, threads: int,
    started: Connection,
) -> None:
    """Entry point of a spawned TP rank."""
    torch.set_num_threads(threads)
    store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=60))
    started.send_bytes(b"")  # reached the store: rank 0 may join the group
    started.close()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=_FOLLOWER_TIMEOUT)
    try:
        tp = TPInfo(rank, world, dist.group.WORLD)
        run_follower(cfg.model, DTYPES[cfg.dtype], tp, cache, device=cfg.device, quantization=cfg.quantization)
    finally:
        dist.destroy_process_group()
    # Done cleanly: leave without the interpreter's teardown, where a gloo/TCPStore destructor racing
    # rank 0's side of the group aborted the process now and then (exit code -6 after a correct run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _TPGroup:
    """The spawned follower processes and this process's side of the gloo group."""

    def __init__(self, cfg: EngineConfig, cache: CacheConfig, world: int, host: str) -> None:
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process")
        check_spawn_safe()
        store = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        threads = torch.get_num_threads()
        pipes = [ctx.Pipe(duplex=False) for _ in range(1, world)]  # (rank 0's end, the rank's end)
        self.procs = [
            ctx.Process(
                target=_follower_main,
                args=(host, store.port, rank, world, cfg, cache, threads, pipes[rank - 1][1]),
                daemon=True,
            )
            for rank in range(1, world)
        ]
        for p, (_, sender) in zip(self.procs, pipes, strict=True):
            p.start()
            sender.close()  # the rank holds the only writer: a rank that dies closes the pipe
        try:
            for rank, (p, (receiver, _)) in enumerate(zip(self.procs, pipes, strict=True), start=1):
                _wait_started(receiver, rank, p)
            dist.init_process_group("gloo", store=store, rank=0, world_size=world, timeout=_RANK0_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.tp = TPInfo(0, world, dist.group.WORLD)

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def _wait_started(started: Connection, rank: int, proc: Any) -> None:
    """Wait for a spawned rank to reach the store, failing fast if its process died. Sleeps in the
    kernel on the rank's pipe (a TCPStore wait with a short timeout, polled, made c10d log a
    "waitForInput ... timed out" warning every second)."""
    if mp_connection.wait([started], _START_TIMEOUT_S):
        try:
            started.recv_bytes()
            return
        except EOFError:  # the rank closed the pipe without a word: it died
            proc.join(5)
            raise RuntimeError(
                f"TP rank {rank} exited with code {proc.exitcode} at start-up (its traceback is above; "
                f"if it says 'bootstrapping phase': {GUARD_MESSAGE})"
            ) from None
        finally:
            started.close()
    raise TimeoutError(f"TP rank {rank} did not start within {_START_TIMEOUT_S:.0f} s")


def _shutdown(engine: LLMEngine, group: _TPGroup | None) -> None:
    if group is not None:
        engine.shutdown()
        group.close()


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        tensor_parallel_size: int = 1,
        block_size: int = BLOCK_SIZE,
        num_blocks: int | None = None,
        max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
        max_num_seqs: int = MAX_NUM_SEQS,
        quantization: str = "none",
        seed: int = 0,
        *,
        device: str = "cpu",
        dist_host: str = "127.0.0.1",
    ) -> None:
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        cfg = EngineConfig(
            model=str(model), dtype=dtype, block_size=block_size, num_blocks=num_blocks,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            quantization=quantization, seed=seed, device=device,
        )
        model_cfg = load_config(cfg.model)
        check_tp(model_cfg, tensor_parallel_size)  # before any rank starts
        cache = resolve_cache_config(cfg, model_cfg, tensor_parallel_size)
        self._group = _TPGroup(cfg, cache, tensor_parallel_size, dist_host) if tensor_parallel_size > 1 else None
        try:
            self.engine = LLMEngine(cfg, self._group.tp if self._group else None, cache)
        except BaseException:
            if self._group is not None:
                self._group.close()
            raise
        self.tokenizer = self.engine.tokenizer
        self._counter = 0
        self._finalizer = weakref.finalize(self, _shutdown, self.engine, self._group)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in the prompts' order."""
        if not self._finalizer.alive:
            raise RuntimeError("LLM has been shut down")
        plist = self._params_list(params, len(prompts))
        outputs = self._submit(prompts, plist)
        by_id = {o.request_id: o for o in outputs}
        while self.engine.has_work():
            for step in self.engine.step():
                out = by_id[step.request_id]
                out.token_ids.extend(step.token_ids)
                out.logprobs.extend(step.logprobs)
                out.finish_reason = step.finish_reason
        for out, p in zip(outputs, plist, strict=True):
            out.text = self.tokenizer.decode(out.token_ids)
            if out.finish_reason == FinishReason.STOP and p.stop:
                out.text = truncate_at_stop(out.text, p.stop)
        return outputs

    def _params_list(self, params: Any, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)

    def _submit(self, prompts: list[Any], plist: list[SamplingParams]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        try:
            for prompt, p in zip(prompts, plist, strict=True):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                rid = f"llm-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, ids, p)
                outputs.append(RequestOutput(rid, ids))
        except BaseException:
            for o in outputs:
                self.engine.abort(o.request_id)
            raise
        return outputs

    def shutdown(self) -> None:
        """Stop the TP follower processes (no-op for tensor_parallel_size=1); idempotent."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
