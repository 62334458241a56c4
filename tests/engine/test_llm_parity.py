"""End-to-end engine behaviour against transformers (tiny fp32 checkpoints from tests/checkpoints.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.config import ModelConfig
from tests.checkpoints import EOS_ID, KINDS, load_hf_model

PROMPT_LENS = (3, 7, 12, 17, 24, 33, 41, 50)
NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, logprobs=True)

Checkpoint = Callable[[str], Path]


def _prompts(seed: int = 0, lens: tuple[int, ...] = PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lens]


def _hf_greedy(path: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """transformers generate(do_sample=False) per prompt (no padding) + logprobs of its tokens."""
    model = load_hf_model(path)
    results = []
    for prompt in prompts:
        with torch.no_grad():
            r = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                output_logits=True, return_dict_in_generate=True,
            )
        tokens = r.sequences[0, len(prompt):].tolist()
        lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(r.logits, tokens, strict=False)]
        results.append((tokens, lps))
    return results


_HF_CACHE: dict[str, list[tuple[list[int], list[float]]]] = {}


def _reference(hf_checkpoint: Checkpoint, kind: str) -> list[tuple[list[int], list[float]]]:
    if kind not in _HF_CACHE:
        _HF_CACHE[kind] = _hf_greedy(hf_checkpoint(kind), _prompts())
    return _HF_CACHE[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_parity_with_transformers(hf_checkpoint: Checkpoint, kind: str) -> None:
    ref = _reference(hf_checkpoint, kind)
    llm = LLM(str(hf_checkpoint(kind)), block_size=8)
    outs = llm.generate(_prompts(), GREEDY)
    for out, (tokens, lps) in zip(outs, ref, strict=True):
        assert out.token_ids == tokens
        assert out.finish_reason == ("stop" if tokens[-1] == EOS_ID else "length")
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(lps), atol=1e-4, rtol=0)
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_staggered_chunked_and_shared_prefix_give_same_tokens(hf_checkpoint: Checkpoint) -> None:
    path = hf_checkpoint("llama")
    prefix = _prompts(seed=1, lens=(16,))[0]  # two full blocks of 8
    prompts = [prefix + p for p in _prompts(seed=2, lens=(2, 9, 30, 5))] + _prompts(seed=3, lens=(40, 6))
    ref = [t for t, _ in _hf_greedy(path, prompts)]
    engine = LLMEngine(EngineConfig(str(path), block_size=8, num_blocks=128, max_num_batched_tokens=16))
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    max_step_tokens = 0
    while pending or engine.has_work():
        if pending:  # one new arrival between steps
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=NEW_TOKENS))
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
        max_step_tokens = max(max_step_tokens, engine.runner.last_num_tokens)
    assert [got[str(i)] for i in range(len(prompts))] == ref
    assert max_step_tokens <= 16  # the 46- and 40-token prompts ran in chunks
    assert engine.prefix_cache_hit_blocks >= 2 * 3  # requests 1..3 reused the 2-block prefix
    assert engine.num_free_blocks == engine.num_total_blocks


def test_small_pool_preempts_and_gives_identical_output(hf_checkpoint: Checkpoint) -> None:
    path = str(hf_checkpoint("qwen2"))
    prompts = _prompts(seed=4, lens=(20, 25, 30, 12, 18, 27))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    big = LLM(path, block_size=4, num_blocks=256).generate(prompts, params)
    small_llm = LLM(path, block_size=4, num_blocks=20)  # 80 tokens for 6 requests of up to 62
    small = small_llm.generate(prompts, params)
    assert [o.token_ids for o in small] == [o.token_ids for o in big]
    assert small_llm.engine.num_preemptions > 0
    assert small_llm.engine.num_free_blocks == 20


def test_request_that_can_never_fit_is_rejected(hf_checkpoint: Checkpoint) -> None:
    llm = LLM(str(hf_checkpoint("llama")), block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="whole pool holds 16"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="context window"):
        llm.generate([[1] * 600], SamplingParams(max_tokens=1))
    assert llm.engine.num_free_blocks == 4 and not llm.engine.has_work()


def test_tensor_parallel_2_matches_1(hf_checkpoint: Checkpoint) -> None:
    path = str(hf_checkpoint("qwen2"))
    prompts = _prompts(seed=5, lens=(5, 19, 33, 8))
    params = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.8, seed=3)] * 2
    ref = LLM(path, block_size=8).generate(prompts, params)
    with LLM(path, block_size=8, tensor_parallel_size=2) as llm:
        outs = llm.generate(prompts, params)
        again = llm.generate(prompts[:1], params[:1])  # the group survives between calls
        group = llm._group
        assert group is not None
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert again[0].token_ids == ref[0].token_ids
    assert all(not p.is_alive() and p.exitcode == 0 for p in group.procs), [(p.is_alive(), p.exitcode) for p in group.procs]


def test_tensor_parallel_4_replicates_kv_heads(hf_checkpoint: Checkpoint) -> None:
    """4 ranks, 2 KV heads: each rank holds KV head rank // 2 (replicated), tokens as TP=1 and HF."""
    path = hf_checkpoint("llama")
    prompts = _prompts(seed=11, lens=(6, 21, 35))
    params = SamplingParams(max_tokens=10)
    ref = LLM(str(path), block_size=8).generate(prompts, params)
    with LLM(str(path), block_size=8, tensor_parallel_size=4) as llm:
        outs = llm.generate(prompts, params)
        assert llm.engine.kv.shape[3] == 1  # one (replicated) KV head per rank
        assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    hf = [t for t, _ in _hf_greedy(path, prompts)]
    assert [o.token_ids for o in outs] == [t[:10] for t in hf]


