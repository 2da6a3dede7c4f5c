"""Append-only JSON Lines traces: writer, reader (into numpy columns), follower, columnar companion.

The modules, one role each (imports point down this list):

- ``format``  — what a trace is: record kinds, header, encoding, limits, ``TraceError``, file modes.
- ``columns`` — the columnar companion ``T.cols``: written in blocks, used only where it matches ``T``.
- ``writer``  — ``TraceWriter``: appends records, flushes every tick, survives a full disk.
- ``rotate``  — ``RotatingTraceWriter`` (segments by size/age, gzip for closed ones, retention) and
  ``trace_files``: the files of a trace, a rotated recording's segments in order.
- ``reader``  — ``read_trace`` (numpy columns) and ``iter_records``.
- ``follow``  — ``TraceFollower``: a growing trace, poll by poll.

Import from here (``from tuner.trace import read_trace``); the modules are the package's inside.
"""

from tuner.trace.columns import columns_path
from tuner.trace.follow import TraceFollower
from tuner.trace.format import (
    MAX_LINE_BYTES,
    SCHEMA_VERSION,
    TraceError,
    check_header,
    encode_record,
    make_header,
    make_private_dirs,
    package_versions,
)
from tuner.trace.reader import TraceData, iter_records, read_trace
from tuner.trace.rotate import RotatingTraceWriter, Rotation, leftovers, parse_rotation, trace_files
from tuner.trace.writer import BUFFER_LIMIT, TraceWriter, default_trace_path

__all__ = [
    "BUFFER_LIMIT",
    "MAX_LINE_BYTES",
    "SCHEMA_VERSION",
    "RotatingTraceWriter",
    "Rotation",
    "TraceData",
    "TraceError",
    "TraceFollower",
    "TraceWriter",
    "check_header",
    "columns_path",
    "default_trace_path",
    "encode_record",
    "iter_records",
    "leftovers",
    "make_header",
    "make_private_dirs",
    "package_versions",
    "parse_rotation",
    "read_trace",
    "trace_files",
]
