"""Does a backend separate meaning?  ROC AUC on the committed pairs (``data/pairs.jsonl``), by subset.

``python -m tuner.quality.validate [--backend minilm] [--backend lexical] [--json]``

The pairs (564, written for this project): 148 close paraphrases and 148 low-overlap paraphrases (same meaning,
few shared words) are the positives; 148 hard negatives (same topic and most of the words, a different claim:
swapped roles, changed numbers, a negation, another entity) and 120 unrelated pairs the negatives.  AUC is the
chance a positive scores above a negative (Mann-Whitney, ties averaged); the 95% interval is a percentile
bootstrap (2,000 resamples, positives and negatives resampled separately, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from tuner.quality.backends import BackendError, load_pairs, open_backend, parse_spec, roc_auc

SUBSETS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("all positives vs all negatives", ("paraphrase", "low_overlap_paraphrase"), ("hard_negative", "unrelated")),
    ("all positives vs hard negatives", ("paraphrase", "low_overlap_paraphrase"), ("hard_negative",)),
    ("all positives vs unrelated", ("paraphrase", "low_overlap_paraphrase"), ("unrelated",)),
    ("low-overlap paraphrases vs all negatives", ("low_overlap_paraphrase",), ("hard_negative", "unrelated")),
    ("close paraphrases vs hard negatives", ("paraphrase",), ("hard_negative",)),
)
KINDS = ("paraphrase", "low_overlap_paraphrase", "hard_negative", "unrelated")


def bootstrap_ci(pos: Sequence[float], neg: Sequence[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    p, q = np.asarray(pos, float), np.asarray(neg, float)
    aucs = [roc_auc(p[rng.integers(0, p.size, p.size)], q[rng.integers(0, q.size, q.size)]) for _ in range(n)]
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def evaluate(backend_spec: str, *, bootstrap: int = 2000) -> dict[str, Any]:
    pairs = load_pairs()
    t = time.monotonic()
    backend = open_backend(parse_spec(backend_spec))
    load_s = time.monotonic() - t
    t = time.monotonic()
    scored = backend.similarities([(p["a"], p["b"]) for p in pairs])
    score_s = time.monotonic() - t
    bad = [why for s, why in scored if s is None]
    if bad:
        raise BackendError(f"{backend.name}: {len(bad)} pairs not scored ({bad[0]})")
    scores = [float(s) for s, _ in scored if s is not None]
    by_kind = {k: [s for s, p in zip(scores, pairs, strict=True) if p["kind"] == k] for k in KINDS}
    out: dict[str, Any] = {"backend": backend.describe(), "pairs": len(pairs), "load_seconds": round(load_s, 2),
                           "score_seconds_per_pair": round(score_s / len(pairs), 5), "subsets": [], "means": {}}
    for name, pos_kinds, neg_kinds in SUBSETS:
        pos = [s for k in pos_kinds for s in by_kind[k]]
        neg = [s for k in neg_kinds for s in by_kind[k]]
        lo, hi = bootstrap_ci(pos, neg, bootstrap) if bootstrap else (None, None)
        out["subsets"].append({"subset": name, "positives": len(pos), "negatives": len(neg),
                               "auc": round(roc_auc(pos, neg), 3), "ci95": [round(lo, 3), round(hi, 3)]
                               if lo is not None and hi is not None else None})
    for k, xs in by_kind.items():
        out["means"][k] = round(sum(xs) / len(xs), 3)
    backend.close()
    return out


def render(results: list[dict[str, Any]]) -> str:
    names = [r["backend"]["name"] + (" (semantic)" if r["backend"].get("semantic") else " (lexical)") for r in results]
    lines = ["ROC AUC on the committed pairs (tuner/quality/data/pairs.jsonl), 95% bootstrap interval", ""]
    lines.append(f"{'subset':44s} {'n+':>4s} {'n-':>4s}  " + "  ".join(f"{n:>26s}" for n in names))
    for i, (name, _, _) in enumerate(SUBSETS):
        row = results[0]["subsets"][i]
        cells = []
        for r in results:
            s = r["subsets"][i]
            ci = s["ci95"]
            cells.append(f"{s['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{s['auc']:.3f}")
        counts = f"{row['positives']:4d} {row['negatives']:4d}"
        lines.append(f"{name:44s} {counts}  " + "  ".join(f"{c:>26s}" for c in cells))
    lines += ["", "mean score by kind"]
    for k in KINDS:
        lines.append(f"  {k:28s} " + "  ".join(f"{r['means'][k]:>10.3f}" for r in results))
    lines += ["", "cost: " + "; ".join(f"{r['backend']['name']} loaded in {r['load_seconds']} s, "
                                       f"{1000 * r['score_seconds_per_pair']:.1f} ms a pair" for r in results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuner.quality.validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", help="minilm, minilm:DIR, embeddings:URL or lexical (repeatable; "
                    "default: minilm and lexical)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for spec in args.backend or ["minilm", "lexical"]:
        try:
            results.append(evaluate(spec, bootstrap=args.bootstrap))
        except (BackendError, ValueError) as exc:
            print(f"tuner: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(results, indent=1) if args.json else render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
