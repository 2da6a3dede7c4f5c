"""A small Llama-style decoder: RMSNorm, rotary positions, SwiGLU, every projection an ``nn.Linear``.

``nn.Linear`` everywhere (no fused or custom matmuls) so ``torch.ao.quantization.quantize_dynamic`` can turn
the model into int8 and ``.to(dtype)`` into bf16/fp16.  Incremental decoding uses a preallocated KV cache;
batches are left-padded and carry a key mask, so prompts of different lengths decode together.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.demo.tokenizer import PAD, VOCAB_SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "model.pt"
CONFIG_FILE = WEIGHTS_DIR / "config.json"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 688  # SwiGLU hidden width, ~8/3 d_model rounded to a multiple of 16
    max_seq: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope_tables(cfg: ModelConfig, length: int) -> tuple[Tensor, Tensor]:
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    ang = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D/2), already gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Preallocated keys/values for every layer plus which slots hold real (not padding) tokens."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, cfg.n_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.length = 0
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def prefix(self, row: int, start: int, stop: int) -> list[tuple[Tensor, Tensor]]:
        """Copies of one sequence's keys/values in slots [start, stop) for every layer."""
        pairs = zip(self.k, self.v, strict=True)
        return [(k[row, :, start:stop].clone(), v[row, :, start:stop].clone()) for k, v in pairs]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        b, t, d = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            ck, cv = cache.k[layer], cache.v[layer]
            ck[:, :, start : start + t] = k.to(ck.dtype)
            cv[:, :, start : start + t] = v.to(cv.dtype)
            k_all = ck[:, :, : start + t].to(q.dtype)
            v_all = cv[:, :, : start + t].to(q.dtype)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, cfg.max_seq)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """ids (B, T) -> logits (B, T, V) in fp32.

        Without a cache: plain causal attention over positions 0..T-1 (training).  With a cache: ``positions``
        (B, T) index the rotary table and ``mask`` (B, 1, T, cache.length + T) says which keys each query sees.
        """
        b, t = ids.shape
        if positions is None:
            positions = torch.arange(t, device=ids.device).expand(b, t)
        x = self.embed(ids)
        cos_table: Tensor = self.rope_cos  # type: ignore[assignment]
        sin_table: Tensor = self.rope_sin  # type: ignore[assignment]
        cos = cos_table[positions].unsqueeze(1).to(x.dtype)
        sin = sin_table[positions].unsqueeze(1).to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += t
        return self.lm_head(self.norm(x)).float()


class BatchDecoder:
    """Incremental decoding of a left-padded batch: ``prefill()`` once, then ``step(next_ids)`` per token.

    Every call returns the next-token logits (B, V).  Prompts longer than ``max_seq - max_new_tokens``
    keep their last tokens.
    """

    def __init__(self, model: TinyLlama, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise ValueError("no prompts")
        cfg = model.cfg
        max_new_tokens = max(1, min(max_new_tokens, cfg.max_seq - 1))
        keep = cfg.max_seq - max_new_tokens
        self.prompts = [list(p[-keep:]) or [PAD] for p in prompts]
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.batch = len(self.prompts)
        self.prompt_len = max(len(p) for p in self.prompts)
        dtype = cache_dtype(model)
        self.cache = KVCache(cfg, self.batch, self.prompt_len + max_new_tokens, dtype, model_device(model))
        self.positions = torch.zeros(self.batch, dtype=torch.long)
        self.steps = 0

    def prefill(self) -> Tensor:
        b, p = self.batch, self.prompt_len
        ids = torch.full((b, p), PAD, dtype=torch.long)
        valid = torch.zeros((b, p), dtype=torch.bool)
        for i, prompt in enumerate(self.prompts):
            ids[i, p - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            valid[i, p - len(prompt) :] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        self.cache.valid[:, :p] = valid
        causal = torch.ones((p, p), dtype=torch.bool).tril()
        # padding queries see themselves so no row of the softmax is empty (an all-masked row gives NaN)
        mask = (valid[:, None, :] & causal[None]) | torch.eye(p, dtype=torch.bool)[None]
        logits = self.model(ids, positions, mask[:, None], self.cache)
        self.positions = positions[:, -1]
        return logits[:, -1]

    def step(self, next_ids: Tensor) -> Tensor:
        if self.cache.length >= self.cache.capacity:
            raise RuntimeError("decode past max_new_tokens")
        slot = self.cache.length
        self.cache.valid[:, slot] = True
        self.positions = self.positions + 1
        mask = self.cache.valid[:, None, None, : slot + 1]
        logits = self.model(next_ids.view(-1, 1), self.positions.view(-1, 1), mask, self.cache)
        self.steps += 1
        return logits[:, -1]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def cache_dtype(model: nn.Module) -> torch.dtype:
    """fp32 for a dynamically quantized model (its activations are fp32), else the parameters' dtype."""
    for p in model.parameters():
        if p.is_floating_point() and p.dim() >= 2:
            return p.dtype
    return torch.float32


def save(model: TinyLlama, directory: Path = WEIGHTS_DIR, meta: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE.name)
    (directory / CONFIG_FILE.name).write_text(json.dumps({"config": asdict(model.cfg), **(meta or {})}, indent=1))


def load(directory: Path = WEIGHTS_DIR, *, dtype: torch.dtype = torch.float32) -> TinyLlama:
    """The committed weights (``weights_only=True``: a tensor file, never arbitrary pickled objects)."""
    info = json.loads((directory / CONFIG_FILE.name).read_text())
    cfg = ModelConfig(**info["config"])
    model = TinyLlama(cfg)
    state = torch.load(directory / WEIGHTS_FILE.name, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model.to(dtype)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
