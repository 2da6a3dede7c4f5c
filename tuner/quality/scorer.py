"""The scorer: a child process of the sidecar that computes similarities, so neither the inference nor the
sidecar's sampling path ever runs a model or waits for one.

``python -m tuner.quality.scorer --backend SPEC`` (started by :class:`ScorerProcess`) speaks JSON lines:

- first it writes ``{"ready": true, "backend": {...}, "self_check": {...}, "load_seconds": S}`` once the
  backend is loaded and passed its self-check (``tuner.quality.backends.self_check``), or ``{"ready": false,
  "reason": "..."}`` and exits;
- then for each job line ``{"id": N, "pairs": [[a, b], ...]}`` on stdin one line ``{"id": N, "scores": [...],
  "reasons": [...], "cpu_seconds": C, "seconds": S}`` (``None`` scores with their reasons);
- it ends at the end of stdin, and with the sidecar (``PR_SET_PDEATHSIG``).

It runs at ``nice`` 10 with one torch thread: on a machine shared with the inference it takes what is left (2
torch threads collapsed to 100-700 ms an answer under contention here, 1 thread stayed at 11-12 ms).

The parent side, :class:`ScorerProcess`, keeps a bounded queue of jobs (the oldest is dropped and counted when
full) and hands the child one job at a time, so the queue bound is real (nothing piles up in the pipe); two
threads do the I/O, nothing blocks the caller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import IO, Any

NICE = 10
QUEUE_JOBS = 64


def _pdeathsig() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- the child ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuner.quality.scorer")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--unpinned", action="store_true")
    ap.add_argument("--remote", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--nice", type=int, default=NICE)
    args = ap.parse_args(argv)
    with contextlib.suppress(OSError):
        os.nice(args.nice)
    out = sys.stdout
    t = time.monotonic()
    from tuner.quality.backends import BackendError, open_backend, parse_spec, self_check

    try:
        spec = parse_spec(args.backend, allow_remote=args.remote)
        backend = open_backend(spec, verify=not args.unpinned, allow_remote=args.remote, model=args.model,
                               timeout=args.timeout)
        check = self_check(backend)
    except (BackendError, ValueError) as exc:
        _put(out, {"ready": False, "reason": str(exc)})
        return 0
    except Exception as exc:  # anything else is a one-line reason too
        _put(out, {"ready": False, "reason": f"{type(exc).__name__}: {exc}"[:400]})
        return 0
    _put(out, {"ready": True, "backend": backend.describe(), "self_check": check,
               "load_seconds": round(time.monotonic() - t, 3)})
    for line in sys.stdin:
        try:
            job = json.loads(line)
            jid, pairs = job["id"], [(str(a), str(b)) for a, b in job["pairs"]]
        except (ValueError, KeyError, TypeError):
            continue
        c0, t0 = time.process_time(), time.monotonic()
        try:
            scored = backend.similarities(pairs)
        except Exception as exc:
            why = f"scorer failed: {type(exc).__name__}: {exc}"[:300]
            scored = [(None, why)] * len(pairs)
        _put(out, {"id": jid, "scores": [s for s, _ in scored], "reasons": [r for _, r in scored],
                   "cpu_seconds": time.process_time() - c0, "seconds": time.monotonic() - t0})
    backend.close()
    return 0


def _put(out: IO[str], msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


# -- the parent -----------------------------------------------------------------------------------------
class ScorerProcess:
    """The scorer child and its bounded job queue.  ``submit`` and ``results`` are safe from any thread.

    ``state``: ``starting`` -> ``ready``, or ``failed`` (the backend could not load; ``reason`` says why) or
    ``exited`` (the child died; ``reason``)."""

    def __init__(self, backend: str, *, unpinned: bool = False, remote: bool = False, model: str | None = None,
                 timeout: float = 10.0, queue: int = QUEUE_JOBS, python: str | None = None) -> None:
        self.queue_cap = max(1, queue)
        self._jobs: deque[tuple[int, list[tuple[str, str]]]] = deque()
        self._results: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.state = "starting"
        self.reason: str | None = None
        self.ready_info: dict[str, Any] | None = None
        self.dropped = 0
        self.submitted = 0
        self.in_flight: int | None = None
        self.started_at = time.monotonic()
        self._closing = False
        self._stderr: deque[str] = deque(maxlen=20)
        cmd = [python or sys.executable, "-m", "tuner.quality.scorer", "--backend", backend,
               "--timeout", f"{timeout:g}"]
        if unpinned:
            cmd.append("--unpinned")
        if remote:
            cmd.append("--remote")
        if model:
            cmd += ["--model", model]
        env = dict(os.environ)
        env.pop("TUNER_SOCKET", None)  # the scorer is not an inference: it must not connect to the channel
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", errors="replace", env=env, bufsize=1,
                                     preexec_fn=_pdeathsig, start_new_session=True)
        self.pid = self.proc.pid
        self._stat_fd: int | None = None
        with contextlib.suppress(OSError):
            self._stat_fd = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        for target, name in ((self._read, "tuner-scorer-read"), (self._write, "tuner-scorer-write"),
                             (self._drain_stderr, "tuner-scorer-err")):
            threading.Thread(target=target, name=name, daemon=True).start()

    # -- any thread ---------------------------------------------------------------------------------
    def submit(self, jid: int, pairs: Sequence[tuple[str, str]]) -> bool:
        """Queue a job; when the queue is full its oldest job is dropped (counted in ``dropped``).  False
        when the scorer is not running (failed or exited): the job is not queued."""
        with self._lock:
            if self.state in ("failed", "exited") or self._closing:
                return False
            if len(self._jobs) >= self.queue_cap:
                self._jobs.popleft()
                self.dropped += 1
            self._jobs.append((jid, list(pairs)))
            self.submitted += 1
            self._wake.notify()
        return True

    def results(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with self._lock:
            while self._results:
                out.append(self._results.popleft())
        return out

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._jobs) + (1 if self.in_flight is not None else 0)

    def usage(self) -> tuple[float | None, float | None]:
        """(RSS bytes, CPU seconds) of the child now, from ``/proc/PID/stat``; (None, None) once it is gone."""
        fd = self._stat_fd
        if fd is None:
            return None, None
        try:
            raw = os.pread(fd, 1024, 0)
            fields = raw.rsplit(b")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / self._tick
            rss = float(int(fields[21]) * self._page)
        except (OSError, ValueError, IndexError):
            return None, None
        return rss, cpu

    def close(self, timeout: float = 3.0) -> None:
        with self._lock:
            self._closing = True
            self._jobs.clear()
            self._wake.notify_all()
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stat_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._stat_fd)
            self._stat_fd = None

    # -- threads ------------------------------------------------------------------------------------
    def _write(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        while True:
            with self._lock:
                while not self._closing and (not self._jobs or self.in_flight is not None
                                             or self.state != "ready"):
                    if self.state in ("failed", "exited"):
                        return
                    self._wake.wait(0.5)
                if self._closing:
                    return
                jid, pairs = self._jobs.popleft()
                self.in_flight = jid
            try:
                stdin.write(json.dumps({"id": jid, "pairs": pairs}) + "\n")
                stdin.flush()
            except (OSError, ValueError):
                return

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            with self._lock:
                if "ready" in msg:
                    if msg.get("ready"):
                        self.state, self.ready_info = "ready", msg
                    else:
                        self.state, self.reason = "failed", str(msg.get("reason") or "the backend did not load")
                    self._wake.notify_all()
                    continue
                if msg.get("id") == self.in_flight:
                    self.in_flight = None
                self._results.append(msg)
                self._wake.notify_all()
        code = self.proc.wait()
        with self._lock:
            if self.state in ("starting", "ready") and not self._closing:
                last = next((ln for ln in reversed(self._stderr) if ln.strip()), "")
                self.reason = f"the scorer exited with code {code}" + (f": {last.strip()}"[:300] if last else "")
                self.state = "exited"
            self._wake.notify_all()

    def _drain_stderr(self) -> None:
        err = self.proc.stderr
        assert err is not None
        for line in err:
            self._stderr.append(line.rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
