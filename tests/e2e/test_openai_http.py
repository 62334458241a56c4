"""The OpenAI HTTP door end to end: a real cluster (router + Serve pools, KV over UCX, the bundled
default model and its chat template), driven by the official `openai` SDK. Prefill TP=1 keeps the
start short (the door does not depend on TP; TP=2 is covered by tests/e2e/test_e2e_serving.py).

Every answer is checked against the gRPC API on the same cluster: greedy text, token counts and
finish reasons must be equal, since both doors enter the same request flow.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from deploy.config import DEFAULT_MODEL_DIR
from router.client import Endpoint, generate, generate_stream
from tests.e2e import RunningCluster, running_cluster, small_config, wait_free

pytestmark = pytest.mark.usefixtures("ray_session")

KEY = "sk-test-key"
PROMPTS = ("The list data type", "A function definition", "Exceptions are raised when")
IDS = [17, 300, 42, 1999, 5, 77, 1024]
N = 12


@pytest.fixture(scope="module")
def cluster() -> Iterator[RunningCluster]:
    cfg = small_config(DEFAULT_MODEL_DIR, router={"http": {"port": 0}, "api_keys": [KEY]},
                       prefill={"tensor_parallel_size": 1, "num_kv_blocks": 256, "resources": {"num_cpus": 0.25}},
                       model={"path": DEFAULT_MODEL_DIR, "block_size": 8, "name": "tiny-py"})
    with running_cluster(cfg) as cl:
        yield cl


def _url(cl: RunningCluster) -> str:
    return f"http://{cl.cluster.router.http_address}/v1"


def _client(cl: RunningCluster, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=_url(cl), api_key=key, max_retries=0, timeout=60)


def _grpc(cl: RunningCluster) -> Endpoint:
    return Endpoint(cl.address, KEY)




def _hf_chat_prompt(messages: list[dict[str, Any]]) -> str:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_models_and_health(cluster: RunningCluster) -> None:
    models = _client(cluster).models.list()
    assert [m.id for m in models.data] == ["tiny-py"]
    with urllib.request.urlopen(f"http://{cluster.cluster.router.http_address}/health", timeout=5) as r:
        assert r.status == 200


def test_completions_equal_grpc_sync(cluster: RunningCluster) -> None:
    client = _client(cluster)
    for prompt in (*PROMPTS, IDS):
        want = generate(_grpc(cluster), prompt, max_tokens=N, timeout=60)
        got = client.completions.create(model="tiny-py", prompt=prompt, max_tokens=N, temperature=0)
        assert got.object == "text_completion" and got.usage is not None
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
        assert got.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    wait_free(_grpc(cluster), within=2.0)


def test_completions_stream_async_with_usage_and_logprobs(cluster: RunningCluster) -> None:
    want = generate(_grpc(cluster), IDS, max_tokens=N, ignore_eos=True, timeout=60)
    want_logprobs = [lp for c in generate_stream(_grpc(cluster), IDS, max_tokens=N, ignore_eos=True,
                                                 logprobs=True, timeout=60) for lp in c.logprobs]

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=_url(cluster), api_key=KEY, max_retries=0) as client:
            stream = await client.completions.create(
                model="tiny-py", prompt=IDS, max_tokens=N, stream=True, logprobs=0,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    content, last = chunks[:-1], chunks[-1]
    assert len(content) >= 2 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in content) == want.text
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    logprobs = [lp for c in content for lp in c.choices[0].logprobs.token_logprobs]
    assert len(logprobs) == N and logprobs == pytest.approx(want_logprobs, abs=1e-5)
    assert last.usage is not None
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(IDS), N)


def test_chat_renders_the_template_like_transformers_and_equals_grpc(cluster: RunningCluster) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You document Python."},
        {"role": "user", "content": [{"type": "text", "text": "What is a list?"}]}]
    flat: list[dict[str, Any]] = [dict(messages[0]), {"role": "user", "content": "What is a list?"}]
    want = generate(_grpc(cluster), _hf_chat_prompt(flat), max_tokens=N, timeout=60)
    got = _client(cluster).chat.completions.create(model="tiny-py", messages=messages,
                                                   max_completion_tokens=N)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.usage is not None
    assert got.choices[0].message.content == want.text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=_url(cluster), api_key=KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="tiny-py", messages=messages, max_tokens=N, stream=True,
                stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want.text
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens


def test_sync_stream_and_request_id_echo(cluster: RunningCluster) -> None:
    client = _client(cluster)
    raw = client.completions.with_raw_response.create(
        model="tiny-py", prompt=PROMPTS[0], max_tokens=4, extra_headers={"x-request-id": "my-req-1"})
    assert raw.headers["x-request-id"] == "my-req-1" and raw.parse().id == "cmpl-my-req-1"
    want = generate(_grpc(cluster), PROMPTS[1], max_tokens=N, timeout=60)
    stream = client.completions.create(model="tiny-py", prompt=PROMPTS[1], max_tokens=N, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text


LONG = " ".join(str(i) for i in range(600))  # more tokens than the 512-token context
BAD_INPUTS = [  # the gRPC validation table (tests/router/test_router.py), through HTTP
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"logprobs": 2}, "logprobs"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 5000]}, "prompt"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": [5] * 600}, "prompt"),
    ({"max_tokens": 600}, "max_tokens"),
    ({"extra_headers": {"x-request-id": "r" * 300}}, "x-request-id"),
    ({"n": 2}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
]


@pytest.mark.parametrize(("kwargs", "param"), BAD_INPUTS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_400_naming_the_field(cluster: RunningCluster, kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"model": "tiny-py", "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        _client(cluster).completions.create(**args)
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.type == "invalid_request_error"


def test_chat_bad_input_names_max_completion_tokens(cluster: RunningCluster) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(cluster).chat.completions.create(model="tiny-py", max_completion_tokens=0,
                                                 messages=[{"role": "user", "content": "hi"}])
    assert err.value.param == "max_completion_tokens"


def test_wrong_key_401_unknown_model_404(cluster: RunningCluster) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        _client(cluster, key="wrong").completions.create(model="tiny-py", prompt="hi", max_tokens=2)
    assert err.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as nf:
        _client(cluster).completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert nf.value.param == "model"


def _set_max_inflight(cl: RunningCluster, n: int) -> None:
    router = cl.cluster.router

    async def change() -> None:
        import dataclasses

        router.reconfigure(dataclasses.replace(router.config, max_inflight=n))

    cl.loop.run(change())


def test_overload_429_and_deadline_504(cluster: RunningCluster) -> None:
    client = _client(cluster)
    _set_max_inflight(cluster, 1)
    try:
        stream = client.completions.create(model="tiny-py", prompt=IDS, max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="tiny-py", prompt="hi", max_tokens=2)
        assert err.value.status_code == 429 and err.value.type == "rate_limit_error"
        stream.close()
    finally:
        _set_max_inflight(cluster, 256)
    wait_free(_grpc(cluster), within=2.0)
    with pytest.raises(openai.APIStatusError) as late:
        client.completions.create(model="tiny-py", prompt=IDS, max_tokens=400, extra_body={"ignore_eos": True},
                                  extra_headers={"x-request-timeout": "0.3"})
    assert late.value.status_code == 504
    wait_free(_grpc(cluster), within=2.0)


def test_disconnect_mid_stream_frees_every_block_within_1s(cluster: RunningCluster) -> None:
    client = _client(cluster)
    stream = client.completions.create(model="tiny-py", prompt=IDS * 20, max_tokens=300, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    stream.close()  # closes the connection
    assert wait_free(_grpc(cluster), within=1.0) <= 1.0


def test_bench_drives_the_http_door(cluster: RunningCluster, tmp_path: Path) -> None:
    """`pdserve bench --endpoint openai`: the gRPC bench's workload and metrics, through SSE."""
    from benchmarks.loadgen.cli import main as bench_main
    from tests.deploy.test_bench import check_run

    out = tmp_path / "bench"
    rc = bench_main(["--endpoint", "openai", "--address", cluster.cluster.router.http_address,
                     "--api-key", KEY, "--concurrency", "4", "--num-requests", "6", "--warmup", "1",
                     "--dataset", "uniform", "--input-len", "16", "--output-len", "6", "--vocab", "2000",
                     "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["endpoint"] == "openai"
    check_run(result["runs"][0], 6)


def test_grpc_still_answers_beside_http(cluster: RunningCluster) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(Endpoint(cluster.address, "wrong"), "hi", max_tokens=2, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_is_503_without_pools(tmp_path: Path) -> None:
    """A router whose pools are empty: /health 503, generation 503, and no template -> 400."""
    from router.config import RouterConfig
    from router.server import RouterServer

    async def run() -> tuple[int, int, int]:
        server = RouterServer(RouterConfig(vocab_size=100, context_len=64, port=0, http_port=0), None)
        await server.start()
        try:
            url = f"http://{server.http_address}"
            health = await asyncio.to_thread(_status, f"{url}/health")
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as c:
                with pytest.raises(openai.APIStatusError) as gen:
                    await c.completions.create(model="pdserve", prompt=[1, 2], max_tokens=2)
                with pytest.raises(openai.BadRequestError) as chat:
                    await c.chat.completions.create(model="pdserve", messages=[{"role": "user", "content": "x"}])
            assert "chat template" in chat.value.message
            return health, gen.value.status_code, chat.value.status_code
        finally:
            await server.stop(0)

    assert asyncio.run(run()) == (503, 503, 400)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_http_uses_the_grpc_ports_tls_and_keys(tmp_path: Path) -> None:
    """With TLS configured the HTTP door speaks HTTPS with the same certificate and keys."""
    import ssl

    from router.config import RouterConfig
    from router.server import RouterServer
    from tests.router.test_router_security import _self_signed

    cert, key = _self_signed(tmp_path)
    config = RouterConfig(vocab_size=100, context_len=64, port=0, http_port=0, api_keys=("k1",),
                          tls_cert=cert, tls_key=key)

    def get(url: str, api_key: str) -> int:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
        context = ssl.create_default_context(cafile=cert)
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    async def run() -> tuple[int, int, str]:
        server = RouterServer(config, None)
        await server.start()
        try:
            url = f"https://{server.http_address}/v1/models"
            ok, wrong = await asyncio.to_thread(get, url, "k1"), await asyncio.to_thread(get, url, "k2")
            try:
                await asyncio.to_thread(_status, f"http://{server.http_address}/health")
                plain = "answered"
            except (urllib.error.URLError, ConnectionError) as e:
                plain = type(e).__name__
            return ok, wrong, plain
        finally:
            await server.stop(0)

    ok, wrong, plain = asyncio.run(run())
    assert (ok, wrong) == (200, 401) and plain != "answered"
