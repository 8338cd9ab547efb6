"""`AsyncGemmaClient` against the real tritonserver (tiny Gemma 3)."""
from __future__ import annotations

import asyncio

import pytest

from gemma_client import (AsyncGemmaClient, Conversation, DeadlineExceededError, GemmaClient,
                          InvalidArgumentError, ModelNotFoundError, UnavailableError)

from tests.support.server import GREEDY, LONG
from tests.support.waiting import wait_for

PROMPT = "The quick brown fox"


def run(coro):
    return asyncio.run(coro)


def cancelled_count(server) -> float:
    return server.metric("gemma_requests_total", outcome="cancelled")


def test_async_stream_and_generate_match_the_sync_client(server):
    sync = GemmaClient(server.grpc_url).generate(PROMPT, max_tokens=16, **GREEDY)

    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            assert await client.is_ready()
            whole = await client.generate(PROMPT, max_tokens=16, **GREEDY)
            deltas = [d async for d in client.stream(PROMPT, max_tokens=16, **GREEDY)]
            return whole, deltas

    whole, deltas = run(main())
    assert whole == sync
    assert len(deltas) > 1 and "".join(d.text for d in deltas) == sync.text
    assert deltas[-1].finish_reason == "length" and sum(d.num_output_tokens for d in deltas) == 16


def test_sixteen_concurrent_streams_from_one_loop(idle_server):
    server = idle_server
    prompts = [f"Story {i}: once upon a time" for i in range(16)]
    sync = GemmaClient(server.grpc_url)
    expected = [sync.generate(p, max_tokens=8 + i, **GREEDY).text for i, p in enumerate(prompts)]

    async def one(client, i):
        parts, counts = [], 0
        async for delta in client.stream(prompts[i], max_tokens=8 + i, **GREEDY):
            parts.append(delta.text)
            counts += delta.num_output_tokens  # each response counts its own tokens
        return "".join(parts), counts

    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = run(main())
    assert [text for text, _ in results] == expected
    assert [n for _, n in results] == [8 + i for i in range(16)]


def test_break_aclose_and_task_cancel_cancel_on_the_server(idle_server):
    server = idle_server
    before = cancelled_count(server)

    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            async for _ in client.stream(PROMPT, max_tokens=LONG, **GREEDY):
                break                                                        # 1: break
            deltas = client.stream(PROMPT, max_tokens=LONG, **GREEDY)
            await deltas.__anext__()
            await deltas.aclose()                                            # 2: aclose
            async with client.stream(PROMPT, max_tokens=LONG, **GREEDY) as deltas:
                await deltas.__anext__()                                     # 3: leaving `async with`

            first = asyncio.Event()

            async def reader():
                async for _ in client.stream(PROMPT, max_tokens=LONG, **GREEDY):
                    first.set()

            task = asyncio.create_task(reader())
            await first.wait()
            task.cancel()                                                    # 4: task cancelled
            with pytest.raises(asyncio.CancelledError):
                await task
            # The client is still usable afterwards.
            return await client.generate(PROMPT, max_tokens=3, **GREEDY)

    assert run(main()).num_output_tokens == 3
    assert wait_for(lambda: cancelled_count(server) == before + 4)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)


def test_async_errors(server):
    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            with pytest.raises(InvalidArgumentError, match="max_tokens"):
                await client.generate(PROMPT, max_tokens=0)
            with pytest.raises(DeadlineExceededError):
                async for _ in client.stream(PROMPT, max_tokens=LONG, timeout=0.3, **GREEDY):
                    pass
        async with AsyncGemmaClient(server.grpc_url, model="no-such-model") as client:
            with pytest.raises(ModelNotFoundError):
                await client.generate(PROMPT)
            with pytest.raises(ModelNotFoundError):
                await client.check_ready()
    run(main())


def test_overload_is_unavailable_error(idle_server):
    """More long requests than the tiny server runs plus queues: the surplus is refused."""
    server = idle_server

    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            async def long_request(i):
                try:
                    async for _ in client.stream(f"{PROMPT} {i}", max_tokens=LONG, **GREEDY):
                        pass
                except UnavailableError as e:
                    return e

            tasks = [asyncio.create_task(long_request(i)) for i in range(48)]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=60)
            refused = [t.result() for t in done if t.result() is not None]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return refused

    refused = run(main())
    assert refused and all(isinstance(e, UnavailableError) for e in refused)
    assert refused[0].status == "StatusCode.UNAVAILABLE"
    assert wait_for(lambda: server.metric("gemma_requests_total", outcome="overloaded") > 0)
    # Every cancelled request ended, the queued ones too (blocks alone free up before those do): the
    # tests after this one find room.
    assert wait_for(server.is_idle, timeout=60)


def test_async_conversation(server):
    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            chat = Conversation()
            reply = "".join([d.text async for d in chat.send_async(client, "Hi", max_tokens=5, **GREEDY)])
            return chat, reply

    chat, reply = run(main())
    assert [t.role for t in chat.turns] == ["user", "model"] and chat.turns[1].text == reply.strip()


def test_many_concurrent_failures_leave_the_server_up(server):
    """Errors come back in-band (no `triton_grpc_error` header): with the header, Triton 2.51
    segfaults when streams like these fail concurrently."""
    async def main():
        async with AsyncGemmaClient(server.grpc_url) as client:
            async def bad(i):
                with pytest.raises(InvalidArgumentError):
                    await client.generate(f"{PROMPT} {i}", max_tokens=0)

            async def good(i):
                return await client.generate(f"{PROMPT} {i}", max_tokens=4, **GREEDY)

            for _ in range(5):
                results = await asyncio.gather(*(bad(i) for i in range(24)), *(good(i) for i in range(4)))
                assert all(r.num_output_tokens == 4 for r in results[24:])
            return await client.is_ready()

    assert run(main())
