"""Issue 7 load and fuzz faults on the channel, through ``tuner run``:

- 200 connections flooding the channel socket (raw frames of finished requests, as fast as the kernel
  takes them, ~100k events/s offered here) beside two well-behaved ``tuner.client`` processes: the
  sidecar's RSS (read from ``/proc`` while it runs) plateaus instead of following the offered load, the
  losses are counted (``chan_dropped_total`` in the trace, a warn note ``tuner report`` lists), and the
  well-behaved clients' requests keep being recorded;
- fuzzed channel messages (hypothesis bytes and JSON garbage on the socket) during a session: the
  sidecar never crashes, the session's own client is served on, the trace is whole.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli import tuner, tuner_popen

# One process opens N raw connections and floods finished-request frames on all of them, non-blocking,
# for S seconds; prints the rows the kernel accepted.
FLOODER = r"""
import json, os, selectors, socket, struct, sys, time
path, conns, seconds, rows_per_frame = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
now = time.monotonic()
row = [0, 1, 4, now, None, now, now, 1, now, [1, 2, 3, 4], 1, 8, 0.7, "fp32", None, None, None]
body = json.dumps({"v": 1, "type": "requests", "rows": [row] * rows_per_frame}).encode()
frame = struct.pack(">I", len(body)) + body
block = frame * 16
sel = selectors.DefaultSelector()
socks = []
for i in range(conns):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        continue
    s.setblocking(False)
    socks.append(s)
    sel.register(s, selectors.EVENT_WRITE, [0])
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for key, _ in sel.select(0.05):
        off = key.data
        try:
            n = key.fileobj.send(memoryview(block)[off[0]:])
        except BlockingIOError:
            continue
        except OSError:
            sel.unregister(key.fileobj)
            continue
        sent += n
        off[0] = (off[0] + n) % len(block)
