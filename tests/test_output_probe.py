"""The output probe: metric keys, rolling-window maths, events, and a real client -> trace round trip."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli import tuner_env
from tuner.core.sampler import Sampler, Tick
from tuner.link.channel import ChannelServer
from tuner.probes.output import OutputProbe, percentile
from tuner.records import Sample, unit_of
from tuner.trace import TraceWriter, make_header, read_trace

INTERFACE_KEYS = {
    "req_ttft_p50_seconds", "req_ttft_p95_seconds", "req_tpot_p50_seconds", "req_tpot_p95_seconds",
    "req_e2e_p50_seconds", "req_queue_p50_seconds", "req_tokens_per_second", "req_requests_per_second",
    "req_done_total", "req_active", "req_batch_occupancy_ratio", "req_seq_rep_4_ratio", "req_rep_32_ratio",
    "req_loop_ratio", "req_distinct_2_ratio", "chan_clients", "chan_dropped_total",
    "alloc_allocated_bytes", "alloc_reserved_bytes", "alloc_host_free_bytes",
}  # fmt: skip
REQUEST_FIELDS = {
    "id", "pid", "prompt_tokens", "tokens", "queue_seconds", "ttft_seconds", "tpot_seconds", "e2e_seconds",
    "tokens_per_second", "seq_rep_4", "rep_32", "loop", "batch_size", "temperature", "precision",
}  # fmt: skip


class ScriptedChannel:
    """The channel's read side, fed by the test (the probe's own unit of work is what is under test)."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, dict[str, Any]]] = []
        self.n_clients = 0
        self.counts = {"malformed": 0, "dropped": 0}
        self.welcome: dict[str, Any] = {}

    def drain(self) -> list[tuple[float, dict[str, Any]]]:
        out, self.pending = self.pending, []
        return out

    def clients(self) -> list[dict[str, Any]]:
        return [{"pid": 1, "uid": 0, "connected_at": 0.0}] * self.n_clients

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def set_welcome(self, **kw: Any) -> None:
        self.welcome.update(kw)


def req(end: float, *, ids: list[int], ttft: float, e2e: float, conn: int = 1, **kw: Any) -> dict[str, Any]:
    n = len(ids)
    return {
        "v": 1, "type": "request", "id": kw.pop("id", 1), "pid": 77, "conn": conn, "prompt_tokens": 5,
        "tokens": n, "created": end - e2e, "end": end, "queue_seconds": kw.pop("queue", 0.0),
        "ttft_seconds": ttft, "tpot_seconds": kw.pop("tpot", 0.01), "e2e_seconds": e2e,
        "tokens_per_second": n / e2e, "ids": ids, "batch_size": kw.pop("batch_size", None),
        "batch_capacity": kw.pop("batch_capacity", None), "temperature": 0.7, "precision": "fp32", **kw,
    }  # fmt: skip


def test_metric_keys_are_the_interface_and_units_follow_suffixes() -> None:
    p = OutputProbe(ScriptedChannel(), t0=0.0)
    m = p.metrics()
    assert set(m) == INTERFACE_KEYS
    assert all(unit_of(k) == u for k, u in m.items())
    assert p.name == "output" and p.available() is None


def test_no_data_means_none_not_zero() -> None:
    ch = ScriptedChannel()
    s = OutputProbe(ch, t0=0.0).sample(1.0)
    assert isinstance(s, Sample) and s.events == ()
    assert all(s.values[k] is None for k in INTERFACE_KEYS if not k.startswith("chan_"))
    assert s.values["chan_clients"] == 0 and s.values["chan_dropped_total"] == 0


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 100):
        xs = sorted(rng.random(n).tolist())
        for q in (0.5, 0.95):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q * 100)))
    assert percentile([], 0.5) is None


