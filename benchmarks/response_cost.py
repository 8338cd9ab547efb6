"""CPU time per streamed response, by process: the gRPC client, the Triton model's stub, the engine.

    python -m benchmarks.response_cost [--checkpoint DIR] [--clients 16] [--max-tokens 300]

Starts a server (the test launcher, the engine in its own process as by default), streams
`--clients` greedy requests at once through one AsyncGemmaClient (as benchmarks.serving's server
target does), and reads the CPU time each of that server's processes used meanwhile (/proc, every
thread; another server on the machine, e.g. a test run's, is not counted). Divided by
the responses streamed, it says what one response costs each side. Why: behind Triton, 64 streams
of a fast engine mean thousands of responses a second. The stub's Python threads and the
benchmark's single client process must each keep up, so this cost bounds the server's throughput
(docs/benchmarks.md, issue #13). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(marker: bytes, session: int) -> float:
    """User + system CPU time of every process of `session` whose command line holds `marker` (the
    server runs in a session of its own: other servers on the machine are not counted)."""
    total = 0.0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                fields = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:  # gone meanwhile
            continue
    return total


async def stream_all(url: str, session: int, clients: int, max_tokens: int) -> dict:
    from gemma_client import AsyncGemmaClient

    client = AsyncGemmaClient(url, timeout=600)
    counts = {"responses": 0, "tokens": 0}

    async def one() -> None:
        async for delta in client.stream("Hello there", max_tokens=max_tokens, temperature=0, ignore_eos=True):
            counts["responses"] += 1
            counts["tokens"] += len(delta.token_ids)

    await asyncio.gather(*[one() for _ in range(4)])  # warm-up: connections, first steps
    counts.update(responses=0, tokens=0)
    stub, engine = cpu_seconds(b"triton_python_backend_stub", session), cpu_seconds(b"backend.engine_process", session)
    own, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*[one() for _ in range(clients)])
    own, wall = time.process_time() - own, time.perf_counter() - start
    stub = cpu_seconds(b"triton_python_backend_stub", session) - stub
    engine = cpu_seconds(b"backend.engine_process", session) - engine
    await client.close()
    n = counts["responses"]
    return {"clients": clients, "responses": n, "tokens": counts["tokens"], "wall_s": round(wall, 2),
            "tokens_per_response": round(counts["tokens"] / n, 2),
            "cpu_us_per_response": {"client": round(1e6 * own / n), "stub": round(1e6 * stub / n),
                                    "engine_process": round(1e6 * engine / n)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint directory (default: the packaged Gemma 3 270M)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=300)
    args = p.parse_args()
    from backend.default_model import ensure_default_checkpoint
    from tests.support.server import start_servers, stop_servers

    checkpoint = args.checkpoint or ensure_default_checkpoint()
    env = {"GEMMA_CHECKPOINT": str(checkpoint), "GEMMA_MAX_NUM_SEQS": str(args.clients)}
    log = Path(tempfile.mkdtemp()) / "server.log"
    (server,) = start_servers((log, env))
    try:
        print(json.dumps(asyncio.run(stream_all(server.grpc_url, server.process.pid, args.clients, args.max_tokens))))
    finally:
        stop_servers([server])


if __name__ == "__main__":
    main()
