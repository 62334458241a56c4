"""Train pdserve's embedded default model: a small Llama on Python's own documentation.

Reproducible and CPU-only. Steps:
  1. text    — `pydoc_data.topics.topics` (stdlib), documents sorted by key; a seeded ~5% of the
               documents is held out for validation.
  2. tokens  — a byte-level BPE (`tokenizers`) trained on the training documents, with
               `<|endoftext|>` as EOS and as the separator between documents.
  3. model   — `transformers.LlamaForCausalLM` (GQA: 8 query heads, 4 KV heads), AdamW,
               warmup + cosine LR, random 256-token windows.
  4. output  — `save_pretrained(safe_serialization=True)` + tokenizer.json into --out-dir, a loss
               log (JSON lines) and periodic resumable checkpoints in --work-dir.

Usage (the committed checkpoint's exact command is in README.md):
  python engine/default_model/train.py --steps 600 --seed 0
  python engine/default_model/train.py --minutes 22      # picks --steps from measured speed
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pydoc_data.topics
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

EOS = "<|endoftext|>"
HERE = Path(__file__).resolve().parent
PROMPTS = ("The list", "A function is", "The for statement", "An exception")
log = logging.getLogger("default_model")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that decides the result; written next to the log for provenance."""

    seed: int = 0
    steps: int = 0                 # 0 -> derived from --minutes
    minutes: float = 22.0
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    max_positions: int = 512
    context: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    val_fraction: float = 0.05
    eval_every: int = 50
    ckpt_every: int = 25
    threads: int = 2


# ---------------------------------------------------------------- data


