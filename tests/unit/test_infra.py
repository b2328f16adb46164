"""infra/ cannot run here (no Docker engine); this keeps it consistent with the code instead."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml

from loopline.runtime.service import SERVICES
from loopline.settings import LooplineSettings

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
METRICS_PORT = "9100"


def settings_env_vars() -> set[str]:
    """Every LOOPLINE_* variable some settings class reads."""
    for name in SERVICES:
        if importlib.util.find_spec(f"loopline.services.{name}.settings"):
            importlib.import_module(f"loopline.services.{name}.settings")
    classes, todo = set(), [LooplineSettings]
    while todo:
        cls = todo.pop()
        classes.add(cls)
        todo.extend(cls.__subclasses__())
    return {f"LOOPLINE_{field.upper()}" for cls in classes for field in cls.model_fields}


def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def k8s() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / "k8s" / "loopline.yaml").read_text()) if d]


def test_compose_runs_every_service_with_real_settings() -> None:
    services = compose()["services"]
    runs = {s["command"][1] for s in services.values() if s.get("command", [None])[0] == "run"}
    assert runs == set(SERVICES)
    known = settings_env_vars()
    for name, svc in services.items():
        env = svc.get("environment", {})
        unknown = {k for k in env if k.startswith("LOOPLINE_")} - known
        assert not unknown, f"compose service {name} sets unknown variables {unknown}"
        if svc.get("command", [None])[0] == "run":
            assert env["LOOPLINE_METRICS_PORT"] == METRICS_PORT
        if svc.get("command", [None])[0] == "apply":
            for path in svc["command"][1:]:
                assert (REPO / "examples" / Path(path).name).exists(), path


def test_prometheus_scrapes_every_service_on_the_metrics_port() -> None:
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{s}:{METRICS_PORT}" for s in SERVICES)


def test_kubernetes_has_one_statefulset_per_service() -> None:
    docs = k8s()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    assert set(deployments) == {f"loopline-{s}" for s in SERVICES}
    known = settings_env_vars()
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert set(config) <= known, set(config) - known
    assert config["LOOPLINE_METRICS_PORT"] == METRICS_PORT
    for name, d in deployments.items():
        container = d["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["run", name.removeprefix("loopline-")]
        assert container["ports"][0]["containerPort"] == int(METRICS_PORT)
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # A stable instance id per pod: its transactional id survives a restart (no dangling
        # transaction).
        instance = next(e for e in container["env"] if e["name"] == "LOOPLINE_INSTANCE_ID")
        assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        service = scaled["spec"]["scaleTargetRef"]["name"].removeprefix("loopline-")
        # KEDA reads the lag of the group the service really uses (ServiceRuntime.group_id's
        # default).
        assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == f"loopline-{service}"


def test_dockerfile_copies_what_exists() -> None:
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src


def test_dashboard_metrics_exist_in_the_code() -> None:
    source = "\n".join(p.read_text() for d in ("loopline", "services")
                       for p in (REPO / d).rglob("*.py"))
    dashboards = sorted((INFRA / "grafana" / "dashboards").glob("*.json"))
    assert dashboards, "infra/grafana/dashboards holds no dashboard"
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        assert exprs, f"{path.name} has no queries"
        # Variables and annotations query Prometheus too: a renamed metric must not silently empty
        # them.
        exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", [])
                  if "expr" in a]
        exprs += [v.get("definition", "") for v in dashboard.get("templating", {}).get("list", [])]
        for expr in exprs:
            for metric in re.findall(r"\bloopline_[a-z0-9_]+", expr):
                base = re.sub(r"_(total|bucket|sum|count|created)$", "", metric)
                assert f'"{base}' in source or f'"{metric}"' in source, (
                    f"{path.name}: {metric} is not defined")


def test_replica_limits_match_how_each_service_scales() -> None:
    from loopline.services.monitor.settings import MonitorSettings
    from loopline.services.trainer.settings import TrainerSettings
    from loopline.spec import load_spec

    docs = k8s()
    partitions = min(load_spec(p).partitions for p in (REPO / "examples").glob("*.yaml"))
    most_partitions = max(load_spec(p).partitions for p in (REPO / "examples").glob("*.yaml"))
    scaled = {d["spec"]["scaleTargetRef"]["name"].removeprefix("loopline-"): d for d in docs
              if d["kind"] == "ScaledObject"}
    # Group consumers of pipeline topics scale on lag, never beyond the partitions a pipeline has.
    assert set(scaled) == {"ingest", "inference", "lineage"}
    for service, d in scaled.items():
        assert d["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
        assert 1 <= d["spec"]["maxReplicaCount"] <= most_partitions, service
    assert partitions >= 1
    # Stateful services split pipelines, never a pipeline: fixed replicas, within the changelog's
    # partitions.
    sets = {d["metadata"]["name"].removeprefix("loopline-"): d for d in docs
            if d["kind"] == "StatefulSet"}
    limits = {"monitor": MonitorSettings.model_fields["state_partitions"].default,
              "trainer": TrainerSettings.model_fields["state_partitions"].default}
    for service, limit in limits.items():
        examples = len(list((REPO / "examples").glob("*.yaml")))
        assert 1 <= sets[service]["spec"]["replicas"] <= min(limit, examples)
