"""The Prometheus HTTP API (``/api/v1/query``), standard library only: instant queries, several at once."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class PromError(Exception):
    """A query that failed; the message is one line, fit to show a user."""


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    value: float | None
    """None for NaN (``histogram_quantile`` over no requests) and infinities."""


def base_url(text: str) -> str:
    """``--prometheus``: ``http://HOST:9090`` (a trailing ``/`` or ``/api/v1`` is dropped).  ``PromError`` else."""
    url = text.strip().rstrip("/")
    if url.endswith("/api/v1"):
        url = url[: -len("/api/v1")]
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise PromError(f"--prometheus {text!r} is not a URL (e.g. http://prometheus:9090)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise PromError(f"--prometheus {text!r}: give the server's http:// or https:// URL (e.g. http://prometheus:9090)")
    return url


class PromClient:
    """Instant queries against one Prometheus server; ``query_many`` runs them on a few threads at once."""

    def __init__(self, url: str, *, timeout: float = 10.0, threads: int = 8) -> None:
        self.url = base_url(url)
        self.timeout = timeout
        self.threads = threads

    def query(self, q: str, at: float | None = None) -> list[Series]:
        """An instant query (at ``at``, unix seconds; default now): its series, or a one-line ``PromError``."""
        params = {"query": q}
        if at is not None:
            params["time"] = f"{at:.3f}"
        req = urllib.request.Request(f"{self.url}/api/v1/query", data=urllib.parse.urlencode(params).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise PromError(f"{self.url}: {_api_error(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise PromError(f"cannot reach Prometheus at {self.url}: {why}") from None
        except ValueError:
            raise PromError(f"{self.url}: the answer is not the Prometheus API's JSON") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise PromError(f"{self.url}: {body.get('error') if isinstance(body, dict) else 'no answer'} ({q[:80]})")
        data = body.get("data") or {}
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar" and isinstance(result, list):
            return [Series({}, _number(result[1]))]
        if kind != "vector" or not isinstance(result, list):
            return []
        out = []
        for item in result:
            if isinstance(item, dict) and isinstance(item.get("value"), list):
                out.append(Series(dict(item.get("metric") or {}), _number(item["value"][1])))
        return out

    def query_many(self, queries: Mapping[str, str], at: float | None = None) -> dict[str, list[Series]]:
        """Several instant queries at the same ``at`` (default: now, the same for all), at once."""
        import time

        when = time.time() if at is None else at
        names = list(queries)
        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(names)))) as pool:
            results = list(pool.map(lambda n: self.query(queries[n], when), names))
        return dict(zip(names, results, strict=True))


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _api_error(exc: urllib.error.HTTPError) -> str:
    """The API's own error text (``{"status": "error", "error": "..."}``), else the HTTP status."""
    try:
        body = json.loads(exc.read())
        if isinstance(body, dict) and body.get("error"):
            return f"{body.get('errorType', 'error')}: {body['error']}"
    except (ValueError, OSError):
        pass
    return f"HTTP {exc.code} {exc.reason}"
