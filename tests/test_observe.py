"""Observer live feed: header + backlog on connect, live records, slow viewers drop (counted) without
blocking publish(), viewer commands, permissions, a viewer in a separate process."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuner.link.observe import ObserverClient, ObserverServer, encode

ROOT = Path(__file__).resolve().parents[1]


def _header() -> dict:
    return {"k": "header", "tool": "inference-tuner", "schema": 1}


def test_header_backlog_then_live(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    with ObserverServer(path, backlog=5) as srv:
        srv.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        srv.publish(_header())
        for i in range(10):
            srv.publish({"k": "tick", "t": i / 10, "m": {"x": i}})
        with ObserverClient(path) as c:
            first = c.recv(2)
            assert first is not None and first["k"] == "header"
            backlog = [c.recv(2) for _ in range(5)]
            assert [r["m"]["x"] for r in backlog if r] == [5, 6, 7, 8, 9]
            srv.publish({"k": "tick", "t": 1.0, "m": {"x": 10}})
            live = c.recv(2)
            assert live is not None and live["m"]["x"] == 10
            assert c.recv(0.05) is None


def test_published_lines_reach_viewers_framed_as_written(tmp_path: Path) -> None:
    """The session forwards the trace writer's own JSON lines: backlog before a viewer, live after."""
    path = str(tmp_path / "obs.sock")
    with ObserverServer(path, backlog=3) as srv:
        srv.start()
        srv.publish_line(b'{"k":"header","tool":"inference-tuner","schema":1}', "header")
        for i in range(5):
            srv.publish_line(b'{"k":"tick","t":%d,"m":{"x":%d}}' % (i, i), "tick")
        with ObserverClient(path) as c:
            got = [c.recv(2) for _ in range(4)]
            assert [r["k"] for r in got if r] == ["header", "tick", "tick", "tick"]
            assert [r["m"]["x"] for r in got[1:] if r] == [2, 3, 4]
            deadline = time.monotonic() + 10
            while srv.viewers() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            srv.publish_line(b'{"k":"note","t":9,"msg":"live"}', "note")
            live = c.recv(2)
            assert live is not None and live["msg"] == "live"


def test_slow_viewer_drops_are_counted_and_publish_never_blocks(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    with ObserverServer(path, backlog=0, queue_limit=50) as srv:
        srv.start()
        srv.publish(_header())
        c = ObserverClient(path)
        deadline = time.monotonic() + 10
        while srv.viewers() == 0 and time.monotonic() < deadline:  # accepted (a loaded machine is slow)
            time.sleep(0.01)
        big = "y" * 20000
        t0 = time.monotonic()
        for i in range(3000):  # ~60 MB, far more than the socket buffers hold; the viewer reads nothing
            srv.publish({"k": "tick", "t": i, "m": {"x": i}, "pad": big})
        elapsed = time.monotonic() - t0
        assert elapsed < 5, elapsed  # publish only encodes and queues
        recs = []
        while True:
            r = c.recv(1.0)
            if r is None:
                break
            recs.append(r)
        assert recs[0]["k"] == "header"  # the header is never the record dropped
        notes = [r for r in recs if r["k"] == "note"]
        assert notes and notes[0]["level"] == "warn" and "viewer dropped" in notes[0]["msg"]
        ticks = [r["m"]["x"] for r in recs if r["k"] == "tick"]
        dropped = sum(n["n"] for n in notes)
        assert len(ticks) + dropped == 3000
        assert ticks[-1] == 2999 and ticks == sorted(ticks)
        c.close()


def test_commands_from_viewer(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    with ObserverServer(path) as srv:
        srv.start()
        with ObserverClient(path) as c:
            c.send_command({"cmd": "policy", "name": "temperature", "enabled": False})
            c.send_command({"cmd": "rm -rf", "name": 3})  # not a command: counted, ignored
            deadline = time.monotonic() + 3
            got: list[dict] = []
            while not got and time.monotonic() < deadline:
                got = srv.drain_commands()
                time.sleep(0.02)
        assert got == [{"cmd": "policy", "name": "temperature", "enabled": False}]
        time.sleep(0.05)
        assert srv.malformed == 1


def test_oversized_command_disconnects_viewer(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    with ObserverServer(path) as srv:
        srv.start()
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall((1 << 30).to_bytes(4, "big"))
        s.settimeout(2)
        assert s.recv(10) == b""  # closed by the server
        s.close()
        srv.publish({"k": "tick", "t": 0})  # still serving
        assert srv.viewers() == 0


def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listens
    with ObserverServer(path) as srv:
        srv.start()
        with pytest.raises(OSError):
            ObserverServer(path)
    assert not os.path.exists(path)
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(OSError):
        ObserverServer(str(regular))


def test_private_dir_when_no_path() -> None:
    srv = ObserverServer()
    d = os.path.dirname(srv.path)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    srv.close()
    assert not os.path.exists(d)


def test_viewer_in_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "obs.sock")
    code = textwrap.dedent(
        f"""
        from tuner.link.observe import ObserverClient
        c = ObserverClient({path!r})
        n = 0
        while True:
            r = c.recv(5)
            if r is None or r["k"] == "end":
                break
            n += r["k"] == "tick"
        c.send_command({{"cmd": "policy", "name": "memory", "enabled": True}})
        print(n)
        """
    )
    with ObserverServer(path) as srv:
        srv.start()
        srv.publish(_header())
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 10
        while srv.viewers() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        for i in range(100):
            srv.publish({"k": "tick", "t": i / 10, "m": {}})
        srv.publish({"k": "end", "t": 10})
        out, _ = p.communicate(timeout=20)
        assert out.strip() == "100"
        deadline = time.monotonic() + 3
        cmds: list[dict] = []
        while not cmds and time.monotonic() < deadline:
            cmds = srv.drain_commands()
            time.sleep(0.02)
        assert cmds == [{"cmd": "policy", "name": "memory", "enabled": True}]


def test_encode_frame() -> None:
    f = encode({"a": 1})
    assert f[:4] == (7).to_bytes(4, "big") and f[4:] == b'{"a":1}'
