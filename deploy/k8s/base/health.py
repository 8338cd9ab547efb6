"""Readiness and liveness probes of the Triton container: what Triton 2.51 cannot tell by itself.

Triton 2.51 reports the model ready for as long as it is loaded. A Python model has no way to turn
that false in model control mode none: the backend API that asks a model instance whether it is
ready came with Triton 2.64 (which also reads a dead stub as not ready), and the Python model's own
`is_ready()` with 2.67. So these probes read the model's health from its metrics port, where the
model exports, per model instance (serving/metrics.py):
- gemma_engine_state{state=serving|restarting|failed}: 1 for the engine's current state;
- gemma_heartbeat_timestamp_seconds: the Unix time of the model's last health check (every 0.1 s),
  which stops advancing when the model's stub process is dead or stuck (its series stay on
  /metrics with their last values, so a stale heartbeat is the only sign of a dead stub).

    python3 health.py ready   # Triton: the model ready; and every instance serving with a fresh heartbeat
    python3 health.py live    # Triton live, and every instance with a fresh heartbeat and not failed

The Kubernetes pod's readiness and liveness probes and docker-compose.yml's health check run it, and the
OpenAI gateway's /health applies its rules (engine_check) too: one reading of the model's health.

An engine being restarted is live but not ready: the model brings it back by itself
(docs/deploy.md, Health). A dead stub, or an engine that the model gave up restarting, is neither:
only a restart of the container brings the model back. Exit status 0 when the check passes, else 1
with the reason on stdout (the kubelet puts it in the pod's events). The ports come from the
container's HTTP_PORT and METRICS_PORT (8000 and 8002 otherwise).

Standard library only: it runs with the image's python3 from a ConfigMap.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

STATE, HEARTBEAT = "gemma_engine_state", "gemma_heartbeat_timestamp_seconds"
# The model checks its engine every 0.1 s; a check waits at most 30 s for an engine that stopped
# answering, which is then killed and restarted (backend/engine_process.py). 10 s tolerates a
# loaded host and is still far below anything that needs the pod out of the Service.
MAX_AGE_S = 10.0
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def instances(metrics_text: str, model: str) -> dict[str, dict]:
    """{instance: {"state": the state whose series reads 1 (or None), "heartbeat": Unix time}} of `model`."""
    found: dict[str, dict] = {}
    for line in metrics_text.splitlines():
        name, _, rest = line.partition("{")
        if name not in (STATE, HEARTBEAT):
            continue
        labels_text, _, value = rest.rpartition("}")
        labels = dict(LABEL.findall(labels_text))
        if labels.get("model") != model:
            continue
        entry = found.setdefault(labels.get("instance", ""), {"state": None, "heartbeat": None})
        if name == HEARTBEAT:
            entry["heartbeat"] = float(value)
        elif float(value) == 1:
            entry["state"] = labels.get("state")
    return found


def check(kind: str, http_url: str, metrics_url: str, model: str, max_age_s: float = MAX_AGE_S,
          now: Optional[float] = None) -> Optional[str]:
    """None when the `kind` ("ready" or "live") check passes, else why it fails."""
    path = f"/v2/models/{model}/ready" if kind == "ready" else "/v2/health/live"
    try:
        with urllib.request.urlopen(http_url + path, timeout=2) as response:
            response.read()
    except urllib.error.HTTPError as e:
        return f"{e.url} answered {e.code}"
    except OSError as e:
        return f"Triton does not answer: {e}"
    return engine_check(kind, metrics_url, model, max_age_s, now)


def engine_check(kind: str, metrics_url: str, model: str, max_age_s: float = MAX_AGE_S,
                 now: Optional[float] = None) -> Optional[str]:
    """The model's own part of `check`, from its metrics alone: what the OpenAI gateway's /health adds
    to Triton's readiness, which it asks over gRPC (gateway/engine_health.py)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            metrics_text = response.read().decode()
    except urllib.error.HTTPError as e:
        return f"{e.url} answered {e.code}"
    except OSError as e:
        return f"Triton's metrics do not answer at {metrics_url}: {e}"
    found = instances(metrics_text, model)
    if not found:
        return f"no {STATE} series of model '{model}' on {metrics_url}"
    return verdict(kind, found, time.time() if now is None else now, max_age_s)


def verdict(kind: str, found: dict[str, dict], now: float, max_age_s: float = MAX_AGE_S) -> Optional[str]:
    """The rules, on what `instances` found: None when every instance passes, else why one fails."""
    for instance, health in sorted(found.items()):
        if health["heartbeat"] is None or now - health["heartbeat"] > max_age_s:
            age = "never" if health["heartbeat"] is None else f"{now - health['heartbeat']:.0f} s ago"
            return f"{instance}: the model's last health check was {age} (its stub is dead or stuck)"
        if health["state"] == "failed" or (kind == "ready" and health["state"] != "serving"):
            return f"{instance}: the engine is {health['state']}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("ready", "live"))
    p.add_argument("--model", default="gemma")
    p.add_argument("--http-url", default=f"http://localhost:{os.environ.get('HTTP_PORT', '8000')}")
    p.add_argument("--metrics-url", default=f"http://localhost:{os.environ.get('METRICS_PORT', '8002')}/metrics")
    p.add_argument("--max-age-s", type=float, default=MAX_AGE_S, help="the oldest heartbeat that passes")
    args = p.parse_args()
    failure = check(args.kind, args.http_url, args.metrics_url, args.model, args.max_age_s)
    print(f"{args.kind}: {failure or 'ok'}")
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
