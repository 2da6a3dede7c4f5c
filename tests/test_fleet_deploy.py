"""The fleet examples under ``deploy/`` (docs/fleet.md, issue 18 §3), checked offline with the tools their
servers use: ``promtool check config|rules`` and ``promtool test rules`` (Debian's prometheus package),
``kubernetes-validate`` (the Kubernetes API's schemas, shipped in the package), ``check-jsonschema`` against
KEDA's ScaledObject CRD (committed, unmodified), and the OpenTelemetry Collector config's structure (no
Collector binary here).  The metric names they use are checked against a real sidecar's ``/metrics``."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli import tuner_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "kubernetes"
KEDA_CRD = K8S / "schemas" / "keda.sh_scaledobjects-v2.20.2.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install "
                                    "prometheus; .ci/run installs it)")  # fmt: skip


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- Prometheus -----------------------------------------------------------------------------------------------


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    cp = promtool("check", "rules", "tuner-rules.yml", cwd=PROM)
    assert cp.returncode == 0 and "SUCCESS" in cp.stdout, cp.stdout + cp.stderr


@needs_promtool
def test_rules_pass_their_unit_tests() -> None:
    cp = promtool("test", "rules", "tuner-rules.test.yml", cwd=PROM)
    assert cp.returncode == 0 and "SUCCESS" in cp.stdout, cp.stdout + cp.stderr


def test_every_alert_and_record_has_a_unit_test() -> None:
    """Each alert is expected both firing and quiet somewhere in the unit tests; each record is evaluated in one
    (directly or through an alert that reads it)."""
    rules = [r for g in yaml.safe_load((PROM / "tuner-rules.yml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((PROM / "tuner-rules.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    exprs = {e["expr"] for t in tests for e in t.get("promql_expr_test", [])}
    alert_exprs = " ".join(r["expr"] for r in rules if "alert" in r)
    for r in rules:
        if "alert" in r:
            mine = [c for c in cases if c["alertname"] == r["alert"]]
            assert any(c["exp_alerts"] for c in mine) and any(not c["exp_alerts"] for c in mine), r["alert"]
        else:
            used_by = exprs | {x["expr"] for x in rules if "record" in x and x["record"] in exprs}
            assert any(r["record"] in e for e in used_by) or r["record"] in alert_exprs, r["record"]


@needs_promtool
@pytest.mark.parametrize(("old", "new", "why"), [
    ('le=~"1(\\\\.0)?"', 'le="1.0"', "Prometheus 3 stores le as 1: the code service's fast burn goes unseen"),
    ("> 14.4 * 0.05", "> 16 * 0.05", "a fast burn of 15x (75% of requests late) no longer fires"),
    ("increase(tuner_cgroup_oom_kills_total[10m])", "tuner_cgroup_oom_kills_total",
     "the restarted container's new cgroup reads 0: the kill in the last scrape before it must alert"),
    ('increase(tuner_events_total{kind="oom_kill"}[10m])', "increase(tuner_cgroup_oom_kills_total[10m])",
     "the sidecar's own oom_kill event shows a kill the cgroup counter missed"),
])  # fmt: skip
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path, old: str, new: str, why: str) -> None:
    rules = (PROM / "tuner-rules.yml").read_text()
    assert old in rules
    (tmp_path / "tuner-rules.yml").write_text(rules.replace(old, new))
    shutil.copy(PROM / "tuner-rules.test.yml", tmp_path)
    cp = promtool("test", "rules", "tuner-rules.test.yml", cwd=tmp_path)
    assert cp.returncode != 0 and "FAILED" in cp.stdout + cp.stderr, why


def _kubernetes_sd_known(tmp_path: Path) -> bool:
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: x\n    kubernetes_sd_configs:\n      - role: pod\n")
    cp = promtool("check", "config", str(probe), cwd=tmp_path)
    return "field kubernetes_sd_configs not found" not in cp.stdout + cp.stderr


@needs_promtool
def test_cluster_config_passes_promtool_check(tmp_path: Path) -> None:
    """Debian builds Prometheus without Kubernetes discovery (``field kubernetes_sd_configs not found``): there the
    one discovery block is swapped for a file-based one and everything else — relabelling, rule files (checked
    too), remote-write — is checked as written."""
    for f in PROM.iterdir():
        shutil.copy(f, tmp_path)
    cfg = tmp_path / "prometheus-cluster.yml"
    text = cfg.read_text()
    block = "kubernetes_sd_configs:\n      - role: pod\n"
    assert text.count(block) == 1
    if not _kubernetes_sd_known(tmp_path):
        cfg.write_text(text.replace(block, "file_sd_configs:\n      - files: [targets.json]\n"))
    cp = promtool("check", "config", cfg.name, cwd=tmp_path)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "SUCCESS: 1 rule files found" in cp.stdout and "17 rules found" in cp.stdout, cp.stdout


@needs_promtool
def test_central_config_passes_promtool_check() -> None:
    cp = promtool("check", "config", "prometheus-central.yml", cwd=PROM)
    assert cp.returncode == 0 and "SUCCESS" in cp.stdout, cp.stdout + cp.stderr


@needs_promtool
def test_promtool_refuses_a_broken_config(tmp_path: Path) -> None:
    """The checks above can fail: a field of the wrong type."""
    text = (PROM / "prometheus-central.yml").read_text().replace("honor_labels: true", "honor_labels: maybe")
    (tmp_path / "c.yml").write_text(text)
    assert promtool("check", "config", "c.yml", cwd=tmp_path).returncode != 0


# -- the names the configs use are the tuner's ----------------------------------------------------------------

WORKLOAD = """
import random, sys, threading, time
from tuner import client
c = client.connect()
def worker(i):
    rng = random.Random(i)
    while True:
        with c.request(prompt_tokens=64) as r:
            time.sleep(0.02)
            for _ in range(16):
                r.token([rng.randrange(1000)])
                time.sleep(0.005)
