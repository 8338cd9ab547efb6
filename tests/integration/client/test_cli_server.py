"""`gemma-client` as a subprocess against the real tritonserver: output and exit codes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from gemma_client import Conversation, GemmaClient, errors

from tests.support.server import GREEDY, LONG
from tests.support.waiting import wait_for
from .test_cli_args import run_cli

PROMPT = "The quick brown fox"
GREEDY_FLAGS = ("--temperature", "0")


def test_generate_prints_the_completion_then_a_newline(server):
    # Without ignore_eos (the CLI has no flag for it): the completion may stop early, identically.
    expected = GemmaClient(server.grpc_url).generate(PROMPT, max_tokens=12, temperature=0.0).text
    streamed = run_cli("--url", server.grpc_url, "generate", PROMPT, "--max-tokens", "12", *GREEDY_FLAGS)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected + "\n" and streamed.stderr == ""
    whole = run_cli("generate", PROMPT, "--no-stream", "--max-tokens", "12", *GREEDY_FLAGS, "--url", server.grpc_url)
    assert (whole.returncode, whole.stdout) == (0, expected + "\n")


def test_generate_reads_the_prompt_from_stdin_and_shows_stats(server):
    expected = GemmaClient(server.grpc_url).generate(PROMPT, max_tokens=5, temperature=0.0)
    result = run_cli("--url", server.grpc_url, "generate", "--max-tokens", "5", *GREEDY_FLAGS, "--show-stats",
                     stdin=PROMPT)
    assert result.returncode == 0 and result.stdout == expected.text + "\n"
    assert result.stderr.strip() == (f"finish_reason={expected.finish_reason} input_tokens="
                                     f"{expected.num_input_tokens} output_tokens={expected.num_output_tokens}")


def test_sampling_flags_reach_the_server(server):
    client = GemmaClient(server.grpc_url)
    expected = client.generate(PROMPT, max_tokens=6, temperature=0.8, top_p=0.9, top_k=40, seed=3,
                               repetition_penalty=1.2, min_tokens=6).text
    result = run_cli("--url", server.grpc_url, "generate", PROMPT, "--max-tokens", "6", "--temperature", "0.8",
                     "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--repetition-penalty", "1.2",
                     "--min-tokens", "6")
    assert result.stdout == expected + "\n"
    ids = client.generate(PROMPT, max_tokens=5, **GREEDY).token_ids
    cut = run_cli("--url", server.grpc_url, "generate", PROMPT, "--max-tokens", "5", "--ignore-eos",
                  *GREEDY_FLAGS, "--stop-token-ids", str(ids[2]), "--show-stats")
    stops_after = ids.index(ids[2]) + 1  # the stop id's first occurrence (greedy text may repeat)
    assert "finish_reason=stop" in cut.stderr and f"output_tokens={stops_after}" in cut.stderr
    full = client.generate(PROMPT, max_tokens=16, **GREEDY).text
    stop = full[8:11]
    cut = client.generate(PROMPT, max_tokens=16, temperature=0.0, stop=[stop]).text
    result = run_cli("--url", server.grpc_url, "generate", PROMPT, "--max-tokens", "16", *GREEDY_FLAGS,
                     "--stop", stop, "never-appears-xyz")
    assert result.stdout == cut + "\n"


def test_health(server):
    result = run_cli("--url", server.grpc_url, "health")
    assert (result.returncode, result.stdout) == (0, "ready\n")
    result = run_cli("--url", server.grpc_url, "--model", "no-such-model", "health")
    assert result.returncode == errors.ModelNotFoundError.exit_code
    assert result.stderr.startswith("gemma-client: ModelNotFoundError: ") and result.stderr.count("\n") == 1


def test_error_exit_codes(server):
    invalid = run_cli("--url", server.grpc_url, "generate", PROMPT, "--max-tokens", "0")
    assert invalid.returncode == errors.InvalidArgumentError.exit_code == 3
    assert invalid.stderr.startswith("gemma-client: InvalidArgumentError: ") and "max_tokens" in invalid.stderr
    assert invalid.stderr.count("\n") == 1 and invalid.stdout == ""

    timeout = run_cli("--url", server.grpc_url, "--timeout", "0.5", "generate", PROMPT, "--max-tokens", str(LONG),
                      "--ignore-eos", *GREEDY_FLAGS)
    assert timeout.returncode == errors.DeadlineExceededError.exit_code == 6
    assert timeout.stderr.startswith("gemma-client: DeadlineExceededError: ")
    assert timeout.stdout.endswith("\n")  # a partial line is ended before the error

    missing = run_cli("--url", server.grpc_url, "--model", "no-such-model", "generate", PROMPT)
    assert missing.returncode == errors.ModelNotFoundError.exit_code


def test_chat_over_piped_stdin(server):
    client = GemmaClient(server.grpc_url)
    chat = Conversation(system="Be brief.")
    replies = ["".join(d.text for d in chat.send(client, message, max_tokens=6, temperature=0.0))
               for message in ("Hello", "Tell me more")]
    result = run_cli("--url", server.grpc_url, "chat", "--system", "Be brief.", "--max-tokens", "6",
                     *GREEDY_FLAGS, stdin="Hello\nTell me more\n/exit\nnever sent\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(r + "\n" for r in replies if r)
    at_eof = run_cli("--url", server.grpc_url, "chat", "--max-tokens", "3", *GREEDY_FLAGS, stdin="Hello\n")
    assert at_eof.returncode == 0 and at_eof.stderr == ""


def test_chat_error_exits_with_its_code(server):
    result = run_cli("--url", server.grpc_url, "chat", "--max-tokens", "0", stdin="Hello\n")
    assert result.returncode == errors.InvalidArgumentError.exit_code
    assert result.stderr.startswith("gemma-client: InvalidArgumentError: ")


def test_ctrl_c_cancels_the_request_and_exits_130(idle_server):
    server = idle_server
    before = server.metric("gemma_requests_total", outcome="cancelled")
    # The CLI as a user's shell starts it, with Ctrl-C's default action: a suite started in the
    # background (`make test &`) hands its children SIGINT ignored, which Python then keeps ignoring.
    interruptible = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "runpy.run_module('gemma_client.cli', run_name='__main__', alter_sys=True)")
    process = subprocess.Popen(
        [sys.executable, "-c", interruptible, "--url", server.grpc_url, "generate", PROMPT,
         "--max-tokens", str(LONG), "--ignore-eos", *GREEDY_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout.read(1), "no output before the interrupt"  # tokens are flowing
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err == "gemma-client: interrupted\n"
    assert out.endswith("\n"), repr(out)  # the partial line is ended
    # At least: the engine reports idle (the idle_server fixture) before the responder has sent the
    # final outputs of earlier tests' requests, so one cancelled earlier may still be counted now.
    assert wait_for(lambda: server.metric("gemma_requests_total", outcome="cancelled") >= before + 1)
    assert wait_for(lambda: server.metric("gemma_kv_blocks_used") == 0)
