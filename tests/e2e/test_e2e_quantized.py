"""An int8 decode pool fed by a full-precision prefill pool, through the real router."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from router.client import get_status
from tests.e2e import running_cluster, small_config, wait_free
from tests.e2e.test_e2e_serving import NEW_TOKENS, _generate_all, _hf_tokens, _prompts

pytestmark = pytest.mark.usefixtures("ray_session")


def test_int8_decode_pool_completes_and_keeps_prefills_first_token(
    hf_checkpoint: Callable[[str], Path],
) -> None:
    path = hf_checkpoint("llama")
    prompts = _prompts()
    expected = _hf_tokens(path, prompts)
    cfg = small_config(str(path), prefill={"tensor_parallel_size": 1}, decode={"quantization": "int8"})
    with running_cluster(cfg) as cl:
        got = _generate_all(cl.address, prompts)
        status = get_status(cl.address)
        wait_free(cl.address, within=2.0)
    assert all(1 <= len(t) <= NEW_TOKENS for t in got)  # every request completed (length or EOS)
    assert [t[0] for t in got] == [t[0] for t in expected]  # the first token is prefill's, fp32
    decode, prefill = status.decode.replicas[0], status.prefill.replicas[0]
    assert decode.quantization == "int8" and prefill.quantization == "none"
    assert decode.weight_bytes < prefill.weight_bytes