for i in range(4):
    threading.Thread(target=worker, args=(i,), daemon=True).start()
time.sleep(float(sys.argv[1]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A ``tuner run --policy interactive --prometheus`` over a client workload, scraped twice a second from its
    third second on."""
    tmp = tmp_path_factory.mktemp("sidecar")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "run", "--quiet", "--policy", "interactive",
                             "--trace", str(tmp / "t.jsonl"), "--prometheus", f"127.0.0.1:{port}", "--",
                             sys.executable, "-c", WORKLOAD, "12"], env=tuner_env())  # fmt: skip
    out: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                _scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(3)  # the first projection (every 2 s) has been made
        for _ in range(10):
            out.append(_scrape(f"http://127.0.0.1:{port}/metrics"))
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    yield out


def exported_names(page: str) -> set[str]:
    names = set()
    for line in page.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


NAME = re.compile(r"(?<![:\w])(tuner_[a-z0-9_]+)")
CONDITIONAL = {
    "tuner_cgroup_mem_limit_bytes": (ROOT / "probes" / "cgroup.py", "cgroup_mem_limit_bytes",
                                     "only under a memory limit (None when unlimited)"),
    "tuner_mem_time_to_limit_seconds": (ROOT / "tuner" / "core" / "window.py", "mem_time_to_limit_seconds",
                                        "only while a limit is projected to be reached"),
}  # fmt: skip
"""Names a sidecar exports only in a state this test's sidecar is not in: checked in the code that makes them."""


def used_names() -> dict[str, set[str]]:
    """Every ``tuner_*`` metric name in the rules, the federation's match[], the autoscalers' queries (the HPA's
    metric is prometheus-adapter's name for a query: the names in the adapter's rule count)."""
    out: dict[str, set[str]] = {}
    [_, adapter] = docs(K8S / "hpa.yaml")
    texts = {f.name: f.read_text() for f in (PROM / "tuner-rules.yml", PROM / "prometheus-central.yml",
                                              K8S / "keda-scaledobject.yaml")}  # fmt: skip
    texts["hpa.yaml (prometheus-adapter)"] = "\n".join(
        f"{r['seriesQuery']} {r['metricsQuery']}" for r in yaml.safe_load(adapter["data"]["config.yaml"])["rules"])
    for name, text in texts.items():
        text = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())
        for n in NAME.findall(text):
            out.setdefault(n, set()).add(name)
    return out


def test_metric_names_in_the_configs_are_what_a_sidecar_exports(scrapes: list[str]) -> None:
    seen = set().union(*(exported_names(p) for p in scrapes))
    used = used_names()
    assert {"tuner_req_ttft_seconds_bucket", "tuner_cgroup_oom_kills_total", "tuner_mem_headroom_ratio"} <= set(used)
    for name, files in sorted(used.items()):
        if name.endswith("_"):  # a prefix in a regular expression (tuner_knob_.*, tuner_process_.*)
            assert any(n.startswith(name) for n in seen), (name, files)
        elif name in CONDITIONAL:
            src, key, _ = CONDITIONAL[name]
            assert f'"{key}"' in src.read_text(), (name, files)
        else:
            assert name in seen, f"{name} (used in {sorted(files)}) is not on a sidecar's /metrics"


def test_the_memory_projection_is_on_every_scrape(scrapes: list[str]) -> None:
    """The agent writes ``mem_headroom_ratio`` with the tick of each projection (every 2 s), not every tick; the
    exporters hold it between projections, or a scrape would catch it one time in twenty at 10 Hz (the memory
    alerts would then read nothing)."""
    have = [any(ln.startswith("tuner_mem_headroom_ratio ") for ln in p.splitlines()) for p in scrapes]
    assert all(have), have


def test_the_autoscalers_ask_for_what_is_served() -> None:
    [hpa, adapter] = docs(K8S / "hpa.yaml")
    [metric] = hpa["spec"]["metrics"]
    [rule] = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.search(rule["name"]["matches"], "tuner_req_e2e_seconds_sum")
    [so] = docs(K8S / "keda-scaledobject.yaml")
    [trig] = so["spec"]["triggers"]
    records = {r["record"] for g in yaml.safe_load((PROM / "tuner-rules.yml").read_text())["groups"]
               for r in g["rules"] if "record" in r}  # fmt: skip
    assert re.match(r"sum\(([\w:]+)\{", trig["metadata"]["query"])[1] in records  # type: ignore[index]
    [deploy, *_] = docs(K8S / "deployment.yaml")
    assert so["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]


def test_the_sidecar_command_in_the_deployment_parses() -> None:
    from tuner.cli import build_parser

    [deploy, *_] = docs(K8S / "deployment.yaml")
    [tuner] = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "tuner"]
    assert tuner["command"][0] == "tuner"
    args = build_parser().parse_args(tuner["command"][1:])
    assert args.prometheus == "0.0.0.0:9464" and args.prometheus_public
    ports = {p["name"]: p["containerPort"] for p in tuner["ports"]}
    assert ports["tuner-metrics"] == 9464 and ports["http"] == int(args.listen.rsplit(":", 1)[1])
    cluster = (PROM / "prometheus-cluster.yml").read_text()
    assert "regex: tuner-metrics" in cluster


# -- Kubernetes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deployment.yaml", "hpa.yaml"])
def test_kubernetes_manifests_validate(name: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra)")
    for doc in docs(K8S / name):
        kv.validate(doc, "1.30.0", strict=True)  # raises ValidationError; 1.30: a version clusters still run


def test_kubernetes_validate_refuses_a_misspelled_field() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra)")
    [hpa, _] = docs(K8S / "hpa.yaml")
    hpa["spec"]["minReplica"] = hpa["spec"].pop("minReplicas")
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, "1.30.0", strict=True)