def test_rolling_window_values_and_events() -> None:
    ch = ScriptedChannel()
    t0 = 1000.0
    p = OutputProbe(ch, t0=t0, window_s=10.0)
    ch.n_clients = 1
    ch.pending = [
        (t0 + 0.5, {"v": 1, "type": "client_connect", "pid": 77, "uid": 0, "conn": 1}),
        (t0 + 1.0, req(t0 + 1.0, ids=[1, 2, 3, 4, 5], ttft=0.1, e2e=0.5, batch_size=2, batch_capacity=4)),
        (t0 + 2.0, req(t0 + 2.0, ids=[7, 7, 7, 7, 7, 7], ttft=0.3, e2e=1.0, batch_size=4, batch_capacity=4)),
        (t0 + 2.0, {"v": 1, "type": "status", "pid": 77, "conn": 1, "active": 3, "dropped": 5}),
        (t0 + 2.1, {"v": 1, "type": "oom", "pid": 77, "conn": 1, "batch_size": 8}),
        (t0 + 2.2, {"v": 1, "type": "alloc", "pid": 77, "conn": 1, "allocated_bytes": 100, "reserved_bytes": 200}),
        (t0 + 2.3, {"v": 1, "type": "command_result", "pid": 77, "conn": 1, "id": "abc", "cmd": "cleanup",
                    "ok": True, "result": {"reclaimed_bytes": 5}, "error": None}),
    ]  # fmt: skip
    ch.counts["malformed"] = 2
    s = p.sample(3.0)
    kinds = [e.kind for e in s.events]
    assert kinds == ["client_connect", "request", "request", "oom", "command_result"]
    r1 = s.events[1]
    assert r1.t == pytest.approx(1.0) and set(r1.data) == REQUEST_FIELDS
    assert r1.data["seq_rep_4"] == 0.0 and r1.data["loop"] is False
    assert s.events[2].data["loop"] is True and s.events[2].data["rep_32"] == pytest.approx(5 / 6)
    assert s.events[3].data == {"pid": 77, "batch_size": 8}
    assert s.events[4].data == {
        "id": "abc",
        "cmd": "cleanup",
        "ok": True,
        "result": {"reclaimed_bytes": 5},
        "error": None,
    }
    v = s.values
    assert v["req_ttft_p50_seconds"] == pytest.approx(0.2)
    assert v["req_ttft_p95_seconds"] == pytest.approx(0.1 + 0.95 * 0.2)
    assert v["req_e2e_p50_seconds"] == pytest.approx(0.75)
    assert v["req_done_total"] == 2 and v["req_active"] == 3
    # first activity at t=0.5 (the connect): the window so far is 2.5 s long
    assert v["req_tokens_per_second"] == pytest.approx(11 / 2.5)
    assert v["req_requests_per_second"] == pytest.approx(2 / 2.5)
    assert v["req_batch_occupancy_ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert v["req_loop_ratio"] == pytest.approx(0.5)
    assert v["req_seq_rep_4_ratio"] == pytest.approx((0.0 + (1 - 1 / 3)) / 2)
    assert v["req_distinct_2_ratio"] == pytest.approx((4 + 1) / (4 + 5))
    assert v["chan_clients"] == 1 and v["chan_dropped_total"] == 5 + 2
    assert v["alloc_allocated_bytes"] == 100 and v["alloc_reserved_bytes"] == 200
    assert v["alloc_host_free_bytes"] is None  # the client did not say whose heap: its free bytes are not known

    # 20 s later the requests have left the 10 s window; the cumulative count stays
    ch.pending = [(t0 + 20.0, {"v": 1, "type": "client_disconnect", "pid": 77, "uid": 0, "conn": 1})]
    ch.n_clients = 0
    s = p.sample(22.0)
    assert [e.kind for e in s.events] == ["client_disconnect"]
    assert s.values["req_ttft_p50_seconds"] is None and s.values["req_loop_ratio"] is None
    assert s.values["req_tokens_per_second"] == 0 and s.values["req_done_total"] == 2
    assert s.values["req_active"] is None  # no client left to report requests in flight
    assert s.values["chan_dropped_total"] == 7  # a gone client's drops are still counted


def test_text_only_with_record_text() -> None:
    for record in (False, True):
        ch = ScriptedChannel()
        p = OutputProbe(ch, t0=0.0, record_text=record)
        assert ch.welcome == {"record_text": record}  # the client is told whether to send text at all
        ch.pending = [(1.0, req(1.0, ids=[1, 2], ttft=0.1, e2e=0.2, text="hi there"))]
        (e,) = p.sample(1.5).events
        assert ("text" in e.data) is record


def test_a_message_the_probe_cannot_use_is_skipped() -> None:
    ch = ScriptedChannel()
    p = OutputProbe(ch, t0=0.0)
    bad = req(1.0, ids=[1], ttft=0.1, e2e=0.2)
    del bad["end"]
    ch.pending = [(1.0, bad), (1.0, req(1.0, ids=[1], ttft=0.1, e2e=0.2))]
    assert [e.kind for e in p.sample(2.0).events] == ["request"]


CHILD = """
import json, random, time
from tuner import client
random.seed(3)
c = client.connect()
time.sleep(0.3)
out = []
for i in range(12):
    with c.request(prompt_tokens=i, batch_size=1, batch_capacity=2) as r:
        toks = [random.randrange(6) for _ in range(random.randrange(0, 30))]
        for t in toks:
            r.token(t)
            time.sleep(0.002)
    out.append(toks)
    c.poll()
c.report_memory(1234, 5678, heap="host")
c.close()
print(json.dumps(out))
"""


def test_client_process_to_trace_file(tmp_path: Path) -> None:
    """The path a session takes: channel -> OutputProbe -> Sampler -> TraceWriter -> read_trace."""
    from tests.test_repetition import ref_distinct_2, ref_loop, ref_rep_w, ref_seq_rep_4

    server = ChannelServer()
    server.start()
    t0 = time.monotonic()
    probe = OutputProbe(server, t0=t0)
    trace = tmp_path / "t.jsonl"
    writer = TraceWriter(trace, make_header(probes={"output": {"metrics": probe.metrics()}}, interval_s=0.05))

    def record(tick: Tick) -> None:
        writer.tick(tick.t, tick.values, tick.procs)
        for e in tick.events:
            writer.event(e)
        writer.flush()

    sampler = Sampler([probe], interval=0.05, t0=t0, hooks=[record])
    sampler.start()
    try:
        p = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHILD)],
            env=tuner_env(TUNER_SOCKET=server.path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0, p.stderr
        time.sleep(0.3)
    finally:
        sampler.stop()
        sampler.close()
        writer.close()
        server.close()
    sent: list[list[int]] = __import__("json").loads(p.stdout)
    data = read_trace(trace)
    reqs = sorted(data.requests(), key=lambda e: e.data["prompt_tokens"])
    assert len(reqs) == 12
    for e, toks in zip(reqs, sent, strict=True):
        assert set(e.data) == REQUEST_FIELDS
        assert e.data["tokens"] == len(toks)
        assert e.data["seq_rep_4"] == ref_seq_rep_4(toks)
        assert e.data["rep_32"] == ref_rep_w(toks)
        assert e.data["loop"] == ref_loop(toks)
        assert 0 < e.t < data.duration + 1
    done = data.column("req_done_total")
    assert np.nanmax(done) == 12
    d2 = data.column("req_distinct_2_ratio")
    assert d2[~np.isnan(d2)][-1] == pytest.approx(ref_distinct_2(sent, 100))
    assert np.nanmax(data.column("alloc_allocated_bytes")) == 1234
    assert np.nanmax(data.column("alloc_host_free_bytes")) == 5678 - 1234  # the host C heap's free bytes
    assert math.isclose(np.nanmax(data.column("req_batch_occupancy_ratio")), 0.5)
    assert [e.kind for e in data.events if e.kind.startswith("client_")] == ["client_connect", "client_disconnect"]


json_scalar = (
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=5)
)
json_value = st.recursive(
    json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8
)


