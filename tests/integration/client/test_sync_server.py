"""`GemmaClient` against the real tritonserver (tiny Gemma 3)."""
from __future__ import annotations

import threading

import pytest

from gemma_client import (ConnectionFailedError, Conversation, DeadlineExceededError, GemmaClient,
                          InvalidArgumentError, ModelNotFoundError)
from gemma_client.outputs import CompletionBuilder

from tests.support.server import GREEDY, LONG
from tests.support.waiting import wait_for
from .tcp_proxy import TcpProxy

PROMPT = "The quick brown fox"


def cancelled_count(server) -> float:
    return server.metric("gemma_requests_total", outcome="cancelled")


def test_stream_and_generate_give_the_same_completion(server):
    client = GemmaClient(server.grpc_url)
    whole = client.generate(PROMPT, max_tokens=16, **GREEDY)
    deltas = list(client.stream(PROMPT, max_tokens=16, **GREEDY))
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == whole.text and whole.text
    assert [t for d in deltas for t in d.token_ids] == list(whole.token_ids)
    assert whole.finish_reason == deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert all(d.num_output_tokens == len(d.token_ids) for d in deltas)  # each response counts its own
    assert whole.num_output_tokens == sum(d.num_output_tokens for d in deltas) == len(whole.token_ids) == 16
    assert whole.num_input_tokens == deltas[-1].num_input_tokens > 0
    assert whole.num_cached_tokens is None  # not asked for (GemmaClient(cached_tokens=True) asks)
    assert not whole.text.startswith(PROMPT)  # exclude_input_in_output is always sent


def test_a_completion_folded_from_many_responses_counts_every_token(server):
    client = GemmaClient(server.grpc_url)
    deltas = list(client.stream(PROMPT, max_tokens=40, **GREEDY))
    builder = CompletionBuilder()  # what the CLI folds a stream with
    for delta in deltas:
        builder.add(delta)
    completion = builder.build()
    assert len(deltas) > 1
    assert completion.num_output_tokens == len(completion.token_ids) == 40
    assert completion.text == client.generate(PROMPT, max_tokens=40, **GREEDY).text


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(server):
    client = GemmaClient(server.grpc_url, cached_tokens=True)
    prompt = " ".join(f"Item {i} is a word." for i in range(30))  # several 16-token KV blocks
    first = client.generate(prompt, max_tokens=2, **GREEDY)
    again = client.generate(prompt, max_tokens=2, **GREEDY)
    assert 0 < again.num_cached_tokens < again.num_input_tokens == first.num_input_tokens
    assert again.text == first.text


def test_seeded_sampling_is_reproducible(server):
    client = GemmaClient(server.grpc_url)
    a = client.generate(PROMPT, max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    b = client.generate(PROMPT, max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_stop_string_ends_generation(server):
    client = GemmaClient(server.grpc_url)
    full = client.generate(PROMPT, max_tokens=24, **GREEDY).text
    stop = full[len(full) // 2:][:3]
    assert stop.strip(), "need a non-blank stop string from the greedy text"
    cut = client.generate(PROMPT, max_tokens=24, stop=[stop], **GREEDY)
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)]  # the stop string itself is not returned


def test_breaking_out_of_a_stream_cancels_it_on_the_server(idle_server):
    server, client = idle_server, GemmaClient(idle_server.grpc_url)
    before = cancelled_count(server)
    for delta in client.stream(PROMPT, max_tokens=LONG, **GREEDY):
        break
    assert wait_for(lambda: cancelled_count(server) == before + 1)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)
    assert client.generate(PROMPT, max_tokens=4, **GREEDY).num_output_tokens == 4  # still serving


def test_closing_or_raising_in_the_loop_cancels(idle_server):
    server, client = idle_server, GemmaClient(idle_server.grpc_url)
    before = cancelled_count(server)
    deltas = client.stream(PROMPT, max_tokens=LONG, **GREEDY)
    next(deltas)
    deltas.close()
    with pytest.raises(KeyError):
        for delta in client.stream(PROMPT, max_tokens=LONG, **GREEDY):
            raise KeyError("caller's own error")
    assert wait_for(lambda: cancelled_count(server) == before + 2)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)


def test_timeout_raises_deadline_exceeded_and_cancels(idle_server):
    server, client = idle_server, GemmaClient(idle_server.grpc_url)
    before = cancelled_count(server)
    with pytest.raises(DeadlineExceededError):
        client.generate(PROMPT, max_tokens=LONG, timeout=0.3, **GREEDY)
    received = []
    # Long enough for a first token on a loaded CPU (~0.3 s seen with other suites running), far
    # short of LONG tokens.
    with pytest.raises(DeadlineExceededError):
        for delta in GemmaClient(server.grpc_url, timeout=2.0).stream(PROMPT, max_tokens=LONG, **GREEDY):
            received.append(delta)
    assert received, "the stream timed out before its first token: the test proves nothing"
    assert wait_for(lambda: cancelled_count(server) == before + 2)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)


