#!/usr/bin/env bash
# End-to-end tests: tests/integration against a real tritonserver, through the gRPC/HTTP clients.
#   bash scripts/e2e.sh [pytest args]
# With no GEMMA_TEST_SERVER_URL the tests' fixture starts its own tritonserver on this machine (CI,
# `make test`). With GEMMA_TEST_SERVER_URL=host:8001 (and GEMMA_TEST_HTTP_URL=host:8000,
# GEMMA_TEST_METRICS_URL=host:8002) the same tests run against that server instead: docker compose's
# client service points them at the triton service this way (docs/deploy.md).
# --confcutdir keeps pytest to tests/integration's own conftest.py, so the client image, which has no
# torch, runs exactly what CI runs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
cd "$root"
exec "$python" -m pytest -q --confcutdir=tests/integration tests/integration "$@"
