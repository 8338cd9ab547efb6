"""Helpers for the client tests; the `server` fixtures come from tests/integration/conftest.py,
so the whole integration run shares one set of tritonservers."""
from __future__ import annotations

# Greedy and EOS ignored: outputs are reproducible and exactly max_tokens long.
GREEDY = dict(temperature=0.0, ignore_eos=True)
# A request that runs long past anything a test waits for, yet fits the tiny server's context
# (GEMMA_MAX_MODEL_LEN in tests/integration/conftest.py) with a short prompt.
LONG = 400

