"""An OTLP/HTTP receiver for tests (no OpenTelemetry Collector binary is available here): it decodes each
request with ``opentelemetry-proto`` — the protobuf definitions the Collector uses — and appends one JSON
line per request to OUT: ``{"path", "signal", "body"}`` (the message as ``MessageToDict`` gives it, field names
as in the .proto).

    python tests/helpers/otlp_receiver.py OUT [--status 503] [--hang]

Prints ``listening on PORT`` once ready.  ``--status``: answer every request with this HTTP status (a
collector refusing); ``--hang``: read the request, never answer (a collector stuck).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

SIGNALS = {
    "/v1/metrics": ("metrics", ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": ("logs", ExportLogsServiceRequest, ExportLogsServiceResponse),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--status", type=int, default=200)
    ap.add_argument("--hang", action="store_true")
    args = ap.parse_args()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if args.hang:
                time.sleep(3600)
                return
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            sig = SIGNALS.get(self.path)
            if sig is None:
                self.send_response(404)
                self.end_headers()
                return
            name, req_type, resp_type = sig
            if args.status != 200:
                self.send_response(args.status)
                self.end_headers()
                return
            msg = req_type.FromString(body)
            line = json.dumps({"path": self.path, "signal": name, "content_type": self.headers.get("Content-Type"),
                               "body": MessageToDict(msg, preserving_proto_field_name=True)})  # fmt: skip
            with lock, open(args.out, "a") as f:
                f.write(line + "\n")
            out = resp_type().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
