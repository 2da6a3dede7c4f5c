"""Security, as a user meets it: Prometheus and the proxy listen on loopback unless told otherwise; prompt
and response text reach a trace only with ``--record-text``; nothing in the package can unpickle.

(Socket permissions, peer-uid checks and trace file modes are covered with the channel and trace tests.)
"""

from __future__ import annotations

import ast
import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.cli import ROOT, assert_one_line_error, tuner, tuner_popen
from tuner.trace import iter_records

PACKAGES = ("tuner", "probes", "policies", "tui")  # what pyproject installs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_addrs(pid: int, port: int) -> set[str]:
    """The local addresses ``pid`` listens on for ``port`` (TCP)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def wait_listening(p: subprocess.Popen[str], port: int, timeout: float = 30) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        addrs = listening_addrs(p.pid, port)
        if addrs:
            return addrs
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on port {port} (exit {p.poll()})")


@contextlib.contextmanager
def running(*args: str, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    p = tuner_popen(*args, cwd=cwd)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- Prometheus ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("addr", ["0.0.0.0:{port}", "[::]:{port}", "0:{port}"])
def test_prometheus_on_a_public_address_needs_prometheus_public(tmp_path: Path, addr: str) -> None:
    port = free_port()
    a = addr.format(port=port)
    marker = tmp_path / "started"
    cp = tuner("run", "--prometheus", a, "--", "touch", str(marker), cwd=tmp_path, timeout=60)
    err = assert_one_line_error(cp)
    assert err.startswith(f"tuner: --prometheus {a!r}: ") and err.endswith(
        "is not a loopback address; add --prometheus-public to serve metrics beyond this machine"
    )
    assert not marker.exists(), "the command ran although the sidecar refused to start"


SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


@pytest.mark.parametrize(
    ("addr", "extra", "bound"),
    [
        (":{port}", (), "127.0.0.1"),  # no host: loopback
        ("localhost:{port}", (), "127.0.0.1"),
        ("0.0.0.0:{port}", ("--prometheus-public",), "0.0.0.0"),  # only when told
    ],
    ids=["default-host", "localhost", "public"],
)
def test_prometheus_binds_loopback_unless_told(tmp_path: Path, addr: str, extra: tuple[str, ...], bound: str) -> None:
    port = free_port()
    a = addr.format(port=port)
    with running("run", "--quiet", "--prometheus", a, *extra, "--trace", "t.jsonl", "--", *SLEEPER, cwd=tmp_path) as p:
        assert wait_listening(p, port) == {bound}
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "tuner_ticks_total" in body


# -- the proxy --------------------------------------------------------------------------------------------
def test_proxy_listens_on_loopback_by_default() -> None:
    from tuner.cli import build_parser
    from tuner.link.addr import is_loopback
    from tuner.proxy.server import parse_listen

    args = build_parser().parse_args(["proxy", "--upstream", "http://127.0.0.1:9"])
    host, _ = parse_listen(args.listen, args.public)
    assert is_loopback(host) and not args.public and not args.prometheus_public


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.1:0", "example.com:0"])
def test_proxy_on_a_public_address_needs_public(tmp_path: Path, listen: str) -> None:
    cp = tuner("proxy", "--upstream", "http://127.0.0.1:9", "--listen", listen, "--headless", cwd=tmp_path, timeout=60)
    err = assert_one_line_error(cp)
    host = listen.rpartition(":")[0].strip("[]")
    assert err == f"tuner: --listen {listen!r}: {host} is not a loopback address; add --public to accept other machines"
    assert not (tmp_path / "traces").exists()


def test_proxy_public_does_not_make_prometheus_public(tmp_path: Path) -> None:
    cp = tuner(
        "proxy", "--upstream", "http://127.0.0.1:9", "--listen", "0.0.0.0:0", "--public",
        "--prometheus", f"0.0.0.0:{free_port()}", "--headless", cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert "add --prometheus-public" in assert_one_line_error(cp)


@pytest.mark.parametrize(("listen", "extra", "bound"), [("127.0.0.1", (), "127.0.0.1"), ("0.0.0.0", ("--public",),
                                                        "0.0.0.0")], ids=["loopback", "public"])  # fmt: skip
def test_proxy_binds_where_it_is_told(tmp_path: Path, listen: str, extra: tuple[str, ...], bound: str) -> None:
    pytest.importorskip("uvicorn")
    port = free_port()
    with running("proxy", "--upstream", "http://127.0.0.1:9", "--listen", f"{listen}:{port}", *extra, "--headless",
                 "--quiet", "--trace", "p.jsonl", cwd=tmp_path) as p:  # fmt: skip
        assert wait_listening(p, port) == {bound}


# -- text only with --record-text ---------------------------------------------------------------------------
SECRET_PROMPT_ANSWER = "zebra-quartz-7731 the patient's diagnosis is confidential"

TEXT_CLIENT = f"""
import time
from tuner import client
c = client.connect()
deadline = time.monotonic() + 10
# with --record-text, also the sidecar's welcome that says so (a client told late sends its first rows without
# text: on a local CI run, py3.13, 2026-12-05, a row came without it, the likely cause; the redaction is tested here)
while (not c.connected or (WAIT_TEXT and not c.record_text)) and time.monotonic() < deadline:
    time.sleep(0.02)
