"""packaging/helm: the queen-tw chart renders, every object is valid Kubernetes, and what the
objects say agrees with the server.

The chart is rendered by Helm's own Go SDK (helm-python-sdk, the same template engine as
``helm template``; no cluster is contacted) with its default values and with the HA values
of the CloudNativePG example. Every built-in object is validated by kubernetes-validate
(strict: unknown fields are errors) against the oldest Kubernetes the chart accepts and a
recent one. Operator objects (ServiceMonitor, PrometheusRule, the CloudNativePG Cluster)
have no schema there, so their required fields are checked here, together with the links
between objects (selectors, port names, the peers' DNS names) and the env names and values
the server must accept. Needs no PostgreSQL except the probe test, which asks the shared
server.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from queen_tw.cluster.peers import parse_peers
from queen_tw.config import OPTIONS, Config
from queen_tw.lifecycle import STOP_BUDGET_S

from support import REPO_ROOT, TEST_ENCRYPTION_KEY, ServerProcess, free_port

try:
    import helm_python
except ImportError:  # reported by the fixture below, as a failure
    helm_python = None
try:
    import kubernetes_validate
except ImportError:
    kubernetes_validate = None

HELM = REPO_ROOT / "packaging" / "helm"
CHART = HELM / "queen-tw"
CNPG = HELM / "examples" / "cnpg"
HA_VALUES = CNPG / "values-ha.yaml"
CNPG_CLUSTER = CNPG / "cluster.yaml"
ALERTS = REPO_ROOT / "packaging" / "prometheus" / "queen-alerts.yml"
PROBE = CHART / "files" / "probe.py"

RELEASE = "queen"
NAMESPACE = "queues"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
"""The oldest Kubernetes Chart.yaml's kubeVersion accepts, and the newest schema of the
pinned kubernetes-validate."""

OPERATOR_GROUPS = {"monitoring.coreos.com", "postgresql.cnpg.io"}
"""API groups of custom resources: checked by the tests below, not by kubernetes-validate."""

SECRET_ENV = {"PG_PASSWORD", "JWT_SECRET", "QUEEN_ENCRYPTION_KEY", "QUEEN_SYNC_SECRET"}
"""Settings that must come from a Secret, never from a literal in the manifests."""

SECRET_SAMPLES = {"PG_USER": "app", "PG_PASSWORD": "pw", "JWT_SECRET": "s" * 32,
                  "QUEEN_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY, "QUEEN_SYNC_SECRET": "k" * 32}
"""What each Secret-fed setting could hold, to parse the rendered env as the server would
(the encryption key is the test database's: a server with another refuses to start)."""

OPTION_NAMES = {spec.env for spec in OPTIONS}

MISSING_TOOL = ("{name} is not installed: pip install '{requirement}' (a test requirement "
                "of tests/test_packaging_kubernetes.py)")


# --- rendering ---------------------------------------------------------------------------


def _require(module: ModuleType | None, name: str, requirement: str) -> ModuleType:
    if module is None:
        pytest.fail(MISSING_TOOL.format(name=name, requirement=requirement))
    return module


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values`` over its defaults, as Helm would."""
    helm = _require(helm_python, "helm-python-sdk", "helm-python-sdk==0.2.2")
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE,
                                 is_install=True)
    return [document for text in manifests.values() for document in yaml.safe_load_all(text)
            if document]


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def ha_objects() -> list[dict[str, Any]]:
    return render(yaml.safe_load(HA_VALUES.read_text()))


@pytest.fixture(params=["default", "ha"], scope="module")
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(f"{request.param}_objects")


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [queen] = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return queen


def env_entries(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    entries = container(objects)["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"an env name is set twice: {names}"
    return {entry["name"]: entry for entry in entries}


def literal_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's env as the server would see it, Secrets and the pod name filled in."""
    env = {}
    for name, entry in env_entries(objects).items():
        if "value" in entry:
            env[name] = entry["value"]
        elif "secretKeyRef" in entry["valueFrom"]:
            env[name] = SECRET_SAMPLES[name]
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[name] = f"{one(objects, 'StatefulSet')['metadata']['name']}-0"
    return env


def is_operator_object(document: dict[str, Any]) -> bool:
    return document["apiVersion"].split("/")[0] in OPERATOR_GROUPS


# --- the chart as Helm and Kubernetes see it ------------------------------------------------


def test_helm_lints_the_chart_without_errors() -> None:
    helm = _require(helm_python, "helm-python-sdk", "helm-python-sdk==0.2.2")
    report = helm.lint(str(CHART))

    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > 1] == [], report["messages"]


