"""`gemma-client` command line: help, argument errors and connection errors (no server needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from gemma_client import cli, errors

from .test_errors import closed_port


def run_cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """The installed console script when there is one, else `python -m gemma_client.cli`."""
    script = shutil.which("gemma-client", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "gemma_client.cli"]
    return subprocess.run(command + list(args), input=stdin, capture_output=True, text=True, timeout=timeout)


def test_help_documents_commands_options_and_exit_codes():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("generate", "chat", "health", "--url", "localhost:8001", "--timeout", "--header",
                 "--ssl", "--root-certs", "--retries", "exit codes"):
        assert word in result.stdout, word
    for cls in (errors.InvalidArgumentError, errors.ConnectionFailedError, errors.UnavailableError,
                errors.DeadlineExceededError, errors.CancelledError):
        assert f"{cls.exit_code:<4}{cls.__name__}" in result.stdout


def test_generate_help_documents_sampling_options():
    out = run_cli("generate", "--help").stdout
    for option in ("--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop", "--no-stream",
                   "--timeout"):
        assert option in out, option
    assert "exit codes" in run_cli("chat", "--help").stdout


@pytest.mark.parametrize("args", [
    (), ("generate", "hi", "--max-tokens", "many"), ("bogus",), ("--header", "no-equals-sign", "health"),
    ("generate", "hi", "--retries", "-1"),
])
def test_bad_command_lines_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == "" and "usage" in result.stderr


def test_options_are_accepted_before_and_after_the_command():
    parser = cli.build_parser()
    before = parser.parse_args(["--url", "h:1", "--timeout", "2", "generate", "p"])
    after = parser.parse_args(["generate", "p", "--url", "h:1", "--timeout", "2"])
    assert (before.url, before.timeout) == (after.url, after.timeout) == ("h:1", 2.0)
    default = parser.parse_args(["health"])
    assert default.url == "localhost:8001" and default.model == "gemma" and default.timeout is None


def test_stop_strings_collect_from_one_or_many_flags():
    parser = cli.build_parser()
    assert parser.parse_args(["generate", "p", "--stop", "a", "b"]).stop == ["a", "b"]
    args = parser.parse_args(["generate", "--stop", "a", "--stop", "b", "--", "p"])
    assert (args.stop, args.prompt) == (["a", "b"], "p")


def test_client_side_argument_error_exit_code():
    result = run_cli("--url", f"127.0.0.1:{closed_port()}", "generate", "hi", "--top-k", "3",
                     "--max-tokens", "0")  # types are fine: only the server checks ranges, and it's down
    assert result.returncode == errors.ConnectionFailedError.exit_code


@pytest.mark.parametrize("command", [("generate", "hi"), ("health",), ("chat",)])
def test_connection_refused_is_one_line_on_stderr(command):
    result = run_cli("--url", f"127.0.0.1:{closed_port()}", *command, stdin="hello\n")
    assert result.returncode == errors.ConnectionFailedError.exit_code == 4
    assert result.stderr.startswith("gemma-client: ConnectionFailedError: ")
    assert result.stderr.count("\n") == 1
    assert result.stdout.strip() == ""
