"""Logprobs through the client library (sync and asyncio, streamed and whole) and the CLI."""
from __future__ import annotations

import asyncio

from gemma_client import AsyncGemmaClient, GemmaClient

from tests.support.server import GREEDY
from .test_cli_args import run_cli

PROMPT = "The quick brown fox"


def test_sync_stream_and_generate_carry_aligned_logprobs(server):
    client = GemmaClient(server.grpc_url)
    whole = client.generate(PROMPT, max_tokens=8, logprobs=2, **GREEDY)
    assert [lp.token_id for lp in whole.logprobs] == list(whole.token_ids)
    for lp in whole.logprobs:
        assert len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token_id == lp.token_id  # greedy: the top-1
        assert lp.top_logprobs[0].logprob == lp.logprob <= 0 and lp.rank == 1
    deltas = list(client.stream(PROMPT, max_tokens=8, logprobs=2, **GREEDY))
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas if d.token_ids)
    assert tuple(lp for d in deltas for lp in d.logprobs or ()) == whole.logprobs
    assert client.generate(PROMPT, max_tokens=2, **GREEDY).logprobs is None


def test_async_client_carries_logprobs(server):
    async def run():
        async with AsyncGemmaClient(server.grpc_url) as client:
            whole = await client.generate(PROMPT, max_tokens=6, logprobs=1, **GREEDY)
            streamed = [lp async for d in client.stream(PROMPT, max_tokens=6, logprobs=1, **GREEDY)
                        for lp in d.logprobs or ()]
            return whole, streamed

    whole, streamed = asyncio.run(run())
    assert len(whole.logprobs) == 6 and tuple(streamed) == whole.logprobs


def test_cli_prints_a_logprobs_table_on_stderr(server):
    expected = GemmaClient(server.grpc_url).generate(PROMPT, max_tokens=4, temperature=0.0, logprobs=1)
    result = run_cli("--url", server.grpc_url, "generate", PROMPT, "--max-tokens", "4", "--temperature", "0",
                     "--logprobs", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected.logprobs)
    for line, lp in zip(lines, expected.logprobs):
        token_id, logprob, token, top = line.split("\t")
        assert (int(token_id), float(logprob), token) == (lp.token_id, round(lp.logprob, 4), repr(lp.token))