@pytest.mark.parametrize("values", [
    {"replicas": 3},                                   # a typo of replicaCount
    {"replicaCount": 0},
    {"peerSync": {"udpPort": "6633"}},
    {"server": {"numWorkers": 0}},
    {"postgresql": {"host": ""}},
    {"env": [{"name": "pg_host", "value": "db"}]},
], ids=["typo", "no-replicas", "port-as-text", "no-workers", "no-pg-host", "env-case"])
def test_values_the_schema_refuses_do_not_render(values: dict[str, Any]) -> None:
    helm = _require(helm_python, "helm-python-sdk", "helm-python-sdk==0.2.2")

    with pytest.raises(helm.HelmValuesError):
        render(values)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(objects: list[dict[str, Any]],
                                                   version: str) -> None:
    validator = _require(kubernetes_validate, "kubernetes-validate",
                         "kubernetes-validate==1.37.0")
    built_in = [o for o in objects if not is_operator_object(o)]
    assert built_in
    errors = []
    for document in built_in:
        try:
            validator.validate(document, version, strict=True)
        except validator.ValidationError as error:
            errors.append(f"{document['kind']} {document['metadata']['name']}: {error}")
    assert not errors, "\n".join(errors)


def test_the_defaults_render_one_instance_without_operator_objects(
    default_objects: list[dict[str, Any]],
) -> None:
    kinds = sorted(o["kind"] for o in default_objects)

    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Service", "Service",
                     "ServiceAccount", "StatefulSet"]
    assert one(default_objects, "StatefulSet")["spec"]["replicas"] == 1
    assert "QUEEN_UDP_PEERS" not in env_entries(default_objects)  # nobody to sync with


def test_the_ha_values_add_the_monitoring_objects(ha_objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in ha_objects)

    assert kinds == ["ConfigMap", "PodDisruptionBudget", "PrometheusRule", "Service",
                     "Service", "ServiceAccount", "ServiceMonitor", "StatefulSet"]
    assert one(ha_objects, "StatefulSet")["spec"]["replicas"] == 3


# --- what the server reads ------------------------------------------------------------------


def test_every_env_name_the_manifests_set_is_a_server_option(
    objects: list[dict[str, Any]],
) -> None:
    unknown = sorted(set(env_entries(objects)) - OPTION_NAMES)

    assert not unknown, f"env names no option of queen_tw/config.py reads: {unknown}"


def test_the_server_accepts_the_rendered_settings(objects: list[dict[str, Any]]) -> None:
    config = Config.from_sources(literal_env(objects), {})

    assert config.file_buffer_dir == volume_mount(objects, "buffers")
    assert config.worker_id.startswith(one(objects, "StatefulSet")["metadata"]["name"])
    assert config.warnings == ()


def test_secrets_come_from_secret_references_only(ha_objects: list[dict[str, Any]]) -> None:
    entries = env_entries(ha_objects)

    assert set(entries) >= SECRET_ENV
    for name in SECRET_ENV:
        reference = entries[name]["valueFrom"]["secretKeyRef"]
        assert reference["name"] and reference["key"], name
    assert entries["JWT_ENABLED"]["value"] == "true"


# --- the StatefulSet --------------------------------------------------------------------------


def volume_mount(objects: list[dict[str, Any]], name: str) -> str:
    [mount] = [m["mountPath"] for m in container(objects)["volumeMounts"] if m["name"] == name]
    return mount


def test_each_pod_keeps_its_own_buffer_volume(objects: list[dict[str, Any]]) -> None:
    statefulset = one(objects, "StatefulSet")
    [claim] = statefulset["spec"]["volumeClaimTemplates"]

    assert claim["metadata"]["name"] == "buffers"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert env_entries(objects)["FILE_BUFFER_DIR"]["value"] == volume_mount(objects, "buffers")
    pod_volumes = {v["name"] for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert "buffers" not in pod_volumes  # a shared volume would be one buffer for all pods


def test_the_pod_runs_non_root_on_a_read_only_root_without_capabilities(
    objects: list[dict[str, Any]],
) -> None:
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    security = container(objects)["securityContext"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    [tmp] = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp and volume_mount(objects, "tmp") == "/tmp"


def test_probes_ask_health_through_the_probe_script(objects: list[dict[str, Any]]) -> None:
    queen = container(objects)
    config_map = one(objects, "ConfigMap")

    assert config_map["data"]["probe.py"] == PROBE.read_text()
    script = f"{volume_mount(objects, 'probe')}/probe.py"
    assert queen["livenessProbe"]["exec"]["command"] == ["python", script, "live"]
    assert queen["startupProbe"]["exec"]["command"] == ["python", script, "live"]
    assert queen["readinessProbe"]["exec"]["command"] == ["python", script, "ready"]


def test_readiness_can_require_the_database() -> None:
    strict = render({"probes": {"readiness": {"requireDatabase": True}}})

    assert container(strict)["readinessProbe"]["exec"]["command"][-1] == "ready-db"


def test_a_pod_gets_time_for_its_graceful_stop(objects: list[dict[str, Any]]) -> None:
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    [_, pre_stop_sleep] = container(objects)["lifecycle"]["preStop"]["exec"]["command"]

    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop_sleep) + STOP_BUDGET_S


def test_the_resources_are_set(objects: list[dict[str, Any]]) -> None:
    resources = container(objects)["resources"]

    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


# --- Services, peers and the disruption budget -------------------------------------------------


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    return one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]


