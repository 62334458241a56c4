"""int8 decode quality on the embedded default (trained) model, teacher-forced on fp32's greedy text."""

from __future__ import annotations

import pytest
import torch

from deploy.config import DEFAULT_MODEL_DIR
from engine import LLM, SamplingParams
from engine.model import build_model
from engine.quant import Int8Linear, QuantConfig, QuantMethod, quantize_layer_fn
from engine.tokenizer import Tokenizer
from tests.checkpoints import PagedRunner

PROMPTS = (
    "The list data type",
    "A function definition",
    "The for statement is used to",
    "Exceptions are raised when",
    "A class is",
    "The import statement",
    "Strings are",
    "The with statement",
)
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def continuations() -> list[list[int]]:
    """prompt + fp32 greedy continuation (64 tokens, EOS ignored), as token ids."""
    tok = Tokenizer.from_model_dir(DEFAULT_MODEL_DIR)
    prompts = [tok.encode(p) for p in PROMPTS]
    llm = LLM(DEFAULT_MODEL_DIR)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    return [p + o.token_ids for p, o in zip(prompts, outs, strict=True)]


def _logits(quantization: QuantMethod, seqs: list[list[int]]) -> list[torch.Tensor]:
    hook = quantize_layer_fn(QuantConfig(quantization)) if quantization != "none" else None
    model = build_model(DEFAULT_MODEL_DIR, torch.float32, quantize_layer=hook)
    quantized = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert quantized == (7 * model.config.num_layers if quantization == "int8" else 0)
    runner = PagedRunner(model, num_blocks=256, block_size=16)
    return [runner.step([(str(i), s)])[0] for i, s in enumerate(seqs)]  # [len, vocab] each


def test_int8_matches_fp32_top_token_and_distribution(continuations: list[list[int]]) -> None:
    ref, q = _logits("none", continuations), _logits("int8", continuations)
    matches, positions, kls = 0, 0, []
    for seq, lr, lq in zip(continuations, ref, q, strict=True):
        cont = slice(len(seq) - NEW_TOKENS - 1, len(seq) - 1)  # the positions that predicted the continuation
        lr, lq = lr[cont].float(), lq[cont].float()  # [64, vocab]
        matches += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        positions += lr.shape[0]
        p_log, q_log = lr.log_softmax(-1), lq.log_softmax(-1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))  # KL(fp32 || int8) per position
    assert any(not torch.equal(a, b) for a, b in zip(ref, q, strict=True))  # int8 really differs
    match_rate = matches / positions
    mean_kl = torch.cat(kls).mean().item()
    print(f"int8 vs fp32: top-1 match {match_rate:.4f} over {positions} positions, mean KL {mean_kl:.5f} nats")
    assert match_rate >= 0.95
    assert mean_kl < 0.02