@pytest.mark.parametrize("sampling, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(max_tokens=5000), "max_tokens"),  # beyond the tiny server's context
])
def test_values_only_the_server_can_judge_are_invalid_argument(server, sampling, field):
    with pytest.raises(InvalidArgumentError, match=field) as info:
        GemmaClient(server.grpc_url).generate(PROMPT, **sampling)
    # No gRPC status in a stream: the status comes from the model's tag, which is not in the message.
    assert info.value.status == "StatusCode.INVALID_ARGUMENT"
    assert not info.value.message.startswith("[")


def test_raw_unknown_key_and_empty_prompt_are_invalid_argument(server):
    lax = GemmaClient(server.grpc_url, strict_sampling=False)  # sends unknown keys as they are
    with pytest.raises(InvalidArgumentError, match="bogus_key"):
        lax.generate(PROMPT, bogus_key=1)
    with pytest.raises(InvalidArgumentError, match="text_input"):
        next(GemmaClient(server.grpc_url).stream("", max_tokens=4))


def test_unknown_model(server):
    client = GemmaClient(server.grpc_url, model="no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        client.generate(PROMPT)
    with pytest.raises(ModelNotFoundError):
        client.check_ready()
    assert client.is_ready() is False


def test_ready(server):
    with GemmaClient(server.grpc_url, headers={"x-api-key": "ignored-by-triton"}) as client:
        assert client.is_ready() is True
        client.check_ready(timeout=5)
        assert client.generate(PROMPT, max_tokens=2, headers={"x-trace": "1"}).num_output_tokens is not None


def test_tls_against_a_plaintext_server_fails_to_connect(server):
    with pytest.raises(ConnectionFailedError):
        GemmaClient(server.grpc_url, ssl=True).generate(PROMPT, max_tokens=2)


def test_retry_connects_once_the_server_is_reachable(server):
    proxy = TcpProxy(server.grpc_url)  # not listening yet: connections are refused
    try:
        client = GemmaClient(proxy.url, retries=5, retry_backoff=0.2)
        with pytest.raises(ConnectionFailedError):
            GemmaClient(proxy.url).generate(PROMPT, max_tokens=2)  # no retries: fails at once
        threading.Timer(0.3, proxy.start).start()
        completion = client.generate(PROMPT, max_tokens=4, **GREEDY)
        assert completion.num_output_tokens == 4 and proxy.connections >= 1
    finally:
        proxy.stop()


def test_connection_lost_mid_stream_is_not_retried(idle_server):
    server = idle_server
    proxy = TcpProxy(server.grpc_url).start()
    before = cancelled_count(server)
    received = []
    try:
        client = GemmaClient(proxy.url, retries=3, retry_backoff=0.05)
        with pytest.raises(ConnectionFailedError):
            for delta in client.stream(PROMPT, max_tokens=LONG, **GREEDY):
                received.append(delta)
                if len(received) == 2:
                    proxy.drop_connections()
        assert len(received) >= 2 and proxy.connections == 1  # tokens had arrived: no second attempt
    finally:
        proxy.stop()
    assert wait_for(lambda: cancelled_count(server) == before + 1)  # the server noticed the lost client
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)


def test_threads_share_one_client(server):
    client = GemmaClient(server.grpc_url)
    expected = {i: client.generate(f"{PROMPT} {i}", max_tokens=8, **GREEDY).text for i in range(4)}
    got: dict[int, str] = {}

    def run(i: int) -> None:
        got[i] = "".join(d.text for d in client.stream(f"{PROMPT} {i}", max_tokens=8, **GREEDY))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


def test_conversation_records_turns_and_builds_on_them(server):
    client = GemmaClient(server.grpc_url)
    chat = Conversation(system="You are terse.")
    first = "".join(d.text for d in chat.send(client, "Hello", max_tokens=6, **GREEDY))
    assert [t.role for t in chat.turns] == ["user", "model"] and chat.turns[1].text == first.strip()
    prompt_2 = Conversation(chat.system, chat.turns + []).render(add_generation_prompt=False)
    deltas = list(chat.send(client, "And then?", max_tokens=6, **GREEDY))
    assert [t.role for t in chat.turns] == ["user", "model"] * 2
    # The second request's prompt held the first exchange: its prompt is longer than a fresh one.
    fresh = Conversation(system="You are terse.")
    fresh_deltas = list(fresh.send(client, "And then?", max_tokens=6, **GREEDY))
    assert deltas[-1].num_input_tokens > fresh_deltas[-1].num_input_tokens
    assert chat.render(add_generation_prompt=False).startswith(prompt_2)


def test_conversation_keeps_nothing_from_a_failed_send(server):
    chat = Conversation()
    with pytest.raises(InvalidArgumentError):
        list(chat.send(GemmaClient(server.grpc_url), "Hi", max_tokens=0))
    assert chat.turns == []
