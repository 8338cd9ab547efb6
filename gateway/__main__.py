"""`python -m gateway`: serve the OpenAI-compatible API with uvicorn (settings.py: environment)."""
from __future__ import annotations

import argparse
import dataclasses
import os

import uvicorn

from .app import create_app
from .settings import DEFAULT_PORT, Settings

# On SIGTERM, open streams get this long to finish; then they are cut, which cancels their Triton
# requests (a container runtime kills the process 10 s after SIGTERM by default).
GRACEFUL_SHUTDOWN_S = 5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--triton-url", help="Triton's gRPC host:port (default: $GEMMA_TRITON_URL or localhost:8001)")
    parser.add_argument("--triton-metrics-url", help="Triton's metrics URL, where /health reads the engine's state, "
                        "or 'none' (default: $GEMMA_TRITON_METRICS_URL, else port 8002 of the --triton-url host)")
    parser.add_argument("--workers", type=int,
                        help="processes serving the port (default: $GEMMA_GATEWAY_WORKERS, else 1)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        given = {"triton_url": args.triton_url, "triton_metrics_url": args.triton_metrics_url, "workers": args.workers}
        settings = dataclasses.replace(settings, **{key: value for key, value in given.items()
                                                    if value is not None and value != ""})
    except ValueError as e:
        parser.error(str(e))
    serve = dict(host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **serve)
        return
    # Worker processes build their app from the environment: the options given here go there first.
    os.environ.update(GEMMA_TRITON_URL=settings.triton_url, GEMMA_TRITON_METRICS_URL=settings.triton_metrics_url)
    uvicorn.run("gateway.app:create_app", factory=True, workers=settings.workers, **serve)


if __name__ == "__main__":
    main()