print(json.dumps({"rows": sent // len(frame) * rows_per_frame, "conns": len(socks)}), flush=True)
"""

# The well-behaved inference: paced requests through tuner.client (10/s: within its fair share of what the
# sidecar records under this flood, ~3.6k requests/s here / 202 connections); prints what it made, dropped.
POLITE = r"""
import json, os, sys, time
from tuner import client
c = client.connect()
seconds = float(sys.argv[1])
made = 0
worst = 0.0
end = time.monotonic() + seconds
while time.monotonic() < end:
    s = time.monotonic()
    with c.request(prompt_tokens=3) as r:
        r.token([5, 6, 7, made % 11])
    c.poll()
    worst = max(worst, time.monotonic() - s)
    made += 1
    time.sleep(0.1)
c.close(timeout=3)
print(json.dumps({"pid": os.getpid(), "made": made, "dropped": c.dropped, "worst": worst}), flush=True)
"""

# What `tuner run` starts: the floods and the polite clients, all children of one command.
LAUNCHER = r"""
import json, os, subprocess, sys
flooder, polite, out = sys.argv[1], sys.argv[2], sys.argv[3]
procs, conns, seconds, rows = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
path = os.environ["TUNER_SOCKET"]
def start(*args):
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
pol = [start(polite, str(seconds + 1)) for _ in range(2)]
fl = [start(flooder, path, str(conns), str(seconds), str(rows)) for _ in range(procs)]
res = {"floods": [json.loads(p.communicate()[0]) for p in fl], "polite": [json.loads(p.communicate()[0]) for p in pol]}
with open(out, "w") as f:
    json.dump(res, f)
"""


def rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def flood(tmp_path: Path, procs: int, conns: int, seconds: float, rows: int) -> dict[str, Any]:
    scripts = {}
    for name, text in (("flooder", FLOODER), ("polite", POLITE), ("launcher", LAUNCHER)):
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(text)
    trace, out = tmp_path / "t.jsonl", tmp_path / "out.json"
    side = tuner_popen(
        "run", "--headless", "--interval", "0.1", "--trace", str(trace), "--",
        sys.executable, str(scripts["launcher"]), str(scripts["flooder"]), str(scripts["polite"]), str(out),
        str(procs), str(conns), str(seconds), str(rows),
    )  # fmt: skip
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()
    try:
        while side.poll() is None and time.monotonic() - t0 < seconds + 60:
            r = rss_of(side.pid)
            if r is not None:
                rss.append((time.monotonic(), r))
            time.sleep(0.1)
        _, err = side.communicate(timeout=60)
    finally:
        if side.poll() is None:
            side.kill()
            side.communicate()
    assert side.returncode == 0, err
    res: dict[str, Any] = json.loads(out.read_text())
    res["rss"] = rss
    res["trace"] = trace
    res["err"] = err
    return res


def check_flood(res: dict[str, Any], seconds: float, conns_total: int) -> dict[str, Any]:
    trace: Path = res["trace"]
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    ticks = [r for r in recs if r["k"] == "tick"]
    offered = sum(f["rows"] for f in res["floods"])
    assert sum(f["conns"] for f in res["floods"]) == conns_total  # every flooding connection was accepted
    dropped = max(t["m"].get("chan_dropped_total") or 0 for t in ticks)
    recorded = sum(1 for r in recs if r["k"] == "event" and r["kind"] == "request")
    # memory: while all the floods are connected, the sidecar's RSS (read from /proc every 0.1 s, on the
    # same monotonic clock as the trace's started_mono) plateaus: the second half no higher than the first
    flooded = [t["t"] for t in ticks if (t["m"].get("chan_clients") or 0) >= conns_total]
    assert len(flooded) >= 2, len(flooded)
    origin = recs[0]["started_mono"]
    start, end = origin + flooded[0], origin + flooded[-1]
    mid = (start + end) / 2
    rss = res["rss"]
    first = max(r for t, r in rss if start <= t <= mid)
    last = max(r for t, r in rss if mid < t <= end)
    base = rss[0][1]
    peak = max(r for _, r in rss)
    print(
        f"\nflood via tuner run: {conns_total} connections offered {offered / seconds:,.0f} events/s "
        f"({offered:,} in {seconds:g} s); recorded {recorded:,}, dropped {dropped:,.0f}; sidecar RSS "
        f"{first / 1e6:.0f} MB (first half of the flood) -> {last / 1e6:.0f} MB (second half), "
        f"peak {peak / 1e6:.0f} MB; {len(ticks)} ticks, {sum(r.get('n', 0) for r in recs if r['k'] == 'skip')} skipped"
    )
    assert last <= first + 30e6  # flat, not growing with the offered load
    assert peak - base < 150e6  # bounded queue (20k messages, 32 MB) + the connections' buffers
    assert dropped > 0  # the overload was real, and its losses counted
    notes = [r for r in recs if r["k"] == "note" and "messages lost" in r["msg"]]
    assert notes and all(r["level"] == "warn" for r in notes)
    # the well-behaved clients kept being served: most of what they made is in the trace
    for p in res["polite"]:
        mine = sum(1 for r in recs if r["k"] == "event" and r["kind"] == "request" and r["data"]["pid"] == p["pid"])
        times = [r["t"] for r in recs if r["k"] == "event" and r["kind"] == "request" and r["data"]["pid"] == p["pid"]]
        halves = (flooded[0], (flooded[0] + flooded[-1]) / 2, flooded[-1])
        assert any(halves[0] <= t <= halves[1] for t in times) and any(halves[1] < t <= halves[2] for t in times)
        # most of what it sent (nearly all on a quiet machine; its own client counts what it could not send)
        assert mine >= 0.5 * (p["made"] - p["dropped"]), (mine, p)
        assert p["worst"] < 1.0, p  # and their inference never waited on the flooded sidecar
    rep = tuner("report", str(trace), "--json")
    assert rep.returncode == 0, rep.stderr
    summary = json.loads(rep.stdout)
    assert summary["metrics"]["chan_dropped_total"]["max"] == dropped
    assert any("messages lost" in w for w in summary["warnings"])
    return summary


def test_flood_small_memory_bounded_drops_counted_polite_served(tmp_path: Path) -> None:
    # 3 s: the plateau check needs two ticks with all 40 connected, and under the flood the sidecar skips
    # ticks (1.5 s gave a single such tick in one run of three here)
    res = flood(tmp_path, procs=2, conns=20, seconds=3.0, rows=64)
    check_flood(res, 3.0, 40)


@pytest.mark.slow
def test_flood_200_clients_100k_events_per_second(tmp_path: Path) -> None:
    seconds = float(os.environ.get("TUNER_FLOOD_SECONDS", "8"))
    res = flood(tmp_path, procs=4, conns=50, seconds=seconds, rows=64)
    check_flood(res, seconds, 200)


# -- fuzzed channel messages during a session --------------------------------------------------------------
SESSION_CLIENT = r"""
import json, sys, time
from tuner import client
c = client.connect()
made = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    with c.request(prompt_tokens=1) as r:
        r.token([1, 2])
    c.poll()
    made += 1
    time.sleep(0.01)
c.close(timeout=3)
print(json.dumps({"made": made, "dropped": c.dropped}), flush=True)
"""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
messages = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={
        "type": st.sampled_from(["hello", "request", "requests", "status", "oom", "alloc", "command_result",
                                 "client_connect", "client_disconnect", "welcome", "knobs", "x"]),
        "rows": st.lists(st.lists(json_values, max_size=18), max_size=3),
        "tokens": json_values, "created": json_values, "end": json_values, "ids": json_values,
        "active": json_values, "dropped": json_values, "pid": json_values, "conn": json_values,
    },
).map(lambda d: json.dumps(d).encode())  # fmt: skip
frames = st.one_of(
    st.binary(max_size=200),  # anything at all, length prefix included or not
    messages.map(lambda b: struct.pack(">I", len(b)) + b),  # well framed, wrong inside
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(lambda x: struct.pack(">I", x[0]) + x[1]),
)


class Session:
    """One ``tuner run`` with a paced client, shared by the fuzz examples (starting one per example would
    make the test slow; what matters is that one session survives them all)."""

    def __init__(self, tmp: Path, seconds: float) -> None:
        self.trace = tmp / "fuzz.jsonl"
        self.proc = tuner_popen(
            "run", "--headless", "--interval", "0.05", "--trace", str(self.trace), "--",
            sys.executable, "-c", SESSION_CLIENT, str(seconds),
        )  # fmt: skip
        end = time.monotonic() + 20
        header: dict[str, Any] = {}
        while not header and time.monotonic() < end:
            if self.trace.exists() and self.trace.read_text():
                header = json.loads(self.trace.read_text().split("\n", 1)[0])
            time.sleep(0.02)
        self.path: str = header["channel_socket"]
        self.sent = 0


def send_junk(path: str, data: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.settimeout(1.0)
        s.sendall(data)
    except OSError:
        pass
    finally:
        s.close()


def test_fuzzed_messages_never_crash_the_session(tmp_path: Path) -> None:
    seconds = 2.5
    session = Session(tmp_path, seconds)
    try:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.lists(frames, min_size=1, max_size=4))
        def fuzz(chunks: list[bytes]) -> None:
            assert session.proc.poll() is None, "the sidecar died"
            send_junk(session.path, b"".join(chunks))
            session.sent += 1

        fuzz()
        assert session.proc.poll() is None, "the sidecar died"
        out, err = session.proc.communicate(timeout=60)
    finally:
        if session.proc.poll() is None:
            session.proc.kill()
            session.proc.communicate()
    assert session.proc.returncode == 0, err
    assert "Traceback" not in err
    assert session.sent >= 20
    recs = [json.loads(line) for line in session.trace.read_text().splitlines()]
    assert recs[-1]["k"] == "end" and recs[-1]["exit_code"] == 0
    mine = [r for r in recs if r["k"] == "event" and r["kind"] == "request" and r["data"]["tokens"] == 2]
    res = json.loads(out.splitlines()[-1]) if out.strip() else None
    assert res is None or len(mine) >= res["made"] - res["dropped"] - 5
    assert len(mine) > 50  # the session's own client was served throughout
    rep = tuner("report", str(session.trace), "--json")
    assert rep.returncode == 0, rep.stderr
