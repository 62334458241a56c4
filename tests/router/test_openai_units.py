"""Pure parts of the OpenAI HTTP door: body -> GenerateRequest, SSE framing, error mapping, and the
chat template rendered exactly as transformers renders it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from pdserve.v1 import router_pb2

from deploy.config import DEFAULT_MODEL_DIR, parse_config
from router.chat_template import ChatTemplate, read_chat_template
from router.openai_request import ApiError, param_of, parse_chat, parse_completion
from router.openai_response import DONE, OpenAIOutput, api_error, sse

# A Llama-3-like template: loop controls, tojson, raise_exception, bos_token, trim/lstrip blocks.
TEMPLATE = """{{ bos_token }}{% for m in messages %}
{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
    <|{{ m['role'] }}|>
{{ m['content'] | trim }}{% if loop.last and m['role'] == 'assistant' %}{% break %}{% endif %}<|end|>
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{{ {'n': 'é'} | tojson }}{% endif %}"""
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  héllo  "}]


def _hf_render(template: str, messages: list[dict[str, Any]]) -> str:
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(DEFAULT_MODEL_DIR) / "tokenizer.json"), bos_token="<s>")
    return str(tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=True))


def test_chat_template_renders_like_transformers() -> None:
    ours = ChatTemplate(TEMPLATE, (("bos_token", "<s>"),)).render(MESSAGES)
    assert ours == _hf_render(TEMPLATE, MESSAGES)
    assert ours.startswith("<s>") and "<|system|>\nbe brief<|end|>" in ours and ours.endswith('<|assistant|>{"n": "é"}')


def test_default_model_ships_a_template_that_transformers_renders_the_same() -> None:
    chat = read_chat_template(DEFAULT_MODEL_DIR)
    assert chat is not None
    ours = ChatTemplate(chat.source, chat.tokens).render(MESSAGES)
    assert ours == _hf_render(chat.source, MESSAGES)
    assert ours.endswith("assistant:")


def test_template_errors_and_missing_template_are_400_naming_messages(tmp_path: Path) -> None:
    template = ChatTemplate(TEMPLATE, ())
    with pytest.raises(ApiError) as err:
        parse_chat({"messages": [{"role": "tool", "content": "x"}]}, "", template)
    assert (err.value.status, err.value.param) == (400, "messages") and "bad role tool" in err.value.message
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert read_chat_template(tmp_path) is None
    with pytest.raises(ApiError) as err:
        parse_chat({"messages": MESSAGES}, "", None)
    assert err.value.status == 400 and "no chat template" in err.value.message


def test_completion_body_maps_to_the_grpc_request() -> None:
    req = parse_completion({"prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9,
                            "top_k": 4, "seed": 3, "stop": "x", "logprobs": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}, "rid")
    g = req.generate
    assert g.request_id == "rid" and list(g.prompt_token_ids.ids) == [5, 6, 7]
    assert (g.sampling.max_tokens, g.sampling.top_k, g.sampling.seed, list(g.sampling.stop)) == (9, 4, 3, ["x"])
    assert g.sampling.logprobs == 1 and g.sampling.ignore_eos
    assert req.stream and req.include_usage and req.logprobs and not req.chat
    assert parse_completion({"prompt": ["one"]}, "").generate.prompt == "one"
    assert parse_completion({"prompt": "a", "min_tokens": 5, "max_tokens": 5}, "").generate.sampling.ignore_eos


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"), ({"echo": True}, "echo"), ({"suffix": "z"}, "suffix"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"max_tokens": "9"}, "max_tokens"), ({"temperature": True}, "temperature"), ({"stop": [1]}, "stop"),
    ({"seed": -1}, "seed"), ({"min_tokens": 3, "max_tokens": 8}, "min_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_unsupported_or_mistyped_fields_are_400_naming_them(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_completion({"prompt": "hi", **body}, "")
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.body()["error"]["param"] == param


def test_prompt_shapes() -> None:
    for prompt in (None, ["a", "b"], [[1], [2]], 5, [1, "a"]):
        with pytest.raises(ApiError) as err:
            parse_completion({"prompt": prompt}, "")
        assert err.value.param == "prompt"


def test_validation_fields_become_openai_params() -> None:
    chat = parse_chat({"messages": MESSAGES, "max_completion_tokens": 3}, "", ChatTemplate("{{ 1 }}"))
    plain = parse_completion({"prompt": "x"}, "")
    assert param_of("sampling.max_tokens", chat) == "max_completion_tokens"
    assert param_of("sampling.max_tokens", plain) == "max_tokens"
    assert param_of("prompt_token_ids[3]", plain) == "prompt"
    assert param_of("prompt", chat) == "messages"
    assert param_of("sampling.stop[2]", plain) == "stop"
    assert param_of("request_id", plain) == "x-request-id"


def test_grpc_statuses_map_to_http() -> None:
    table = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
             grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
             grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 500}
    for code, status in table.items():
        err = api_error(code, "m")
        assert err.status == status
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def _msg(ids: list[int], text: str, finish: int = 0) -> router_pb2.GenerateResponse:
    msg = router_pb2.GenerateResponse(token_ids=ids, text=text, finish_reason=finish)  # type: ignore[arg-type]
    if finish:
        msg.usage.prompt_tokens, msg.usage.completion_tokens = 4, len(ids) + 1
    return msg


def test_sse_framing_and_chunks() -> None:
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"
    req = parse_chat({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
                     "r1", ChatTemplate("{{ 1 }}"))
    out = OpenAIOutput(req, "r1", "m", 7, str)
    first = out.role_chunk()
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    a, b = out.chunk(_msg([1], "he")), out.chunk(_msg([2], "y", router_pb2.STOP))
    assert a["object"] == "chat.completion.chunk" and a["id"] == "chatcmpl-r1"
    assert a["choices"][0]["finish_reason"] is None and b["choices"][0]["finish_reason"] == "stop"
    last = out.usage_chunk()
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 4, "completion_tokens": 2,
                                                       "total_tokens": 6}


def test_non_streaming_completion_body_with_logprobs() -> None:
    req = parse_completion({"prompt": "x", "logprobs": 1}, "r2")
    out = OpenAIOutput(req, "r2", "m", 7, lambda t: f"<{t}>")
    for msg in (_msg([3], "a"), _msg([4, 5], "bc", router_pb2.LENGTH)):
        msg.logprobs.extend([-0.5] * len(msg.token_ids))
        out.add(msg)
    body = out.body()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "abc"
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["<3>", "<4>", "<5>"] and lp["text_offset"] == [0, 3, 6]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


def test_yaml_keys() -> None:
    cfg = parse_config({"router": {"http": {"port": None}}, "model": {"name": "tiny"}}, "t")
    assert cfg.router.http.port is None and cfg.model.served_name == "tiny"
    default = parse_config({}, "t")
    assert default.router.http.port == 8000 and default.model.served_name == "default_model"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage", [False, True])
def test_fast_sse_chunk_equals_the_dict_chunk(chat: bool, usage: bool) -> None:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": usage}}
    req = parse_chat({**body, "messages": MESSAGES}, "q", ChatTemplate("{{ 1 }}")) if chat \
        else parse_completion({**body, "prompt": "x"}, "q")
    fast, slow = OpenAIOutput(req, "q", "m", 7, str), OpenAIOutput(req, "q", "m", 7, str)
    for msg in (_msg([1], 'a "quoted" é\n'), _msg([2], "", router_pb2.LENGTH)):
        frame = fast.chunk_sse(msg)
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
        assert json.loads(frame[6:]) == slow.chunk(msg)
