"""A real vLLM server for the end-to-end tests (``make test-vllm``): the CPU build installed by
``vllm-lab install`` into ``$VLLM_LAB/venv``, serving the demo model as ``tuner demo --export-hf`` writes it.

Started like ``vllm-lab start`` starts its own model (same module entry point, same offline and CPU settings,
``--enforce-eager``), on a free port, in its own session; stopped with SIGTERM (its engine processes follow),
then SIGKILL to the whole session after 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tuner.demo.export_hf import ALLOWED_TOKEN_IDS

MODEL = "tuner-demo"
MAX_SEQS = 32  # the server's --max-num-seqs: streams past it wait in vLLM's queue
START_TIMEOUT_S = 900.0  # ~40 s on an idle 2-core machine; several minutes when the machine is busy


def lab_python() -> Path | None:
    lab = os.environ.get("VLLM_LAB")
    if not lab:
        return None
    py = Path(lab) / "venv" / "bin" / "python"
    return py if py.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMServer:
    proc: subprocess.Popen[bytes] | None  # None: a server someone else started (VLLM_TEST_URL)
    root: str  # http://127.0.0.1:PORT
    log: Path | None
    started_seconds: float
    pid: int

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def metrics_text(self) -> str:
        r = httpx.get(self.root + "/metrics", timeout=30)
        r.raise_for_status()
        return r.text

    def metrics(self) -> dict[str, float]:
        """Every sample of ``/metrics``, summed over its labels (one engine here): name -> value."""
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                key = s.name if "le" not in s.labels else f"{s.name}{{le={s.labels['le']}}}"
                out[key] = out.get(key, 0.0) + float(s.value)
        return out

    def num_gpu_blocks(self) -> int:
        """The KV cache's size in blocks (``vllm:cache_config_info``'s label)."""
        m = re.search(r'num_gpu_blocks="(\d+)"', self.metrics_text())
        assert m, "no num_gpu_blocks in vllm:cache_config_info"
        return int(m.group(1))

    def settled(self, timeout: float = 60.0) -> dict[str, float]:
        """The metrics once no request runs or waits and the token counter stopped moving."""
        deadline = time.monotonic() + timeout
        last: dict[str, float] | None = None
        while True:
            m = self.metrics()
            idle = m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0
            if (
                idle
                and last is not None
                and m.get("vllm:generation_tokens_total") == last.get("vllm:generation_tokens_total")
                and m.get("vllm:time_to_first_token_seconds_count")
                == last.get("vllm:time_to_first_token_seconds_count")
            ):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM did not settle within {timeout:g} s: {m}")
            last = m if idle else None
            time.sleep(0.5)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        try:  # its engine core and workers: whatever of the session it started is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode


def existing(root: str) -> VLLMServer:
    """A server already running (``VLLM_TEST_URL=http://HOST:PORT``, serving the export as ``tuner-demo``):
    for working on these tests without a start each run.  Its PID is the one listening on the port."""
    port = int(root.rsplit(":", 1)[1].rstrip("/"))
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    pid = int(out.split("pid=")[1].split(",")[0]) if "pid=" in out else 0
    return VLLMServer(None, root.rstrip("/"), None, 0.0, pid)


def start_vllm(python: Path, model: Path, workdir: Path, *extra: str) -> VLLMServer:
    cache = workdir / "cache"
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TRITON_CACHE_DIR=str(cache / "triton"),
        HF_HOME=str(cache / "hf"),
        TMPDIR=str(cache / "tmp"),
    )
    env.pop("PYTHONPATH", None)  # vLLM's own venv, not the tuner's checkout
    for d in ("vllm", "inductor", "tmp"):
        (cache / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "vllm-server.log"
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        *extra,
    ]
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = VLLMServer(proc, f"http://127.0.0.1:{port}", log, 0.0, proc.pid)
    deadline = t0 + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            server.stop()
            raise RuntimeError(f"vLLM exited with {proc.returncode} while starting:\n" + "\n".join(tail))
        try:
            if httpx.get(server.url + "/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"vLLM not ready after {START_TIMEOUT_S:g} s; see {log}")
        time.sleep(0.5)
    server.started_seconds = time.monotonic() - t0
    return server


# -- clients -------------------------------------------------------------------------------------------
@dataclass
class Streamed:
    text: str
    chunks: int
    usage: dict[str, Any] | None
    ttft: float | None  # seconds from sending to the first chunk with text
    aborted: bool


async def stream_completion(
    client: httpx.AsyncClient, url: str, prompt: str, *, abort_after: int | None = None, **body: Any
) -> Streamed:
    """One streamed ``/v1/completions``; ``abort_after=N`` hangs up after N chunks with text.  With
    ``stream=False`` in ``body``, one plain request (its answer is one chunk)."""
    req = {"model": MODEL, "prompt": prompt, "stream": True, "allowed_token_ids": ALLOWED_TOKEN_IDS, **body}
    if not req["stream"]:
        t0 = time.monotonic()
        r = await client.post(url + "/completions", json=req)
        assert r.status_code == 200, (r.status_code, r.text)
        answer = r.json()
        return Streamed(answer["choices"][0]["text"], 1, answer.get("usage"), time.monotonic() - t0, False)
    texts: list[str] = []
    usage = None
    ttft = None
    t0 = time.monotonic()
    async with client.stream("POST", url + "/completions", json=req) as r:
        assert r.status_code == 200, (r.status_code, await r.aread())
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev.get("choices") or ():
                if c.get("text"):
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    texts.append(c["text"])
            if abort_after is not None and len(texts) >= abort_after:
                return Streamed("".join(texts), len(texts), usage, ttft, True)
    return Streamed("".join(texts), len(texts), usage, ttft, False)


async def raw_ttft(root: str, prompt: str, **body: Any) -> float:
    """One streamed ``/v1/completions`` over a bare socket: seconds from writing the request to the first read
    holding generated text (the least a client can add to what it measures)."""
    host, port = root.removeprefix("http://").rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    data = json.dumps(
        {"model": MODEL, "prompt": prompt, "stream": True, "allowed_token_ids": ALLOWED_TOKEN_IDS, **body}
    ).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
    t0 = time.monotonic()
    w.write(head % host.encode() + b"content-length: %d\r\n\r\n" % len(data) + data)
    ttft = None
    try:
        while chunk := await r.read(65536):
            if ttft is None and re.search(rb'"text":"[^"]', chunk):
                ttft = time.monotonic() - t0
    finally:
        w.close()
    assert ttft is not None
    return ttft


def closed_loop(root: str, prompts: list[str], workers: int, **body: Any) -> list[float]:
    """``workers`` clients, each sending its share of ``prompts`` one after the other (bare sockets): TTFTs."""

    async def main() -> list[float]:
        async def worker(w: int) -> list[float]:
            return [await raw_ttft(root, p, **body) for p in prompts[w::workers]]

        return [t for ts in await asyncio.gather(*(worker(w) for w in range(workers))) for t in ts]

    return asyncio.run(main())


def burst(url: str, prompts: list[str], *, aborts: dict[int, int] | None = None, **body: Any) -> list[Streamed]:
    """All prompts at once, each its own stream; ``aborts[i] = N``: stream i hangs up after N chunks."""

    async def main() -> list[Streamed]:
        limits = httpx.Limits(max_connections=len(prompts) + 4, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as c:
            return list(
                await asyncio.gather(
                    *(
                        stream_completion(c, url, p, abort_after=(aborts or {}).get(i), **body)
                        for i, p in enumerate(prompts)
                    )
                )
            )

    return asyncio.run(main())


def sustained(
    url: str, prompts: list[str], workers: int, seconds: float, **body: Any
) -> list[Streamed]:
    """``workers`` streaming clients, each sending its share of ``prompts`` (round and round) one after the other
    until ``seconds`` have passed (a request started before then runs to its end): a load that lasts as long on a
    fast vLLM as on a slow one, so a sampler of ``/metrics`` sees it several times.  Every stream, in order of
    start per worker."""

    async def main() -> list[Streamed]:
        # (keep-alive shorter than the server's 5 s: a connection it closed is never reused)
        limits = httpx.Limits(max_connections=workers + 4, keepalive_expiry=2.0)
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as c:

            async def worker(w: int) -> list[Streamed]:
                mine = prompts[w::workers] or prompts
                out: list[Streamed] = []
                while not out or time.monotonic() < deadline:
                    out.append(await stream_completion(c, url, mine[len(out) % len(mine)], **body))
                return out

            return [s for ss in await asyncio.gather(*(worker(w) for w in range(workers))) for s in ss]

    return asyncio.run(main())


class Watch:
    """Samples vLLM's ``/metrics`` every ``period`` s in a thread: the gauges' values over time."""

    def __init__(self, server: VLLMServer, names: tuple[str, ...], period: float = 0.1) -> None:
        self.server = server
        self.names = names
        self.period = period
        self.seen: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                m = self.server.metrics()
                self.seen.append({n: m.get(n, float("nan")) for n in self.names})
            self._stop.wait(self.period)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def values(self, name: str) -> list[float]:
        return [s[name] for s in self.seen]
