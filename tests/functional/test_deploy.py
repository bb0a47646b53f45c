"""deploy/: the image, the kustomize base and overlays, and their contract with the code.

- every overlay renders with ``kubectl kustomize`` and every object validates against its
  Kubernetes schema (kubernetes-validate, strict, at the oldest supported and the newest release);
  the prometheus-operator objects get structural checks here;
- checkov passes for the rendered manifests and the Dockerfile, every skip justified inline;
- the manifests agree with the code: probe paths and ports, env var names (Settings), the grace
  period against the drain, flush and metrics deadlines, the metrics grace against the scrape
  interval, the Service's target port, the image's user;
- the alerts' Grafana and runbook links and the `release` label kube-prometheus-stack selects on
  come from one place per overlay (components/monitoring-links);
- the monitoring files generated from dashboards/ are in sync with it;
- the image's entrypoint works from an installed wheel: ``sse-sidecar serve`` starts, gets ready
  and exits cleanly on SIGTERM.

Needs ``kubectl`` (>= 1.27) and ``.venv-tools`` (checkov): ``make test`` provides both.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from aiohttp import web

from sidecar import __version__
from sidecar.app import FLUSH_DEADLINE_SECONDS, create_admin_app, create_app
from sidecar.config import ENV_PREFIX, Settings
from tests.conftest import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
GENERATED = KUSTOMIZE / "base" / "monitoring" / "generated"
SYNC_SCRIPT = ROOT / "scripts" / "sync_deploy_monitoring.py"
TOOLS_BIN = ROOT / ".venv-tools" / "bin"
COMPONENTS = KUSTOMIZE / "components"
LINKS_FILE = "monitoring-links.yaml"
TARGETS = {
    "base": KUSTOMIZE / "base",
    "dev": KUSTOMIZE / "overlays" / "dev",
    "production": KUSTOMIZE / "overlays" / "production",
}
OVERLAYS = ("dev", "production")
# The oldest Kubernetes the manifests support (native sidecars: 1.29; the preStop sleep action:
# 1.30), and the newest release kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
PROMETHEUS_OPERATOR = "monitoring.coreos.com/v1"
SIDECAR = "sse-sidecar"
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
# Time the manifests give beyond preStop + drain + flush deadline, at least.
GRACE_MARGIN_SECONDS = 5.0

Obj = dict[str, Any]


# -- rendering ------------------------------------------------------------------------------


def _kubectl() -> str:
    """A kubectl whose kustomize renders these manifests (>= 1.27: kustomize v5)."""
    for candidate in (shutil.which("kubectl"), str(TOOLS_BIN / "kubectl")):
        if candidate is None or not Path(candidate).exists():
            continue
        out = subprocess.run(
            [candidate, "version", "--client", "-o", "json"], capture_output=True, text=True
        )
        if out.returncode == 0:
            minor = json.loads(out.stdout)["clientVersion"]["minor"].rstrip("+")
            if int(minor) >= 27:
                return candidate
    pytest.fail("kubectl >= 1.27 not found: run `make tools` (or `make test`), which installs it")


def _render(path: Path) -> list[Obj]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: _render(path) for name, path in TARGETS.items()}


def _one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _deployment(objs: list[Obj]) -> Obj:
    return _one(objs, "Deployment", "llm-service")


def _pod(objs: list[Obj]) -> Obj:
    spec: Obj = _deployment(objs)["spec"]["template"]["spec"]
    return spec


def _sidecar(objs: list[Obj]) -> Obj:
    found: list[Obj] = [c for c in _pod(objs).get("initContainers", []) if c["name"] == SIDECAR]
    assert len(found) == 1, "the sidecar must be one of the pod's initContainers"
    return found[0]


def _all_containers(pod: Obj) -> list[Obj]:
    containers: list[Obj] = pod.get("initContainers", []) + pod["containers"]
    return containers


def _port(container: Obj, port: int | str) -> int:
    """A probe's or a Service's port (a number or a container port name) as a number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port!r}"
    return int(numbers[0])


