"""The demo's prompt stream, sent to an OpenAI-compatible server: ``tuner demo``'s workload for a model served
elsewhere (the demo model exported with ``tuner demo --export-hf`` and served by vLLM, usually behind ``tuner
proxy``).

``python -m tuner.demo.drive --url http://127.0.0.1:8100/v1 [--duration S | --requests N] [--rate R] [--seed N]``

- Requests arrive as a Poisson process (``--rate`` per second), each a streamed ``/v1/completions`` of a prompt
  cut from the held-out part of the demo's corpus (``tuner.demo.corpus.held_out_prompts``, the workload's own
  prompts) with a response length drawn per request, as ``python -m tuner.demo.workload`` draws them.  No
  concurrency limit here: arrivals do not wait for answers (the proxy's limit, or the server's, queues them).
- ``--temperature T`` is what the user asks for (sent on every request; ``tuner proxy --temperature-mode
  always`` lets its policy replace it; ``--temperature none`` sends none).  No repetition penalty is sent: the
  proxy's knob fills it in.
- The demo model's context is 256 tokens (one a byte, plus BOS): ``max_tokens`` is cut to fit the prompt.
  Sampling is restricted to what the model was trained to produce (``allowed_token_ids``: bytes and EOS,
  vLLM's field), and the token ids come back in the stream (``return_token_ids``), so the proxy judges
  repetition on the model's own tokens, as ``tuner demo`` does (``--plain``: neither, for another server).
- Ends with one JSON line on stdout: requests done / failed, tokens, TTFT p50/p95, and the responses'
  repetition measured on their bytes (the demo model's tokens), as ``tuner demo`` measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from typing import Any

import httpx

from tuner.demo.export_hf import ALLOWED_TOKEN_IDS
from tuner.probes.repetition import response_repetition

CONTEXT = 256
LOOP_MIN_N, LOOP_MAX_N = 4, 40  # bytes: "   " or "---" is text, not a loop (tuner.demo.curve)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tuner.demo.drive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", required=True, help="the server's /v1 base URL, e.g. http://127.0.0.1:8100/v1")
    ap.add_argument("--model", default="tuner-demo", help="the served model's name (default tuner-demo)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, help="seconds of arrivals (default 120)")
    g.add_argument("--requests", type=int, help="number of arrivals")
    ap.add_argument("--rate", type=float, default=5.0, help="mean arrivals per second (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--temperature", default="0.8", help="the temperature asked for, or 'none' to send none (default 0.8)"
    )
    ap.add_argument("--min-new-tokens", type=int, help="shortest response asked for (default min(32, max))")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="longest response asked for (default 96)")
    ap.add_argument("--prompts", type=int, default=256, help="distinct held-out prompts to draw from")
    ap.add_argument(
        "--plain", action="store_true", help="send no vLLM fields (allowed_token_ids: bytes and EOS; return_token_ids)"
    )
    ap.add_argument("--report", metavar="PATH", help="also write one JSON line per finished request here")
    args = ap.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 120.0
    if args.rate <= 0 or (args.duration is not None and args.duration <= 0):
        ap.error("--rate and --duration must be more than 0")
    if args.requests is not None and args.requests < 1:
        ap.error("--requests must be at least 1")
    if args.min_new_tokens is None:
        args.min_new_tokens = min(32, args.max_new_tokens)
    if not 1 <= args.min_new_tokens <= args.max_new_tokens < CONTEXT:
        ap.error(f"need 1 <= --min-new-tokens <= --max-new-tokens < {CONTEXT}")
    if args.temperature.lower() == "none":
        args.temperature = None
    else:
        try:
            args.temperature = float(args.temperature)
        except ValueError:
            ap.error("--temperature: a number or 'none'")
        if not 0 <= args.temperature <= 2:
            ap.error("--temperature must be within 0..2")
    return args


async def one(c: httpx.AsyncClient, args: argparse.Namespace, prompt: str, max_new: int) -> dict[str, Any]:
    room = CONTEXT - len(prompt.encode("utf-8")) - 1  # the BOS the server adds
    body: dict[str, Any] = {"model": args.model, "prompt": prompt, "stream": True, "max_tokens": min(max_new, room)}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if not args.plain:
        body["allowed_token_ids"] = ALLOWED_TOKEN_IDS
        body["return_token_ids"] = True  # the proxy measures repetition on the model's own tokens
    t0 = time.monotonic()
    ttft = None
    texts: list[str] = []
    async with c.stream("POST", args.url.rstrip("/") + "/completions", json=body) as r:
        if r.status_code != 200:
            detail = (await r.aread()).decode("utf-8", "replace")[:200]
            return {"error": f"HTTP {r.status_code}: {detail}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for ch in json.loads(line[6:]).get("choices") or ():
                if ch.get("text"):
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    texts.append(ch["text"])
    ids = list("".join(texts).encode("utf-8"))  # the demo model's tokens are bytes
    rep = response_repetition(ids, loop_min_n=LOOP_MIN_N, loop_max_n=LOOP_MAX_N)
    return {
        "tokens": len(ids),
        "ttft_seconds": ttft,
        "e2e_seconds": time.monotonic() - t0,
        "seq_rep_4": rep.seq_rep_4,
        "loop": rep.loop,
        "temperature": args.temperature,
    }


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    vs = sorted(values)
    return vs[min(len(vs) - 1, int(q * len(vs)))]


async def drive(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    from tuner.demo.corpus import held_out_prompts

    prompts = held_out_prompts(args.prompts, seed=args.seed)
    rng = random.Random(args.seed)
    done: list[dict[str, Any]] = []
    failed: list[str] = []
    report = open(args.report, "w") if args.report else None  # noqa: SIM115
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits, trust_env=False) as c:
        tasks: set[asyncio.Task[None]] = set()

        async def run(prompt: str, max_new: int) -> None:
            try:
                rec = await one(c, args, prompt, max_new)
            except httpx.HTTPError as exc:
                rec = {"error": f"{type(exc).__name__}: {exc}"}
            if "error" in rec:
                failed.append(rec["error"])
                return
            done.append(rec)
            if report is not None:
                report.write(json.dumps(rec) + "\n")

        n = 0
        next_at = t0
        while not stop.is_set():
            if args.requests is not None and n >= args.requests:
                break
            if args.duration is not None and next_at - t0 >= args.duration:
                break
            wait = next_at - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    break
                except asyncio.TimeoutError:
                    pass
            prompt = prompts[rng.randrange(len(prompts))]
            max_new = rng.randint(args.min_new_tokens, args.max_new_tokens)
            task = asyncio.get_running_loop().create_task(run(prompt, max_new))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            next_at += rng.expovariate(args.rate)
        if tasks and not stop.is_set():
            await asyncio.wait(tasks)
        for task in tasks:
            task.cancel()
    if report is not None:
        report.close()
    seconds = time.monotonic() - t0
    ttft = [r["ttft_seconds"] for r in done if r["ttft_seconds"] is not None]
    reps = [r["seq_rep_4"] for r in done if r["seq_rep_4"] is not None]
    tokens = sum(r["tokens"] for r in done)
    return {
        "workload": "tuner.demo.drive",
        "url": args.url,
        "requests_sent": n,
        "requests_done": len(done),
        "requests_failed": len(failed),
        "first_error": failed[0] if failed else None,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "ttft_p50_seconds": _p(ttft, 0.5),
        "ttft_p95_seconds": _p(ttft, 0.95),
        "seq_rep_4_mean": statistics.fmean(reps) if reps else None,
        "loop_share": statistics.fmean(1.0 if r["loop"] else 0.0 for r in done) if done else None,
        "seed": args.seed,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = asyncio.Event()

    async def go() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await drive(args, stop)

    result = asyncio.run(go())
    print(json.dumps(result), flush=True)
    return 0 if result["requests_done"] else 1


if __name__ == "__main__":
    sys.exit(main())
