"""The benchmark's gateway target (benchmarks/serving.py) against the real gateway: every request
counted to exactly its max_tokens, as the direct gRPC target counts the same load."""
from __future__ import annotations

import pytest

# The last one's first token has no text of its own with the tiny model: its chunk comes with the next token.
PROMPTS = ["The quick brown fox", "¿Dónde está la biblioteca? 图书馆在哪里?",
           "Translate to German: The weather is nice today, so we are going for a walk in the park."]


@pytest.mark.parametrize("max_tokens", [1, 12])
def test_gateway_target_counts_every_token_as_the_grpc_target_does(server, gateway, max_tokens):
    from benchmarks import serving  # not in the client image (docker/client.Dockerfile), where this dir skips
    for target in (serving.GatewayTarget(gateway.url, timeout_s=60), serving.ServerTarget(server.grpc_url, 60)):
        try:
            record = serving.measure(target, "closed", PROMPTS, max_tokens, 60, concurrency=3, num_requests=6)
        finally:
            serving.close(target)
        assert (record["system"], record["requests"], record["errors"]) == (target.name, 6, 0), record
        assert record["output_tokens"] == 6 * max_tokens and record["ttft_ms"]["n"] == 6
