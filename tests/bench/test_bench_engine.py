"""The engine probe's cost: the captured 55 KB vLLM 0.32 ``/metrics`` page scraped at 1 Hz.

Goal (issue 15): <= 0.5% of a core.  A process that only runs ``EngineProbe`` (its scraper thread fetching
and parsing the page every second from a local server in another process) against, in the same run, a bare
Python process waking on the same 1 s deadlines (the floor any 1 Hz loop pays).  Asserted: the probe's
process minus the bare one <= 0.5% of a core.  TUNER_BENCH_SECONDS sets the measured time (default 30).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cli import tuner_env

SECONDS = float(os.environ.get("TUNER_BENCH_SECONDS", "30"))
PAGE = Path(__file__).resolve().parents[1] / "data" / "vllm" / "metrics-0.32.0-cpu.txt"

SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = open(sys.argv[1], "rb").read()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves vLLM's page
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""

PROBE = """
import sys, time
from tuner.probes.engine import EngineProbe
p = EngineProbe(sys.argv[1], interval=1.0)
time.sleep(float(sys.argv[2]))
print(p.scrapes, p.failures, p.engine, flush=True)
"""

BARE = """
import sys, time
deadline = time.monotonic()
end = deadline + float(sys.argv[1])
while deadline < end:
    deadline += 1.0
    d = deadline - time.monotonic()
    if d > 0:
        time.sleep(d)
"""


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


@pytest.mark.bench
def test_engine_scrape_cost_at_1_hz() -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(PAGE)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/metrics"
        total = SECONDS + 6
        probe = subprocess.Popen([sys.executable, "-c", PROBE, url, str(total)], stdout=subprocess.PIPE, text=True,
                                 env=tuner_env())
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(total)])
        try:
            time.sleep(4)  # start-up (imports: prometheus_client, the first parse) is not the steady cost
            pp, bp = psutil.Process(probe.pid), psutil.Process(bare.pid)
            c_probe0, c_bare0, t0 = _cpu(pp), _cpu(bp), time.monotonic()
            time.sleep(SECONDS)
            c_probe1, c_bare1, dt = _cpu(pp), _cpu(bp), time.monotonic() - t0
            out, _ = probe.communicate(timeout=30)
        finally:
            for p in (probe, bare):
                p.kill()
                p.wait(10)
    finally:
        server.kill()
        server.wait(10)
    scrapes, failures, engine = out.split()
    share_probe = (c_probe1 - c_probe0) / dt
    share_bare = (c_bare1 - c_bare0) / dt
    info = {
        "seconds": round(dt, 1),
        "page_bytes": PAGE.stat().st_size,
        "scrapes": int(scrapes),
        "failures": int(failures),
        "probe_core_share_percent": round(share_probe * 100, 3),
        "bare_1hz_core_share_percent": round(share_bare * 100, 3),
        "cpu_ms_per_scrape": round((c_probe1 - c_probe0 - (c_bare1 - c_bare0)) / dt * 1e3, 2),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    print(f"\nengine probe at 1 Hz on the 55 KB vLLM page: {info}")
    assert engine == "vllm" and int(failures) == 0 and int(scrapes) >= SECONDS
    assert share_probe - share_bare <= 0.005, info
