"""The gateway's settings: environment variables, each with a default (docs/gateway.md lists them)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_PORT = 9000


@dataclass(frozen=True)
class Settings:
    triton_url: str = "localhost:8001"    # Triton's gRPC endpoint
    triton_model: str = "gemma"           # the model's name in Triton's repository
    served_model_name: str = "gemma"      # the model id clients ask for and /v1/models lists
    api_key: Optional[str] = None         # when set, requests need `Authorization: Bearer <key>`
    max_body_bytes: int = 1 << 20         # larger request bodies get 413
    max_choices: int = 16                 # n x prompts per request: each choice is a Triton request
    # Triton's /metrics, where /health reads the engine's state: "" means port 8002 of triton_url's
    # host; "none" reads Triton's readiness alone (behind a balancer over several servers, whose own
    # probes take a server with a failed engine out: deploy/k8s).
    triton_metrics_url: str = ""
    # Processes serving the port, each with its own event loop and gRPC channel: one process spends
    # ~0.3 ms of CPU per streamed token (docs/benchmarks.md), so it caps a GPU server's streams.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.triton_metrics_url not in ("", "none") and \
                not self.triton_metrics_url.startswith(("http://", "https://")):
            raise ValueError(f"the Triton metrics URL (GEMMA_TRITON_METRICS_URL, --triton-metrics-url) must be "
                             f"http(s)://host:port/metrics or 'none', got {self.triton_metrics_url!r}")
        if self.workers < 1:
            raise ValueError(f"the gateway's workers (GEMMA_GATEWAY_WORKERS, --workers) must be >= 1, got {self.workers}")

    def engine_metrics_url(self) -> Optional[str]:
        """Where /health reads the engine's state; None: not read."""
        if self.triton_metrics_url == "none":
            return None
        return self.triton_metrics_url or f"http://{self.triton_url.rpartition(':')[0]}:8002/metrics"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        model = env.get("GEMMA_TRITON_MODEL") or cls.triton_model
        return cls(
            triton_url=env.get("GEMMA_TRITON_URL") or cls.triton_url,
            triton_model=model,
            served_model_name=env.get("GEMMA_SERVED_MODEL_NAME") or model,
            api_key=env.get("GEMMA_API_KEY") or None,
            max_body_bytes=int(env.get("GEMMA_GATEWAY_MAX_BODY_BYTES") or cls.max_body_bytes),
            max_choices=int(env.get("GEMMA_GATEWAY_MAX_CHOICES") or cls.max_choices),
            triton_metrics_url=env.get("GEMMA_TRITON_METRICS_URL") or cls.triton_metrics_url,
            workers=int(env.get("GEMMA_GATEWAY_WORKERS") or cls.workers),
        )