def strict(schema: Any) -> Any:
    """KEDA's openAPIV3Schema as a JSON schema that refuses unknown fields, as the API server prunes them (a
    misspelled field would otherwise be dropped without a word)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture
def keda_schema(tmp_path: Path) -> Path:
    if shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("check-jsonschema is not installed (the dev extra)")
    [crd] = docs(KEDA_CRD)
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    [version] = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["name"] == "v1alpha1"
    out = tmp_path / "scaledobject.schema.json"
    out.write_text(json.dumps(strict(version["schema"]["openAPIV3Schema"])))
    return out


def check_jsonschema(schema: Path, doc: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run([str(exe), "--schemafile", str(schema), str(doc)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_keda_scaledobject_validates_against_the_crd(keda_schema: Path) -> None:
    cp = check_jsonschema(keda_schema, K8S / "keda-scaledobject.yaml")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    [so] = docs(K8S / "keda-scaledobject.yaml")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"


def test_check_jsonschema_refuses_a_misspelled_field(keda_schema: Path, tmp_path: Path) -> None:
    text = (K8S / "keda-scaledobject.yaml").read_text().replace("minReplicaCount:", "minReplicas:")
    (tmp_path / "so.yaml").write_text(text)
    cp = check_jsonschema(keda_schema, tmp_path / "so.yaml")
    assert cp.returncode != 0 and "minReplicas" in cp.stdout + cp.stderr


# -- OpenTelemetry Collector ------------------------------------------------------------------------------------


def test_collector_config_is_wired() -> None:
    """What can be checked without a Collector binary: every component a pipeline names is defined (with its
    ``type/name``), every defined one is used, the memory limiter comes first (the Collector's advice), and the
    OTLP receiver listens over HTTP on 4318, where ``--otlp`` sends (``URL/v1/metrics``, ``URL/v1/logs``)."""
    from tuner.outputs.otlp import endpoints

    [cfg] = docs(DEPLOY / "otel" / "collector.yaml")
    pipes = cfg["service"]["pipelines"]
    assert set(pipes) == {"metrics", "logs"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for p in pipes.values():
        for kind in used:
            assert p[kind], (kind, p)
            for comp in p[kind]:
                assert comp in cfg[kind], f"{comp} is not defined under {kind}"
                used[kind].add(comp)
        assert p["processors"][0] == "memory_limiter" and p["processors"][-1] == "batch"
    for kind, comps in used.items():
        assert set(cfg[kind]) == comps, f"defined but unused {kind}: {set(cfg[kind]) - comps}"
    http = cfg["receivers"]["otlp"]["protocols"]["http"]
    assert set(cfg["receivers"]["otlp"]["protocols"]) == {"http"}  # the tuner speaks OTLP/HTTP only
    assert http["endpoint"].rsplit(":", 1)[1] == "4318"
    url = re.search(r"--otlp (\S+)", (DEPLOY / "otel" / "collector.yaml").read_text())[1]  # type: ignore[index]
    assert url.endswith(":4318") and endpoints(url)[0] == f"{url}/v1/metrics"


def test_resource_attributes_name_the_replica(tmp_path: Path) -> None:
    """``OTEL_RESOURCE_ATTRIBUTES=service.instance.id=POD`` reaches the collector (the series' ``instance`` label
    after remote-write) instead of the random id per session, which would make new series at every restart."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otlp extra is not installed")
    from tests.test_otlp import Receiver, attrs

    r = Receiver(tmp_path)
    try:
        cp = subprocess.run([sys.executable, "-m", "tuner", "run", "--quiet", "--trace", str(tmp_path / "t.jsonl"),
                             "--otlp", r.url, "--", "sleep", "1.5"], capture_output=True, text=True, timeout=120,
                            env=tuner_env(OTEL_METRIC_EXPORT_INTERVAL="500",
                                          OTEL_RESOURCE_ATTRIBUTES="service.instance.id=chat-0,k8s.pod.name=chat-0,"
                                                                   "host.name=node-7"))  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        reqs = r.requests("metrics")
    finally:
        r.close()
    assert reqs
    res = attrs(reqs[-1]["body"]["resource_metrics"][0]["resource"])
    assert res["service.instance.id"] == "chat-0" and res["k8s.pod.name"] == "chat-0" and res["host.name"] == "node-7"
    assert res["service.name"] == "inference-tuner"