_BY_TYPE: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(-(1 << 64), 1 << 64),
    float: st.floats(allow_nan=False),
    str: st.text(max_size=6),
    bool: st.booleans(),
    type(None): st.none(),
    list: st.lists(st.integers(-(1 << 64), 1 << 64) | json_scalar, max_size=20),
    dict: st.dictionaries(st.text(max_size=4), json_value, max_size=3),
}


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-typed messages (so many pass validation), with wrong types and unknown fields mixed in."""
    from tuner.link.channel import _REQUIRED, _SCHEMA

    kind = draw(st.sampled_from([*_SCHEMA, "client_connect", "other"]))
    if kind == "requests":  # rows: well-typed mostly, in the channel's ROW_FIELDS order
        from tuner.link.channel import ROW_FIELDS

        def row() -> st.SearchStrategy[list[Any]]:
            cells = [st.one_of(*[_BY_TYPE[t] for t in types if t in _BY_TYPE]) for _, types in ROW_FIELDS]
            return st.tuples(*cells).map(list)

        rows = draw(st.lists(row() | st.lists(json_scalar, max_size=17), max_size=4))
        return {"v": 1, "type": "requests", "rows": rows}
    schema = _SCHEMA.get(kind, {})
    names = [*_REQUIRED.get(kind, ()), *draw(st.lists(st.sampled_from([*schema, "x"]), unique=True))]
    msg: dict[str, Any] = {"v": draw(st.sampled_from([1, 1, 1, 2])), "type": kind}
    for name in names:
        types = schema.get(name, (object,))
        good = st.one_of(*[_BY_TYPE[t] for t in types if t in _BY_TYPE]) if name in schema else json_value
        msg[name] = draw(st.one_of(good, good, good, json_value))
    return msg


@settings(max_examples=150, deadline=None)
@given(st.lists(messages(), max_size=12), st.floats(0, 100))
def test_fuzzed_messages_never_break_the_probe(msgs: list[dict[str, Any]], now: float) -> None:
    """Whatever passes the channel's validation, the probe turns into sane values and strict-JSON events."""
    import json

    from tuner.link.channel import MessageError, expand_rows, validate

    ch = ScriptedChannel()
    p = OutputProbe(ch, t0=0.0)
    for m in msgs:
        try:
            body = json.dumps(m).encode()
            ok = validate(body)
        except (MessageError, ValueError):
            continue
        for one in expand_rows(ok) if ok["type"] == "requests" else [ok]:  # as the server does
            one.update(pid=1, conn=1)
            ch.pending.append((now, one))
    s = p.sample(now)
    for k, v in s.values.items():
        assert v is None or (isinstance(v, float) and math.isfinite(v)), (k, v)
    for e in s.events:
        json.dumps({"t": e.t, "data": e.data}, allow_nan=False)


