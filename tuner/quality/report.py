"""What a trace says about consistency: ``tuner report``'s ``consistency`` section (text and JSON).

``summarize(header, events, actions)`` returns None for a trace recorded without ``--consistency``, else:

- ``backend``, ``semantic``, ``rate``: what produced the figures (the header's ``quality``);
- ``state`` (``ready``, ``failed``, ``exited``, ``starting``: still loading when the session ended, or
  ``unknown``), ``reason``, ``self_check_auc``, ``model``,
  ``weights_sha256`` (the ``quality_backend`` event);
- ``scored`` (``quality`` events), ``by_source`` (``{"in-process": n, "shadow": n}``), ``self_consistency`` and
  ``relevance`` (``{"mean", "p10", "n"}``), ``by_temperature`` (``[{"temperature", "n", "self_consistency"}]``),
  ``unscored`` (``{reason: n}``, the five most common);
- ``precision_steps``: one entry per precision change the inference carried out (a ``done`` action), with the
  three figures the guard judged — ``kl``, ``top1`` (the command's result) and the canary round's ``reference``
  (mean), ``normalised``, ``unrelated_mean``, ``identical``/``n`` — and ``rolled_back`` (a later step back to
  where it came from whose reason is the quality guard's); ``rollback``: this change is such a step back.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _dist(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"mean": None, "p10": None, "n": 0}
    s = sorted(xs)
    return {"mean": sum(s) / len(s), "p10": s[int(0.1 * (len(s) - 1))], "n": len(s)}


def summarize(header: Mapping[str, Any], events: Sequence[Any], actions: Sequence[Mapping[str, Any]]
              ) -> dict[str, Any] | None:
    q = header.get("quality")
    if not isinstance(q, Mapping):
        return None
    out: dict[str, Any] = {"backend": q.get("backend"), "semantic": q.get("semantic"), "rate": q.get("rate"),
                           "state": "unknown", "reason": None, "self_check_auc": None, "model": None,
                           "weights_sha256": None}
    qual, refs = [], []
    for e in events:
        d = e.data if isinstance(e.data, Mapping) else {}
        if e.kind == "quality_backend":
            out["state"] = d.get("state") or out["state"]
            out["reason"] = d.get("reason")
            b = _map(d.get("backend"))
            check = _map(d.get("self_check"))
            out["self_check_auc"] = _num(check.get("auc"))
            out["model"] = b.get("model")
            out["weights_sha256"] = b.get("weights_sha256")
        elif e.kind == "quality":
            qual.append(d)
        elif e.kind == "quality_reference":
            refs.append((float(e.t), d))
    out["scored"] = len(qual)
    out["by_source"] = dict(Counter(str(d.get("source") or "in-process") for d in qual))
    sc = [x for d in qual if (x := _num(d.get("self_consistency"))) is not None]
    rel = [x for d in qual if (x := _num(d.get("relevance"))) is not None]
    out["self_consistency"] = _dist(sc)
    out["relevance"] = _dist(rel)
    by_t: dict[float, list[float]] = {}
    for d in qual:
        t, x = _num(d.get("temperature")), _num(d.get("self_consistency"))
        if t is not None and x is not None:
            by_t.setdefault(round(t, 4), []).append(x)
    out["by_temperature"] = [{"temperature": t, "n": len(xs), "self_consistency": sum(xs) / len(xs)}
                             for t, xs in sorted(by_t.items())]
    reasons = Counter(str(d["reason"]) for d in qual if d.get("reason"))
    out["unscored"] = dict(reasons.most_common(5))
    out["precision_steps"] = _precision_steps(actions, refs)
    return out


def _precision_steps(actions: Sequence[Mapping[str, Any]], refs: list[tuple[float, Mapping[str, Any]]]
                     ) -> list[dict[str, Any]]:
    done = [a for a in actions if isinstance(a, Mapping) and a.get("knob") == "precision" and a.get("outcome")
            == "done"]
    steps: list[dict[str, Any]] = []
    for i, a in enumerate(done):
        t = _num(a.get("t")) or 0.0
        res = _map(a.get("result"))
        to, frm = a.get("value"), a.get("previous") or res.get("previous")
        ref = next((d for rt, d in refs if rt >= t - 1.0 and d.get("precision") == to), None) \
            if res.get("canary_answers") else None
        back = next((b for b in done[i + 1:] if b.get("value") == frm
                     and (b.get("previous") or _map(b.get("result")).get("previous")) == to), None)
        steps.append({
            "t": t, "from": frm, "to": to, "kl": _num(res.get("kl")), "top1": _num(res.get("top1")),
            "reference": _num(ref.get("mean")) if ref else None,
            "normalised": _num(ref.get("normalised")) if ref else None,
            "unrelated_mean": _num(ref.get("unrelated_mean")) if ref else None,
            "identical": ref.get("identical") if ref else None, "n": ref.get("n") if ref else None,
            "backend": ref.get("backend") if ref else None,
            "rolled_back": bool(back and str(back.get("reason") or "").startswith("quality guard")),
            "rollback": str(a.get("reason") or "").startswith("quality guard"),
        })
    return steps


def render(s: Mapping[str, Any] | None) -> list[str]:
    """The report's lines for ``summarize()``'s result (nothing without ``--consistency``)."""
    if not s:
        return []
    kind = "semantic" if s.get("semantic") else "lexical: shared characters, not meaning"
    rate = _num(s.get("rate"))
    head = f"consistency  {s.get('backend')} ({kind})"
    if s.get("state") in ("failed", "exited"):
        return ["", f"{head}: scorer {s['state']}: {s.get('reason')}; not measured"]
    if s.get("state") == "starting" and not s.get("scored"):
        return ["", f"{head}: scorer {s.get('reason')}; not measured"]
    extra = []
    if s.get("self_check_auc") is not None:
        extra.append(f"self-check AUC {s['self_check_auc']:.2f}")
    if rate is not None:
        extra.append(f"{rate:.0%} of requests sampled")
    src = ", ".join(f"{n} {k}" for k, n in sorted((s.get("by_source") or {}).items()))
    lines = ["", f"{head}, {', '.join(extra)}: {s.get('scored', 0)} responses scored" + (f" ({src})" if src else "")]
    for key, label in (("self_consistency", "self-consistency"), ("relevance", "relevance")):
        d = s.get(key) or {}
        if d.get("n"):
            lines.append(f"  {label:<18} mean {d['mean']:.3f}, p10 {d['p10']:.3f} (n {d['n']})")
    bt = s.get("by_temperature") or []
    if len(bt) > 1:
        lines.append("  by temperature     " + "  ".join(f"T {r['temperature']:g}: {r['self_consistency']:.3f} "
                                                       f"({r['n']})" for r in bt))
    for why, n in (s.get("unscored") or {}).items():
        lines.append(f"  not scored ({n}): {why}")
    for st in s.get("precision_steps") or []:
        kl = f"KL {st['kl']:.4g}" if st.get("kl") is not None else "KL n/a"
        top1 = f"top-1 {st['top1']:.3f}" if st.get("top1") is not None else "top-1 n/a"
        if st.get("reference") is not None:
            ref = (f"reference {st['reference']:.3f} ({st['identical']}/{st['n']} answers the same; normalised "
                   f"{st['normalised']:.2f} vs unrelated {st['unrelated_mean']:.3f})")
        else:
            ref = "reference not measured"
        verdict = "rolled back" if st.get("rolled_back") else "kept"
        if st.get("rollback"):
            lines.append(f"  precision {st['from']} -> {st['to']} at {st['t']:.1f} s: the quality guard's rollback")
            continue
        lines.append(f"  precision {st['from']} -> {st['to']} at {st['t']:.1f} s: {kl}, {top1}, {ref}: {verdict}")
    return lines
