"""Shared fixtures (keep small): one thread for torch, tiny checkpoints written once per session
(`hf_checkpoint(kind)`, `model_dir`), the session's local Ray."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.checkpoints import write_hf_checkpoint, write_tiny_model


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()  # what the imports made lives on: the collection after each test skips it


@pytest.fixture(autouse=True)
def _free_leftovers_here() -> Iterator[None]:
    """A test's leftover reference cycles are freed on the main thread as it ends, never by a
    collection that a later test's worker thread happens to trigger (objects of ucxx and grpc.aio
    must not be finalized on a foreign thread after their event loop closed)."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``hf_checkpoint(kind)`` -> directory of a tiny transformers checkpoint (cached per session)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = write_hf_checkpoint(tmp_path_factory.mktemp(f"ckpt_{kind}"), kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """engine.make_model's tiny llama (seed 0), written once per session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for every end-to-end test (starting one costs ~10 s); shut down at the end."""
    import ray

    ray.init(num_cpus=8, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False, namespace="pdserve-tests")
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
