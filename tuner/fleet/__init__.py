"""``tuner fleet``: every sidecar a Prometheus server scrapes, read back through PromQL (its HTTP API).

- ``promql`` — the Prometheus HTTP API client (standard library only): instant queries, several at once.
- ``view``   — the fleet as the view shows it: one ``Replica`` per sidecar and the fleet's totals
  (``fetch_fleet``), built from the series ``tuner.outputs.prometheus`` exports.

The Textual app is ``tuner.tui.fleet``; this package never imports textual.
"""

from tuner.fleet.promql import PromClient, PromError
from tuner.fleet.view import Fleet, Replica, fetch_fleet

__all__ = ["Fleet", "PromClient", "PromError", "Replica", "fetch_fleet"]
