"""The demo's text: the standard library's ``pydoc_data/topics.py``, split into the topics the demo model
trains on and the held-out ones its prompts are cut from.  Standard library only: ``python -m
tuner.demo.drive`` sends these prompts to any server without torch installed."""

from __future__ import annotations

import importlib
import random
import zlib

HELD_OUT_SHARE = 0.05


def topics() -> dict[str, str]:
    """The pydoc topic texts every CPython ships (read through importlib, not from a path)."""
    mod = importlib.import_module("pydoc_data.topics")
    return {str(k): str(v) for k, v in mod.topics.items()}


def split_topics(texts: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(train, held_out) texts.  Topics are ordered by the CRC32 of their name (stable across Python
    versions for the topics they share) and taken into the held-out part until it has 5% of the bytes."""
    texts = topics() if texts is None else texts
    total = sum(len(v.encode()) for v in texts.values())
    held: list[str] = []
    train: list[str] = []
    held_bytes = 0
    for key in sorted(texts, key=lambda k: (zlib.crc32(k.encode()), k)):
        size = len(texts[key].encode())
        if held_bytes < HELD_OUT_SHARE * total and size < 0.5 * HELD_OUT_SHARE * total * 4:
            held.append(texts[key])
            held_bytes += size
        else:
            train.append(texts[key])
    return train, held


def held_out_prompts(n: int, seed: int = 0, min_bytes: int = 32, max_bytes: int = 160) -> list[str]:
    """``n`` prompts cut from the held-out topics: each starts at a paragraph and ends at a word boundary."""
    _, held = split_topics()
    starts: list[tuple[int, int]] = []
    for d, doc in enumerate(held):
        pos = 0
        while pos < len(doc) - min_bytes:
            starts.append((d, pos))
            nxt = doc.find("\n\n", pos)
            if nxt < 0:
                break
            pos = nxt + 2
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        d, pos = starts[rng.randrange(len(starts))]
        length = rng.randint(min_bytes, max_bytes)
        text = held[d][pos : pos + length]
        cut = text.rfind(" ")
        if cut >= min_bytes // 2:
            text = text[:cut]
        text = text.lstrip("\n")
        if len(text.strip()) >= min_bytes // 2:
            out.append(text)
    return out
