"""A one-shot check of the NVIDIA probe on a real GPU (issue 16 §5): ``make gpu-check`` / ``tools/gpu_check.sh``.

Written for a machine lent for minutes, run unattended: x86-64, an NVIDIA GPU (an H200 as known), Python 3.12
with CUDA torch, nvidia-ml-py, psutil, numpy, transformers and prometheus-client — no textual, no orjson, no
network, maybe a gVisor sandbox.  ``make gpu-check-bundle`` (here) prepares the folder to copy there
(``--bundle DIR``: the project's committed source and the wheels that machine lacks: orjson for Python 3.12,
manylinux x86-64; ``tuner run --headless`` never imports textual); ``tools/gpu_check.sh`` (there) installs the
wheels with ``pip install --no-index --target`` and runs this.

Without a GPU it prints one line saying so and exits 0.  With one it prints one line per check and exits 1 when
any fails, in about two minutes (a 4-minute limit on the run):

- NVML starts from the real library (``libnvidia-ml``), and the real per-call latency of every call the probe
  makes (and of the probe's whole tick) is printed;
- a small CUDA model (a Llama from transformers, random weights: no download) runs under ``tuner run`` for about
  a minute, decoding through ``tuner.integrations.hf.TunedGenerator`` (requests reported by ``tuner.client``);
- the tree's per-process GPU memory rise at model load is within 10% or 16 MiB of ``torch.cuda.memory_reserved()``'s
  rise (the CUDA context measured after ``torch.cuda.init()`` and a warm-up, before the model) — or ``None`` with a
  reason, which passes (a sandbox may refuse per-process data);
- over a 30 s decode, the energy counter's increase is within 10% of the mean power draw x the time;
- clocks, clock event reasons (as words) and the P-state are read;
- a precision step to bf16 on CUDA is carried out by the handler a tuner precision command runs
  (``TorchLoop._on_precision``) and measured (parameter bytes, the tree's GPU memory, tokens/s before and after);
  int8 on CUDA without bitsandbytes is a named SKIP, not a pass;
- energy per generated token is recorded (or ``None`` with a reason);
- nothing reads 0.0 that cannot be 0 while the model decodes (power, clocks, memory, the tree's memory);
- no device stopped answering.

The trace and the workload's own figures stay in ``.gpu-check/`` for whoever reads the results later.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
BUNDLE_LIMIT = 64 * MiB
BUNDLE_WHEELS = ("orjson",)
"""What the target lacks of the project's core dependencies on the path the check takes (``tuner run --headless``
and ``tuner report`` import no textual: tests/test_gpu_check.py checks it)."""
BUNDLE_SKIP = ("tests", "traces")
RUN_TIMEOUT_S = 240.0
DECODE_S = 30.0
MEM_TOLERANCE = (0.10, 16 * MiB)
ENERGY_TOLERANCE = 0.10
NEVER_ZERO = (
    "gpu_power_watts",
    "gpu_sm_clock_hertz",
    "gpu_mem_clock_hertz",
    "gpu_mem_used_bytes",
    "gpu_mem_total_bytes",
    "gpu_tree_mem_bytes",
    "gpu_power_limit_watts",
    "gpu_energy_joules_total",
)
"""Keys that cannot read 0.0 on a GPU a model is decoding on: a 0.0 there is an unknown shown as a number."""


# -- output ----------------------------------------------------------------------------------------------------
class Report:
    """One line per check: ``PASS``/``FAIL``/``SKIP``/``INFO name: detail``."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0, "INFO": 0}

    def line(self, status: str, name: str, detail: str) -> None:
        self.counts[status] += 1
        self.out(f"{status} {name}: {detail}")

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.line("PASS" if ok else "FAIL", name, detail)
        return ok

    def run(self, name: str, fn: Callable[[], None]) -> None:
        """A check that must never stop the others: an exception is its FAIL."""
        try:
            fn()
        except Exception as exc:
            self.line("FAIL", name, f"{type(exc).__name__}: {exc}")


def mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / MiB:,.1f} MiB"


# -- the trace, read plainly -------------------------------------------------------------------------------------
class Trace:
    def __init__(self, path: Path) -> None:
        self.header: dict[str, Any] = {}
        self.ticks: list[tuple[float, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            k = rec.get("k")
            if k == "header":
                self.header = rec
            elif k == "tick":
                self.ticks.append((float(rec["t"]), rec.get("m") or {}))
            elif k == "event":
                self.events.append(rec)
            elif k == "note":
                self.notes.append(rec)

    def t(self, mono: float) -> float:
        """A monotonic stamp of the workload (the same clock system-wide) as trace time."""
        return mono - float(self.header.get("started_mono") or 0.0)

    def values(self, key: str, t0: float, t1: float) -> list[tuple[float, float | None]]:
        return [(t, m.get(key)) for t, m in self.ticks if t0 <= t <= t1 and key in m]

    @property
    def gpu(self) -> dict[str, Any]:
        p = (self.header.get("probes") or {}).get("nvidia") or {}
        return p if isinstance(p, dict) else {}


def device_key(trace: Trace, t0: float, t1: float) -> str:
    """The GPU the workload ran on: where the tree had processes while it decoded, else CUDA's first device."""
    counts: dict[str, float] = {}
    for _, m in trace.ticks:
        for k, v in m.items():
            if k.startswith("gpu_tree_procs/") and isinstance(v, (int, float)) and v > 0:
                counts[k.split("/", 1)[1]] = counts.get(k.split("/", 1)[1], 0) + v
    if counts:
        return max(counts, key=counts.__getitem__)
    visible = ((trace.gpu.get("detail") or {}).get("selection") or {}).get("visible") or ["0"]
    return str(visible[0])


def _nums(pairs: Sequence[tuple[float, Any]]) -> list[float]:
    return [float(v) for _, v in pairs if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _unattributed_reason(trace: Trace, key: str) -> str | None:
    detail = trace.gpu.get("detail") or {}
    if isinstance(detail.get("attribution"), str):
        return str(detail["attribution"])
    for n in trace.notes:
        msg = str(n.get("msg", ""))
        if key in msg and "not sampled" in msg:
            return msg
    return None


# -- the checks over a recorded run --------------------------------------------------------------------------------
def check_memory(rep: Report, trace: Trace, res: dict[str, Any], dev: str) -> None:
    key = f"gpu_tree_mem_bytes/{dev}"
    ctx = _nums(trace.values(key, trace.t(res["context"][0]), trace.t(res["context"][1])))
    loaded = _nums(trace.values(key, trace.t(res["loaded"][0]), trace.t(res["loaded"][1])))
    torch_rise = float(res["reserved_loaded"] - res["reserved_context"])
    name = "memory at model load"
    if not ctx or not loaded:
        reason = _unattributed_reason(trace, key)
        if reason:
            rep.line(
                "PASS",
                name,
                f"the tree's GPU memory is None with a reason: {reason} (torch reserved +{mib(torch_rise)})",
            )
        else:
            rep.line("FAIL", name, f"{key} has no value around the load and no reason is recorded")
        return
    before, after = statistics.median(ctx), statistics.median(loaded)
    if after == 0.0:
        rep.line(
            "FAIL", name, f"{key} reads 0.0 while torch holds {mib(res['reserved_loaded'])}: an unknown shown as 0"
        )
        return
    rise = after - before
    tol = max(MEM_TOLERANCE[0] * torch_rise, MEM_TOLERANCE[1])
    rep.check(
        name,
        abs(rise - torch_rise) <= tol,
        f"NVML (the tree's processes) +{mib(rise)} vs torch memory_reserved() +{mib(torch_rise)}, "
        f"off by {mib(abs(rise - torch_rise))} (allowed {mib(tol)}); CUDA context {mib(before)}",
    )


def check_energy(rep: Report, trace: Trace, res: dict[str, Any], dev: str) -> None:
    t0, t1 = trace.t(res["decode"][0]) + 1.0, trace.t(res["decode"][1]) - 1.0
    rows = [
        (t, m.get(f"gpu_energy_joules_total/{dev}"), m.get(f"gpu_power_watts/{dev}"))
        for t, m in trace.ticks
        if t0 <= t <= t1
    ]
    rows = [(t, e, p) for t, e, p in rows if isinstance(e, (int, float)) and isinstance(p, (int, float))]
    if len(rows) < 10:
        rep.line("FAIL", "energy counter", f"{len(rows)} ticks with energy and power in the decode window")
        return
    de = rows[-1][1] - rows[0][1]
    dt = rows[-1][0] - rows[0][0]
    power = statistics.fmean(p for _, _, p in rows)
    expect = power * dt
    off = abs(de - expect) / expect if expect > 0 else math.inf
    rep.check(
        "energy counter",
        off <= ENERGY_TOLERANCE,
        f"+{de:,.1f} J over {dt:.1f} s of decoding vs mean power {power:.1f} W x time = {expect:,.1f} J "
        f"({off:.1%} apart, allowed {ENERGY_TOLERANCE:.0%})",
    )


def check_clocks(rep: Report, trace: Trace, res: dict[str, Any], dev: str) -> None:
    t0, t1 = trace.t(res["decode"][0]), trace.t(res["decode"][1])
    sm = _nums(trace.values(f"gpu_sm_clock_hertz/{dev}", t0, t1))
    mem = _nums(trace.values(f"gpu_mem_clock_hertz/{dev}", t0, t1))
    reasons = _nums(trace.values(f"gpu_clock_event_reasons/{dev}", t0, t1))
    pstate = _nums(trace.values(f"gpu_pstate/{dev}", t0, t1))
    words = [
        e["data"].get("reasons")
        for e in trace.events
        if e.get("kind") == "gpu_clock_reasons" and str(e.get("data", {}).get("device")) == dev.split(":")[0]
    ]
    last = ", ".join(words[-1]) if words and words[-1] else "none active"
    ok = bool(sm and mem and reasons)
    rep.check(
        "clocks and throttle reasons",
        ok,
        f"SM {statistics.median(sm) / 1e6 if sm else float('nan'):.0f} MHz, memory "
        f"{statistics.median(mem) / 1e6 if mem else float('nan'):.0f} MHz, P{int(pstate[-1]) if pstate else '?'}; "
        f"reasons while decoding: {last} ({len(words)} changes)",
    )


def check_precision(rep: Report, trace: Trace, res: dict[str, Any], dev: str) -> None:
    bf16 = res.get("bf16") or {}
    if "error" in bf16:
        rep.line("FAIL", "precision fp32 -> bf16 on CUDA", str(bf16["error"]))
    else:
        before, after = bf16.get("param_bytes_before"), bf16.get("param_bytes_after")
        key = f"gpu_tree_mem_bytes/{dev}"
        m0 = _nums(trace.values(key, trace.t(res["decode"][1]) - 3.0, trace.t(res["decode"][1])))
        m1 = _nums(trace.values(key, trace.t(res["bf16_idle"][0]), trace.t(res["bf16_idle"][1])))
        tree = f"tree GPU memory {mib(max(m0))} -> {mib(min(m1))}" if m0 and m1 else "tree GPU memory n/a"
        ok = bool(bf16.get("changed")) and before is not None and after is not None and after <= 0.55 * before
        rep.check(
            "precision fp32 -> bf16 on CUDA",
            ok,
            f"parameters {mib(before)} -> {mib(after)} in {bf16.get('seconds', float('nan')):.2f} s; {tree}; "
            f"decode {res.get('tps_fp32', 0):.0f} -> {res.get('tps_bf16', 0):.0f} tokens/s",
        )
    int8 = res.get("int8") or {}
    if int8.get("changed"):
        rep.line(
            "PASS",
            "precision -> int8 on CUDA",
            f"parameters {mib(int8.get('param_bytes_before'))} -> {mib(int8.get('param_bytes_after'))} (bitsandbytes)",
        )
    elif "bitsandbytes" in str(int8.get("error", "")):
        rep.line("SKIP", "precision -> int8 on CUDA", str(int8["error"]))
    else:
        rep.line("FAIL", "precision -> int8 on CUDA", str(int8.get("error") or "not attempted"))


def check_energy_per_token(rep: Report, trace: Trace, res: dict[str, Any]) -> None:
    vals = _nums([(t, m.get("gpu_energy_per_token_joules")) for t, m in trace.ticks])
    why = [str(n.get("msg")) for n in trace.notes if "energy per token not computed" in str(n.get("msg"))]
    if vals:
        rep.line(
            "PASS",
            "energy per token",
            f"{statistics.median(vals):.3g} J per generated token (median of the live "
            f"30 s figure; {res.get('tokens', 0)} tokens)",
        )
    elif why:
        rep.line("PASS", "energy per token", f"None with a reason: {why[-1]}")
    else:
        rep.line("FAIL", "energy per token", "never computed and no reason recorded")


def check_zeros(rep: Report, trace: Trace, res: dict[str, Any], dev: str) -> None:
    t0, t1 = trace.t(res["decode"][0]) + 1.0, trace.t(res["decode"][1]) - 1.0
    bad = []
    for name in NEVER_ZERO:
        key = f"{name}/{dev}"
        n = sum(1 for t, m in trace.ticks if t0 <= t <= t1 and m.get(key) == 0.0)
        if n:
            bad.append(f"{key} read 0.0 in {n} ticks")
    rep.check("no unknown read as 0.0", not bad, "; ".join(bad) or f"{', '.join(NEVER_ZERO)} never 0.0 while decoding")


def check_answering(rep: Report, trace: Trace) -> None:
    hung = [e for e in trace.events if e.get("kind") in ("device_not_answering", "device_lost")]
    rep.check(
        "device answered",
        not hung,
        "; ".join(f"{e['kind']} {e.get('data')}" for e in hung) or "no call passed its deadline, no device lost",
    )
    costs = _nums([(t, m.get("probe_cost_seconds/nvidia")) for t, m in trace.ticks])
    if costs:
        rep.line(
            "INFO",
            "probe cost in the run",
            f"median {statistics.median(costs) * 1e3:.2f} ms a tick, "
            f"max {max(costs) * 1e3:.1f} ms ({len(costs)} ticks)",
        )


def analyse(rep: Report, trace_path: Path, results_path: Path) -> None:
    trace = Trace(trace_path)
    res = json.loads(results_path.read_text())
    t0, t1 = trace.t(res["decode"][0]), trace.t(res["decode"][1])
    dev = device_key(trace, t0, t1)
    rep.line(
        "INFO", "workload", f"{res.get('model')}, GPU {dev} ({res.get('device_name')}), {res.get('tokens')} tokens"
    )
    rep.run("memory at model load", lambda: check_memory(rep, trace, res, dev))
    rep.run("energy counter", lambda: check_energy(rep, trace, res, dev))
    rep.run("clocks and throttle reasons", lambda: check_clocks(rep, trace, res, dev))
    rep.run("precision", lambda: check_precision(rep, trace, res, dev))
    rep.run("energy per token", lambda: check_energy_per_token(rep, trace, res))
    rep.run("no unknown read as 0.0", lambda: check_zeros(rep, trace, res, dev))
    rep.run("device answered", lambda: check_answering(rep, trace))


# -- on the GPU machine ------------------------------------------------------------------------------------------------
def nvml_latencies(rep: Report) -> None:
    """The real per-call latency of every NVML call the probe makes, and of its whole tick."""
    import pynvml

    from tuner.probes.nvidia import NvidiaProbe

    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    me = os.getpid()
    calls: list[tuple[str, Callable[[], Any], int]] = [
        ("memory_v2", lambda: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2), 50),
        ("utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(h), 50),
        ("temperatureV", lambda: pynvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU), 50),
        ("power", lambda: pynvml.nvmlDeviceGetPowerUsage(h), 50),
        ("energy", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h), 50),
        ("sm_clock", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM), 50),
        ("mem_clock", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM), 50),
        ("clock_reasons", lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(h), 50),
        ("pstate", lambda: pynvml.nvmlDeviceGetPerformanceState(h), 50),
        ("compute_procs_v3", lambda: pynvml.nvmlDeviceGetComputeRunningProcesses_v3(h), 50),
        ("graphics_procs_v3", lambda: pynvml.nvmlDeviceGetGraphicsRunningProcesses_v3(h), 50),
        ("mps_procs_v3", lambda: pynvml.nvmlDeviceGetMPSComputeRunningProcesses_v3(h), 50),
        ("process_util", lambda: pynvml.nvmlDeviceGetProcessUtilization(h, time.time_ns() // 1000 - 1_000_000), 50),
        ("field_values", lambda: pynvml.nvmlDeviceGetFieldValues(h, [197, 198]), 50),
        ("power_limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h), 50),
        ("ecc", lambda: pynvml.nvmlDeviceGetTotalEccErrors(h, 0, 0), 20),
        ("remapped_rows", lambda: pynvml.nvmlDeviceGetRemappedRows(h), 20),
        ("pcie_throughput", lambda: pynvml.nvmlDeviceGetPcieThroughput(h, 0), 5),
    ]
    parts = []
    for name, fn, n in calls:
        times = []
        err = None
        for _ in range(n):
            t = time.perf_counter()
            try:
                fn()
            except pynvml.NVMLError as exc:
                if getattr(exc, "value", None) != 0:  # NVMLError(0): no samples, a normal answer
                    err = str(exc)
            except AttributeError as exc:
                err = str(exc)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        parts.append(f"{name} {med * 1e6:.0f} us" + (f" ({err})" if err else ""))
    rep.line("INFO", "NVML per-call latency (median)", ", ".join(parts))
    probe = NvidiaProbe([me])
    try:
        if probe.available() is None:
            probe.sample(0.0)
            ticks = []
            for k in range(50):
                t = time.perf_counter()
                probe.sample(0.1 * (k + 1))
                ticks.append(time.perf_counter() - t)
            rep.line(
                "INFO",
                "probe tick on this machine",
                f"median {statistics.median(ticks) * 1e3:.2f} ms, "
                f"max {max(ticks) * 1e3:.2f} ms for {len(probe._devices)} device(s), deadline worker included",
            )
    finally:
        probe.close()


def check_real_nvml(rep: Report) -> bool:
    import pynvml

    from tuner.probes.nvidia import NvidiaProbe

    probe = NvidiaProbe(None)
    reason = probe.available()
    lib = getattr(pynvml, "nvmlLib", None)
    lib_name = str(getattr(lib, "_name", "") or "")
    detail = probe.describe() if reason is None else {}
    probe.close()
    names = ", ".join(str(d.get("name")) for d in detail.get("devices", []))
    ok = reason is None and "nvidia-ml" in lib_name and "fakes" not in str(pynvml.__file__)
    return rep.check(
        "NVML from the real library",
        ok,
        reason
        or f"{lib_name} via {pynvml.__file__}; driver {detail.get('driver_version')}, "
        f"CUDA {detail.get('cuda_driver_version')}; {names}",
    )


def no_gpu_reason() -> str | None:
    """Why there is no GPU to check (None: there is one)."""
    from tuner.probes.nvidia import NvidiaProbe

    probe = NvidiaProbe(None)
    reason = probe.available()
    probe.close()
    return reason


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".gpu-check"), help="folder for the trace and figures (.gpu-check)")
    ap.add_argument("--decode-s", type=float, default=DECODE_S, help="seconds of fp32 decoding (30)")
    ap.add_argument("--bundle", metavar="DIR", help="here: prepare the folder to copy to the GPU machine")
    ap.add_argument("--workload", metavar="RESULTS", help=argparse.SUPPRESS)
    ap.add_argument("--workload-device", default="cuda", help=argparse.SUPPRESS)  # cpu: try the workload here
    ap.add_argument("--workload-small", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bundle:
        return make_bundle(Path(args.bundle))
    if args.workload:
        return workload(Path(args.workload), args.decode_s, args.workload_device, args.workload_small)
    try:
        reason = no_gpu_reason()
    except ImportError as exc:  # the machine lacks one of the project's dependencies
        print(f"FAIL gpu-check: cannot import the project with {sys.executable}: {exc}")
        return 1
    if reason is not None:
        cuda = _torch_sees_a_gpu()
        if cuda:
            print(f"FAIL gpu-check: torch sees {cuda} but NVML does not start: {reason}")
            return 1
        print(f"gpu-check: no NVIDIA GPU here ({reason}): nothing to check")
        return 0
    rep = Report()
    started = time.monotonic()
    if not check_real_nvml(rep):
        return 1
    rep.run("NVML per-call latency", lambda: nvml_latencies(rep))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace, results = out / "trace.jsonl", out / "workload.json"
    results.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tuner",
        "run",
        "--headless",
        "--quiet",
        "--overwrite",
        "--trace",
        str(trace),
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--workload",
        str(results),
        "--decode-s",
        str(args.decode_s),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        cp = subprocess.run(cmd, env=env, timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        rep.line("FAIL", "tuner run", f"did not finish within {RUN_TIMEOUT_S:.0f} s")
        return finish(rep, started, trace)
    (out / "run.log").write_text(cp.stdout + cp.stderr)
    if cp.returncode != 0 or not results.exists():
        tail = " | ".join((cp.stderr.strip().splitlines() or ["no output"])[-3:])
        rep.line("FAIL", "tuner run", f"exit code {cp.returncode}: {tail} (all of it in {out / 'run.log'})")
        return finish(rep, started, trace)
    rep.line("PASS", "tuner run", f"a CUDA model decoded under tuner run for {time.monotonic() - started:.0f} s")
    analyse(rep, trace, results)
    return finish(rep, started, trace)


def finish(rep: Report, started: float, trace: Path) -> int:
    c = rep.counts
    print(
        f"gpu-check: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped in {time.monotonic() - started:.0f} s"
        f" (trace {trace})"
    )
    return 1 if c["FAIL"] else 0


def _torch_sees_a_gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


# -- the workload (runs under tuner run) ---------------------------------------------------------------------------
def workload(results: Path, decode_s: float, device: str = "cuda", small: bool = False) -> int:
    """A Llama on CUDA (random weights), decoding through TunedGenerator; writes what it measured to ``results``.
    ``device="cpu"``, ``small``: the same steps on a tiny model, to try this script where there is no GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuner.integrations.hf import TunedGenerator
    from tuner.integrations.precision import PrecisionError

    res: dict[str, Any] = {}
    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
    dev = torch.device(device, 0) if cuda else torch.device("cpu")
    res["device_name"] = torch.cuda.get_device_name(dev) if cuda else "cpu"

    def reserved() -> int:
        return int(torch.cuda.memory_reserved(dev)) if cuda else 0

    def build(**kw: int) -> Any:
        cfg = LlamaConfig(max_position_embeddings=512, **kw)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
        return model.eval()

    # warm-up: the same kinds of kernels once (lazily loaded CUDA modules grow the context), then nothing held
    tiny = build(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    with torch.inference_mode():
        tiny(torch.zeros((1, 8), dtype=torch.long, device=dev))
    del tiny
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    res["reserved_context"] = reserved()
    a = time.monotonic()
    time.sleep(2.5)
    res["context"] = [a, time.monotonic()]
    vocab = 512 if small else 32000
    if small:
        model = build(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    else:  # ~220M parameters, 0.9 GB in fp32
        model = build(
            vocab_size=vocab,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=16,
        )
    if cuda:
        torch.cuda.synchronize()
    res["reserved_loaded"] = reserved()
    res["model"] = f"Llama {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters (random weights)"
    a = time.monotonic()
    time.sleep(2.5)
    res["loaded"] = [a, time.monotonic()]

    gen = TunedGenerator(model, pad_token_id=0, eos_token_id=None, temperature=0.0, batch_size=8, max_new_tokens=32)
    g = torch.Generator().manual_seed(0)

    def decode(seconds: float) -> tuple[list[float], int]:
        start = time.monotonic()
        tokens = 0
        while time.monotonic() - start < seconds:
            for _ in range(8):
                gen.submit(torch.randint(3, vocab, (24,), generator=g).tolist())
            for _, ids in gen.step():
                tokens += len(ids)
        return [start, time.monotonic()], tokens

    res["decode"], n = decode(decode_s)
    res["tokens"] = n
    res["tps_fp32"] = n / (res["decode"][1] - res["decode"][0])
    try:
        res["bf16"] = gen.loop._on_precision("bf16")  # what a tuner precision command runs
    except (PrecisionError, RuntimeError) as exc:
        res["bf16"] = {"error": str(exc)}
    if cuda:
        torch.cuda.empty_cache()
    a = time.monotonic()
    time.sleep(2.5)
    res["bf16_idle"] = [a, time.monotonic()]
    res["decode_bf16"], n2 = decode(min(10.0, decode_s))
    res["tokens"] += n2
    res["tps_bf16"] = n2 / (res["decode_bf16"][1] - res["decode_bf16"][0])
    try:
        res["int8"] = gen.loop._on_precision("int8")
    except (PrecisionError, RuntimeError) as exc:
        res["int8"] = {"error": str(exc)}
    results.write_text(json.dumps(res, default=str))
    gen.client.close()
    return 0


# -- here: the bundle ------------------------------------------------------------------------------------------------
def make_bundle(dest: Path, *, python_version: str = "3.12") -> int:
    """The committed source (without tests/ and traces/) and the wheels the GPU machine lacks, in ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"gpu-check-bundle: needs a git checkout ({exc})", file=sys.stderr)
        return 1
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[0] not in BUNDLE_SKIP]
        tar.extractall(dest, members=members, filter="tar")
    wheels = dest / "wheels"
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--no-deps",
            "-d",
            str(wheels),
            *BUNDLE_WHEELS,
        ],
        capture_output=True,
        text=True,
    )
    if cp.returncode != 0:
        print(f"gpu-check-bundle: pip download failed: {cp.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    (dest / "BUNDLE.txt").write_text(
        f"inference-tuner {head}: the GPU check (issue 16).\n"
        "On the GPU machine, in this folder: make gpu-check   (or: sh tools/gpu_check.sh)\n"
        "It prints one line per check and exits 1 if one fails; .gpu-check/ keeps the trace and figures.\n"
        f"wheels/: {', '.join(sorted(p.name for p in wheels.glob('*.whl')))}\n"
    )
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and not p.is_symlink())
    if size > BUNDLE_LIMIT:
        print(
            f"gpu-check-bundle: {dest} is {size / MiB:.1f} MiB, over the {BUNDLE_LIMIT / MiB:.0f} MiB limit",
            file=sys.stderr,
        )
        return 1
    print(
        f"gpu-check-bundle: {dest} ({size / MiB:.1f} MiB, commit {head[:12]}; wheels: "
        f"{', '.join(sorted(p.name for p in wheels.glob('*.whl')))})"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