def _pod_labels(objs: list[Obj]) -> dict[str, str]:
    labels: dict[str, str] = _deployment(objs)["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _sidecar_env(objs: list[Obj]) -> dict[str, str]:
    """The sidecar's environment from its ConfigMaps and Secrets (envFrom) and env."""
    env: dict[str, str] = {}
    for source in _sidecar(objs).get("envFrom", []):
        if "configMapRef" in source:
            env.update(_one(objs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        else:
            name = source["secretRef"]["name"]
            secrets = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == name]
            for secret in secrets:
                env.update(secret.get("stringData", {}))
                env.update({k: _b64decode(v) for k, v in secret.get("data", {}).items()})
    for var in _sidecar(objs).get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def _b64decode(value: str) -> str:
    return base64.b64decode(value).decode()


# -- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_renders_the_expected_objects(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    kinds = {o["kind"] for o in rendered[target]}
    expected = {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PodMonitor",
        "PrometheusRule",
    }
    assert expected <= kinds
    if target == "dev":
        assert {"Namespace", "StatefulSet", "Secret"} <= kinds
    if target == "production":
        assert "HorizontalPodAutoscaler" in kinds
        assert "Secret" not in kinds, "production secrets are created outside git"
    if target != "base":
        namespaces = {o["metadata"].get("namespace") for o in rendered[target]} - {None}
        assert len(namespaces) == 1, f"one namespace per overlay, got {namespaces}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schema(
    rendered: dict[str, list[Obj]], target: str, k8s_version: str
) -> None:
    problems = []
    for obj in rendered[target]:
        if obj["apiVersion"] == PROMETHEUS_OPERATOR:
            continue  # a CRD: structural checks below
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_only_known_crds_are_used(rendered: dict[str, list[Obj]], target: str) -> None:
    crds = {(o["apiVersion"], o["kind"]) for o in rendered[target] if "." in o["apiVersion"]}
    allowed = {
        (PROMETHEUS_OPERATOR, "PodMonitor"),
        (PROMETHEUS_OPERATOR, "PrometheusRule"),
        # Built-in API groups with dots in their names.
        ("networking.k8s.io/v1", "NetworkPolicy"),
        ("policy/v1", "PodDisruptionBudget"),
    }
    assert crds <= allowed


# -- prometheus-operator objects: structure ---------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_podmonitor_scrapes_the_sidecars_admin_port(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    monitor = _one(objs, "PodMonitor")
    assert monitor["apiVersion"] == PROMETHEUS_OPERATOR
    assert monitor["metadata"]["name"]
    assert monitor["metadata"].get("namespace") == _deployment(objs)["metadata"].get("namespace")
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "jobLabel", "namespaceSelector"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert _selects(spec["selector"]["matchLabels"], _pod_labels(objs))
    endpoints = spec["podMetricsEndpoints"]
    assert len(endpoints) == 1
    (endpoint,) = endpoints
    assert endpoint["port"] == "admin"
    assert _port(_sidecar(objs), endpoint["port"]) == Settings().admin_port
    assert endpoint["path"] in _admin_routes()
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+[smh]", endpoint[key]), key


def _rule_files() -> list[Path]:
    folder = ROOT / "dashboards" / "prometheus"
    files = [
        p
        for p in sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
        if "groups" in (yaml.safe_load(p.read_text()) or {})
    ]
    assert files, f"no rule files in {folder}: the PrometheusRule has nothing to carry"
    return files


@pytest.mark.parametrize("target", TARGETS)
def test_prometheusrule_holds_exactly_the_rule_groups_of_dashboards(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    rule = _one(rendered[target], "PrometheusRule")
    assert rule["apiVersion"] == PROMETHEUS_OPERATOR
    assert set(rule["spec"]) == {"groups"}
    groups = rule["spec"]["groups"]
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "duplicate rule group names"
    for group in groups:
        # The fields of prometheus-operator's RuleGroup.
        allowed_group = {"name", "labels", "interval", "query_offset", "rules", "limit"}
        assert set(group) <= allowed_group | {"partial_response_strategy"}, group["name"]
        assert group["rules"], group["name"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str | int), r
            assert str(r["expr"]).strip(), r
            allowed = {"alert", "record", "expr", "for", "keep_firing_for", "labels"}
            assert set(r) <= allowed | {"annotations"}, r
            if "for" in r:
                assert re.fullmatch(r"(\d+[smhdwy])+", r["for"]), r
    expected = [g for f in _rule_files() for g in yaml.safe_load(f.read_text())["groups"]]
    if target != "base":
        # The overlays set the links' addresses (components/monitoring-links): put the
        # rule files' back to compare the rest.
        links = _links(target)
        text = json.dumps(groups)
        text = text.replace(links["grafanaUrl"] + "/d/", SOURCE_GRAFANA + "/d/")
        text = text.replace(links["runbookUrl"] + "#", SOURCE_RUNBOOK + "#")
        groups = json.loads(text)
    assert groups == expected


# The addresses the rule files in dashboards/ carry, before an overlay sets its own.
SOURCE_GRAFANA = "https://grafana.example.com"
SOURCE_RUNBOOK = "https://github.com/sse-sidecar/sse-sidecar/blob/main/dashboards/RUNBOOK.md"


def _links(overlay: str) -> dict[str, str]:
    """The overlay's one place for the monitoring links (its monitoring-links.yaml)."""
    doc = yaml.safe_load((KUSTOMIZE / "overlays" / overlay / LINKS_FILE).read_text())
    assert doc["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    data: dict[str, str] = doc["data"]
    assert set(data) == {"grafanaUrl", "runbookUrl", "prometheusRelease"}
    return data


def _alert_annotations(objs: list[Obj]) -> list[dict[str, str]]:
    rule = _one(objs, "PrometheusRule")
    return [r["annotations"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_alert_links_and_the_release_label_come_from_one_place(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    links = _links(target)
    annotations = _alert_annotations(objs)
    assert len(annotations) >= 14
    for a in annotations:
        assert a["runbook_url"].startswith(links["runbookUrl"] + "#"), a["runbook_url"]
        assert a["dashboard_url"].startswith(links["grafanaUrl"] + "/d/sse-sidecar-overview/")
    # kube-prometheus-stack's Prometheus selects `release: <its release>` by default.
    for kind in ("PodMonitor", "PrometheusRule"):
        assert _one(objs, kind)["metadata"]["labels"]["release"] == links["prometheusRelease"]
    # Read, never applied.
    assert not [o for o in objs if o["metadata"]["name"] == "sse-sidecar-monitoring-links"]
    if target == "dev":
        assert "grafana.example.com" not in yaml.safe_dump_all(objs)


def test_one_edit_moves_every_link(tmp_path: Path) -> None:
    """Changing the overlay's monitoring-links.yaml is all it takes: every alert follows."""
    copy = tmp_path / "kustomize"
    shutil.copytree(KUSTOMIZE, copy)
    links = copy / "overlays" / "production" / LINKS_FILE
    doc = yaml.safe_load(links.read_text())
    doc["data"] = {
        "grafanaUrl": "https://grafana.corp.test:3443/grafana",
        "runbookUrl": "https://wiki.corp.test/sse-sidecar/runbook",
        "prometheusRelease": "prom",
    }
    links.write_text(yaml.safe_dump(doc))
    objs = _render(copy / "overlays" / "production")
    for a in _alert_annotations(objs):
        assert re.fullmatch(
            r"https://wiki\.corp\.test/sse-sidecar/runbook#ssesidecar[a-z]+", a["runbook_url"]
        ), a["runbook_url"]
        assert a["dashboard_url"].startswith(
            "https://grafana.corp.test:3443/grafana/d/sse-sidecar-overview/sse-sidecar-overview"
        ), a["dashboard_url"]
    for kind in ("PodMonitor", "PrometheusRule"):
        assert _one(objs, kind)["metadata"]["labels"]["release"] == "prom"


@pytest.mark.parametrize("target", TARGETS)
def test_dashboards_configmap_holds_every_dashboard(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    cm = _one(rendered[target], "ConfigMap", "sse-sidecar-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    boards = sorted((ROOT / "dashboards").glob("*.json"))
    assert boards, "no dashboards/*.json"
    assert sorted(cm["data"]) == [p.name for p in boards]
    for path in boards:
        assert cm["data"][path.name] == path.read_text()
        json.loads(cm["data"][path.name])
    # Client-side `kubectl apply` keeps the whole object in an annotation capped at 256 KiB.
    assert len(json.dumps(cm)) < 256 * 1024


def test_generated_monitoring_files_are_in_sync_with_dashboards(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    result = subprocess.run(
        [sys.executable, str(SYNC_SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    expected = {p.name: p.read_bytes() for p in out.iterdir()}
    actual = {p.name: p.read_bytes() for p in GENERATED.iterdir()} if GENERATED.is_dir() else {}
    stale = sorted(n for n in expected.keys() | actual.keys() if expected.get(n) != actual.get(n))
    assert not stale, (
        f"{GENERATED.relative_to(ROOT)} is out of sync with dashboards/ ({', '.join(stale)}): "
        "run `.venv/bin/python scripts/sync_deploy_monitoring.py`"
    )


def test_sync_script_fails_clearly_without_rule_files(tmp_path: Path) -> None:
    (tmp_path / "dashboards" / "prometheus").mkdir(parents=True)
    result = subprocess.run(
        [
            sys.executable,
            str(SYNC_SCRIPT),
            "--dashboards",
            str(tmp_path / "dashboards"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no rule files" in result.stderr
    assert not (tmp_path / "out").exists()


# -- the contract with the code ---------------------------------------------------------------


def _admin_routes() -> set[str]:
    admin = create_admin_app(create_app(Settings()))
    return {
        r.resource.canonical
        for r in admin.router.routes()
        if isinstance(r.resource, web.Resource) and r.method == "GET"
    }


@pytest.mark.parametrize("target", TARGETS)
def test_probes_match_the_admin_app(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    sidecar = _sidecar(objs)
    routes = _admin_routes()
    env = _sidecar_env(objs)
    admin_port = int(env.get(ENV_PREFIX + "ADMIN_PORT", Settings().admin_port))
    assert admin_port == 8081
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert path in routes, f"{path} is not a GET route of the admin app"
        assert _port(sidecar, get["port"]) == admin_port, probe
    # /readyz pings Redis with redis_timeout_seconds: the probe must wait longer than that.
    redis_timeout = float(env.get(ENV_PREFIX + "REDIS_TIMEOUT_SECONDS", 2.0))
    for probe in ("startupProbe", "readinessProbe"):
        assert sidecar[probe]["timeoutSeconds"] > redis_timeout, probe


@pytest.mark.parametrize("target", TARGETS)
def test_sidecar_is_a_native_sidecar_with_its_ports(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    pod = _pod(objs)
    sidecar = _sidecar(objs)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar.get("args", ["serve"]) == ["serve"]
    assert "command" not in sidecar, "the image's ENTRYPOINT (sse-sidecar) runs"
    env = _sidecar_env(objs)
    defaults = Settings()
    assert _port(sidecar, "http") == int(env[ENV_PREFIX + "PORT"]) == defaults.port == 8080
    assert _port(sidecar, "admin") == int(env[ENV_PREFIX + "ADMIN_PORT"]) == defaults.admin_port
    # The upstream is the LLM container, in the same pod, on its declared port.
    upstream = env[ENV_PREFIX + "UPSTREAM_URL"]
    match = re.fullmatch(r"http://(127\.0\.0\.1|localhost):(\d+)", upstream)
    assert match, upstream
    (llm,) = [c for c in pod["containers"] if c["name"] == "llm"]
    assert int(match.group(2)) == _port(llm, "llm") == 8283
    # Kubernetes' docker-links variables would set SSE_SIDECAR_PORT=tcp://... for a Service
    # named sse-sidecar; they are off.
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("target", TARGETS)
def test_service_targets_the_traffic_port(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    service = _one(objs, "Service", "llm-service")
    assert _selects(service["spec"]["selector"], _pod_labels(objs))
    (port,) = service["spec"]["ports"]
    assert _port(_sidecar(objs), port["targetPort"]) == 8080 == Settings().port


def _env_names_in(text: str) -> set[str]:
    return set(re.findall(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+", text))


@pytest.mark.parametrize("target", TARGETS)
def test_every_sse_sidecar_variable_is_a_setting(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    used = _env_names_in(yaml.safe_dump_all(objs))
    assert used, "the manifests set no SSE_SIDECAR_* variable"
    # Settings ignores unknown SSE_SIDECAR_* variables: a typo would silently do nothing.
    assert used <= SETTINGS_ENV, f"not Settings fields: {sorted(used - SETTINGS_ENV)}"


def test_every_sse_sidecar_variable_named_in_deploy_is_a_setting() -> None:
    """Comments, examples and the README section included."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".json"]
    unknown = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in files
        for name in _env_names_in(p.read_text()) - SETTINGS_ENV
    }
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_sidecars_environment_makes_valid_settings(
    rendered: dict[str, list[Obj]], target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _sidecar_env(rendered[target])
    if target == "production":
        # The Secret is created outside git; its documented shape stands in for it.
        example = yaml.safe_load(
            (KUSTOMIZE / "overlays/production/secret.example.yaml").read_text()
        )
        refs = [
            s["secretRef"]["name"]
            for s in _sidecar(rendered[target])["envFrom"]
            if "secretRef" in s
        ]
        assert refs == [example["metadata"]["name"]]
        env.update(example["stringData"])
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.redis_url.startswith(("redis://", "rediss://"))
    assert settings.replay_token is not None
    assert settings.signing_key is not None


@pytest.mark.parametrize("target", TARGETS)
def test_grace_period_covers_prestop_drain_and_flush(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    pod = _pod(objs)
    grace = pod["terminationGracePeriodSeconds"]
    prestop = max(
        c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        for c in _all_containers(pod)
    )
    assert _sidecar(objs)["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    env = _sidecar_env(objs)
    drain = float(env[ENV_PREFIX + "DRAIN_SECONDS"])
    metrics = float(env[ENV_PREFIX + "METRICS_GRACE_SECONDS"])
    needed = prestop + drain + FLUSH_DEADLINE_SECONDS + metrics + GRACE_MARGIN_SECONDS
    assert grace >= needed, (
        f"terminationGracePeriodSeconds {grace} < preStop {prestop} + drain {drain} "
        f"+ flush {FLUSH_DEADLINE_SECONDS} + metrics grace {metrics} + margin "
        f"{GRACE_MARGIN_SECONDS}"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_the_final_counts_outlast_a_scrape_interval(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    """After the drain, /metrics serves until a scrape reads the final counts: the grace for
    that must be longer than the PodMonitor's interval, or the last counts can be missed."""
    objs = rendered[target]
    grace = float(_sidecar_env(objs)[ENV_PREFIX + "METRICS_GRACE_SECONDS"])
    (endpoint,) = _one(objs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    interval = float(endpoint["interval"].removesuffix("s"))
    assert grace > interval


@pytest.mark.parametrize("target", TARGETS)
def test_pod_is_hardened(rendered: dict[str, list[Obj]], target: str) -> None:
    objs = rendered[target]
    pod = _pod(objs)
    assert pod["automountServiceAccountToken"] is False
    account = _one(objs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in _all_containers(pod):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1, container["name"]
        assert "emptyDir" in volumes[tmp[0]["name"]], container["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), container["name"]
    sidecar = _sidecar(objs)
    ctx = sidecar["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["runAsUser"] == _dockerfile_uid()
    assert sidecar["image"].rsplit(":", 1)[1] == __version__, "image tag = project version"


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budget_and_network_policy_select_the_pods(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    objs = rendered[target]
    labels = _pod_labels(objs)
    pdb = _one(objs, "PodDisruptionBudget", "llm-service")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    policy = _one(objs, "NetworkPolicy", "llm-service")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    sidecar = _sidecar(objs)
    ingress = {
        _port(sidecar, p["port"]): rule for rule in policy["spec"]["ingress"] for p in rule["ports"]
    }
    assert set(ingress) == {8080, 8081}, "only the sidecar's ports; the LLM's stays pod-local"
    monitoring = ingress[8081]["from"]
    assert monitoring == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {6379, 53} <= egress_ports


def test_dev_redis_is_persistent_and_matches_the_sidecars_url(
    rendered: dict[str, list[Obj]],
) -> None:
    objs = rendered["dev"]
    url = _sidecar_env(objs)[ENV_PREFIX + "REDIS_URL"]
    match = re.fullmatch(r"redis://:([^@]+)@([a-z0-9-]+):(\d+)/\d+", url)
    assert match, url
    password, host, port = match.groups()
    service = _one(objs, "Service", host)
    assert service["spec"]["ports"][0]["port"] == int(port)
    redis = _one(objs, "StatefulSet", "redis")
    assert redis["spec"]["replicas"] == 1
    assert redis["spec"]["serviceName"] == host
    assert _selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    config = next(o for o in objs if o["kind"] == "ConfigMap" and "redis.conf" in o.get("data", {}))
    conf = config["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^dir /data$", conf, re.M)
    auth = next(o for o in objs if o["kind"] == "Secret" and "auth.conf" in o.get("data", {}))
    assert _b64decode(auth["data"]["auth.conf"]) == f"requirepass {password}"


def test_production_scales_and_spreads(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["production"]
    deployment = _deployment(objs)
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    hpa = _one(objs, "HorizontalPodAutoscaler", "llm-service")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llm-service",
    }
    assert hpa["spec"]["minReplicas"] >= 3
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for constraint in spread:
        assert _selects(constraint["labelSelector"]["matchLabels"], _pod_labels(objs))


# -- checkov ---------------------------------------------------------------------------------


def _checkov(folder: Path, *frameworks: str) -> list[Obj]:
    checkov = TOOLS_BIN / "checkov"
    if not checkov.exists():
        pytest.fail("checkov not found in .venv-tools: run `make tools` (or `make test`)")
    result = subprocess.run(
        [
            str(checkov),
            "--directory",
            str(folder),
            "--framework",
            *frameworks,
            "--output",
            "json",
            "--skip-download",  # offline: no guidelines or policies from the vendor's API
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    out: list[Obj] = reports if isinstance(reports, list) else [reports]
    return out


@pytest.fixture(scope="module")
def checkov_reports(
    rendered: dict[str, list[Obj]], tmp_path_factory: pytest.TempPathFactory
) -> list[Obj]:
    folder = tmp_path_factory.mktemp("checkov")
    # The overlays: what gets applied (the base alone has no namespace, so it is not applied).
    for name in OVERLAYS:
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all(rendered[name], sort_keys=False))
    shutil.copy(DEPLOY / "Dockerfile", folder / "Dockerfile")
    return _checkov(folder, "kubernetes", "dockerfile")


def test_checkov_passes_for_the_manifests_and_the_dockerfile(checkov_reports: list[Obj]) -> None:
    types = {r["check_type"] for r in checkov_reports}
    assert types == {"kubernetes", "dockerfile"}
    failed = [
        f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['resource']})"
        for r in checkov_reports
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    for report in checkov_reports:
        assert report["summary"]["parsing_errors"] == 0
        assert report["summary"]["passed"] > 30


def test_every_checkov_skip_is_justified(checkov_reports: list[Obj]) -> None:
    skipped = [c for r in checkov_reports for c in r["results"]["skipped_checks"]]
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']}: no reason given"
    # Only these, each with its reason inline in the manifest it applies to.
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_43"}


def test_checkov_looks_at_the_native_sidecar(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """The sidecar is an init container: make sure checkov's container checks reach it."""
    deployment = json.loads(json.dumps(_deployment(rendered["dev"])))
    sidecar = next(
        c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == SIDECAR
    )
    del sidecar["securityContext"]["readOnlyRootFilesystem"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(deployment))
    (report,) = _checkov(tmp_path, "kubernetes")
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert "CKV_K8S_22" in failed  # "Use read-only filesystem for containers where possible"


# -- the Dockerfile -----------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        assert stages, "instructions before the first FROM"
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def _dockerfile_uid() -> int:
    users = [args for name, args in _dockerfile_stages()[-1] if name == "USER"]
    assert users, "the final stage sets no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER must be numeric (runAsNonRoot can only verify a number): {users[-1]}"
    return int(match.group(1))


def test_dockerfile_contract() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build the wheel, then a clean runtime stage"
    final = dict(stages[-1])
    assert _dockerfile_uid() >= 10000
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(final["ENTRYPOINT"]) == ["sse-sidecar"]
    assert json.loads(final["CMD"]) == ["serve"]
    assert set(final["EXPOSE"].split()) == {"8080", "8081"}
    # Nothing is built or installed in the final stage: it only copies the build stage's venv.
    assert not [args for name, args in stages[-1] if name == "RUN"]
    copies = [args for name, args in stages[-1] if name == "COPY"]
    assert copies
    assert all(c.startswith("--from=build ") for c in copies)
    base = stages[-1][0][1]
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base


# -- the entrypoint, from an installed wheel --------------------------------------------------


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project's wheel installed as the image installs it.

    The wheel is built from a copy of the sources and installed without dependencies; the
    dependencies come from the project's venv through a .pth file (no download, and the
    project's editable install is not on the path: only the wheel's ``sidecar`` is).
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sidecar", src / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(tmp / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("sse_sidecar-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    (Path(site) / "_project_dependencies.pth").write_text(deps + "\n")
    return venv


def _clean_env(**settings: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith((ENV_PREFIX, "OTEL_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(settings)
    return env


def test_wheel_installs_the_entrypoint_and_its_files(wheel_venv: Path) -> None:
    bin_ = wheel_venv / "bin"
    # cwd: not the repository, whose sidecar/ would shadow the wheel's for `python -c`.
    version = subprocess.run(
        [str(bin_ / "sse-sidecar"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=wheel_venv,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"sse-sidecar {__version__}"
    helped = subprocess.run(
        [str(bin_ / "sse-sidecar"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        cwd=wheel_venv,
    )
    assert helped.returncode == 0, helped.stderr
    for name in ("--upstream-url", "--redis-url", "--drain-seconds", "SSE_SIDECAR_ADMIN_PORT"):
        assert name in helped.stdout
    where = subprocess.run(
        [
            str(bin_ / "python"),
            "-c",
            "import sidecar, importlib.resources as r; print(sidecar.__file__); "
            "print(all(r.files('sidecar').joinpath(f).is_file() "
            "for f in ('store/append.lua', 'store/finalize.lua', 'py.typed')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=wheel_venv,
        env=_clean_env(),
    )
    assert where.returncode == 0, where.stderr
    module, files = where.stdout.split()
    assert Path(module).is_relative_to(wheel_venv), f"not the wheel's sidecar: {module}"
    assert files == "True", "the wheel lacks its Lua scripts (package data)"


def test_wheel_entrypoint_serves_and_stops_on_sigterm(
    wheel_venv: Path, redis_server: RedisServer
) -> None:
    port, admin = free_port(), free_port()
    env = _clean_env(
        SSE_SIDECAR_REDIS_URL=redis_server.url,
        SSE_SIDECAR_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}",
        SSE_SIDECAR_HOST="127.0.0.1",
        SSE_SIDECAR_PORT=str(port),
        SSE_SIDECAR_ADMIN_PORT=str(admin),
        SSE_SIDECAR_DRAIN_SECONDS="1",
    )
    proc = subprocess.Popen(
        [str(wheel_venv / "bin" / "sse-sidecar"), "serve"],
        env=env,
        cwd=wheel_venv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = _wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        assert status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=1 + FLUSH_DEADLINE_SECONDS + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.startswith("{")]
    assert "stopped" in messages


def _wait_ready(url: str, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"sse-sidecar serve exited with {proc.returncode}:\n{err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("sse-sidecar serve did not get ready within 30 s")
            time.sleep(0.1)  # polling a child process's port has no event to await
