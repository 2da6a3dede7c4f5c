"""Repetition measures over generated token ids, computed incrementally (O(1) work per token).

Every tracker takes tokens one at a time (``push``) or in chunks (``extend``) and can report its value
at any moment; the value always equals what a plain whole-sequence computation gives (the tests check
this with hypothesis against reference implementations).  Tokens are any hashable values — normally
ints (token ids).

Definitions (for one response ``s`` of ``n`` tokens):

- **seq-rep-4** (Welleck et al. 2019, "Neural text degeneration with unlikelihood training"):
  ``1 - |unique 4-grams of s| / |4-grams of s|`` where ``s`` has ``n - 3`` 4-grams.  ``None`` when
  ``n < 4``.  0 = no 4-gram repeats; close to 1 = the response is one 4-gram over and over.
- **rep-32** (``rep-w`` with window ``w = 32``): the share of the ``n`` tokens that equal at least one of
  the (up to) 32 tokens right before them in the same response.  The first token has no predecessor and
  never counts as a repeat, but is part of the denominator.  ``None`` when ``n == 0``.
- **loop**: ``True`` once, at some position ``i``, the ``3 * k`` tokens ending at ``i`` are three copies of
  the same ``k``-gram in a row, for some ``k`` in ``min_n..max_n`` (default 1..8) — i.e.
  ``s[i-3k+1 : i-2k+1] == s[i-2k+1 : i-k+1] == s[i-k+1 : i+1]``.  Equivalently ``s[j] == s[j-k]`` for
  every ``j`` in ``(i-2k, i]``, which is what the tracker counts (one run length per ``k``).  The flag
  stays set for the rest of the response.  With a byte-level tokenizer short repeats (``"   "``,
  ``"---"``) already satisfy ``k = 1``; raise ``min_n`` there.
- **distinct-2** (Li et al. 2016) over the last ``N`` responses: distinct bigrams / all bigrams, counted
  within each response (a bigram never spans two responses).  ``None`` when there is no bigram.  The
  window also stops at ``max_bigrams`` bigrams (memory bound; see ``Distinct2``).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from itertools import pairwise

Token = Hashable


class SeqRep4:
    """seq-rep-4 of one response."""

    __slots__ = ("_p1", "_p2", "_p3", "_seen", "n")

    def __init__(self) -> None:
        self.n = 0
        self._p1: Token = None
        self._p2: Token = None
        self._p3: Token = None
        self._seen: set[tuple[Token, Token, Token, Token]] = set()

    def push(self, tok: Token) -> None:
        if self.n >= 3:
            self._seen.add((self._p3, self._p2, self._p1, tok))
        self._p3, self._p2, self._p1 = self._p2, self._p1, tok
        self.n += 1

    def extend(self, toks: Iterable[Token]) -> None:
        for t in toks:
            self.push(t)

    @property
    def value(self) -> float | None:
        total = self.n - 3
        if total <= 0:
            return None
        return 1.0 - len(self._seen) / total


class RepW:
    """rep-w: share of tokens equal to one of the previous ``w`` tokens (default w = 32)."""

    __slots__ = ("_win", "n", "repeats")

    def __init__(self, w: int = 32) -> None:
        if w < 1:
            raise ValueError("window must be >= 1")
        self._win: deque[Token] = deque(maxlen=w)
        self.n = 0
        self.repeats = 0

    def push(self, tok: Token) -> None:
        if tok in self._win:  # at most w comparisons: O(1) per token
            self.repeats += 1
        self._win.append(tok)
        self.n += 1

    def extend(self, toks: Iterable[Token]) -> None:
        for t in toks:
            self.push(t)

    @property
    def value(self) -> float | None:
        return self.repeats / self.n if self.n else None


class LoopDetector:
    """The same k-gram three times in a row, k in ``min_n..max_n`` (see the module docstring)."""

    __slots__ = ("_hist", "_runs", "looped", "max_n", "min_n", "n", "period", "repeats")

    def __init__(self, min_n: int = 1, max_n: int = 8, repeats: int = 3) -> None:
        if not (1 <= min_n <= max_n) or repeats < 2:
            raise ValueError("need 1 <= min_n <= max_n and repeats >= 2")
        self.min_n, self.max_n, self.repeats = min_n, max_n, repeats
        self._hist: deque[Token] = deque(maxlen=max_n)
        self._runs = [0] * (max_n + 1)  # _runs[k]: consecutive positions j with s[j] == s[j-k]
        self.n = 0
        self.looped = False
        self.period: int | None = None  # the k of the first loop found

    def push(self, tok: Token) -> None:
        hist, runs = self._hist, self._runs
        h = len(hist)
        need = self.repeats - 1
        for k in range(self.min_n, self.max_n + 1):
            if k <= h and hist[-k] == tok:
                r = runs[k] + 1
                runs[k] = r
                if r >= need * k and not self.looped:
                    self.looped, self.period = True, k
            else:
                runs[k] = 0
        hist.append(tok)
        self.n += 1

    def extend(self, toks: Iterable[Token]) -> None:
        for t in toks:
            self.push(t)

    @property
    def value(self) -> bool:
        return self.looped


class Distinct2:
    """distinct-2 over the last ``last`` responses (bigram counts kept per response, oldest evicted).

    Memory is bounded too: the oldest responses are also evicted while the window holds more than
    ``max_bigrams`` bigrams (the newest response always stays), so the window is the longest run of
    recent responses — at most ``last`` — whose bigrams fit.
    """

    def __init__(self, last: int = 100, max_bigrams: int = 1_000_000) -> None:
        if last < 1 or max_bigrams < 1:
            raise ValueError("last and max_bigrams must be >= 1")
        self.last = last
        self.max_bigrams = max_bigrams
        self._counts: Counter[tuple[Token, Token]] = Counter()
        self._responses: deque[list[tuple[Token, Token]]] = deque()
        self._total = 0

    def add_response(self, toks: Iterable[Token]) -> None:
        seq = toks if isinstance(toks, list) else list(toks)
        bigrams = list(pairwise(seq))
        self._counts.update(bigrams)
        self._total += len(bigrams)
        self._responses.append(bigrams)
        while len(self._responses) > self.last or (self._total > self.max_bigrams and len(self._responses) > 1):
            old = self._responses.popleft()
            counts = self._counts
            for b in old:
                c = counts[b] - 1
                if c:
                    counts[b] = c
                else:
                    del counts[b]
            self._total -= len(old)

    @property
    def value(self) -> float | None:
        return len(self._counts) / self._total if self._total else None


@dataclass(frozen=True, slots=True)
class ResponseRepetition:
    tokens: int
    seq_rep_4: float | None
    rep_32: float | None
    loop: bool


def response_repetition(
    toks: Iterable[Token], *, w: int = 32, loop_min_n: int = 1, loop_max_n: int = 8, loop_repeats: int = 3
) -> ResponseRepetition:
    """seq-rep-4, rep-w and the loop flag of one whole response in a single fused pass.

    The same algorithms as the trackers above (O(1) per token), with the per-token state in local
    variables: this is what the sidecar runs on every finished request, so it has to manage >= 1M tokens/s.
    """
    if w < 1 or not (1 <= loop_min_n <= loop_max_n) or loop_repeats < 2:
        raise ValueError("need w >= 1, 1 <= loop_min_n <= loop_max_n and loop_repeats >= 2")
    seen: set[tuple[Token, Token, Token, Token]] = set()
    win: deque[Token] = deque(maxlen=w)
    hist: deque[Token] = deque(maxlen=loop_max_n)
    runs = [0] * (loop_max_n + 1)
    ks = range(loop_min_n, loop_max_n + 1)
    need = loop_repeats - 1
    hist_in_win = w >= loop_max_n  # then "t not in win" already says "t not in hist"
    p1: Token = None
    p2: Token = None
    p3: Token = None
    n = repeats = 0
    looped = dirty = False
    add, win_append, hist_append = seen.add, win.append, hist.append
    for t in toks:
        if n >= 3:
            add((p3, p2, p1, t))
        p3, p2, p1 = p2, p1, t
        in_win = t in win
        if in_win:
            repeats += 1
        if not looped:
            if (in_win or not hist_in_win) and t in hist:  # no k can match unless t is in the last max_n
                h = len(hist)
                dirty = True
                for k in ks:
                    if k <= h and hist[-k] == t:
                        r = runs[k] + 1
                        runs[k] = r
                        if r >= need * k:
                            looped = True
                    else:
                        runs[k] = 0
            elif dirty:
                runs = [0] * (loop_max_n + 1)
                dirty = False
            hist_append(t)
        win_append(t)
        n += 1
    return ResponseRepetition(
        tokens=n,
        seq_rep_4=(1.0 - len(seen) / (n - 3)) if n > 3 else None,
        rep_32=repeats / n if n else None,
        loop=looped,
    )
