"""The OpenAI gateway's image and compose services (docker/gateway.Dockerfile, docker-compose.yml's
openai and openai-cpu); the checks every image gets are in test_images.py."""
from __future__ import annotations

import json
import re

import pytest

from .test_images import GATEWAY_IMAGE, ROOT, args_of, pip_requirements

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

COMMAND = ["python3", "-m", "gateway", "--host", "0.0.0.0", "--port", "9000"]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_image_installs_the_gateway_extra_as_pinned_in_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    image = set(pip_requirements(GATEWAY_IMAGE))
    assert set(extras["gateway"]) <= image, (extras["gateway"], image)
    assert "/opt/gemma-triton/client" in image
    assert not any(re.match(r"torch\b", r) for r in image)  # HTTP and gRPC only


def test_image_has_the_health_probe_script_where_the_gateway_loads_it():
    """/health applies the server pod's probe rules (gateway/engine_health.py), loaded from the script's
    place in the repository, which the image keeps beside gateway/ in its WORKDIR."""
    from gateway.engine_health import HEALTH_SCRIPT

    relative = HEALTH_SCRIPT.relative_to(ROOT).as_posix()
    assert args_of(GATEWAY_IMAGE, "WORKDIR") == ["/opt/gemma-triton"]
    assert "gateway/ gateway/" in args_of(GATEWAY_IMAGE, "COPY")
    assert f"{relative} {relative}" in args_of(GATEWAY_IMAGE, "COPY")


def test_image_runs_the_gateway_on_port_9000(services):
    (cmd,) = args_of(GATEWAY_IMAGE, "CMD")
    assert json.loads(cmd) == COMMAND == services["openai"]["command"]
    assert args_of(GATEWAY_IMAGE, "EXPOSE") == ["9000"]


@pytest.mark.parametrize("gateway, server", [("openai", "triton"), ("openai-cpu", "triton-cpu")])
def test_services_front_their_healthy_triton(services, gateway, server):
    spec = services[gateway]
    assert spec["build"]["dockerfile"] == "docker/" + GATEWAY_IMAGE
    assert spec["depends_on"] == {server: {"condition": "service_healthy"}}
    assert spec["environment"]["GEMMA_TRITON_URL"] == f"{server}:8001"
    # /health follows that server's engine too (restarting or failed: 503)
    assert spec["environment"]["GEMMA_TRITON_METRICS_URL"] == f"http://{server}:8002/metrics"
    assert "GEMMA_API_KEY" in spec["environment"]  # the host's key, when set
    assert spec["ports"] == ["${OPENAI_PORT:-9000}:9000"]
    assert "localhost:9000/health" in " ".join(spec["healthcheck"]["test"])
    assert spec.get("profiles") == services[server].get("profiles")
