"""``tuner demo --export-hf DIR``: the trained demo model as a Hugging Face Llama folder an engine can serve.

The folder loads with ``transformers`` (``LlamaForCausalLM``, ``AutoTokenizer``) and serves with vLLM
(``--model DIR --dtype float32 --max-model-len 256``):

- ``config.json``: ``LlamaForCausalLM`` with the demo's shape.  No tensor permutation is needed: the demo's
  rotary embedding is the half-split form (``x1, x2 = x.chunk(2)``), which is what HF's ``rotate_half``
  computes; ``rms_norm_eps`` 1e-5 (LlamaConfig's default is 1e-6); untied embedding and output head;
  ``max_position_embeddings`` 256, the demo's context (vLLM takes ``max_model_len`` from it).  The rope theta
  is written in both spellings (transformers 4's ``rope_theta``, 5's ``rope_parameters``).
- ``model.safetensors``: the fp32 weights under Llama's names.
- ``generation_config.json``: token ids only, no sampling defaults (vLLM's ``--generation-config auto`` would
  apply them to every request).
- ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``): the demo's byte-level ids, byte
  b -> id b, built as a BPE with no merges over GPT-2's byte-to-character map, so every byte is its own token;
  ``<|bos|>`` 256, ``<|eos|>`` 257, ``<|pad|>`` 258, ``<|unused0..4|>`` 259-263 (special, so ``<s>`` in a
  prompt stays bytes).  Encoding with special tokens prepends BOS, as the demo's prompts start.
- ``chat_template.jinja`` (also in ``tokenizer_config.json``): BOS, then the messages' contents joined by a
  newline, the demo server's chat prompt (no role tags: the model never saw any).

What an engine does differently from the demo: the demo never samples BOS, PAD or the unused ids; an engine
may, unless the request restricts it (vLLM: ``"allowed_token_ids": [0, ..., 255, 257]``, see
:data:`ALLOWED_TOKEN_IDS`); the demo cuts an over-long prompt to its last tokens, vLLM answers 400.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tuner.demo.tokenizer import BOS, EOS, PAD, VOCAB_SIZE
from tuner.errors import UserError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"] + [f"<|unused{i}|>" for i in range(VOCAB_SIZE - PAD - 1)]
# What the demo's sampler can produce: the 256 bytes and EOS (tuner/demo/sampling.py mask_specials).
ALLOWED_TOKEN_IDS = [*range(256), EOS]
# BOS, then the contents joined by "\n" (tuner/demo/serve.py).  The newline is an expression: transformers
# renders templates with trim_blocks, which eats a literal newline after a {% ... %} tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_name(key: str) -> str:
    """A demo ``state_dict`` key -> its ``LlamaForCausalLM`` key."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    head, i, rest = key.split(".", 2)
    if head != "blocks" or rest not in _LAYER_NAMES:
        raise ValueError(f"no Llama name for demo weight {key!r}")
    return f"model.layers.{int(i)}.{_LAYER_NAMES[rest]}"


def hf_config(cfg: Any) -> dict[str, Any]:
    """``config.json`` for a :class:`tuner.demo.model.ModelConfig`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "dtype": "float32",
    }


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the one the ByteLevel pre-tokenizer and decoder use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def tokenizer_json() -> str:
    """``tokenizer.json`` whose ids equal :class:`tuner.demo.tokenizer.ByteTokenizer`'s."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = _byte_chars()
    if set(chars.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("this tokenizers version's byte alphabet differs from GPT-2's")
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    # no regex split: without merges every byte is its own token anyway
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    if ids != list(range(256, VOCAB_SIZE)):
        raise RuntimeError(f"special tokens got ids {ids}, not 256..{VOCAB_SIZE - 1}")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", BOS)]
    )
    return str(tok.to_str(pretty=True))


def tokenizer_config(max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_len,
        "padding_side": "left",  # the demo left-pads its batches
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(256 + i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }


def _readme(cfg: Any) -> str:
    return (
        "# tuner demo model (Hugging Face Llama format)\n\n"
        "Written by `tuner demo --export-hf`: the byte-level Llama-style model `tuner demo` serves, trained on "
        "the standard library's `pydoc_data` text (see tuner/demo/MODEL_CARD.md in inference-tuner).\n\n"
        f"- {cfg.n_layers} layers, hidden {cfg.d_model}, {cfg.n_heads} heads, context {cfg.max_seq} tokens, "
        "fp32.\n"
        "- Token ids are UTF-8 bytes (0-255); `<|bos|>` 256, `<|eos|>` 257, `<|pad|>` 258, 259-263 unused. "
        "Prompts start with BOS (the tokenizer adds it).\n"
        "- Only bytes and EOS were ever targets: restrict sampling to them, e.g. vLLM "
        '`"allowed_token_ids": [0, ..., 255, 257]`.\n\n'
        "Serve with vLLM:\n\n"
        "    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name tuner-demo "
        "--dtype float32 --max-model-len 256\n"
    )


def check_target(out: Path) -> None:
    """A new folder, or an empty one: never mix an export into other files."""
    try:
        if not (out.exists() or out.is_symlink()):
            return
        if not out.is_dir():
            raise UserError(f"--export-hf {out}: exists and is not a folder")
        taken = any(out.iterdir())
    except OSError as exc:
        raise UserError(f"--export-hf {out}: cannot look into it ({exc.strerror or exc})") from None
    if taken:
        raise UserError(f"--export-hf {out}: the folder exists and is not empty; give a new or empty one")


def export(out: Path) -> list[Path]:
    """Write the demo model into ``out`` (new or empty); returns the files written.  On any failure nothing
    is left behind (files are written as ``.partial`` and renamed once all are complete)."""
    try:
        import torch  # noqa: F401  (the demo's weights are a torch file)
        from safetensors.torch import save as safetensors_bytes
        from tokenizers import Tokenizer  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"--export-hf needs torch, safetensors and tokenizers ({exc.name} is missing): "
            "pip install 'inference-tuner[torch]'"
        ) from None
    from tuner.demo.model import load

    out = Path(out)
    check_target(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--export-hf {out}: cannot create the folder ({exc.strerror or exc})") from None
    model = load()
    cfg = model.cfg
    weights = {hf_name(k): v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    texts: dict[str, str] = {
        "config.json": json.dumps(hf_config(cfg), indent=2) + "\n",
        "generation_config.json": json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, indent=2)
        + "\n",
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": json.dumps(tokenizer_config(cfg.max_seq), indent=2) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[2]}, indent=2
        )
        + "\n",
        "chat_template.jinja": CHAT_TEMPLATE,
        "README.md": _readme(cfg),
    }
    partial: list[Path] = []
    done: list[Path] = []
    try:
        for name in FILES:
            p = out / (name + ".partial")
            partial.append(p)
            if name == "model.safetensors":
                p.write_bytes(safetensors_bytes(weights, metadata={"format": "pt"}))
            else:
                p.write_text(texts[name], encoding="utf-8")
        for p in partial:
            final = p.with_name(p.name.removesuffix(".partial"))
            os.replace(p, final)
            done.append(final)
    except OSError as exc:
        for p in partial + done:
            p.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise UserError(f"--export-hf {out}: cannot write ({exc.strerror or exc}); nothing was left there") from None
    return done
