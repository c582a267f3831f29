"""deploy/k8s, checked without a cluster: `kubectl kustomize` renders base and GPU overlay,
kubernetes-validate checks every object against the Kubernetes OpenAPI schemas (strict), and
the objects agree with each other, the image and the server's settings.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    BIN,
    K8S_DIR,
    NGINX_DIR,
    REPO,
    directive,
    free_port,
    nginx_size,
    settings_from_env,
    stage,
    stop,
    wait_ready,
)

from conftest import private_redis
from gruserve.settings import Settings

KUSTOMIZATIONS = {"base": K8S_DIR / "base", "gpu": K8S_DIR / "overlays" / "gpu"}
# the oldest Kubernetes release still maintained when this was written, and the newest the
# validator knows
VERSIONS = ["1.31", kubernetes_validate.utils.latest_version()]
POD_LABELS = {"app.kubernetes.io/name": "gruserve"}


def _drain_s(docs: tuple[dict[str, Any], ...]) -> float:
    """How long `gruserve serve` finishes in-flight requests after SIGTERM: the ConfigMap's
    GRUSERVE_SHUTDOWN_GRACE_S, else the setting's default."""
    data = find(docs, "ConfigMap", "gruserve-config")["data"]
    default = Settings.model_fields["shutdown_grace_s"].default
    return float(data.get("GRUSERVE_SHUTDOWN_GRACE_S", default))


@cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed: it renders the kustomizations (kubectl kustomize); "
            "the raw manifests are still validated by test_each_base_manifest_validates"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one ``kind`` object named ``name`` (a generated ConfigMap: ``name-<hash>``)."""
    matches = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            d["metadata"]["name"] == name
            or (kind == "ConfigMap" and d["metadata"]["name"].startswith(name + "-"))
        )
    ]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = find(docs, "Deployment", "gruserve")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gruserve"]
    return dict(containers[0])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_objects_validate(name: str, version: str) -> None:
    docs = render(name)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Deployment", "Deployment", "Service", "Service", "Service",
         "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "Ingress"]
    )  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"].get("namespace", "gruserve") == "gruserve"


def test_each_base_manifest_validates() -> None:
    """Without kubectl too: every file kustomization.yaml lists is a valid object as it is."""
    kustomization = yaml.safe_load((KUSTOMIZATIONS["base"] / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUSTOMIZATIONS["base"] / resource).read_text()):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_the_validator_rejects_what_kubernetes_rejects() -> None:
    deployment = find(render("base"), "Deployment", "gruserve")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_probes_ports_and_labels_fit_together() -> None:
    docs = render("base")
    pod = find(docs, "Deployment", "gruserve")["spec"]["template"]
    c = container(docs)
    port, grpc_port = map(int, stage("runtime").values("EXPOSE")[0].split())
    assert c["ports"] == [
        {"name": "http", "containerPort": port},
        {"name": "grpc", "containerPort": grpc_port},
    ]
    config = find(docs, "ConfigMap", "gruserve-config")["data"]
    assert int(config["GRUSERVE_GRPC_PORT"]) == grpc_port
    # gRPC health answers as /readyz does; a gRPC probe takes a number, not a port name
    assert c["readinessProbe"]["grpc"] == {"port": grpc_port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    assert POD_LABELS.items() <= pod["metadata"]["labels"].items()
    service = find(docs, "Service", "gruserve")
    assert service["spec"]["selector"] == POD_LABELS
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", port, "http"),
        ("grpc", grpc_port, "grpc"),
    ]
    assert find(docs, "PodDisruptionBudget", "gruserve")["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": POD_LABELS},
    }
    hpa = find(docs, "HorizontalPodAutoscaler", "gruserve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "gruserve"}  # fmt: skip
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in c["resources"]["requests"], "the HPA's utilization is of the request"
    assert hpa["minReplicas"] >= 2 and find(docs, "Deployment", "gruserve")["spec"]["replicas"] >= 2

    backend = find(docs, "Ingress", "gruserve")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"] == {"name": "gruserve", "port": {"name": "http"}}
    # the session Ingress's own Service: the same pods, HTTP only
    sessions = find(docs, "Service", "gruserve-sessions")
    assert sessions["spec"]["selector"] == POD_LABELS
    assert [(p["name"], p["port"], p["targetPort"]) for p in sessions["spec"]["ports"]] == [
        ("http", port, "http")
    ]


def test_pods_run_unprivileged_on_a_read_only_root() -> None:
    docs = render("base")
    spec = find(docs, "Deployment", "gruserve")["spec"]["template"]["spec"]
    c = container(docs)
    user = stage("runtime").values("USER")[0].split(":")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == user[0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and stage("runtime").env()["HOME"] == "/tmp"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[tmp[0]["name"]]


def test_termination_waits_for_the_drain() -> None:
    spec = find(render("base"), "Deployment", "gruserve")["spec"]["template"]["spec"]
    command = container(render("base"))["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert int(command[1]) + _drain_s(render("base")) < spec["terminationGracePeriodSeconds"]


def test_configmap_holds_real_settings_and_points_at_redis() -> None:
    docs = render("base")
    config = find(docs, "ConfigMap", "gruserve-config")
    env_from = container(docs)["envFrom"][0]["configMapRef"]["name"]
    assert env_from == config["metadata"]["name"]  # the hashed name
    data = config["data"]
    assert all(key.startswith("GRUSERVE_") for key in data)
    fields = {key.removeprefix("GRUSERVE_").lower(): value for key, value in data.items()}
    assert fields.keys() <= Settings.model_fields.keys(), sorted(fields)
    settings = Settings(_env_file=None, **fields)  # type: ignore[arg-type,call-arg]
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings.session_store)
    assert match, settings.session_store
    redis = find(docs, "Service", match.group(1))
    assert redis["spec"]["ports"][0]["port"] == int(match.group(2))
    assert "memory" not in settings.session_store and settings.provider == "cpu"


def test_the_shipped_redis_fills_up_before_its_container_limit_and_then_refuses(
    tmp_path: Path,
) -> None:
    """Redis's ``maxmemory`` is below the container's memory limit, with ``noeviction``: a
    full Redis refuses writes (503 StoreFull, nothing lost) before the kernel would kill it
    with every session; checked on a real ``redis-server`` started with the manifest's
    arguments."""
    (redis,) = find(render("base"), "Deployment", "redis")["spec"]["template"]["spec"]["containers"]
    limit = redis["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    with private_redis(tmp_path, redis["args"]) as node:
        config = node.client.config_get("maxmemory*")
    assert 0 < int(str(config["maxmemory"])) <= 0.8 * int(limit.removesuffix("Mi")) * 2**20
    assert config["maxmemory-policy"] == "noeviction"


def test_gpu_overlay_asks_for_a_gpu_and_cuda() -> None:
    base, gpu = render("base"), render("gpu")
    c = container(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":gpu") and container(base)["image"].endswith(":cpu")
    config = find(gpu, "ConfigMap", "gruserve-config")
    assert config["data"]["GRUSERVE_PROVIDER"] == "cuda"
    assert c["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    spec = find(gpu, "Deployment", "gruserve")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["nodeSelector"]
    # everything else is the base's: probes, security, the read-only root
    for key in ("readinessProbe", "livenessProbe", "securityContext", "volumeMounts"):
        assert c[key] == container(base)[key]
    assert "nvidia.com/gpu" not in str(base)


def test_ingress_mirrors_the_nginx_configuration() -> None:
    docs = render("base")
    prefix = "nginx.ingress.kubernetes.io/"
    nginx = (NGINX_DIR / "gruserve.conf").read_text()
    body = nginx_size(directive(nginx, "client_max_body_size")[0])
    assert body == Settings.model_fields["max_request_bytes"].default
    everything, sessions = (
        find(docs, "Ingress", "gruserve"),
        find(docs, "Ingress", "gruserve-sessions"),
    )
    for ingress in (everything, sessions):
        annotations = ingress["metadata"]["annotations"]
        assert nginx_size(annotations[prefix + "proxy-body-size"]) == body
        assert annotations[prefix + "proxy-buffering"] == "off"
        assert annotations[prefix + "proxy-request-buffering"] == "off"
    # as deploy/nginx: requests naming a session hash onto one pod, the rest round robin
    assert prefix + "upstream-hash-by" not in everything["metadata"]["annotations"]
    assert sessions["metadata"]["annotations"][prefix + "upstream-hash-by"] == "$uri"
    (path,) = sessions["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1/sessions/", "Prefix")
    assert path["backend"]["service"] == {"name": "gruserve-sessions", "port": {"name": "http"}}
    assert "~^/v1/sessions/([^/]+) $1;" in nginx
    hosts = {
        rule["host"] for ingress in (everything, sessions) for rule in ingress["spec"]["rules"]
    }
    assert len(hosts) == 1, hosts


READ_ONLY_ROOT = """
set -e
mount --make-rprivate /
for target in $(awk '{print $2}' /proc/self/mounts | sort -u); do
    case "$target" in /proc*|/sys*|/dev*) ;; *) mount -o remount,bind,ro "$target" ;; esac
