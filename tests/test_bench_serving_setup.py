"""The server-level benchmark's setup, checked on the CPU: the options build one EngineConfig that the
server's model.py rebuilds from the GEMMA_* environment, the random gemma-2b-shaped checkpoint has a
tokenizer and a vocabulary the engine can serve, a request cut short is an error, and client
processes that cannot start say why."""
import asyncio
import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.loader import start_engine
from backend.params import EngineConfig, SamplingParams
from benchmarks import random_checkpoint, run, serving
from benchmarks.stats import Timeline
from serving.config import model_settings

ROOT = Path(__file__).resolve().parents[1]


def _server_settings(monkeypatch, env: dict[str, str]):
    """The settings the server's model builds (initialize) with config.pbtxt and `env`."""
    text = (ROOT / "model_repository/gemma/config.pbtxt").read_text()
    parameters = {key: {"string_value": value} for key, value in
                  re.findall(r'key:\s*"(\w+)",\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)}
    for key in [k for k in os.environ if k.startswith("GEMMA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = {"model_config": json.dumps({"parameters": parameters}), "model_instance_kind": "CPU",
            "model_instance_device_id": "0"}
    return model_settings(args)


@pytest.mark.parametrize("config", [
    EngineConfig(),
    EngineConfig(checkpoint="/models/gemma-2b-random", engine="te", dtype="bfloat16", max_num_seqs=64,
                 kv_cache_bytes=123 << 20, max_model_len=1024),
    EngineConfig(gpu_memory_utilization=0.9),
])
def test_the_server_rebuilds_the_engine_config_of_the_in_process_engine(monkeypatch, config):
    assert _server_settings(monkeypatch, serving.server_env(config)).engine == config


def test_a_setting_the_server_cannot_be_given_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        serving.server_env(EngineConfig(block_size=32))
    assert serving.server_env(EngineConfig(fp8=True))["GEMMA_FP8"] == "True"  # a parameter since FP8 serving


def test_the_callers_serving_settings_reach_the_server(monkeypatch):
    """GEMMA_RESPONDER_THREADS (and GEMMA_ENGINE_PROCESS) set where a benchmark runs reach the server's
    model (the launcher passes the model's GEMMA_* settings only from the environment it is given)."""
    monkeypatch.setenv("GEMMA_RESPONDER_THREADS", "4")
    monkeypatch.setenv("GEMMA_ENGINE_PROCESS", "false")
    env = serving.server_env(EngineConfig())
    assert env["GEMMA_RESPONDER_THREADS"] == "4" and env["GEMMA_ENGINE_PROCESS"] == "false"
    settings = _server_settings(monkeypatch, env)
    assert settings.responder_threads == 4 and not settings.engine_process


def test_gpu_memory_utilization_is_an_engine_option(default_checkpoint):
    args = run.parse_args(["--checkpoint", "/m/gemma-2b", "--gpu-memory-utilization", "0.9"])
    assert run.engine_config(args) == EngineConfig(checkpoint="/m/gemma-2b", gpu_memory_utilization=0.9)


def test_options_set_the_load_and_the_one_engine_config(default_checkpoint):
    args = run.parse_args(["--checkpoint", "/m/gemma-2b", "--engine", "te", "--dtype", "bfloat16",
                           "--max-num-seqs", "64", "--kv-cache-bytes", "1000", "--concurrencies", "1,8,32,64",
                           "--server-tokens", "64", "--requests-per-client", "4", "--server-reps", "3",
                           "--rate", "40", "--open-requests", "160", "--time-limit", "60",
                           "--client-processes", "4"])
    assert run.engine_config(args) == EngineConfig(checkpoint="/m/gemma-2b", engine="te", dtype="bfloat16",
                                                   max_num_seqs=64, kv_cache_bytes=1000)
    assert run.settings(args) == dataclasses.replace(
        run.Settings(), concurrencies=(1, 8, 32, 64), server_tokens=64, requests_per_client=4, server_reps=3,
        rate_per_s=40.0, open_requests=160, time_limit_s=60.0, client_processes=4)
    # No options: what `make bench` always ran (the packaged model, EngineConfig's defaults).
    plain = run.parse_args([])
    assert run.settings(plain) == run.Settings()
    assert run.engine_config(plain) == EngineConfig(checkpoint=str(default_checkpoint))
    assert run.settings(run.parse_args(["--quick", "--rate", "2"])) == dataclasses.replace(run.QUICK, rate_per_s=2.0)
    with pytest.raises(SystemExit):
        run.parse_args(["--client-processes", "0"])


def test_gemma_2b_shapes():
    c = random_checkpoint.gemma_2b_config()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (256000, 2048, 16384, 18, 8, 1, 256)


def test_random_checkpoint_has_the_tokenizer_and_its_vocabulary_and_serves(tmp_path, monkeypatch,
                                                                          default_checkpoint):
    gemma_2b = random_checkpoint.gemma_2b_config
    monkeypatch.setattr(random_checkpoint, "gemma_2b_config",  # gemma-2b's layer types, at a CPU test's size
                        lambda layers, vocab: gemma_2b(layers, vocab, hidden_size=64, intermediate_size=128,
                                                       head_dim=16))
    out = random_checkpoint.main(["--out", str(tmp_path / "ckpt"), "--tokenizer", str(default_checkpoint),
                                  "--layers", "2", "--device", "cpu"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma" and config["num_hidden_layers"] == 2
    assert config["vocab_size"] == 262144  # the Gemma 3 tokenizer's, not gemma-2b's 256000
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()

    engine = start_engine(EngineConfig(checkpoint=str(out), max_num_seqs=2, kv_cache_bytes=4 << 20))
    try:
        assert max(engine.tokenizer.hf_tokenizer.get_vocab().values()) < engine.limits.vocab_size
        result = engine.submit("The capital of France is",
                               SamplingParams(max_tokens=12, **serving.GREEDY)).result()
        assert (result.num_output_tokens, result.finish_reason) == (12, "length")
    finally:
        engine.shutdown()


class _Target:
    """Delivers all tokens in one delta, one fewer for the prompt "short"."""
    name = "fake"

    async def stream(self, prompt, max_tokens, timeline):
        timeline.arrivals.append((time.perf_counter(), max_tokens - (prompt == "short")))


def test_a_request_that_ends_with_fewer_tokens_is_an_error():
    record = serving.measure(_Target(), "closed", ["full", "short"], 5, 10, concurrency=2, num_requests=4)
    assert (record["requests"], record["errors"], record["error_kinds"]) == (4, 2, {"wrong_token_count": 2})
    assert record["client_processes"] == 1  # every server record says how many client processes ran it


def test_client_processes_that_cannot_reach_their_server_fail_at_once_with_each_ones_error():
    with pytest.raises(RuntimeError, match=r"(?s)client process \d+: .*ConnectionFailedError.*client process \d+: "):
        serving.ServerTarget("localhost:1", timeout_s=10, client_processes=2)  # port 1: nothing listens


class _BatchEngine:
    """Stands for an Engine whose receiver thread hands each step's outputs to every running
    request at once, as an engine process's deltas arrive: one token per request and step."""

    def __init__(self, num_requests: int, max_tokens: int):
        self.num_requests, self.max_tokens = num_requests, max_tokens
        self.handles, self.submitted = [], threading.Event()

    def submit(self, prompt, params, on_ready):
        handle = _BatchHandle(on_ready)
        self.handles.append(handle)
        if len(self.handles) == self.num_requests:
            self.submitted.set()
        return handle

    def steps(self) -> None:  # the receiver thread
        self.submitted.wait(10)
        for step in range(self.max_tokens):
            self.deliver_step(step)

    def deliver_step(self, step: int) -> None:
        for handle in self.handles:
            handle.deliver(step, "length" if step == self.max_tokens - 1 else None)


class _BatchHandle:
    def __init__(self, on_ready):
        self.on_ready, self.unread, self.lock = on_ready, [], threading.Lock()

    def deliver(self, token: int, finish_reason) -> None:
        with self.lock:
            self.unread.append((token, finish_reason))
        self.on_ready(self)

    def poll(self):
        with self.lock:
            unread, self.unread = self.unread, []
        if not unread:
            return None
        return SimpleNamespace(token_ids=[t for t, _ in unread], finish_reason=unread[-1][1])

    def cancel(self) -> None:
        pass


def test_engine_direct_reads_a_steps_outputs_in_one_loop_wake_up_not_one_per_request():
    """EngineTarget: what the engine's receiver thread hands over while the event loop is busy waits
    for one wake-up of the loop (a call_soon_threadsafe writes to the loop's self-pipe; one per request
    and step was most of the benchmark process's CPU at 256 clients), and every stream still gets
    every token, stamped when it arrived."""
    engine = _BatchEngine(num_requests=64, max_tokens=5)
    target = serving.EngineTarget(engine)

    async def streams():
        loop = asyncio.get_running_loop()
        wake_ups = 0
        threadsafe = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wake_ups
            wake_ups += 1
            return threadsafe(*args)

        loop.call_soon_threadsafe = counted
        timelines = [Timeline(time.perf_counter()) for _ in range(64)]
        reading = asyncio.gather(*(target.stream("p", 5, timeline) for timeline in timelines))
        while not engine.submitted.is_set():
            await asyncio.sleep(0)
        for step in range(5):
            # The loop is busy (joining) for the whole of the receiver thread's step, as it is when
            # a step's deltas arrive while it serves other work: so the count does not hang on a race.
            receiver = threading.Thread(target=engine.deliver_step, args=(step,))
            receiver.start()
            receiver.join()
            await asyncio.sleep(0)
        await reading
        return timelines, wake_ups

    timelines, wake_ups = asyncio.run(streams())
    assert [sum(n for _, n in t.arrivals) for t in timelines] == [5] * 64
    assert all(t.start <= stamp for t in timelines for stamp, _ in t.arrivals)
    assert wake_ups == 5  # one per step; one per handed-over output was 320


def test_engine_direct_a_stream_cut_at_the_end_of_a_run_does_not_stall_the_next_run():
    """A stream cancelled at a run's time limit gets its final delta after that run's loop has closed
    (handing it over raises there, as it did with a call_soon_threadsafe per read); the next run's
    streams, on a new loop, still get every token."""
    engine = _BatchEngine(num_requests=1, max_tokens=3)
    target = serving.EngineTarget(engine)

    async def cut_short():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(target.stream("p", 3, Timeline(time.perf_counter())), 0.05)

    asyncio.run(cut_short())
    with pytest.raises(RuntimeError, match="closed"):
        engine.handles[0].deliver(0, "cancelled")
    engine.handles, engine.num_requests = [], 4
    engine.submitted.clear()

    async def next_run():
        steps = threading.Thread(target=engine.steps)
        steps.start()
        timelines = [Timeline(time.perf_counter()) for _ in range(4)]
        await asyncio.wait_for(asyncio.gather(*(target.stream("p", 3, t) for t in timelines)), 10)
        steps.join()
        return timelines

    assert [sum(n for _, n in t.arrivals) for t in asyncio.run(next_run())] == [3] * 4