def test_seeded_sampling_is_reproducible_across_batches(hf_checkpoint: Checkpoint) -> None:
    llm = LLM(str(hf_checkpoint("llama")), block_size=8)
    prompts = _prompts(seed=6, lens=(10, 20, 30))
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = llm.generate(prompts[1:2], seeded)[0].token_ids
    mixed = llm.generate(prompts, [SamplingParams(max_tokens=8, temperature=1.2), seeded, SamplingParams()])
    assert mixed[1].token_ids == alone
    other = llm.generate(prompts[1:2], SamplingParams(max_tokens=16, temperature=1.0, seed=43, ignore_eos=True))
    assert other[0].token_ids != alone
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_top_k_1_is_greedy(hf_checkpoint: Checkpoint) -> None:
    llm = LLM(str(hf_checkpoint("llama")), block_size=8)
    prompts = _prompts(seed=7, lens=(10, 20))
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=2.0, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_stop_conditions(hf_checkpoint: Checkpoint) -> None:
    llm = LLM(str(hf_checkpoint("mistral")), block_size=8)
    prompt = _prompts(seed=8, lens=(12,))
    base = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert len(base.token_ids) == 24 and base.finish_reason == "length"
    # stop token: the output ends with (and includes) its first occurrence
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(tok,)))[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    # eos: the model's eos id stops unless ignore_eos
    eos_params = SamplingParams(max_tokens=24, stop_token_ids=())
    llm.engine.model_config = _with_eos(llm.engine.model_config, tok)
    out = llm.generate(prompt, eos_params)[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    # stop string: text cut before it, tokens up to the one completing it
    stop = llm.tokenizer.decode(base.token_ids[8:10])[-3:]
    assert stop.strip()
    out = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and stop not in out.text
    text = llm.tokenizer.decode(out.token_ids)
    assert stop in text and stop not in llm.tokenizer.decode(out.token_ids[:-1])
    assert text.startswith(out.text) and base.token_ids[: len(out.token_ids)] == out.token_ids
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def _with_eos(cfg: ModelConfig, eos: int) -> ModelConfig:
    return replace(cfg, eos_token_ids=(eos,))


def test_context_window_finishes_with_length(hf_checkpoint: Checkpoint) -> None:
    path = str(hf_checkpoint("llama"))
    engine = LLMEngine(EngineConfig(path, block_size=8, num_blocks=64, max_model_len=40))
    engine.add_request("r", _prompts(seed=9, lens=(30,))[0], SamplingParams(max_tokens=100, ignore_eos=True))
    tokens: list[int] = []
    reason = None
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
            reason = out.finish_reason
    assert len(tokens) == 10 and reason == "length"
    assert engine.num_free_blocks == 64


def test_hold_kv_prefill_then_decode_in_another_engine(hf_checkpoint: Checkpoint) -> None:
    """The disaggregated hand-off in one process: prefill holds KV, decode reserves, copies, resumes."""
    path = str(hf_checkpoint("llama"))
    prompts = _prompts(seed=10, lens=(9, 16, 27))
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    ref = LLM(path, block_size=8).generate(prompts, params)
    pre = LLMEngine(EngineConfig(path, block_size=8, num_blocks=32))
    dec = LLMEngine(EngineConfig(path, block_size=8, num_blocks=32))
    assert dec.add_prefilled("pad", [1] * 20, 5, params) is not None  # shifts decode's block ids
    for i, p in enumerate(prompts):
        pre.add_request(str(i), p, params, hold_kv=True)
    first: dict[str, int] = {}
    while pre.has_work():
        for out in pre.step():
            assert out.finish_reason == "prefilled"
            first[out.request_id] = out.token_ids[0]
    assert pre.num_free_blocks == 32 - (2 + 2 + 4)
    for i, p in enumerate(prompts):
        rid = str(i)
        src = pre.kv_block_ids(rid)
        dst = dec.add_prefilled(rid, p, first[rid], params)
        assert dst is not None and len(dst) == len(src) and dst != src
        dec.kv[dst] = pre.kv[src]  # what kv_transfer does between machines
        pre.release_kv(rid)
        dec.resume(rid)
    assert pre.num_free_blocks == 32
    dec.abort("pad")
    got = {rid: [tok] for rid, tok in first.items()}
    while dec.has_work():
        for out in dec.step():
            got[out.request_id] += out.token_ids
    assert [got[str(i)] for i in range(3)] == [o.token_ids for o in ref]
    assert dec.num_free_blocks == 32
    assert dec.add_prefilled("a", [1] * 200, 5, SamplingParams(max_tokens=1)) is not None
    assert dec.add_prefilled("b", [1] * 100, 5, SamplingParams(max_tokens=1)) is None  # no room now
    dec.abort("a")
    assert dec.num_free_blocks == 32


def test_step_pack_unpack_roundtrip() -> None:
    from engine.attention import AttnMetadata
    from engine.distributed import pack_step, unpack_step
    from engine.model_runner import StepInputs

    meta = AttnMetadata([1, 3], [9, 3], torch.tensor([[4, 7], [2, 0]]), torch.tensor([72, 32, 33, 34]))
    inputs = StepInputs(torch.tensor([5, 6, 7, 8]), torch.tensor([8, 0, 1, 2]), meta)
    header, payload = pack_step(inputs)
    back = unpack_step(header.tolist(), payload.clone())
    assert back.meta.query_lens == [1, 3] and back.meta.seq_lens == [9, 3]
    assert torch.equal(back.meta.block_tables, meta.block_tables)
    assert torch.equal(back.meta.slot_mapping, meta.slot_mapping)
    assert torch.equal(back.input_ids, inputs.input_ids) and torch.equal(back.positions, inputs.positions)
