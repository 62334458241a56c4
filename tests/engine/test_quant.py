"""int8 / fp8 weight quantization (engine/quant.py): memory, round-trip bound, accuracy, the pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from engine.quant import (
    Fp8Linear,
    Int8Linear,
    QuantConfig,
    check_supported,
    quantize,
    quantize_layer_fn,
    weight_bytes,
)
from engine.quant_kernels import (
    INT8_KERNELS,
    dequantize_int8,
    fp8_linear,
    quantize_fp8,
    quantize_int8,
)

torch.set_num_threads(1)
HIDDEN, INTER, HEAD_DIM, KV_HEADS = 64, 128, 16, 2
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TinyAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=True)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(HIDDEN)
        self.self_attn = TinyAttn()
        self.mlp = TinyMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, D]; attention left out
        a = self.self_attn
        h = a.o_proj(a.q_proj(self.input_layernorm(x)))
        return x + h + self.mlp(x + h)


class TinyModel(nn.Module):
    def __init__(self, num_layers: int = 2, vocab: int = 97) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, HIDDEN)
        self.layers = nn.ModuleList(TinyLayer() for _ in range(num_layers))
        self.lm_head = nn.Linear(HIDDEN, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)  # [T, D]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)  # [T, V]


def _model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel().eval()


def _decoder_linears(model: nn.Module) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in PROJ}


def test_int8_bytes_at_most_027_of_fp32() -> None:
    model = _model()
    fp32_bytes = sum(m.weight.numel() * 4 for m in _decoder_linears(model).values())
    total_before = weight_bytes(model)
    quantize(model, QuantConfig("int8"))
    q_bytes = sum(
        m.weight.numel() * m.weight.element_size() + m.scale.numel() * m.scale.element_size()
        for m in _decoder_linears(model).values()
    )
    assert q_bytes <= 0.27 * fp32_bytes, (q_bytes, fp32_bytes)
    all_buffers = sum(  # + the bf16 scale copy some kernels keep (2 bytes per channel)
        b.numel() * b.element_size()
        for m in _decoder_linears(model).values()
        for n, b in m.named_buffers()
        if n != "bias"
    )
    assert all_buffers <= 0.28 * fp32_bytes, (all_buffers, fp32_bytes)
    saved = total_before - weight_bytes(model)
    assert saved >= 0.73 * fp32_bytes  # weight_bytes sees the saving too


def test_round_trip_within_half_scale_per_channel() -> None:
    model = _model()
    for name, lin in _decoder_linears(model).items():
        w = lin.weight.detach()
        q, scale = quantize_int8(w)
        assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
        err = (w - dequantize_int8(q, scale)).abs().amax(dim=1)  # [N]
        assert torch.all(err <= scale / 2 * (1 + 1e-5)), name


def test_round_trip_zero_row_and_outlier() -> None:
    w = torch.randn(8, 32)
    w[3] = 0.0
    w[5, 7] = 1e3
    q, scale = quantize_int8(w)
    assert torch.all(q[3] == 0)
    assert q[5, 7] == 127
    assert torch.all((w - dequantize_int8(q, scale)).abs().amax(dim=1) <= scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("kernel", sorted(INT8_KERNELS))
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_int8_linear_close_to_fp32(kernel: str, rows: int) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(96, 80, bias=True)
    x = torch.randn(rows, 96)
    ref = lin(x)
    out = Int8Linear.from_linear(lin, kernel)(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, (kernel, rel.item())


def test_int8_linear_matches_dequantized_weight_exactly_in_fp32() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(64, 48, bias=False)
    q_lin = Int8Linear.from_linear(lin, "dequant")
    x = torch.randn(5, 64)
    ref = x @ dequantize_int8(q_lin.weight, q_lin.scale).T
    torch.testing.assert_close(q_lin(x), ref, rtol=1e-5, atol=1e-5)


def test_int8_linear_keeps_leading_dims_and_bias_precision() -> None:
    lin = nn.Linear(32, 16, bias=True)
    q_lin = Int8Linear.from_linear(lin)
    assert q_lin.bias is not None and q_lin.bias.dtype == torch.float32
    assert q_lin(torch.randn(2, 3, 32)).shape == (2, 3, 16)


def test_kernel_override_by_config_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = nn.Linear(32, 16)
    assert Int8Linear.from_linear(lin, "dequant").kernel == "dequant"
    monkeypatch.setenv("PDSERVE_INT8_KERNEL", "bf16")
    assert Int8Linear.from_linear(lin, "auto").kernel == "bf16"
    assert Int8Linear.from_linear(lin, "dequant").kernel == "dequant"  # config wins
    monkeypatch.setenv("PDSERVE_INT8_KERNEL", "nope")
    with pytest.raises(ValueError, match="int8 kernel"):
        Int8Linear.from_linear(lin, "auto")
    with pytest.raises(ValueError, match="int8 kernel"):
        QuantConfig("int8", int8_kernel="nope")
    with pytest.raises(ValueError, match="method"):
        QuantConfig("int4")  # type: ignore[arg-type]


def test_quantize_swaps_all_decoder_linears_only() -> None:
    model = _model()
    ids = torch.arange(10)
    with torch.no_grad():
        ref = model(ids)
        assert quantize(model, QuantConfig("int8")) is model
        out = model(ids)
    linears = _decoder_linears(model)
    assert len(linears) == 2 * len(PROJ)
    assert all(isinstance(m, Int8Linear) for m in linears.values())
    assert not any(type(m) is nn.Linear for m in model.layers.modules())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()) < 0.02


def test_layer_hook_equals_whole_model_pass() -> None:
    whole, per_layer = _model(3), _model(3)
    quantize(whole, QuantConfig("int8", int8_kernel="dequant"))
    hook = quantize_layer_fn(QuantConfig("int8", int8_kernel="dequant"))
    for layer in per_layer.layers:
        hook(layer)
    ids = torch.arange(7)
    with torch.no_grad():
        torch.testing.assert_close(whole(ids), per_layer(ids))
    assert weight_bytes(whole) == weight_bytes(per_layer)


def test_none_is_identity_and_no_layers_is_an_error() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, QuantConfig("none"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="decoder layers"):
        quantize(nn.Sequential(nn.Linear(4, 4)), QuantConfig("int8"))


def test_weight_bytes_counts_tied_weights_once() -> None:
    model = _model()
    model.lm_head.weight = model.embed_tokens.weight
    expected = sum(p.numel() * 4 for p in model.parameters())  # parameters() dedupes
    assert weight_bytes(model) == expected


def test_fp8_on_cpu_raises_clear_error() -> None:
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9.*not a CUDA GPU"):
        check_supported("fp8", "cpu")
    with pytest.raises(ValueError, match="not a CUDA GPU"):
        quantize(_model(), QuantConfig("fp8"))
    check_supported("int8", "cpu")
    check_supported("none", "cpu")


def test_fp8_math_on_cpu_reference() -> None:
    """The fp8 math (per-channel e4m3 weights, per-token activations) via CPU `_scaled_mm`."""
    torch.manual_seed(4)
    w, x = torch.randn(48, 64), torch.randn(5, 64)
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    ref = x @ w.T
    rel = (fp8_linear(x, q, scale) - ref).norm() / ref.norm()
    assert rel < 0.08, rel.item()
    odd = Fp8Linear(*quantize_fp8(torch.randn(10, 24)), bias=None)  # sizes not multiples of 16
    assert not odd.use_scaled_mm and odd(torch.randn(3, 24)).shape == (3, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_linear_on_gpu() -> None:
    device = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        with pytest.raises(ValueError, match="compute capability"):
            check_supported("fp8", device)
        return
    torch.manual_seed(5)
    model = TinyModel().to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.arange(12, device=device)
    with torch.no_grad():
        ref = model(ids).float()
        quantize(model, QuantConfig("fp8"))
        out = model(ids).float()
    assert all(isinstance(m, Fp8Linear) for m in _decoder_linears(model).values())
    assert ((out - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases stay full precision
def test_loader_hook_on_real_model(kind: str, hf_checkpoint: Any) -> None:
    """engine.model.build_model with the per-layer hook: int8 logits track fp32 ones."""
    from engine.attention import AttnMetadata
    from engine.kv_cache import CacheConfig, allocate_kv
    from engine.model import build_model

    path = hf_checkpoint(kind)
    ref_model = build_model(path, torch.float32)
    q_model = build_model(
        path, torch.float32, quantize_layer=quantize_layer_fn(QuantConfig("int8"))
    )
    assert all(isinstance(m, Int8Linear) for m in _decoder_linears(q_model).values())
    assert type(q_model.lm_head) is nn.Linear
    assert weight_bytes(q_model) < weight_bytes(ref_model)
    t = 8
    meta = AttnMetadata([t], [t], torch.tensor([[0]]), torch.arange(t))
    logits = []
    for model in (ref_model, q_model):
        kv = allocate_kv(
            model.config, CacheConfig(block_size=16, num_blocks=2), 1, torch.float32, "cpu"
        )
        with torch.inference_mode():
            hidden = model(torch.arange(1, t + 1), torch.arange(t), meta, kv)  # [T, D]
            logits.append(model.compute_logits(hidden))  # [T, V]
    rel = (logits[1] - logits[0]).norm() / logits[0].norm()
    assert rel < 0.05, rel.item()


def test_llm_engine_int8_greedy_tracks_fp32(hf_checkpoint: Any) -> None:
    """LLMEngine(quantization="int8") decodes through Int8Linear; greedy tokens mostly agree."""
    from engine.engine import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    path = str(hf_checkpoint("llama"))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for method in ("none", "int8"):
        engine = LLMEngine(EngineConfig(path, block_size=8, num_blocks=32, quantization=method))
        engine.add_request(method, list(range(3, 15)), params)
        tokens[method] = []
        while engine.has_work():
            for out in engine.step():
                tokens[method].extend(out.token_ids)
        if method == "int8":
            assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
    assert len(tokens["int8"]) == 8
    assert tokens["int8"][0] == tokens["none"][0]  # same first (prefill) token
    same = sum(a == b for a, b in zip(tokens["int8"], tokens["none"], strict=True))
    assert same >= 6, tokens  # measured: 8 of 8
