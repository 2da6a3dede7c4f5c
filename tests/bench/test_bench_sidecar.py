"""The sidecar's own CPU cost while recording, at 10 Hz and 100 Hz.

Goal (issue: Foundation): <= 1% of a core at 10 Hz, <= 3% at 100 Hz over 60 s.  Baseline in the same
run: a bare Python process that only wakes on the same deadlines (the floor any sampler pays).
Set TUNER_BENCH_SECONDS to shorten the measurement (default 60).
"""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from tests.cli import tuner_popen

SECONDS = float(os.environ.get("TUNER_BENCH_SECONDS", "60"))

BARE_LOOP = """
import sys, time
interval = float(sys.argv[1])
deadline = time.monotonic()
end = deadline + float(sys.argv[2])
while deadline < end:
    deadline += interval
    d = deadline - time.monotonic()
    if d > 0:
        time.sleep(d)
"""


@pytest.mark.bench
@pytest.mark.parametrize("hz", [10, 100])
def test_sidecar_cpu(hz: int, tmp_path: object, benchmark: object) -> None:
    import subprocess

    interval = 1.0 / hz
    bare = subprocess.Popen([sys.executable, "-c", BARE_LOOP, str(interval), str(SECONDS + 10)])
    side = tuner_popen(
        "run",
        "--quiet",
        "--interval",
        str(interval),
        "--trace",
        f"{tmp_path}/s.jsonl",
        "--",
        "sleep",
        str(SECONDS + 10),
    )
    try:
        time.sleep(4)  # start-up (imports, discovery) is not the steady cost
        bare_p, side_p = psutil.Process(bare.pid), psutil.Process(side.pid)
        c_bare0, c_side0 = bare_p.cpu_times(), side_p.cpu_times()
        t0 = time.monotonic()
        time.sleep(SECONDS)
        c_bare1, c_side1 = bare_p.cpu_times(), side_p.cpu_times()
        dt = time.monotonic() - t0
        share_bare = (c_bare1.user + c_bare1.system - c_bare0.user - c_bare0.system) / dt
        share_side = (c_side1.user + c_side1.system - c_side0.user - c_side0.system) / dt
    finally:
        bare.kill()
        side.terminate()
        side.wait(30)
        bare.wait(10)
    info = {
        "hz": hz,
        "seconds": SECONDS,
        "sidecar_core_share_percent": round(share_side * 100, 3),
        "bare_loop_core_share_percent": round(share_bare * 100, 3),
        "ratio_to_bare": round(share_side / share_bare, 2) if share_bare else None,
    }
    benchmark.extra_info.update(info)  # type: ignore[attr-defined]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # type: ignore[attr-defined]
    print(f"\nsidecar CPU at {hz} Hz: {info}")
