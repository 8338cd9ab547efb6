"""The model's engine state for /health, by the rules of the server pod's own probes.

Triton 2.51 reads the model ready while its engine is being restarted or has failed for good; the
model says so on Triton's metrics port instead (gemma_engine_state, and a heartbeat that stops when its
stub died). deploy/k8s/base/health.py reads them for the pod's probes and compose's health check; the
gateway loads that same file rather than parsing the metrics a second way. It is a standalone script
(a ConfigMap in Kubernetes, standard library only), so it is loaded from its path: the repository's,
or the same place in the gateway image (docker/gateway.Dockerfile copies it there).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

HEALTH_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "base" / "health.py"


def _load_health():
    spec = importlib.util.spec_from_file_location("gemma_health_probe", HEALTH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_health = _load_health()


def engine_problem(metrics_url: str, model: str) -> Optional[str]:
    """None when every instance of `model` serves with a fresh heartbeat (the readiness probe's rule),
    else why not, e.g. "gemma_0_0: the engine is restarting". Blocks up to 2 s: run it off the loop."""
    return _health.engine_check("ready", metrics_url, model)
