"""Canary prompt sets: fixed prompts answered before and after a knob change (reference consistency).

A file holds one prompt a line (UTF-8); blank lines are skipped; a line is taken as it is (no trimming but the
line break), so a prompt may end in a space on purpose.  ``tuner ... --canary FILE`` sends the set to the
inference side (the channel's welcome); without it the loop uses its own set — the demo ships
``data/demo_canary.txt``: 24 openings of paragraphs of the documentation it was trained on, 12 from topics it
never saw in training and 12 from topics it did (plain ASCII, 41-69 bytes, no trailing space).
"""

from __future__ import annotations

from pathlib import Path

DEMO_CANARY = Path(__file__).resolve().parent / "data" / "demo_canary.txt"
MAX_PROMPTS = 256
MAX_PROMPT_CHARS = 4000
MAX_TOTAL_CHARS = 200_000
"""The set travels in the channel's welcome frame (at most 1 MiB)."""


class CanaryError(ValueError):
    """A canary file that cannot be used; ``str(exc)`` is the one-line reason."""


def parse_canary(text: str, name: str = "canary file") -> tuple[str, ...]:
    prompts = tuple(line for line in text.splitlines() if line.strip())
    if len(prompts) < 2:
        raise CanaryError(f"{name}: {len(prompts)} prompts; a canary set needs at least 2 (one a line)")
    if len(prompts) > MAX_PROMPTS:
        raise CanaryError(f"{name}: {len(prompts)} prompts; at most {MAX_PROMPTS} (each is answered at every "
                          "precision change)")
    for i, p in enumerate(prompts, 1):
        if len(p) > MAX_PROMPT_CHARS:
            raise CanaryError(f"{name}: prompt {i} has {len(p)} characters (at most {MAX_PROMPT_CHARS})")
    total = sum(len(p) for p in prompts)
    if total > MAX_TOTAL_CHARS:
        raise CanaryError(f"{name}: {total} characters in all (at most {MAX_TOTAL_CHARS})")
    return prompts


def load_canary(path: str | Path) -> tuple[str, ...]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except IsADirectoryError:
        raise CanaryError(f"canary file {p}: is a directory") from None
    except OSError as exc:
        raise CanaryError(f"canary file {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CanaryError(f"canary file {p}: not UTF-8 text") from None
    return parse_canary(text, f"canary file {p}")


def demo_canary() -> tuple[str, ...]:
    return load_canary(DEMO_CANARY)