for i in range(3):
    with c.request(prompt_tokens=5) as r:
        for word in {SECRET_PROMPT_ANSWER.split()!r}:
            r.text(word + " ")
    c.poll()
time.sleep(0.5)  # the sender thread delivers the finished requests
print("sent", c.connected)
"""


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@pytest.mark.parametrize("record_text", [False, True], ids=["default", "record-text"])
def test_run_records_response_text_only_with_record_text(tmp_path: Path, record_text: bool) -> None:
    trace = tmp_path / "t.jsonl"
    flag = ["--record-text"] if record_text else []
    cp = tuner("run", "--quiet", "--interval", "0.05", *flag, "--trace", str(trace), "--", sys.executable, "-c",
               TEXT_CLIENT.replace("WAIT_TEXT", str(record_text)), cwd=tmp_path, timeout=60)  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "sent True"
    raw = trace.read_bytes()
    requests = [r for r in iter_records(trace) if r.get("k") == "event" and r.get("kind") == "request"]
    assert len(requests) == 3, "the client's requests did not reach the trace"
    for word in ("zebra-quartz-7731", "diagnosis", "confidential"):
        assert (word.encode() in raw) is record_text, word
    if record_text:
        assert all(r["data"]["text"].split() == SECRET_PROMPT_ANSWER.split() for r in requests)
    else:
        assert all("text" not in r["data"] for r in requests)


IDS_CLIENT = f"""
import time
from tuner import client
c = client.connect()
deadline = time.monotonic() + 10
while not c.connected and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.2)  # the welcome (record_text) arrives with the connection
with c.request(prompt_tokens=5) as r:
    r.token([1, 2, 3, 4])
    if c.record_text:
        r.response_text({SECRET_PROMPT_ANSWER!r})
time.sleep(0.5)
print("record_text", c.record_text)
"""


@pytest.mark.parametrize("record_text", [False, True], ids=["default", "record-text"])
def test_a_token_id_loop_attaches_its_text_only_with_record_text(tmp_path: Path, record_text: bool) -> None:
    """A decode loop reports ids with token() and, when the sidecar asks for text, the decoded response with
    response_text(): recorded as is, and it counts no tokens."""
    trace = tmp_path / "t.jsonl"
    flag = ["--record-text"] if record_text else []
    cp = tuner("run", "--quiet", "--interval", "0.05", *flag, "--trace", str(trace), "--", sys.executable, "-c",
               IDS_CLIENT, cwd=tmp_path, timeout=60)  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == f"record_text {record_text}"
    (req,) = [r["data"] for r in iter_records(trace) if r.get("k") == "event" and r.get("kind") == "request"]
    assert req["tokens"] == 4
    assert req.get("text") == (SECRET_PROMPT_ANSWER if record_text else None)
    assert (b"zebra-quartz" in trace.read_bytes()) is record_text


@pytest.mark.slow
def test_demo_records_response_text_with_record_text(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    trace = tmp_path / "demo.jsonl"
    cp = tuner("demo", "--headless", "--quiet", "--requests", "4", "--record-text", "--trace", str(trace),
               cwd=tmp_path, timeout=240)  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    requests = [r["data"] for r in iter_records(trace) if r.get("kind") == "request"]
    assert len(requests) == 4
    assert all(isinstance(r.get("text"), str) and r["text"] for r in requests)


@pytest.mark.parametrize("record_text", [False, True], ids=["default", "record-text"])
def test_a_prompt_on_the_command_line_is_recorded_only_with_record_text(tmp_path: Path, record_text: bool) -> None:
    """`tuner run -- llama-cli -p "..."`: the prompt is an argument; the trace keeps its length, not its text."""
    trace = tmp_path / "t.jsonl"
    flag = ["--record-text"] if record_text else []
    cmd = ["sh", "-c", ":", "sh", "-p", SECRET_PROMPT_ANSWER, "--n-predict", "32"]
    cp = tuner("run", "--quiet", *flag, "--trace", str(trace), "--", *cmd, cwd=tmp_path, timeout=60)
    assert cp.returncode == 0, cp.stderr
    header = next(iter_records(trace))
    if record_text:
        assert header["command"] == cmd and "command_redacted" not in header
    else:
        n = len(SECRET_PROMPT_ANSWER)
        assert header["command"] == ["sh", "-c", ":", "sh", "-p", f"<text: {n} chars>", "--n-predict", "32"]
        assert header["command_redacted"] == 1
    assert (b"zebra-quartz" in trace.read_bytes()) is record_text
    report = tuner("report", str(trace), cwd=tmp_path)
    assert report.returncode == 0 and ("zebra-quartz" in report.stdout) is record_text


@pytest.mark.slow
def test_demo_records_no_prompt_text(tmp_path: Path) -> None:
    """The demo's prompts are known (held-out documentation): none of them, nor any text field, is in its trace."""
    pytest.importorskip("torch")
    from tuner.demo.corpus import held_out_prompts

    trace = tmp_path / "demo.jsonl"
    cp = tuner("demo", "--headless", "--quiet", "--requests", "4", "--trace", str(trace), cwd=tmp_path, timeout=240)
    assert cp.returncode == 0, cp.stderr
    prompts = [p.strip() for p in held_out_prompts(256, seed=0)]
    pieces = {p[:24] for p in prompts if len(p) >= 24}
    assert len(pieces) > 100
    strings = [s for rec in iter_records(trace) for s in _strings(rec)]
    requests = [r for r in iter_records(trace) if r.get("kind") == "request"]
    assert len(requests) == 4
    assert all("text" not in r["data"] for r in requests)
    leaked = sorted({piece for piece in pieces for s in strings if piece in s})
    assert not leaked, leaked[:3]


