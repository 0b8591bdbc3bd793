"""deploy/: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate), their wiring to each
other, the CRD and Helm files structurally, and every metric the dashboard, the HPA and the adapter name against
what a running server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from rankserve.api.app import create_app
from rankserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "rankserve.json"
ADAPTER = K8S / "prometheus-adapter-values.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in {"kustomization.yaml", ADAPTER.name})
# The oldest Kubernetes still in common support and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# Exported only where the engine runs on CUDA (this test serves on the CPU).
CUDA_ONLY = {"rankserve_gpu_memory_bytes"}


def load_all() -> dict[str, dict[str, Any]]:
    """kind → the one document of that kind in deploy/k8s."""
    docs: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} documents"
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return load_all()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # not in the Kubernetes schemas: checked structurally below
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_mistakes(docs: dict[str, dict[str, Any]]) -> None:
    # The check above is not vacuous: a misspelt field and a wrong type are rejected.
    bad = json.loads(json.dumps(docs["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(docs["Service"]))
    bad["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    image = container(load_all())["image"].rsplit(":", 1)[0]
    assert [i["name"] for i in kustomization.get("images", [])] in ([], [image])


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def test_deployment_gpu_probes_and_shutdown(docs: dict[str, dict[str, Any]]) -> None:
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_of(c)
    assert ports["http"] == int(env["NIM_HTTP_API_PORT"])
    Settings(**{"port": env["NIM_HTTP_API_PORT"]})  # the env values are valid settings
    aliases = {a.upper() for f in Settings.model_fields.values() for a in f.validation_alias.choices}  # type: ignore[union-attr]
    for name in env:
        if name.startswith(("RANKSERVE_", "NIM_")):
            assert name in aliases, f"{name} is not a setting"

    def probe(kind: str) -> dict[str, Any]:
        get = c[kind]["httpGet"]
        assert get["port"] in ports or get["port"] in ports.values()
        return get

    assert probe("livenessProbe")["path"] == "/v1/health/live"
    assert probe("readinessProbe")["path"] == "/v1/health/ready"
    assert probe("startupProbe")["path"] == "/v1/health/ready"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a model download and load take minutes"

    # The grace period covers the preStop sleep, the drain and the longest request.
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(env["RANKSERVE_SHUTDOWN_DRAIN_SECONDS"])
    longest = float(env["RANKSERVE_REQUEST_TIMEOUT_SECONDS"])
    assert drain > 0 and pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + longest

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    volumes = {v["name"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= volumes
    for cache in ("HF_HOME", "RANKSERVE_ENGINE_CACHE_DIR"):  # the model download and the TensorRT engines
        assert any(Path(env[cache]).is_relative_to(m) for m in mounts), f"{cache} is on a volume"

    args = c.get("args", [])
    if "--config" in args:
        assert (ROOT / args[args.index("--config") + 1]).is_file(), "the preset is one the image holds (configs/)"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_manifests_match_the_images(docs: dict[str, dict[str, Any]], dockerfile: str) -> None:
    """The pod runs as the images' user, mounts their cache volume and serves on their port."""
    path = ROOT / dockerfile
    if not path.exists():
        pytest.skip(f"{dockerfile} is not in this checkout")
    text = path.read_text()
    user = re.search(r"^USER (\d+)", text, re.M)
    volume = re.search(r"^VOLUME (\[.*\])", text, re.M)
    port = re.search(r"^EXPOSE (\d+)", text, re.M)
    assert user and volume and port
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    assert {m["mountPath"] for m in container(docs)["volumeMounts"]} >= set(json.loads(volume.group(1)))
    assert {p["containerPort"] for p in container(docs)["ports"]} == {int(port.group(1))}