RUN_CHILD = """
import time
from tuner import client
c = client.connect()
assert c.connected or True
for i in range(8):
    with c.request(prompt_tokens=i) as r:
        for chunk in ["alpha", " beta", " gamma"]:
            r.text(chunk)
            time.sleep(0.005)
    c.poll()
print(type(c).__name__)
"""


@pytest.mark.parametrize("record_text", [False, True])
def test_tuner_run_records_every_request_of_its_command(tmp_path: Path, record_text: bool) -> None:
    """As a user meets it: ``tuner run -- CMD`` sets TUNER_SOCKET, CMD uses tuner.client, the trace has it all."""
    from tests.cli import tuner

    trace = tmp_path / "run.jsonl"
    args = ["run", "--headless", "--quiet", "--trace", str(trace), "--interval", "0.05"]
    if record_text:
        args.append("--record-text")
    cp = tuner(*args, "--", sys.executable, "-c", RUN_CHILD, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "Client"
    data = read_trace(trace)
    reqs = sorted(data.requests(), key=lambda e: e.data["prompt_tokens"])
    assert [e.data["prompt_tokens"] for e in reqs] == list(range(8))
    for e in reqs:
        assert set(e.data) == REQUEST_FIELDS | ({"text"} if record_text else set())
        assert e.data["tokens"] == 3 and e.data["ttft_seconds"] > 0 and e.data["tpot_seconds"] > 0.004
        if record_text:
            assert e.data["text"] == "alpha beta gamma"
    assert np.nanmax(data.column("req_done_total")) == 8
    assert [e.kind for e in data.events].count("client_connect") == 1
    assert ("alpha beta gamma" in trace.read_text()) is record_text
