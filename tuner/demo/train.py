"""Train the demo model on the standard library's ``pydoc_data/topics.py`` text.

``python -m tuner.demo.train --seed 0 --minutes 18`` writes ``tuner/demo/weights/{model.pt,config.json}``.
The learning-rate schedule runs on the wall-clock budget (warm-up, then cosine to 10%), so a run of M
minutes ends at the low learning rate whatever the machine's speed; the step count reached is recorded.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.demo.corpus import split_topics
from tuner.demo.model import WEIGHTS_DIR, ModelConfig, TinyLlama, param_count, save
from tuner.demo.tokenizer import BOS, EOS


def to_ids(docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids.append(BOS)
        ids.extend(doc.encode("utf-8"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def batch_of(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
    x = torch.stack([data[s : s + ctx] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + ctx + 1] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def evaluate(model: TinyLlama, data: torch.Tensor, ctx: int, max_windows: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over non-overlapping windows of ``data``."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // ctx)
    losses = []
    for i in range(0, n, 16):
        idx = range(i, min(n, i + 16))
        x = torch.stack([data[j * ctx : j * ctx + ctx] for j in idx])
        y = torch.stack([data[j * ctx + 1 : j * ctx + ctx + 1] for j in idx])
        logits = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item())
    model.train()
    return sum(losses) / (n * ctx)


def lr_at(frac: float, peak: float, warmup_frac: float = 0.03) -> float:
    if frac < warmup_frac:
        return peak * frac / warmup_frac
    p = min(1.0, (frac - warmup_frac) / (1 - warmup_frac))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=18.0, help="wall-clock training budget")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = ModelConfig()
    train_docs, held_docs = split_topics()
    train_ids, held_ids = to_ids(train_docs), to_ids(held_docs)
    model = TinyLlama(cfg)
    print(f"params {param_count(model):,}; train {len(train_ids):,} bytes, held-out {len(held_ids):,}", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    budget = args.minutes * 60.0
    t0 = time.monotonic()
    step = 0
    seen = 0
    smooth: float | None = None
    model.train()
    while True:
        frac = (time.monotonic() - t0) / budget
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, args.lr)
        x, y = batch_of(train_ids, args.batch, cfg.max_seq, gen)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += x.numel()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 50 == 0:
            el = time.monotonic() - t0
            print(f"step {step} t={el:.0f}s lr={lr_at(frac, args.lr):.2e} loss={smooth:.3f}", flush=True)
        if step % 400 == 0:
            print(f"  held-out loss {evaluate(model, held_ids, cfg.max_seq):.4f} nats/byte", flush=True)
    seconds = time.monotonic() - t0
    held_loss = evaluate(model, held_ids, cfg.max_seq, max_windows=10_000)
    train_loss = evaluate(model, train_ids, cfg.max_seq, max_windows=128)
    meta = {
        "seed": args.seed,
        "minutes": args.minutes,
        "train_seconds": round(seconds, 1),
        "steps": step,
        "tokens_seen": seen,
        "batch": args.batch,
        "peak_lr": args.lr,
        "held_out_loss_nats_per_byte": round(held_loss, 4),
        "train_loss_nats_per_byte": round(train_loss, 4),
        "train_bytes": len(train_ids),
        "held_out_bytes": len(held_ids),
        "params": param_count(model),
        "torch": torch.__version__,
    }
    model.eval()
    save(model, args.out, meta)
    print(f"done: {step} steps in {seconds:.0f}s; held-out {held_loss:.4f} nats/byte; saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