def split_documents(val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded document-level split: whole documents go to validation until ~val_fraction of chars."""
    topics: dict[str, str] = pydoc_data.topics.topics
    keys = sorted(topics)
    random.Random(seed).shuffle(keys)
    total = sum(len(topics[k]) for k in keys)
    val_keys: set[str] = set()
    val_chars = 0
    for key in keys:
        size = len(topics[key])
        if val_chars >= val_fraction * total:
            break
        if val_chars + size <= 1.5 * val_fraction * total:
            val_keys.add(key)
            val_chars += size
    train = [topics[k] for k in sorted(topics) if k not in val_keys]
    val = [topics[k] for k in sorted(topics) if k in val_keys]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every string encodes; `<|endoftext|>` is a special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id_of(tok: Tokenizer) -> int:
    eos_id = tok.token_to_id(EOS)
    assert eos_id is not None, "tokenizer lacks <|endoftext|>"
    return eos_id


def encode_corpus(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents joined by EOS -> [N] int64 token stream."""
    eos_id = eos_id_of(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(tokens: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows -> [batch, ctx + 1] (inputs are [:, :-1], labels [:, 1:])."""
    starts = torch.randint(0, tokens.numel() - ctx - 1, (batch,), generator=gen)
    return torch.stack([tokens[s : s + ctx + 1] for s in starts.tolist()])


# ---------------------------------------------------------------- model


def build_model(cfg: TrainConfig, eos_id: int) -> LlamaForCausalLM:
    """Tiny Llama with GQA and tied embeddings (float32)."""
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def lm_loss(model: LlamaForCausalLM, window: torch.Tensor) -> torch.Tensor:
    # window: [B, S + 1] -> mean next-token cross-entropy (scalar)
    logits = model(input_ids=window[:, :-1]).logits  # [B, S, V]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), window[:, 1:].reshape(-1)
    )


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokens: torch.Tensor, ctx: int) -> float:
    """Mean loss over all non-overlapping ctx windows of the validation stream."""
    model.eval()
    n = (tokens.numel() - 1) // ctx
    windows = torch.stack([tokens[i * ctx : i * ctx + ctx + 1] for i in range(n)])
    losses = [lm_loss(model, windows[i : i + 8]).item() * len(windows[i : i + 8])
              for i in range(0, n, 8)]
    model.train()
    return sum(losses) / n


@torch.no_grad()
def greedy(model: LlamaForCausalLM, tok: Tokenizer, prompt: str, new_tokens: int = 30) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones_like(ids))
    model.train()
    return tok.decode(out[0].tolist())


# ---------------------------------------------------------------- loop


def save_ckpt(path: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer, step: int,
              total: int, gen: torch.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "total": total, "gen": gen.get_state()}, tmp)
    tmp.replace(path)


def keep_best(path: Path, model: LlamaForCausalLM, step: int, val_loss: float) -> None:
    """Early stopping by selection: keep the weights with the lowest validation loss."""
    if path.exists() and torch.load(path, weights_only=True)["val_loss"] <= val_loss:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "step": step, "val_loss": val_loss}, tmp)
    tmp.replace(path)


def measure_steps(cfg: TrainConfig, model: LlamaForCausalLM, tokens: torch.Tensor) -> int:
    """Time a few throwaway steps on a copy and size the run to --minutes."""
    probe = LlamaForCausalLM(model.config)
    probe.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(12345)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        lm_loss(probe, sample_batch(tokens, cfg.batch_size, cfg.context, gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    per_step = sorted(times)[len(times) // 2] * 1.1  # leave room for evals
    steps = max(cfg.warmup_steps + 10, int(cfg.minutes * 60 / per_step))
    log.info("measured %.2f s/step -> %d steps for %.1f min", per_step, steps, cfg.minutes)
    return steps


def prepare(cfg: TrainConfig) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """Split, train the tokenizer, encode -> (tokenizer, train ids [N], val ids [M])."""
    train_docs, val_docs = split_documents(cfg.val_fraction, cfg.seed)
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    train_ids, val_ids = encode_corpus(tok, train_docs), encode_corpus(tok, val_docs)
    log.info("docs train=%d val=%d tokens train=%d val=%d vocab=%d eos=%d", len(train_docs),
             len(val_docs), train_ids.numel(), val_ids.numel(), tok.get_vocab_size(),
             eos_id_of(tok))
    return tok, train_ids, val_ids


def initial_model(cfg: TrainConfig, tok: Tokenizer, val_ids: torch.Tensor
                  ) -> tuple[LlamaForCausalLM, float]:
    """Seeded fresh model and its validation loss (the 'before' figure)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, eos_id_of(tok))
    log.info("params %d", sum(p.numel() for p in model.parameters()))
    val0 = evaluate(model, val_ids, cfg.context)
    log.info("before: val_loss %.4f ppl %.1f", val0, math.exp(val0))
    return model, val0


def train(cfg: TrainConfig, out_dir: Path, work_dir: Path, resume: bool) -> None:
    tok, train_ids, val_ids = prepare(cfg)
    model, val0 = initial_model(cfg, tok, val_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = work_dir / "ckpt.pt"
    step, total = 0, cfg.steps
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, total = state["step"], state["total"]
        gen.set_state(state["gen"])
        log.info("resumed at step %d of %d", step, total)
    if total == 0:
        total = measure_steps(cfg, model, train_ids)
    if step == 0:
        (work_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        (work_dir / "metrics.jsonl").unlink(missing_ok=True)
        (work_dir / "best.pt").unlink(missing_ok=True)
    run_steps(cfg, model, opt, gen, train_ids, val_ids, step, total, ckpt,
              work_dir / "metrics.jsonl")
    export_best(cfg, model, tok, val_ids, out_dir, work_dir, val0)


def export_best(cfg: TrainConfig, model: LlamaForCausalLM, tok: Tokenizer, val_ids: torch.Tensor,
                out_dir: Path, work_dir: Path, val0: float) -> None:
    """Load work_dir/best.pt (lowest validation loss so far), plot, sample and save."""
    best = torch.load(work_dir / "best.pt", weights_only=True)
    log.info("exporting best val step %d (val_loss %.4f)", best["step"], best["val_loss"])
    model.load_state_dict(best["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_metrics(work_dir / "metrics.jsonl", out_dir / "loss_curve.png")
    finish(cfg, model, tok, val_ids, out_dir, val0)


def export_only(cfg: TrainConfig, out_dir: Path, work_dir: Path) -> None:
    """Recover a run that was stopped: export its best checkpoint without training further."""
    tok, _, val_ids = prepare(cfg)
    model, val0 = initial_model(cfg, tok, val_ids)
    export_best(cfg, model, tok, val_ids, out_dir, work_dir, val0)


def run_steps(cfg: TrainConfig, model: LlamaForCausalLM, opt: torch.optim.Optimizer,
              gen: torch.Generator, train_ids: torch.Tensor, val_ids: torch.Tensor, step: int,
              total: int, ckpt: Path, metrics: Path) -> None:
    model.train()
    t0 = time.perf_counter()
    with metrics.open("a") as mf:
        while step < total:
            lr = lr_at(step, cfg, total)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = lm_loss(model, sample_batch(train_ids, cfg.batch_size, cfg.context, gen))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            row: dict[str, float] = {"step": step, "lr": lr, "train_loss": loss.item(),
                                     "elapsed_s": time.perf_counter() - t0}
            if step % cfg.eval_every == 0 or step == total:
                row["val_loss"] = evaluate(model, val_ids, cfg.context)
                keep_best(ckpt.with_name("best.pt"), model, step, row["val_loss"])
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            if step % 10 == 0 or "val_loss" in row:
                log.info("step %d/%d lr %.2e %s", step, total, lr,
                         " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith("loss")))
            if step % cfg.ckpt_every == 0 or step == total:
                save_ckpt(ckpt, model, opt, step, total, gen)


def finish(cfg: TrainConfig, model: LlamaForCausalLM, tok: Tokenizer, val_ids: torch.Tensor,
           out_dir: Path, val0: float) -> None:
    val = evaluate(model, val_ids, cfg.context)
    log.info("after: val_loss %.4f ppl %.1f (before %.4f ppl %.1f; uniform ppl %d)", val,
             math.exp(val), val0, math.exp(val0), cfg.vocab_size)
    for prompt in PROMPTS:
        log.info("sample %r -> %r", prompt, greedy(model, tok, prompt))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(str(out_dir / "tokenizer.json"))
    add_legacy_config_keys(out_dir / "config.json")
    eos_id = eos_id_of(tok)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
        "pad_token": EOS, "unk_token": EOS, "model_max_length": cfg.max_positions,
        "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    log.info("saved to %s (eos id %d)", out_dir, eos_id)


# A plain "role: content" transcript ending in "assistant:" (the model is no assistant; the
# template lets /v1/chat/completions run on it).
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def add_legacy_config_keys(path: Path) -> None:
    """transformers 5 writes `dtype`/`rope_parameters`; readers of 4.x expect these keys too."""
    config = json.loads(path.read_text())
    config["torch_dtype"] = config.get("dtype", "float32")
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plot_metrics(metrics: Path, png: Path) -> None:
    """Train loss (per step) and validation loss (every eval_every steps) -> a PNG figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, label="train")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="default model training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def parse_args() -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="exact step count (overrides --minutes)")
    p.add_argument("--minutes", type=float, default=22.0, help="training wall-time budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/pdserve_default_model"))
    p.add_argument("--resume", action="store_true", help="continue from --work-dir/ckpt.pt")
    p.add_argument("--export-only", action="store_true",
                   help="save --work-dir/best.pt to --out-dir without training")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw --out-dir/loss_curve.png from --work-dir/metrics.jsonl")
    a = p.parse_args()
    cfg = TrainConfig(seed=a.seed, steps=a.steps, minutes=a.minutes, threads=a.threads,
                      batch_size=a.batch_size)
    return cfg, a


def main() -> None:
    cfg, args = parse_args()
    out_dir, work_dir = args.out_dir, args.work_dir
    if args.plot_only:
        plot_metrics(work_dir / "metrics.jsonl", out_dir / "loss_curve.png")
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=[
        logging.StreamHandler(), logging.FileHandler(work_dir / "train.log")])
    torch.set_num_threads(cfg.threads)
    log.info("config %s", asdict(cfg))
    if args.export_only:
        export_only(cfg, out_dir, work_dir)
    else:
        train(cfg, out_dir, work_dir, args.resume)


if __name__ == "__main__":
    main()
