"""Bad input, as a user meets it: the real ``tuner`` in a subprocess, each input -> the exact one line on
stderr and the exit code (2 for bad input and usage errors; 126/127 as a shell for a command that cannot
start).  Never a traceback, nothing started half-way, nothing already recorded lost.

Covered: policy files for ``run``/``demo``/``replay`` (unknown keys and tables, wrong types, inverted
bounds, out of range, empty, not TOML, not UTF-8, missing, a directory, an unknown preset), every option
with a bad value (interval, Prometheus addresses, trace and output paths, export formats, contradicting
flags), missing arguments and unknown subcommands, PIDs (nonexistent, 0, negative, not a number, too
large, our own, a kernel thread, another user's), and hypothesis-fuzzed argv for several subcommands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli import ROOT, assert_one_line_error, cannot_run_as_nobody, tuner, tuner_env, tuner_popen
from tuner.policies.batch_size import BatchConfig
from tuner.records import Action, Applied
from tuner.trace import TraceWriter, make_header, read_trace

HAVE_TORCH = importlib.util.find_spec("torch") is not None

# -- inputs ------------------------------------------------------------------------------------------
POLICY_FILES: dict[str, bytes] = {
    "empty.toml": b"",
    "blank.toml": b"  \n\n",
    "not_toml.toml": b"[batch_size\nmin = 1\n",
    "binary.toml": b"\xff\xfe\x00[batch_size]",
    "unknown_table.toml": b"[turbo]\nboost = 1\n",
    "unknown_key.toml": b"[batch_size]\nmin = 1\nmax = 8\nbogus = 3\n",
    "wrong_type.toml": b"[batch_size]\nmin = 'one'\n",
    "wrong_type_bool.toml": b"[temperature]\nmax = true\n",
    "not_a_table.toml": b"batch_size = 4\n",
    "inverted.toml": b"[batch_size]\nmin = 64\nmax = 8\n",
    "inverted_temp.toml": b"[temperature]\nmin = 1.5\nmax = 0.5\n",
    "out_of_range.toml": b"[temperature]\nmin = 0.2\nmax = 9.0\n",
    "nan.toml": b"[temperature]\nmax = nan\n",
    "no_policy.toml": b"[agent]\npriority = ['cleanup']\n",
    "bad_cooldown.toml": b"[agent]\ncooldown_s = { warp = 3 }\n[cleanup]\n",
    "negative.toml": b"[cleanup]\nmax_points = -1\n",
}

BATCH_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(BatchConfig)))

# file name -> the message after "tuner: policy file <name>: "
POLICY_ERRORS: dict[str, str] = {
    "empty.toml": "empty file (it needs at least one policy table, e.g. [batch_size])",
    "blank.toml": "empty file (it needs at least one policy table, e.g. [batch_size])",
    "binary.toml": "not UTF-8 text",
    "unknown_table.toml": "unknown table [turbo] (known: agent, temperature, batch_size, precision, cleanup)",
    "unknown_key.toml": f"unknown key batch_size.bogus (known: {BATCH_KEYS})",
    "wrong_type.toml": "batch_size.min must be an integer, not 'one'",
    "wrong_type_bool.toml": "temperature.max must be a number, not True",
    "not_a_table.toml": "'batch_size' must be a table ([batch_size]), not a int",
    "inverted.toml": "inverted bounds: batch_size.min = 64 is above batch_size.max = 8",
    "inverted_temp.toml": "inverted bounds: temperature.min = 1.5 is above temperature.max = 0.5",
    "out_of_range.toml": "temperature.max = 9 is out of range (0 to 5)",
    "nan.toml": "temperature.max must be a number, not nan",
    "negative.toml": "cleanup.max_points = -1 must not be negative",
    "no_policy.toml": "no policy table (add at least one of [temperature], [batch_size], [precision], [cleanup])",
    "bad_cooldown.toml": "agent.cooldown_s: unknown knob 'warp' (known: temperature, repetition_penalty, "
    "batch_size, precision, cleanup)",
}


def _policy_rows() -> list[tuple[str, tuple[str, ...], str | re.Pattern[str], int]]:
    rows: list[tuple[str, tuple[str, ...], str | re.Pattern[str], int]] = []
    for name in POLICY_FILES:
        msg: str | re.Pattern[str]
        if name == "not_toml.toml":  # tomllib's own wording differs between Python versions
            msg = re.compile(r"tuner: policy file not_toml\.toml: invalid TOML \(.+\(at line 1, column \d+\)\)")
        else:
            msg = f"tuner: policy file {name}: {POLICY_ERRORS[name]}"
        rows.append((f"run-policy-{name}", ("run", "--policy", name, "--", "true"), msg, 2))
    for name in ("inverted.toml", "unknown_key.toml", "empty.toml"):
        msg = f"tuner: policy file {name}: {POLICY_ERRORS[name]}"
        rows.append((f"replay-policy-{name}", ("replay", "trace.jsonl", "--policy", name), msg, 2))
        rows.append((f"attach-policy-{name}", ("attach", "--policy", name, "{self_parent}"), msg, 2))
    rows += [
        (
            "run-policy-missing",
            ("run", "--policy", "missing.toml", "--", "true"),
            "tuner: policy file missing.toml: no such file",
            2,
        ),
        ("run-policy-dir", ("run", "--policy", "adir", "--", "true"), "tuner: policy file adir: is a directory", 2),
        (
            "run-policy-dir-suffix",
            ("run", "--policy", "dir.toml", "--", "true"),
            "tuner: policy file dir.toml: is a directory",
            2,
        ),
        (
            "run-policy-unknown-preset",
            ("run", "--policy", "turbo", "--", "true"),
            "tuner: unknown policy 'turbo': use one of interactive, offline, edge or a .toml file",
            2,
        ),
        (
            "run-policy-empty-arg",
            ("run", "--policy", "", "--", "true"),
            "tuner: --policy '': give a preset (interactive, offline, edge) or a .toml file",
            2,
        ),
        (
            "replay-policy-missing",
            ("replay", "trace.jsonl", "--policy", "missing.toml"),
            "tuner: policy file missing.toml: no such file",
            2,
        ),
        (
            "replay-policy-empty-arg",
            ("replay", "trace.jsonl", "--policy", ""),
            "tuner: --policy '': give a preset (interactive, offline, edge) or a .toml file",
            2,
        ),
        (
            "replay-no-policy",
            ("replay", "trace.jsonl"),
            "tuner: trace.jsonl was recorded without a policy: give one with --policy P",
            2,
        ),
        (
            "run-observe-only-alone",
            ("run", "--observe-only", "--", "true"),
            "tuner: --observe-only needs --policy P (without a policy nothing acts anyway)",
            2,
        ),
        (
            "attach-observe-only-alone",
            ("attach", "--observe-only", "{self_parent}"),
            "tuner: --observe-only needs --policy P (without a policy nothing acts anyway)",
            2,
        ),
    ]
    if HAVE_TORCH:
        for name in ("inverted.toml", "not_a_table.toml", "missing.toml"):
            msg = f"tuner: policy file {name}: {POLICY_ERRORS.get(name, 'no such file')}"
            rows.append((f"demo-policy-{name}", ("demo", "--headless", "--requests", "1", "--policy", name), msg, 2))
        rows.append(
            (
                "demo-observe-only-alone",
                ("demo", "--headless", "--requests", "1", "--observe-only"),
                "tuner: --observe-only needs --policy P (without a policy nothing acts anyway)",
                2,
            )
        )
    return rows


def _interval(v: str) -> str:
    return f"tuner: --interval {v} is out of range: use 0.001 to 1 s (1-1000 Hz)"


def _prom(v: str, why: str) -> str:
    return f"tuner: --prometheus {v!r}: {why}"


RUN_HELP = "(see 'tuner run --help')"
OPTION_ROWS: list[tuple[str, tuple[str, ...], str | re.Pattern[str], int]] = [
    # --interval
    ("interval-0", ("run", "--interval", "0", "--", "true"), _interval("0"), 2),
    ("interval-negative", ("run", "--interval", "-0.5", "--", "true"), _interval("-0.5"), 2),
    ("interval-huge", ("run", "--interval", "1e300", "--", "true"), _interval("1e+300"), 2),
    (
        "interval-overflow",
        ("run", "--interval", "1e999", "--", "true"),
        f"tuner run: error: argument --interval: '1e999' is not a finite number {RUN_HELP}",
        2,
    ),
    (
        "interval-nan",
        ("run", "--interval", "nan", "--", "true"),
        f"tuner run: error: argument --interval: 'nan' is not a finite number {RUN_HELP}",
        2,
    ),
    (
        "interval-inf",
        ("attach", "--interval=-inf", "{self_parent}"),
        "tuner attach: error: argument --interval: '-inf' is not a finite number (see 'tuner attach --help')",
        2,
    ),
    # every float option of every subcommand is finite (the demo's sampler crashed on --temperature inf)
    (
        "demo-temperature-inf",
        ("demo", "--headless", "--requests", "1", "--temperature", "inf"),
        "tuner demo: error: argument --temperature: 'inf' is not a finite number (see 'tuner demo --help')",
        2,
    ),
    (
        "demo-rate-nan",
        ("demo", "--headless", "--requests", "1", "--rate", "nan"),
        "tuner demo: error: argument --rate: 'nan' is not a finite number (see 'tuner demo --help')",
        2,
    ),
    (
        "proxy-timeout-nan",
        ("proxy", "--upstream", "http://127.0.0.1:9", "--timeout", "NaN"),
        "tuner proxy: error: argument --timeout: 'NaN' is not a finite number (see 'tuner proxy --help')",
        2,
    ),
    ("interval-too-fast", ("attach", "--interval", "0.0001", "{self_parent}"), _interval("0.0001"), 2),
    (
        "interval-text",
        ("run", "--interval", "fast", "--", "true"),
        f"tuner run: error: argument --interval: invalid float value: 'fast' {RUN_HELP}",
        2,
    ),
    (
        "interval-missing-value",
        ("run", "--interval"),
        f"tuner run: error: argument --interval: expected one argument {RUN_HELP}",
        2,
    ),
    # --prometheus
    (
        "prom-no-port",
        ("run", "--prometheus", "localhost", "--", "true"),
        _prom("localhost", "expected HOST:PORT, e.g. 127.0.0.1:9464"),
        2,
    ),
    (
        "prom-port-0",
        ("run", "--prometheus", ":0", "--", "true"),
        _prom(":0", "port must be a number from 1 to 65535"),
        2,
    ),
    (
        "prom-port-big",
        ("run", "--prometheus", "127.0.0.1:70000", "--", "true"),
        _prom("127.0.0.1:70000", "port must be a number from 1 to 65535"),
        2,
    ),
    (
        "prom-port-text",
        ("run", "--prometheus", "127.0.0.1:http", "--", "true"),
        _prom("127.0.0.1:http", "port must be a number from 1 to 65535"),
        2,
    ),
    (
        "prom-v6-unbracketed",
        ("run", "--prometheus", "::1:9464", "--", "true"),
        _prom("::1:9464", "put an IPv6 address in brackets, e.g. [::1]:9464"),
        2,
    ),
    (
        "prom-v6-unclosed",
        ("run", "--prometheus", "[::1:9464", "--", "true"),
        _prom("[::1:9464", "expected [IPV6]:PORT, e.g. [::1]:9464"),
        2,
    ),
    (
        "prom-name-not-localhost",  # a name is not looked up: only localhost counts as loopback
        ("run", "--prometheus", "no-such-host.invalid:9464", "--", "true"),
        _prom(
            "no-such-host.invalid:9464",
            "no-such-host.invalid is not a loopback address; add --prometheus-public to serve metrics beyond "
            "this machine",
        ),
        2,
    ),
    (
        "prom-public-v4",
        ("run", "--prometheus", "0.0.0.0:9464", "--", "true"),
        _prom(
            "0.0.0.0:9464",
            "0.0.0.0 is not a loopback address; add --prometheus-public to serve metrics beyond this machine",
        ),
        2,
    ),
    (
        "prom-public-v6",
        ("attach", "--prometheus", "[::]:9464", "{self_parent}"),
        _prom(
            "[::]:9464", ":: is not a loopback address; add --prometheus-public to serve metrics beyond this machine"
        ),
        2,
    ),
    (
        "prom-empty",
        ("run", "--prometheus", " ", "--", "true"),
        _prom(" ", "expected HOST:PORT, e.g. 127.0.0.1:9464"),
        2,
    ),
    # --trace
    (
        "trace-dir",
        ("run", "--trace", "adir", "--", "true"),
        "tuner: cannot write trace adir: it is a directory (give a file name)",
        2,
    ),
    (
        "trace-parent-file",
        ("run", "--trace", "afile/t.jsonl", "--", "true"),
        "tuner: cannot write trace afile/t.jsonl: afile is not a directory",
        2,
    ),
    (
        "trace-exists",
        ("run", "--trace", "trace.jsonl", "--", "true"),
        "tuner: --trace trace.jsonl already exists (a recorded trace): give a new path, or add --overwrite to "
        "replace it",
        2,
    ),
    (
        "trace-exists-other",
        ("attach", "--trace", "afile", "{self_parent}"),
        "tuner: --trace afile already exists (2 bytes): give a new path, or add --overwrite to replace it",
        2,
    ),
    ("trace-empty-name", ("run", "--trace", "", "--", "true"), "tuner: --trace '': give a file name", 2),
    ("trace-fifo", ("run", "--trace", "fifo", "--", "true"), "tuner: cannot write trace fifo: not a regular file", 2),
    # run
    ("run-no-command", ("run",), "tuner: no command given: use 'tuner run [options] -- CMD ...'", 2),
    ("run-only-dashdash", ("run", "--"), "tuner: no command given: use 'tuner run [options] -- CMD ...'", 2),
    (
        "run-command-not-found",
        ("run", "--", "no-such-command-xyz"),
        "tuner: command not found: no-such-command-xyz",
        127,
    ),
    ("run-command-not-executable", ("run", "--", "./afile"), "tuner: permission denied: ./afile", 126),
    ("run-command-is-dir", ("run", "--", "./adir"), "tuner: permission denied: ./adir", 126),
    (
        "run-tui-and-headless",
        ("run", "--tui", "--headless", "--", "true"),
        "tuner: --tui and --headless contradict each other: choose one",
        2,
    ),
    (
        "run-tui-no-tty",
        ("run", "--tui", "--", "true"),
        "tuner: --tui needs a terminal (stdin and stdout are not a tty): use --headless",
        2,
    ),
    (
        "run-unknown-option",
        ("run", "--turbo", "--", "true"),
        f"tuner run: error: unrecognized arguments: --turbo {RUN_HELP}",
        2,
    ),
    # top level
    (
        "unknown-subcommand",
        ("frobnicate",),
        "tuner: error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'probes', 'run', 'attach', 'demo', "
        "'tui', 'replay', 'report', 'compare', 'export', 'proxy', 'fleet') (see 'tuner --help')",
        2,
    ),
    ("unknown-top-option", ("--turbo",), "tuner: error: unrecognized arguments: --turbo (see 'tuner --help')", 2),
    ("newline-in-argument", ("attach", "1\n2"), "tuner: '1\\n2' is not a PID (a positive whole number)", 2),
    # export
    (
        "export-no-args",
        ("export",),
        "tuner export: error: the following arguments are required: TRACE, --to, OUT (see 'tuner export --help')",
        2,
    ),
    (
        "export-no-out",
        ("export", "trace.jsonl", "--to", "csv"),
        "tuner export: error: the following arguments are required: OUT (see 'tuner export --help')",
        2,
    ),
    (
        "export-bad-format",
        ("export", "trace.jsonl", "--to", "xlsx", "o.xlsx"),
        "tuner export: error: argument --to: invalid choice: 'xlsx' (choose from 'csv', 'parquet', 'perfetto') "
        "(see 'tuner export --help')",
        2,
    ),
    (
        "export-missing-trace",
        ("export", "missing.jsonl", "--to", "csv", "o.csv"),
        "tuner: missing.jsonl: no such file",
        2,
    ),
    (
        "export-trace-dir",
        ("export", "adir", "--to", "csv", "o.csv"),
        "tuner: adir: is a directory, not a trace file",
        2,
    ),
    (
        "export-not-a-trace",
        ("export", "inverted.toml", "--to", "csv", "o.csv"),
        "tuner: inverted.toml: not an inference-tuner trace (binary or foreign content)",
        2,
    ),
    (
        "export-out-dir",
        ("export", "trace.jsonl", "--to", "csv", "adir"),
        "tuner: adir is a directory: give a file name to write",
        2,
    ),
    (
        "export-out-parent-file",
        ("export", "trace.jsonl", "--to", "perfetto", "afile/o.json"),
        "tuner: cannot write afile/o.json: afile is not a directory",
        2,
    ),
    (
        "export-out-is-input",
        ("export", "trace.jsonl", "--to", "csv", "trace.jsonl"),
        "tuner: OUT trace.jsonl is the trace being read: give another file name",
        2,
    ),
    (
        "export-out-is-a-trace",
        ("export", "trace.jsonl", "--to", "csv", "policy_trace.jsonl"),
        "tuner: OUT policy_trace.jsonl is a recorded trace: refusing to overwrite it; give another file name",
        2,
    ),
    (
        "export-events-out-is-a-trace",
        ("export", "trace.jsonl", "--to", "parquet", "other"),
        "tuner: OUT other.events.parquet is a recorded trace: refusing to overwrite it; give another file name",
        2,
    ),
    (
        "export-out-full-device",
        ("export", "trace.jsonl", "--to", "csv", "/dev/full"),
        "tuner: cannot write /dev/full: No space left on device",
        2,
    ),
    ("export-empty-trace-name", ("export", "", "--to", "csv", "o.csv"), "tuner: TRACE '': give a file name", 2),
    # report / compare / replay
    (
        "report-no-args",
        ("report",),
        "tuner report: error: the following arguments are required: TRACE (see 'tuner report --help')",
        2,
    ),
    ("report-missing", ("report", "missing.jsonl"), "tuner: missing.jsonl: no such file", 2),
    ("report-non-utf8-name", ("report", os.fsdecode(b"\xff.jsonl")), "tuner: \\udcff.jsonl: no such file", 2),
    ("report-empty-file", ("report", "empty.toml"), "tuner: empty.toml: empty file, not a trace", 2),
    (
        "report-html-dir",
        ("report", "trace.jsonl", "--html", "adir"),
        "tuner: adir is a directory: give a file name to write",
        2,
    ),
    (
        "report-html-is-input",
        ("report", "trace.jsonl", "--html", "trace.jsonl"),
        "tuner: --html trace.jsonl is the trace being read: give another file name",
        2,
    ),
    (
        "compare-one-arg",
        ("compare", "trace.jsonl"),
        "tuner compare: error: the following arguments are required: B (see 'tuner compare --help')",
        2,
    ),
    ("compare-missing-b", ("compare", "trace.jsonl", "missing.jsonl"), "tuner: missing.jsonl: no such file", 2),
    (
        "compare-html-is-b",
        ("compare", "trace.jsonl", "policy_trace.jsonl", "--html", "policy_trace.jsonl"),
        "tuner: --html policy_trace.jsonl is the trace being read: give another file name",
        2,
    ),
    (
        "replay-no-args",
        ("replay",),
        "tuner replay: error: the following arguments are required: TRACE (see 'tuner replay --help')",
        2,
    ),
    (
        "replay-out-is-input",
        ("replay", "policy_trace.jsonl", "--out", "policy_trace.jsonl"),
        "tuner: --out must not be the trace being replayed",
        2,
    ),
    (
        "replay-out-is-a-trace",
        ("replay", "policy_trace.jsonl", "--out", "trace.jsonl"),
        "tuner: --out trace.jsonl is a recorded trace: refusing to overwrite it; give another file name (or add "
        "--overwrite)",
        2,
    ),
    (
        "replay-out-parent-file",
        ("replay", "policy_trace.jsonl", "--out", "afile/x.jsonl"),
        "tuner: cannot write afile/x.jsonl: afile is not a directory",
        2,
    ),
    # tui
    ("tui-no-args", ("tui",), "tuner: give either a TRACE file or --connect SOCKET (one of them)", 2),
    (
        "tui-both",
        ("tui", "trace.jsonl", "--connect", "x.sock"),
        "tuner: give either a TRACE file or --connect SOCKET (one of them)",
        2,
    ),
    ("tui-missing-file", ("tui", "missing.jsonl"), "tuner: missing.jsonl: no such file", 2),
    ("tui-dir", ("tui", "adir"), "tuner: adir: is a directory, not a trace file", 2),
    (
        "tui-missing-socket",
        ("tui", "--connect", "missing.sock"),
        "tuner: missing.sock: no such socket (is the session running? it prints its live-view socket)",
        2,
    ),
    ("tui-socket-not-a-socket", ("tui", "--connect", "afile"), "tuner: cannot connect to afile: Connection refused", 2),
    (
        "tui-no-tty",
        ("tui", "trace.jsonl"),
        "tuner: tuner tui needs a terminal (stdin and stdout are not a tty); for text use 'tuner report trace.jsonl'",
        2,
    ),
    # PIDs
    (
        "attach-no-pid",
        ("attach",),
        "tuner attach: error: the following arguments are required: PID (see 'tuner attach --help')",
        2,
    ),
    ("attach-nonexistent", ("attach", "999999999"), "tuner: no process with PID 999999999", 2),
    ("attach-too-large", ("attach", "99999999999999999999"), "tuner: no process with PID 99999999999999999999", 2),
    ("attach-zero", ("attach", "0"), "tuner: 0 is not a valid PID", 2),
    ("attach-negative", ("attach", "-5"), "tuner: -5 is not a valid PID", 2),
    ("attach-text", ("attach", "nginx"), "tuner: 'nginx' is not a PID (a positive whole number)", 2),
    ("attach-float", ("attach", "12.5"), "tuner: '12.5' is not a PID (a positive whole number)", 2),
    ("attach-hex", ("attach", "0x10"), "tuner: '0x10' is not a PID (a positive whole number)", 2),
    ("attach-empty", ("attach", ""), "tuner: '' is not a PID (a positive whole number)", 2),
    ("attach-non-ascii-digit", ("attach", "\u0663"), "tuner: '\u0663' is not a PID (a positive whole number)", 2),
    ("probes-pid-nonexistent", ("probes", "--pid", "999999999"), "tuner: no process with PID 999999999", 2),
    ("probes-pid-text", ("probes", "--pid", "self"), "tuner: 'self' is not a PID (a positive whole number)", 2),
]

PROXY = ("proxy", "--upstream", "http://127.0.0.1:9")
OTHER_OPTION_ROWS: list[tuple[str, tuple[str, ...], str | re.Pattern[str], int]] = [
    ("proxy-no-upstream", ("proxy",),
     "tuner proxy: error: the following arguments are required: --upstream (see 'tuner proxy --help')", 2),
    ("proxy-upstream-scheme", ("proxy", "--upstream", "ftp://x"),
     "tuner: --upstream 'ftp://x': use http://HOST:PORT (or https://)", 2),
    ("proxy-upstream-not-url", ("proxy", "--upstream", "http://[::1"),
     "tuner: --upstream 'http://[::1' is not a URL", 2),
    ("proxy-listen-no-port", (*PROXY, "--listen", "nohost"),
     "tuner: --listen 'nohost': expected HOST:PORT, e.g. 127.0.0.1:8100", 2),
    ("proxy-listen-port-big", (*PROXY, "--listen", "127.0.0.1:99999"),
     "tuner: --listen '127.0.0.1:99999': port must be a number from 0 to 65535", 2),
    ("proxy-concurrency-0", (*PROXY, "--max-concurrency", "0"), "tuner: --max-concurrency must be at least 1", 2),
    ("proxy-bounds-inverted", (*PROXY, "--temperature-bounds", "2:1"),
     "tuner: --temperature-bounds '2:1': need 0 <= LO <= HI", 2),
    ("proxy-bounds-text", (*PROXY, "--temperature-bounds", "warm"),
     "tuner: --temperature-bounds 'warm': use LO:HI, e.g. 0.2:1.2", 2),
    ("proxy-body-small", (*PROXY, "--max-body-bytes", "10"), "tuner: --max-body-bytes must be at least 1024", 2),
    ("proxy-timeout-0", (*PROXY, "--timeout", "0"), "tuner: --timeout and --connect-timeout must be positive", 2),
    ("proxy-mode", (*PROXY, "--temperature-mode", "sometimes"),
     "tuner proxy: error: argument --temperature-mode: invalid choice: 'sometimes' (choose from 'unset', 'always') "
     "(see 'tuner proxy --help')", 2),
    ("proxy-pid", (*PROXY, "--pid", "999999999"), "tuner: no process with PID 999999999", 2),
]  # fmt: skip
if HAVE_TORCH:
    DEMO = ("demo", "--headless")
    OTHER_OPTION_ROWS += [
        ("demo-requests-0", (*DEMO, "--requests", "0"), "tuner: --requests 0 must be at least 1", 2),
        ("demo-duration-0", (*DEMO, "--duration", "0"), "tuner: --duration 0 must be more than 0 seconds", 2),
        ("demo-batch-0", (*DEMO, "--requests", "1", "--batch-size", "0"), "tuner: --batch-size 0 must be at least 1",
         2),
        ("demo-temperature-negative", (*DEMO, "--requests", "1", "--temperature=-1"),
         "tuner: --temperature -1 must be 0 (greedy) or more", 2),
        ("demo-rate-0", (*DEMO, "--requests", "1", "--rate", "0"),
         "tuner: --rate 0 must be more than 0 requests per second", 2),
        ("demo-tau-0", (*DEMO, "--requests", "1", "--mirostat", "--mirostat-tau", "0"),
         "tuner: --mirostat-tau 0 must be more than 0 bits", 2),
        ("demo-seed-text", (*DEMO, "--requests", "1", "--seed", "x"),
         "tuner demo: error: argument --seed: invalid int value: 'x' (see 'tuner demo --help')", 2),
        ("demo-duration-and-requests", (*DEMO, "--requests", "1", "--duration", "5"),
         "tuner demo: error: argument --duration: not allowed with argument --requests (see 'tuner demo --help')", 2),
    ]  # fmt: skip

ROWS = _policy_rows() + OPTION_ROWS + OTHER_OPTION_ROWS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of inputs: policy files, two small traces, a directory, a plain file."""
    d = tmp_path_factory.mktemp("bad_input")
    for name, data in POLICY_FILES.items():
        (d / name).write_bytes(data)
    (d / "adir").mkdir()
    (d / "dir.toml").mkdir()
    (d / "afile").write_text("x\n")
    os.mkfifo(d / "fifo")
    write_trace(d / "trace.jsonl")
    write_trace(d / "policy_trace.jsonl", policy="edge")
    write_trace(d / "other.events.parquet")  # a trace under the name a parquet export writes its events to
    return d