def test_service_pdb_and_hpa_point_at_the_deployment(docs: dict[str, dict[str, Any]]) -> None:
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in container(docs)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = docs["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_hpa_metrics_are_served_by_the_adapter(docs: dict[str, dict[str, Any]]) -> None:
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    served = {}
    for rule in rules:
        assert set(rule) >= {"seriesQuery", "resources", "name", "metricsQuery"}
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        assert re.fullmatch(rule["name"]["matches"], series_name(rule["seriesQuery"]))
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
        served[rule["name"]["as"]] = rule
    for metric in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served


def series_name(query: str) -> str:
    match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", query)
    assert match
    return match.group(1)


def test_service_monitor_scrapes_the_metrics_route(docs: dict[str, dict[str, Any]]) -> None:
    monitor = docs["ServiceMonitor"]
    service = docs["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
        assert endpoint["port"] in service_ports
        assert endpoint["path"] in ("/v1/metrics", "/metrics")
        assert duration_s(endpoint["scrapeTimeout"]) <= duration_s(endpoint["interval"])


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


# -- the metric names used by the dashboard, the HPA and the adapter -------------------------------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job"}


def test_alert_rules(docs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    rule = docs["PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == docs["ServiceMonitor"]["metadata"]["labels"]["release"]
    groups = rule["spec"]["groups"]
    alerts = [r for g in groups for r in g["rules"]]
    assert alerts and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in alerts)
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in alerts)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    exprs = [e.replace("$__rate_interval", "1m").replace("$job", ".*") for e in dashboard_exprs()]
    exprs = [e for e in exprs if not e.startswith("label_values(")]
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        exprs.append(rule["seriesQuery"])
        exprs.append(
            rule["metricsQuery"]
            .replace("<<.Series>>", series_name(rule["seriesQuery"]))
            .replace("<<.LabelMatchers>>", 'namespace="default"')
            .replace("<<.GroupBy>>", "pod")
        )
    rules = {
        "groups": [{"name": "rankserve", "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def referenced_metrics() -> set[str]:
    """Metric names in the dashboard, the HPA, the adapter rules and docs/operations.md."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    section = operations[operations.index("## Metrics") :]
    section = section[: section.index("\n## ")]
    names = set(re.findall(r"\brankserve_[a-z0-9_]*[a-z0-9]", section))
    assert len(names) >= 15, "docs/operations.md lists the metrics"
    for expr in dashboard_exprs():
        names |= set(re.findall(r"\brankserve_[a-z0-9_]+", expr))
    docs = load_all()
    names |= {m["pods"]["metric"]["name"] for m in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    for group in docs["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            names |= set(re.findall(r"\brankserve_[a-z0-9_]+", rule["expr"]))
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        names.add(series_name(rule["seriesQuery"]))
    return names


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "info": ("_info",),
    "gauge": ("",),
    "unknown": ("",),
}


def exported_names(exposition: str) -> set[str]:
    """Every sample name the exposition declares, whether or not a labelled family has samples yet."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)  # a histogram's or counter's family name, as docs name them
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
        names |= {s.name for s in family.samples}
    return names


@pytest.fixture(scope="module")
def exposition(tiny_checkpoint_dir: Path) -> str:
    settings = Settings(model=str(tiny_checkpoint_dir), device="cpu", dtype="float32", log_level="warning")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/v1/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.02)
        body = {"query": {"text": "q"}, "passages": [{"text": "a"}, {"text": "b b"}]}
        assert client.post("/v1/ranking", json=body).status_code == 200
        assert client.post("/v1/ranking", json={"query": {"text": "q"}}).status_code == 422
        response = client.get("/v1/metrics")
        assert response.status_code == 200
        return response.text


def test_every_referenced_metric_is_exported(exposition: str) -> None:
    exported = exported_names(exposition)
    referenced = referenced_metrics()
    assert {"rankserve_requests_in_flight", "rankserve_request_duration_seconds_bucket"} <= referenced
    missing = sorted(name for name in referenced - exported if name not in CUDA_ONLY)
    assert not missing, f"named in deploy/ but not exported by the server: {missing}"
    # and the CUDA-only names are declared by the server's code, with the dashboard's spelling
    telemetry = (ROOT / "src" / "rankserve" / "telemetry.py").read_text()
    for name in CUDA_ONLY & referenced:
        assert f'"{name}"' in telemetry, name


def test_dashboard_labels_exist(exposition: str) -> None:
    """`sum by (label)` in the dashboard groups by labels the series carry."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    for expr in dashboard_exprs():
        for by, metric_name in re.findall(r"sum by \(([a-z_, ]+)\) \(rate\((rankserve_[a-z0-9_]+)\{", expr):
            wanted = {b.strip() for b in by.split(",")} - {"le"}
            if metric_name in labels:
                assert wanted <= labels[metric_name], (expr, labels[metric_name])
