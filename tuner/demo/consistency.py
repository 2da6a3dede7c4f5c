"""Consistency on the demo model, measured offline (the figures of docs/quality.md).

``python -m tuner.demo.consistency temperature [--backend minilm] [--temps 0.2,0.4,...] [--prompts 48]``
    self-consistency (two answers to each held-out prompt, sampled in one batch at T) and relevance against T;
``python -m tuner.demo.consistency policy TRACE [TRACE ...] [--band 0.02,0.10] [--last 120]``
    what the temperature policy did in recorded runs (``tuner demo --policy ... --consistency ...``): the
    temperatures and repetition penalties it set, its holds at the self-consistency floor, the share of 10 s
    windows whose mean repetition (seq-rep-4) was in the band, and the self-consistency of the scored responses;
``python -m tuner.demo.consistency precision [--backend minilm]``
    reference consistency of the shipped canary set (``tuner/quality/data/demo_canary.txt``), greedy answers at
    bf16 and int8 vs fp32, with the KL / top-1 figures the precision guard reports for the same step, and the
    same-run baseline the policy's floor is relative to (fp32 answers of *different* canary prompts).

The answers are the demo's own: ``tuner.demo.workload.canary_answers`` (greedy, 64 bytes) and the serving loop's
sampler.  Scores come from the named backend in this process (``tuner.quality.backends``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.quality.backends import Backend, BackendError, open_backend, parse_spec
from tuner.quality.canary import demo_canary

if TYPE_CHECKING:
    import torch


def reference_figures(backend: Backend, ref: list[str], new: list[str]) -> dict[str, Any]:
    """What the quality probe reports for a canary round (``tuner.quality.probe``): the mean and min similarity of
    each prompt's new answer to its reference, how many are identical, the baseline (reference answers of
    neighbouring prompts) and the normalised figure."""
    n = len(ref)
    scored = backend.similarities([(ref[i], new[i]) for i in range(n)] + [(ref[i], ref[(i + 1) % n])
                                                                          for i in range(n)])
    sims = [s for s, _ in scored[:n] if s is not None]
    base = [s for s, _ in scored[n:] if s is not None]
    mean = statistics.fmean(sims) if sims else None
    unrel = statistics.fmean(base) if base else None
    norm = (mean - unrel) / (1 - unrel) if mean is not None and unrel is not None and unrel < 1 else None
    return {"mean": mean, "min": min(sims) if sims else None, "identical": sum(a == b for a, b in zip(ref, new,
            strict=True)), "n": n, "unrelated_mean": unrel, "normalised": norm}


def run_precision(backend: Backend) -> dict[str, Any]:
    from tuner.demo.corpus import held_out_prompts
    from tuner.demo.model import BatchDecoder, load
    from tuner.demo.tokenizer import ByteTokenizer
    from tuner.demo.workload import CANARY_TOKENS, canary_answers
    from tuner.integrations.precision import PrecisionManager

    tok = ByteTokenizer()
    kl_prompts = [tok.encode(p, bos=True) for p in held_out_prompts(8, seed=1000, max_bytes=96)]

    def kl_canary(m: torch.nn.Module) -> torch.Tensor:  # the demo's own KL / top-1 canary (workload.main)
        return BatchDecoder(m, kl_prompts, 1).prefill()  # type: ignore[arg-type]

    prompts = list(demo_canary())
    out: dict[str, Any] = {"backend": backend.name, "prompts": len(prompts), "tokens": CANARY_TOKENS, "steps": []}
    for precision in ("bf16", "int8"):
        pm = PrecisionManager(load(), canary=kl_canary, reference="memory")
        t = time.monotonic()
        ref = canary_answers(pm.model, prompts)
        ref_s = time.monotonic() - t
        result = pm.set(precision)
        t = time.monotonic()
        new = canary_answers(pm.model, prompts)
        new_s = time.monotonic() - t
        fig = reference_figures(backend, ref, new)
        out["steps"].append({"from": "fp32", "to": precision, "kl": result.get("kl"), "top1": result.get("top1"),
                             **fig, "answer_seconds_fp32": round(ref_s, 2),
                             "answer_seconds": round(new_s, 2)})
        pm.close()
    return out


def run_temperature(backend: Backend, temps: list[float], n: int, seed: int) -> dict[str, Any]:
    import torch

    from tuner.demo.corpus import held_out_prompts
    from tuner.demo.model import load
    from tuner.demo.sampling import SamplingParams, generate
    from tuner.demo.tokenizer import ByteTokenizer
    from tuner.demo.workload import CANARY_TOKENS

    tok = ByteTokenizer()
    model = load()
    prompts = held_out_prompts(n, seed=seed)
    rows: list[dict[str, Any]] = []
    for temp in temps:
        gen = torch.Generator().manual_seed(seed)
        ids = [tok.encode(p, bos=True) for p in prompts for _ in (0, 1)]
        outs = generate(model, ids, CANARY_TOKENS, SamplingParams(temperature=temp), generator=gen)
        texts = [tok.decode(o) for o in outs]
        pairs = [(texts[2 * i], texts[2 * i + 1]) for i in range(n)] + [(prompts[i], texts[2 * i]) for i in range(n)]
        scored = backend.similarities(pairs)
        sc = [s for s, _ in scored[:n] if s is not None]
        rel = [s for s, _ in scored[n:] if s is not None]
        rows.append({"temperature": temp, "self_consistency": statistics.fmean(sc) if sc else None,
                     "self_consistency_se": statistics.stdev(sc) / math.sqrt(len(sc)) if len(sc) > 1 else None,
                     "relevance": statistics.fmean(rel) if rel else None, "scored": len(sc),
                     "identical": sum(texts[2 * i] == texts[2 * i + 1] for i in range(n))})
    return {"backend": backend.name, "prompts": n, "tokens": CANARY_TOKENS, "seed": seed, "rows": rows}


def summarize_policy_run(path: str, band: tuple[float, float], last_s: float) -> dict[str, Any]:
    """One recorded run of the temperature policy with ``--consistency``: see the module's docstring."""
    from tuner.trace import iter_records

    reqs: list[tuple[float, float, float | None]] = []  # (t, seq_rep_4, temperature)
    scored: list[float] = []
    temps: list[tuple[float, float]] = []
    penalties: list[float] = []
    held = 0
    end = 0.0
    for r in iter_records(path):
        k, t = r.get("k"), float(r.get("t") or 0.0)
        end = max(end, t)
        if k == "event" and r.get("kind") == "request":
            d = r["data"]
            if isinstance(d.get("seq_rep_4"), (int, float)):
                reqs.append((t, float(d["seq_rep_4"]), d.get("temperature")))
        elif k == "event" and r.get("kind") == "quality":
            sc = r["data"].get("self_consistency")
            if isinstance(sc, (int, float)):
                scored.append(float(sc))
        elif k == "action" and r.get("outcome") in ("applied", "done"):
            if r.get("knob") == "temperature" and isinstance(r.get("value"), (int, float)):
                temps.append((t, float(r["value"])))
            elif r.get("knob") == "repetition_penalty" and isinstance(r.get("value"), (int, float)):
                penalties.append(float(r["value"]))
            if "floor" in str(r.get("reason", "")):
                held += 1
    served = [x for _, _, x in reqs if isinstance(x, (int, float))]
    windows: dict[int, list[float]] = {}
    for t, rep, _ in reqs:
        windows.setdefault(int(t // 10), []).append(rep)
    in_band = sum(1 for xs in windows.values() if band[0] <= statistics.fmean(xs) <= band[1])
    late = [x for t, _, x in reqs if t >= end - last_s and isinstance(x, (int, float))]
    return {"trace": path, "seconds": round(end, 1), "requests": len(reqs),
            "temperature_first": served[0] if served else None, "temperature_max": max(served) if served else None,
            "temperature_last_mean": statistics.fmean(late) if late else None, "temperature_moves": len(temps),
            "penalty_max": max(penalties) if penalties else 1.0, "floor_actions": held,
            "windows": len(windows), "windows_in_band": in_band, "scored": len(scored),
            "self_consistency": statistics.fmean(scored) if scored else None}


def render(kind: str, res: dict[str, Any]) -> str:
    lines = []
    if kind == "policy":
        lines.append(f"{'trace':32s} {'s':>5s} {'T first':>7s} {'T max':>6s} {'T last':>6s} {'pen.max':>7s} "
                     f"{'floor':>5s} {'in band':>8s} {'self-cons.':>10s}")
        for r in res["runs"]:
            sc = "-" if r["self_consistency"] is None else f"{r['self_consistency']:.3f} ({r['scored']})"
            lines.append(f"{Path(r['trace']).name[:32]:32s} {r['seconds']:5.0f} {r['temperature_first'] or 0:7.2f} "
                         f"{r['temperature_max'] or 0:6.2f} {r['temperature_last_mean'] or 0:6.2f} "
                         f"{r['penalty_max']:7.2f} {r['floor_actions']:5d} "
                         f"{str(r['windows_in_band']) + '/' + str(r['windows']):>8s} {sc:>10s}")
        return "\n".join(lines)
    if kind == "precision":
        lines.append(f"reference consistency, {res['prompts']} canary prompts, greedy {res['tokens']} bytes, backend "
                     f"{res['backend']}")
        lines.append(f"{'step':14s} {'KL':>8s} {'top-1':>6s} {'mean':>6s} {'min':>6s} {'same':>5s} {'unrel':>6s} "
                     f"{'norm':>6s}")
        for s in res["steps"]:
            lines.append(f"{s['from'] + ' -> ' + s['to']:14s} {s['kl']:8.4f} {s['top1']:6.3f} {s['mean']:6.3f} "
                         f"{s['min']:6.3f} {s['identical']:5d} {s['unrelated_mean']:6.3f} {s['normalised']:6.3f}")
    else:
        lines.append(f"self-consistency vs temperature, {res['prompts']} held-out prompts x 2 answers, "
                     f"{res['tokens']} bytes, backend {res['backend']}")
        lines.append(f"{'T':>5s} {'self-cons.':>10s} {'se':>6s} {'relevance':>9s} {'identical':>9s}")
        for r in res["rows"]:
            lines.append(f"{r['temperature']:5.2f} {r['self_consistency']:10.3f} {r['self_consistency_se']:6.3f} "
                         f"{r['relevance']:9.3f} {r['identical']:9d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuner.demo.consistency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("temperature", "precision", "policy"))
    ap.add_argument("traces", nargs="*", help="policy: the recorded runs")
    ap.add_argument("--band", default="0.02,0.10", help="policy: the repetition band (low,high)")
    ap.add_argument("--last", type=float, default=120.0, help="policy: seconds at the end for 'T last'")
    ap.add_argument("--backend", default="minilm")
    ap.add_argument("--temps", default="0.2,0.4,0.6,0.8,1.0,1.2")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "policy":
        from tuner.trace import TraceError

        if not args.traces:
            print("tuner: give the traces of the runs", file=sys.stderr)
            return 2
        lo, hi = (float(x) for x in args.band.split(","))
        try:
            res = {"runs": [summarize_policy_run(t, (lo, hi), args.last) for t in args.traces]}
        except TraceError as exc:
            print(f"tuner: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(res, indent=1) if args.json else render("policy", res))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    try:
        backend = open_backend(parse_spec(args.backend))
    except (BackendError, ValueError) as exc:
        print(f"tuner: {exc}", file=sys.stderr)
        return 2
    if args.what == "precision":
        res = run_precision(backend)
    else:
        res = run_temperature(backend, [float(x) for x in args.temps.split(",")], args.prompts, args.seed)
    print(json.dumps(res, indent=1) if args.json else render(args.what, res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