def write_trace(path: Path, *, policy: str | None = None, ticks: int = 20) -> None:
    header = make_header(
        probes={"cpu": {"available": True, "metrics": {"tree_rss_bytes": "bytes"}}},
        interval_s=0.1,
        command=["serve"],
        extra={"policy": policy} if policy else None,
    )
    with TraceWriter(path, header) as w:
        for i in range(ticks):
            w.tick(0.1 * (i + 1), {"tree_rss_bytes": 1e6 + i, "tree_cpu_ratio": 0.5})
        if policy:
            w.action(Applied(0.5, Action("batch_size", "batch_size", 4, "test"), "dry-run", 8))
        w.end(0.1 * ticks + 0.05, ticks=ticks, skipped=0)


@pytest.fixture(scope="module")
def fuzzdir(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the inputs for the fuzzer: a fuzzed command that succeeds may write files there."""
    d = tmp_path_factory.mktemp("fuzz") / "w"
    shutil.copytree(workdir, d, ignore=lambda _, names: [n for n in names if n == "fifo"])
    os.mkfifo(d / "fifo")
    return d


@pytest.fixture(scope="module")
def self_parent() -> str:
    """A live process the tests may name: this test process (the tuner's parent, not the tuner)."""
    return str(os.getpid())


@pytest.mark.parametrize(("args", "expected", "code"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_exact_line(
    workdir: Path, self_parent: str, args: tuple[str, ...], expected: str | re.Pattern[str], code: int
) -> None:
    argv = [a.replace("{self_parent}", self_parent) for a in args]
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    cp = tuner(*argv, cwd=workdir, timeout=60, stdin=subprocess.DEVNULL)
    err = assert_one_line_error(cp, code)
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(err), err
    else:
        assert err == expected
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert after == before, "a failed command changed or created a file"
    assert not (workdir / "traces").exists(), "a failed command left a trace behind"


# -- PIDs that need a live process ------------------------------------------------------------------
def test_attach_to_its_own_pid_is_refused(tmp_path: Path) -> None:
    """`exec` makes the shell's PID the tuner's: the one process it must not watch (it would wait forever)."""
    cmd = f"exec {sys.executable} -m tuner attach $$"
    cp = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60, env=tuner_env(), cwd=tmp_path)
    err = assert_one_line_error(cp)
    assert re.fullmatch(r"tuner: PID (\d+) is this tuner process itself: give the PID of the inference to watch", err)


def test_attach_to_a_zombie_is_refused(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.02)
        cp = tuner("attach", str(child.pid), cwd=tmp_path, timeout=60)
        assert assert_one_line_error(cp) == (
            f"tuner: process {child.pid} has already exited (a zombie its parent has not reaped): nothing to watch"
        )
        assert not (tmp_path / "traces").exists()
    finally:
        child.wait()


def _kernel_thread() -> int | None:
    for pid in range(2, 200):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[6]) & 0x00200000:
            return pid
    return None


@pytest.mark.parametrize("cmd", ["attach", "proxy"])
def test_attach_to_a_kernel_thread_is_refused(tmp_path: Path, cmd: str) -> None:
    pid = _kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread visible in this PID namespace")
    argv = ("attach", str(pid)) if cmd == "attach" else (*PROXY, "--pid", str(pid))
    cp = tuner(*argv, cwd=tmp_path, timeout=60)
    assert (
        assert_one_line_error(cp) == f"tuner: PID {pid} is a kernel thread, not a process with memory of its own to "
        "watch"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
@pytest.mark.parametrize("args", [("attach", "1"), ("probes", "--pid", "1")], ids=["attach", "probes"])
def test_pid_1_as_another_user_is_access_denied(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Run as 'nobody': PID 1 belongs to root and cannot be read -> one line, exit 2, no trace left."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed")
    if why := cannot_run_as_nobody():
        pytest.skip(why)
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    work = tmp_path / "w"
    work.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chown(work, 65534, 65534)
    cp = subprocess.run(
        [*drop, "-m", "tuner", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
        cwd=work,
    )
    if cp.returncode == 0:
        pytest.skip("PID 1 is readable by nobody here (a permissive /proc)")
    err = assert_one_line_error(cp)
    assert err == "tuner: cannot read process 1 (access denied): run tuner as the same user or as root"
    assert not (work / "traces").exists()


# -- failing late loses nothing ------------------------------------------------------------------------
@contextlib.contextmanager
def _listening() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def test_a_taken_prometheus_port_fails_before_the_command_starts(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    with _listening() as port:
        cp = tuner(
            "run",
            "--prometheus",
            f"127.0.0.1:{port}",
            "--trace",
            "t.jsonl",
            "--",
            "touch",
            str(marker),
            cwd=tmp_path,
            timeout=60,
        )
    err = assert_one_line_error(cp)
    assert err == f"tuner: cannot serve Prometheus metrics on 127.0.0.1:{port}: Address already in use"
    assert not marker.exists(), "the command was started although the sidecar could not run"
    assert not (tmp_path / "t.jsonl").exists()


def test_a_trace_in_an_unwritable_place_fails_before_the_command_starts(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    cp = tuner("run", "--trace", "/proc/version/t.jsonl", "--", "touch", str(marker), cwd=tmp_path, timeout=60)
    assert (
        assert_one_line_error(cp) == "tuner: cannot write trace /proc/version/t.jsonl: /proc/version is not a directory"
    )
    assert not marker.exists()


def test_an_existing_trace_is_kept_and_overwrite_replaces_it(workdir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "keep.jsonl"
    write_trace(trace, ticks=7)
    original = trace.read_bytes()
    cp = tuner("run", "--quiet", "--trace", str(trace), "--", "true", cwd=tmp_path, timeout=60)
    assert_one_line_error(cp)
    assert trace.read_bytes() == original
    cp = tuner(
        "run",
        "--quiet",
        "--overwrite",
        "--interval",
        "0.02",
        "--trace",
        str(trace),
        "--",
        sys.executable,
        "-c",
        "import time; time.sleep(0.3)",
        cwd=tmp_path,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    data = read_trace(trace)
    assert data.header["command"][0] == sys.executable and data.end is not None


CRASHER = """
import os, sys, time
blob = bytearray(64 << 20)   # something to see in the trace
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(0.6)
os.abort()                   # dies by a signal, late, mid-run
"""


def test_a_command_that_crashes_late_leaves_a_complete_trace(tmp_path: Path) -> None:
    trace = tmp_path / "crash.jsonl"
    cp = tuner(
        "run",
        "--headless",
        "--interval",
        "0.02",
        "--trace",
        str(trace),
        "--",
        sys.executable,
        "-c",
        CRASHER,
        cwd=tmp_path,
        timeout=60,
    )
    assert cp.returncode == 128 + signal.SIGABRT, cp.stderr
    assert "Traceback" not in cp.stderr
    data = read_trace(trace)
    assert data.end is not None and data.end["exit_code"] == 128 + signal.SIGABRT
    assert len(data.times) >= 10
    assert max(v for v in data.column("tree_rss_bytes") if v == v) > 60 * (1 << 20)


def test_a_sidecar_killed_mid_run_leaves_what_it_recorded_readable(tmp_path: Path) -> None:
    """The tuner itself dies late (SIGKILL: no cleanup at all): the ticks written so far are all readable
    and the command it watched runs on."""
    trace = tmp_path / "killed.jsonl"
    marker = tmp_path / "child-finished"
    child = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(marker)!r}).write_text('ok')"
    p = tuner_popen(
        "run", "--quiet", "--interval", "0.02", "--trace", str(trace), "--", sys.executable, "-c", child, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not trace.exists() or trace.read_bytes().count(b'"k":"tick"') < 10):
            time.sleep(0.05)
        p.kill()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    data = read_trace(trace)  # no end record, but every complete line is there
    assert data.end is None and len(data.times) >= 10
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.05)
    assert marker.read_text() == "ok", "the watched command did not survive the sidecar's death"


def test_a_late_failure_of_the_sidecar_closes_the_trace_and_spares_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug striking after recording began (injected into Session.start, in-process: the same main()
    the command runs): one 'internal error' line, exit 70, the trace complete with an end record saying
    why, and the command left running to its own end."""
    from tuner.cli import INTERNAL_ERROR
    from tuner.core.session import Session

    start = Session.start

    def start_then_fail(self: Session) -> None:
        start(self)
        time.sleep(0.3)  # a few ticks on disk
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Session, "start", start_then_fail)
    trace, marker = tmp_path / "t.jsonl", tmp_path / "finished"
    child = f"import time, pathlib; time.sleep(1.0); pathlib.Path({str(marker)!r}).write_text('ok')"
    code, err = _run_main(["run", "--quiet", "--interval", "0.02", "--trace", str(trace), "--", sys.executable, "-c",
                           child])  # fmt: skip
    assert code == INTERNAL_ERROR
    assert err.strip() == (
        "tuner: internal error: RuntimeError: injected failure (TUNER_DEBUG=1 shows the traceback; please report it)"
    )
    data = read_trace(trace)
    assert len(data.times) >= 5
    assert data.end is not None and data.end["sidecar_failed"] is True
    assert data.end["error"] == "RuntimeError: injected failure"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.05)
    assert marker.read_text() == "ok", "the command did not survive the sidecar's failure"


# -- fuzzed argv (in-process: the same main() the command runs, thousands of times faster) ------------
WORDS = [
    "",
    " ",
    "-",
    "--",
    "-h0",
    "0",
    "-1",
    "1e999",
    "nan",
    "abc",
    "\u0663",
    "x\ny",
    "trace.jsonl",
    "policy_trace.jsonl",
    "missing.jsonl",
    "adir",
    "afile",
    "afile/x",
    "empty.toml",
    "inverted.toml",
    "not_toml.toml",
    "edge",
    "turbo",
    "csv",
    "parquet",
    "perfetto",
    "xml",
    "0.0.0.0:1",
    ":0",
    "[::1",
    "127.0.0.1:x",
]
OPTIONS = {
    "report": ["--json", "--html", "--skip-bad"],
    "export": ["--to", "--skip-bad"],
    "compare": ["--json", "--html", "--skip-bad"],
    "replay": ["--policy", "--out", "--json", "--skip-bad", "--overwrite"],
    "tui": ["--connect"],
    "attach": ["--interval", "--policy", "--observe-only", "--prometheus", "--trace", "--headless", "--quiet"],
    "probes": ["--pid", "--json"],
    "run": [
        "--interval",
        "--policy",
        "--observe-only",
        "--prometheus",
        "--prometheus-public",
        "--trace",
        "--overwrite",
        "--headless",
        "--tui",
        "--quiet",
        "--record-text",
    ],
}
NO_SUCH_COMMAND = "no-such-command-xyz"


def _argv() -> st.SearchStrategy[list[str]]:
    def for_sub(sub: str) -> st.SearchStrategy[list[str]]:
        no_nul = st.characters(blacklist_characters="\x00")  # a real argv cannot hold NUL
        token = st.one_of(st.sampled_from(WORDS + OPTIONS[sub]), st.text(no_nul, max_size=6))
        if sub == "run":  # whatever the options, the command itself never exists: nothing really runs
            return st.lists(token, max_size=6).map(lambda rest: [sub, *rest, "--", NO_SUCH_COMMAND])
        return st.lists(token, max_size=6).map(lambda rest: [sub, *rest])

    return st.sampled_from(sorted(OPTIONS)).flatmap(for_sub)


def _run_main(argv: list[str]) -> tuple[int, str]:
    from tuner.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


def _is_safe(argv: list[str]) -> bool:
    """Leave out argv that would legitimately run for long (attach to a live process, probes of ourselves)."""
    if argv[0] == "attach":
        words = [w.strip().lstrip("+") for w in argv]
        pids = [int(w) for w in words if w.isascii() and w.isdigit()]
        return not any(pid > 0 and pid != os.getpid() for pid in pids)
    if argv[0] == "probes":
        return "--pid" in argv and "-h" not in argv
    return True


def _not_found(cmd: list[str], *args: object) -> None:
    from tuner.errors import UserError

    raise UserError(f"command not found: {cmd[0]}", code=127)


@settings(
    max_examples=int(os.environ.get("TUNER_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(argv=_argv())
def test_fuzzed_argv_is_never_a_traceback(fuzzdir: Path, argv: list[str]) -> None:
    if not _is_safe(argv):
        return
    cwd = os.getcwd()
    os.chdir(fuzzdir)
    try:
        before = {p.name: p.read_bytes() for p in fuzzdir.iterdir() if p.is_file() and p.suffix == ".jsonl"}
        # Everything up to starting the command is real; the start itself always fails as a missing
        # command would (fuzzed text can name a real program: '[' is one).
        with mock.patch("tuner.commands.run.start_child", side_effect=_not_found):
            code, err = _run_main(argv)
        after = {p.name: p.read_bytes() for p in fuzzdir.iterdir() if p.is_file() and p.suffix == ".jsonl"}
    finally:
        os.chdir(cwd)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert after == before, ("a trace was changed", argv)
    if code != 0:
        lines = [ln for ln in err.splitlines() if not ln.startswith("tuner: warning:")]
        if code in (126, 127):  # every other check passed: the command (never a real one) could not start
            assert argv[0] == "run" and re.fullmatch(
                r"tuner: (command not found|permission denied|cannot start)"
                r"[: ].+",
                lines[0],
            ), (argv, err)
        assert code in (2, 126, 127), (argv, code, err)
        assert len(lines) == 1 and lines[0].startswith("tuner"), (argv, err)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argv())
def test_fuzzed_argv_through_the_real_command(fuzzdir: Path, argv: list[str]) -> None:
    if not _is_safe(argv) or argv[0] == "run":  # fuzzed text could name a real program to run
        return
    cp = tuner(*argv, cwd=fuzzdir, timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in cp.stderr, (argv, cp.stderr)
    if cp.returncode != 0:
        lines = [ln for ln in cp.stderr.splitlines() if not ln.startswith("tuner: warning:")]
        assert cp.returncode in (2, 126, 127) and len(lines) == 1, (argv, cp.returncode, cp.stderr)


# -- fuzzed policy documents (in-process: the parser every --policy goes through) ---------------------------
def _policy_docs() -> st.SearchStrategy[dict[str, object]]:
    from tuner.core.policy_config import POLICY_CLASSES, AgentConfig

    keys = {n: [f.name for f in dataclasses.fields(c)] + ["enabled", "bogus"] for n, (c, _) in POLICY_CLASSES.items()}
    keys["agent"] = [f.name for f in dataclasses.fields(AgentConfig)] + ["bogus"]
    scalar = st.one_of(
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(),
        st.text(max_size=8),
        st.sampled_from([0, 1, 2, 8, 64, 0.5, 0.0, 1.0, -1, "fp16", "int8", "gc", "fp32", "cleanup"]),
    )
    value = st.one_of(
        scalar,
        st.lists(scalar, max_size=4),
        st.dictionaries(st.sampled_from(["temperature", "cleanup", "warp", "batch_size"]), scalar, max_size=3),
    )
    tables = {n: st.dictionaries(st.sampled_from(k), value, max_size=5) for n, k in keys.items()}
    return st.fixed_dictionaries({}, optional={**tables, "weird": st.integers()})  # type: ignore[arg-type]


@settings(max_examples=int(os.environ.get("TUNER_FUZZ_EXAMPLES", "200")), deadline=None)
@given(doc=_policy_docs())
def test_fuzzed_policy_documents_are_accepted_whole_or_refused_in_one_line(doc: dict[str, object]) -> None:
    """Anything a TOML file can hold: a UserError of one line, or a config whose agent builds."""
    from tuner.core.actuator import DryRunActuator
    from tuner.core.policy_config import build_agent, parse_policy
    from tuner.errors import UserError

    try:
        cfg = parse_policy(doc, source="p.toml")
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("policy file p.toml: ")
        return
    build_agent(cfg, DryRunActuator(), None)
