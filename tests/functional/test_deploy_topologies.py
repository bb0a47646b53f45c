"""deploy/: the Redis Sentinel and Redis Cluster components and their example overlays
(overlays/production-sentinel, overlays/production-cluster) render, validate, open exactly the
ports they say, and give the sidecar settings whose URL is the right kind of target."""

from __future__ import annotations

import os
import subprocess

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from sidecar.config import ENV_PREFIX, Settings
from sidecar.store.url import ClusterTarget, SentinelTarget, parse_redis_url
from tests.functional.test_deploy import (
    K8S_VERSIONS,
    KUSTOMIZE,
    PROMETHEUS_OPERATOR,
    Obj,
    _deployment,
    _kubectl,
    _one,
    _sidecar_env,
)

TOPOLOGIES = {"sentinel": SentinelTarget, "cluster": ClusterTarget}


def _render(path: str) -> list[Obj]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZE / path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    out = {name: _render(f"overlays/production-{name}") for name in TOPOLOGIES}
    out["production"] = _render("overlays/production")
    return out


def _egress_ports(objs: list[Obj]) -> set[int]:
    policy = _one(objs, "NetworkPolicy", "llm-service")
    return {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("name", TOPOLOGIES)
def test_the_overlay_validates_against_the_kubernetes_schema(
    rendered: dict[str, list[Obj]], name: str, k8s_version: str
) -> None:
    problems = []
    for obj in rendered[name]:
        if obj["apiVersion"] == PROMETHEUS_OPERATOR:
            continue
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
    assert not problems, "\n".join(problems)


def test_only_sentinel_opens_the_sentinel_port(rendered: dict[str, list[Obj]]) -> None:
    production = _egress_ports(rendered["production"])
    assert _egress_ports(rendered["sentinel"]) == production | {26379}
    assert _egress_ports(rendered["cluster"]) == production  # clients never use the bus port


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_the_overlay_is_production_plus_its_component(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    def objects(objs: list[Obj]) -> list[str]:
        # ConfigMap names carry a content hash: compare them by what they are generated from.
        return sorted(f"{o['kind']}/{o['metadata']['name'].rsplit('-', 1)[0]}" for o in objs)

    assert objects(rendered[name]) == objects(rendered["production"])
    spec = _deployment(rendered[name])["spec"]
    assert (
        spec["template"]["spec"]["containers"]
        == _deployment(rendered["production"])["spec"]["template"]["spec"]["containers"]
    )


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_the_secret_example_makes_valid_settings_of_the_right_topology(
    rendered: dict[str, list[Obj]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _sidecar_env(rendered[name])
    example = yaml.safe_load(
        (KUSTOMIZE / f"components/redis-{name}/secret.example.yaml").read_text()
    )
    env.update(example["stringData"])
    for var in list(os.environ):
        if var.startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    target = parse_redis_url(settings.redis_url)
    assert isinstance(target, TOPOLOGIES[name])
    assert target.credentials.password == "CHANGE-ME"
    if isinstance(target, SentinelTarget):
        assert target.master == "mymaster"
        assert [e.port for e in target.sentinels] == [26379, 26379, 26379]
    else:
        assert settings.redis_max_connections == 4