done
# A checkout under /tmp (a CI clone, say) would vanish under the fresh /tmp: carry it across.
case "$REPO" in /tmp/*) mount --bind "$REPO" /mnt; carried=1 ;; esac
mount -t tmpfs tmpfs /tmp
if [ -n "${carried:-}" ]; then
    mkdir -p "$REPO" && mount --bind /mnt "$REPO" && mount -o remount,bind,ro "$REPO"
fi
if touch "$GRUSERVE_MODELS_DIR/probe" 2>/dev/null; then echo "still writable"; exit 3; fi
cd /tmp
exec "$@"
"""


def test_serves_on_a_read_only_root_with_a_writable_tmp(tmp_path: Path) -> None:
    """What readOnlyRootFilesystem + the /tmp emptyDir give the container, in a private mount
    namespace: every file system read-only but a fresh /tmp (HOME=/tmp as in the image)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -m (root or CAP_SYS_ADMIN) to remount the root read-only")
    port = free_port()
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/tmp",
        "GRUSERVE_MODELS_DIR": str(REPO / "models"),
        "GRUSERVE_PROVIDER": "cpu",
        "GRUSERVE_PORT": str(port),
        "GRUSERVE_GRPC_PORT": "0",
        "GRUSERVE_HOST": "127.0.0.1",
        "REPO": str(REPO),
    }
    proc = subprocess.Popen(
        [unshare, "-m", "sh", "-c", READ_ONLY_ROOT, "sh", str(BIN / "gruserve"), "serve"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(proc, port)
        base = f"http://127.0.0.1:{port}"
        sid = httpx.post(f"{base}/v1/models/demo/sessions", json={}).json()["session_id"]
        step = httpx.post(f"{base}/v1/sessions/{sid}/step", json={"inputs": [[40.5], [60.1]]})
        assert step.status_code == 200, step.text
    finally:
        output = stop(proc)
    # onnxruntime only warns when it cannot write its cache in HOME: look for any such sign
    for sign in ("Read-only file system", "Permission denied", "Failed to persist", "Traceback"):
        assert sign not in output, output


ROLLOUT = K8S_DIR / "overlays" / "rollout"


@cache
def render_rollout() -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the rollout overlay")
    result = subprocess.run([kubectl, "kustomize", str(ROLLOUT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.mark.parametrize("version", VERSIONS)
def test_rollout_overlay_validates(version: str) -> None:
    for doc in render_rollout():
        kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] != "Namespace":  # the claim too: pods mount claims of their namespace
            assert doc["metadata"].get("namespace") == "gruserve", doc["metadata"]


def test_rollout_overlay_mounts_one_read_only_repository_and_polls_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs, base = render_rollout(), render("base")
    claim = find(docs, "PersistentVolumeClaim", "gruserve-models")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    spec = find(docs, "Deployment", "gruserve")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}
    models = mounts[stage("runtime").env()["GRUSERVE_MODELS_DIR"]]
    assert models["readOnly"] is True
    source = volumes[models["name"]]["persistentVolumeClaim"]
    assert source == {"claimName": claim["metadata"]["name"], "readOnly": True}
    # the base's mounts are all still there
    assert {m["mountPath"] for m in container(base)["volumeMounts"]} < mounts.keys()
    config = find(docs, "ConfigMap", "gruserve-config")
    assert container(docs)["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    fields = {k.removeprefix("GRUSERVE_").lower(): v for k, v in config["data"].items()}
    assert fields.keys() <= Settings.model_fields.keys(), sorted(fields)
    settings = settings_from_env(config["data"], monkeypatch)
    assert settings.repository_poll_s > 0
    assert settings.version_policies()["demo"].kept([1, 2, 3]) == [2, 3]
    assert (
        settings.session_store
        == find(base, "ConfigMap", "gruserve-config")["data"]["GRUSERVE_SESSION_STORE"]
    )
