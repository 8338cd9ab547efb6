"""preStop hook of the Triton container: hold the pod's shutdown until its generations have finished.

Kubernetes runs this as soon as it starts terminating the pod (scale-down, rollout, node drain) and
sends SIGTERM to tritonserver only once it returns. Until then Triton serves as usual, so:
1. wait --propagation-s: the pod has left the Service endpoints at once, but the balancers take a few
   seconds to notice (Envoy re-resolves the headless Service's DNS name every 5 s), and requests
   that arrive meanwhile are still served;
2. then poll the model's gauges on the metrics port until no request is running or waiting, for at
   most --drain-timeout-s.
SIGTERM then finds an idle server: Triton unloads the model (finalize) and exits in seconds. On a
timeout, what is still running gets Triton's --exit-timeout-secs, and the pod's
terminationGracePeriodSeconds is the hard limit (docs/deploy.md, "Scale-down").
It stops waiting at once when nothing can finish any more: the model's stub is dead (its heartbeat
stopped; its gauges keep their last values) or its engine failed for good (the liveness probe
restarts the container then: docs/deploy.md, Health).

Standard library only: it runs with the image's python3 from a ConfigMap.
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.request

# serving/metrics.py's gauges of requests in the engine, summed over the model's instances.
IN_FLIGHT = ("gemma_running_requests", "gemma_queue_depth")
HEARTBEAT = "gemma_heartbeat_timestamp_seconds"
FAILED = 'state="failed"'  # in gemma_engine_state's labels
STALE_S = 10.0  # a heartbeat older than this: the stub is dead or stuck (health.py's MAX_AGE_S)


def in_flight(metrics_text: str) -> float:
    """Requests running or waiting, from a Prometheus text exposition."""
    total = 0.0
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in IN_FLIGHT:
            total += float(line.rsplit(" ", 1)[1])
    return total


def model_gone(metrics_text: str, now: float) -> bool:
    """Every instance's stub is dead (heartbeat older than STALE_S) or its engine failed for good."""
    heartbeats = [float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(HEARTBEAT)]
    failed = [line for line in metrics_text.splitlines()
              if line.startswith("gemma_engine_state{") and FAILED in line and float(line.rsplit(" ", 1)[1]) == 1]
    return bool(heartbeats) and (all(now - beat > STALE_S for beat in heartbeats) or len(failed) == len(heartbeats))


def drain(metrics_url: str, propagation_s: float, drain_timeout_s: float, poll_s: float = 1.0) -> str:
    """Wait as described above; returns why it stopped waiting: idle, timeout, unreachable or gone."""
    time.sleep(propagation_s)
    deadline = time.monotonic() + drain_timeout_s
    while True:
        try:
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                metrics_text = response.read().decode()
        except OSError:
            return "unreachable"  # the server is gone: nothing left to wait for
        if in_flight(metrics_text) == 0:
            return "idle"
        if model_gone(metrics_text, time.time()):
            return "gone"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(poll_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics-url", default="http://localhost:8002/metrics")
    p.add_argument("--propagation-s", type=float, required=True)
    p.add_argument("--drain-timeout-s", type=float, required=True)
    p.add_argument("--poll-s", type=float, default=1.0)
    args = p.parse_args()
    started = time.monotonic()
    outcome = drain(args.metrics_url, args.propagation_s, args.drain_timeout_s, args.poll_s)
    # Kubernetes shows a hook's output only when the hook fails; this is for running it by hand.
    print(f"drain: {outcome} after {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