def selects_the_pods(selector: dict[str, str], objects: list[dict[str, Any]]) -> bool:
    return bool(selector) and selector.items() <= pod_labels(objects).items()


def container_port(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [port] = [p for p in container(objects)["ports"] if p["name"] == name]
    return port


def test_the_http_service_reaches_the_api_port(objects: list[dict[str, Any]]) -> None:
    service = one(objects, "Service", one(objects, "StatefulSet")["metadata"]["name"])
    [port] = service["spec"]["ports"]

    assert selects_the_pods(service["spec"]["selector"], objects)
    assert port["targetPort"] == "http"
    assert str(container_port(objects, "http")["containerPort"]) == literal_env(objects)["PORT"]


def test_the_peers_are_every_pod_under_the_headless_service(
    ha_objects: list[dict[str, Any]],
) -> None:
    statefulset = one(ha_objects, "StatefulSet")
    headless = one(ha_objects, "Service", statefulset["spec"]["serviceName"])
    udp_port = int(literal_env(ha_objects)["QUEEN_UDP_NOTIFY_PORT"])

    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects_the_pods(headless["spec"]["selector"], ha_objects)
    [sync] = headless["spec"]["ports"]
    assert sync["protocol"] == "UDP" and sync["targetPort"] == "sync"
    assert container_port(ha_objects, "sync") == {"name": "sync", "containerPort": udp_port,
                                                  "protocol": "UDP"}
    name = statefulset["metadata"]["name"]
    domain = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    peers = parse_peers(literal_env(ha_objects)["QUEEN_UDP_PEERS"], udp_port)
    assert [str(peer) for peer in peers] == [f"{name}-{i}.{domain}:{udp_port}"
                                            for i in range(statefulset["spec"]["replicas"])]


def test_the_ha_pods_spread_over_nodes_and_zones(ha_objects: list[dict[str, Any]]) -> None:
    pod = one(ha_objects, "StatefulSet")["spec"]["template"]["spec"]
    [preferred] = pod["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    [zones] = pod["topologySpreadConstraints"]

    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert selects_the_pods(term["labelSelector"]["matchLabels"], ha_objects)
    assert zones["topologyKey"] == "topology.kubernetes.io/zone"
    assert selects_the_pods(zones["labelSelector"]["matchLabels"], ha_objects)


def test_the_disruption_budget_lets_one_pod_go_at_a_time(
    objects: list[dict[str, Any]],
) -> None:
    budget = one(objects, "PodDisruptionBudget")

    assert budget["spec"]["maxUnavailable"] == 1
    assert selects_the_pods(budget["spec"]["selector"]["matchLabels"], objects)


# --- operator objects: required fields checked here ---------------------------------------------


def test_the_service_monitor_scrapes_the_http_service_as_job_queen_tw(
    ha_objects: list[dict[str, Any]],
) -> None:
    monitor = one(ha_objects, "ServiceMonitor")
    service = one(ha_objects, "Service", one(ha_objects, "StatefulSet")["metadata"]["name"])
    headless = one(ha_objects, "Service", one(ha_objects, "StatefulSet")["spec"]["serviceName"])

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert not selector.items() <= headless["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics/prometheus"
    assert {"targetLabel": "job", "replacement": "queen-tw"} in endpoint["relabelings"]
    assert 'job="queen-tw"' in ALERTS.read_text()  # the job the alert rules expect


def test_the_prometheus_rule_carries_the_packaged_alert_rules(
    ha_objects: list[dict[str, Any]],
) -> None:
    rule = one(ha_objects, "PrometheusRule")

    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for each in group["rules"]:
            assert each["expr"] and ("alert" in each or "record" in each)


def cnpg_cluster() -> dict[str, Any]:
    [cluster] = [d for d in yaml.safe_load_all(CNPG_CLUSTER.read_text()) if d]
    return cluster


def test_the_cnpg_cluster_has_three_instances_with_synchronous_replication() -> None:
    cluster = cnpg_cluster()
    spec = cluster["spec"]

    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1" and cluster["kind"] == "Cluster"
    assert cluster["metadata"]["name"]
    assert spec["instances"] == 3
    synchronous = spec["postgresql"]["synchronous"]
    assert synchronous["method"] in {"any", "first"}
    assert 1 <= synchronous["number"] < spec["instances"]
    assert synchronous["dataDurability"] == "required"  # no commit without a standby copy
    assert spec["storage"]["size"]
    assert spec["bootstrap"]["initdb"]["database"] and spec["bootstrap"]["initdb"]["owner"]


def test_the_ha_values_point_at_the_cnpg_primary_service_and_its_secret(
    ha_objects: list[dict[str, Any]],
) -> None:
    cluster = cnpg_cluster()
    name = cluster["metadata"]["name"]
    env = env_entries(ha_objects)

    assert env["PG_HOST"]["value"] == f"{name}-rw"  # the operator moves it to the new primary
    assert env["PG_DB"]["value"] == cluster["spec"]["bootstrap"]["initdb"]["database"]
    for setting, key in (("PG_USER", "username"), ("PG_PASSWORD", "password")):
        assert env[setting]["valueFrom"]["secretKeyRef"] == {"name": f"{name}-app", "key": key}
    values = literal_env(ha_objects)
    workers = int(values["NUM_WORKERS"])
    per_worker = int(values["DB_POOL_SIZE"]) + (1 if workers > 1 else 0)  # + the LISTEN relay
    connections = one(ha_objects, "StatefulSet")["spec"]["replicas"] * workers * per_worker
    max_connections = int(cluster["spec"]["postgresql"]["parameters"]["max_connections"])
    assert connections + 10 <= max_connections  # room for the operator and psql


# --- the probe script, against a real server ----------------------------------------------------


def run_probe(mode: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run([sys.executable, str(PROBE), mode], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.parametrize("mode", ["live", "ready", "ready-db"])
def test_the_probe_passes_on_a_serving_server(server: ServerProcess, mode: str) -> None:
    result = run_probe(mode, server.port)

    assert result.returncode == 0, result.stderr


def test_a_server_started_with_the_ha_pod_env_passes_the_probes(
    make_server: Callable[..., ServerProcess],
) -> None:
    """The HA pod's env, as rendered (NUM_WORKERS, JWT, encryption key, signed peer sync to
    the three pods' DNS names), starts a real server; only what points outside this machine
    is swapped: PostgreSQL, the buffer directory, and ports that are free here."""
    udp_port = free_port()
    values = yaml.safe_load(HA_VALUES.read_text())
    values["peerSync"]["udpPort"] = udp_port
    env = literal_env(render(values))
    local = {name: value for name, value in env.items()
             if not name.startswith("PG_") and name not in ("FILE_BUFFER_DIR", "PORT")}
    assert local["NUM_WORKERS"] == "2" and local["QUEEN_UDP_PEERS"].count(",") == 2

    server = make_server(**local)

    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert health["shared_state"] == {"enabled": True}  # the peer sync runs
    for mode in ("live", "ready", "ready-db"):
        result = run_probe(mode, server.port)
        assert result.returncode == 0, result.stderr


def test_the_probe_fails_when_nothing_answers() -> None:
    result = run_probe("live", free_port())

    assert result.returncode == 1
    assert "did not answer" in result.stderr


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("queen_probe", PROBE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def health_answers() -> Iterator[tuple[int, dict[str, Any], dict[str, bool]]]:
    """(status, body, whether each mode passes) for the /health answers that matter."""
    buffering = {"status": "unhealthy", "database": "disconnected",
                 "file_buffer": {"pending": 12, "failed": 0, "healthy": True}}
    broken = {**buffering, "file_buffer": {"pending": 12, "failed": 1, "healthy": False}}
    yield 200, {"status": "healthy"}, {"live": True, "ready": True, "ready-db": True}
    yield 503, buffering, {"live": True, "ready": True, "ready-db": False}
    yield 503, broken, {"live": True, "ready": False, "ready-db": False}
    yield 503, {}, {"live": True, "ready": False, "ready-db": False}


def test_a_pod_whose_postgres_is_away_stays_ready_while_its_buffer_is_healthy() -> None:
    probe = load_probe()

    for status, body, expected in health_answers():
        assert {mode: probe.passes(mode, status, body) for mode in expected} == expected, body