# -- no pickle -----------------------------------------------------------------------------------------------
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib", "marshal", "copyreg"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    parts: list[str] = []
    f: ast.expr = node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str) -> Any:
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def unpickling_sites(source: str, where: str) -> list[str]:
    """Every place in ``source`` that could turn bytes into arbitrary objects."""
    tree = ast.parse(source, filename=where)
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"{where}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            bad.append(f"{where}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            last = name.split(".")[-1]
            if name == "__import__" and node.args and getattr(node.args[0], "value", None) in UNPICKLERS:
                bad.append(f"{where}:{node.lineno} __import__")
            elif name.endswith("torch.load") and _kw(node, "weights_only") is not True:
                bad.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            elif (
                last == "load"
                and name.split(".")[0] in ("np", "numpy")
                and _kw(node, "allow_pickle")
                not in (
                    None,
                    False,
                )
            ):
                bad.append(f"{where}:{node.lineno} numpy.load(allow_pickle=...)")
            elif last in ("read_pickle", "to_pickle"):
                bad.append(f"{where}:{node.lineno} {name}")
    return bad


def test_no_pickle_anywhere_in_the_package() -> None:
    sources = _sources()
    assert len(sources) > 30, "the scan found too few files: the package layout changed?"
    bad = [site for p in sources for site in unpickling_sites(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not bad, "unpickling is a code-execution hole in a trace/channel/model file:\n" + "\n".join(bad)


def test_the_pickle_scan_catches_what_it_should() -> None:
    """The scanner itself: each way in is reported, the safe forms are not."""
    text = (
        "import pickle\nimport dill as d\nfrom shelve import open\nimport torch\nimport numpy as np\n"
        "torch.load('w.pt')\ntorch.load('w.pt', weights_only=False)\ntorch.load('w.pt', weights_only=True)\n"
        "np.load('a.npy', allow_pickle=True)\nnp.load('a.npy')\n__import__('pickle')\npd.read_pickle('x')\n"
    )
    sites = unpickling_sites(text, "probe.py")
    assert [int(s.split(" ", 1)[0].rsplit(":", 1)[1]) for s in sites] == [1, 2, 3, 6, 7, 9, 11, 12], sites


def test_a_pickled_trace_is_refused(tmp_path: Path) -> None:
    """A trace is JSON lines: a file holding a pickle is refused, never loaded."""
    import pickle as _pickle  # only to build the hostile input

    evil = tmp_path / "evil.jsonl"
    evil.write_bytes(_pickle.dumps({"k": "header"}) + b"\n")
    cp = tuner("report", str(evil), cwd=tmp_path)
    assert "not an inference-tuner trace" in assert_one_line_error(cp)
