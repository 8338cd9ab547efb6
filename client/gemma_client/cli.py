"""`gemma-client`: generate, chat and health-check against a Triton server from the shell."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence, TextIO

import gemma_protocol as protocol

from . import errors
from .chat import Conversation
from .client import DEFAULT_MODEL, DEFAULT_URL, GemmaClient
from .outputs import CompletionBuilder

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code for bad command lines
EXIT_INTERRUPTED = 130

_ERROR_CLASSES = (errors.GemmaClientError, errors.InvalidArgumentError, errors.ConnectionFailedError,
                  errors.UnavailableError, errors.DeadlineExceededError, errors.CancelledError,
                  errors.ModelNotFoundError, errors.AuthenticationError, errors.ServerError)


def _exit_code_doc() -> str:
    rows = [(EXIT_OK, "success"), (EXIT_USAGE, "bad command line"),
            (errors.GemmaClientError.exit_code, "any other client error")]
    rows += [(cls.exit_code, f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}")
             for cls in _ERROR_CLASSES if cls is not errors.GemmaClientError]
    rows.append((EXIT_INTERRUPTED, "interrupted (Ctrl-C); the request is cancelled on the server"))
    return "exit codes:\n" + "\n".join(f"  {code:<4}{text}" for code, text in sorted(rows))


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted both before and after the command (`--url X generate` or `generate --url X`)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection")
    group.add_argument("--url", default=default(DEFAULT_URL),
                       help=f"Triton gRPC endpoint HOST:PORT (default {DEFAULT_URL})")
    group.add_argument("--model", default=default(DEFAULT_MODEL),
                       help=f"model name on the server (default {DEFAULT_MODEL})")
    group.add_argument("--timeout", type=float, default=default(None), metavar="S",
                       help="per-request timeout in seconds (default: none)")
    group.add_argument("--retries", type=int, default=default(0), metavar="N",
                       help="retry a request N times if the connection fails before any token arrived")
    group.add_argument("--header", action="append", default=default([]), metavar="KEY=VALUE",
                       help="extra request header, e.g. 'authorization=Bearer TOKEN'; repeatable")
    group.add_argument("--ssl", action="store_true", default=default(False), help="use TLS")
    group.add_argument("--root-certs", default=default(None), metavar="PEM",
                       help="TLS root certificates file (default: system roots)")
    group.add_argument("--private-key", default=default(None), metavar="PEM", help="TLS client private key file")
    group.add_argument("--cert-chain", default=default(None), metavar="PEM", help="TLS client certificate chain file")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    """One option per `protocol.SAMPLING_FIELDS` entry (--max-tokens, --temperature, --stop, ...)."""
    group = parser.add_argument_group("sampling (server defaults apply to what is not given)")
    for field in protocol.SAMPLING_FIELDS:
        if field.kind is dict:  # structured_outputs: its own options, _structured_options
            continue
        flag = "--" + field.key.replace("_", "-")
        if field.kind is bool and field.default is True:  # e.g. speculate: only turning it off says anything
            group.add_argument("--no-" + field.key.replace("_", "-"), dest=field.key, action="store_false",
                               default=None, help=field.doc)
        elif field.kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=field.doc)
        elif field.is_list:
            group.add_argument(flag, type=field.kind, nargs="+", action="extend",
                               metavar="STR" if field.kind is str else "N",
                               help=f"{field.doc}; repeatable (put them after the prompt, or end with --)")
        else:
            default = "" if field.default is None else f" (server default: {field.default})"
            group.add_argument(flag, type=field.kind, metavar={int: "N", float: "X"}.get(field.kind, "TEXT"),
                               help=field.doc + default)


def _structured_options(parser: argparse.ArgumentParser) -> None:
    """The `structured_outputs` sampling parameter: one constraint on what is generated."""
    group = parser.add_argument_group(
        "structured outputs (at most one of the first five; the output is constrained to it)")
    kinds = group.add_mutually_exclusive_group()
    kinds.add_argument("--json-schema", metavar="FILE",
                       help="JSON that follows this JSON schema: a file, or the schema itself ('{...}')")
    kinds.add_argument("--regex", metavar="PATTERN", help="text that matches this regular expression")
    kinds.add_argument("--choice", action="append", metavar="TEXT",
                       help="exactly one of these strings; repeat for each (--choice yes --choice no)")
    kinds.add_argument("--grammar", metavar="FILE",
                       help="text of this grammar (a file in llguidance's Lark dialect)")
    kinds.add_argument("--json-object", action="store_true", help="any JSON object")
    group.add_argument("--disable-any-whitespace", action="store_true",
                       help="JSON without whitespace between its tokens (with --json-schema, --json-object)")
    group.add_argument("--disable-additional-properties", action="store_true",
                       help="objects hold only the properties their schema names (with --json-schema)")


def _structured_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Optional[dict[str, Any]]:
    """The `structured_outputs` object the options ask for; None without one. A file that cannot be
    read, or a schema that is not JSON, is a bad command line."""
    if not hasattr(args, "json_schema"):  # `health`
        return None
    if args.json_schema is not None:
        text = args.json_schema if args.json_schema.lstrip().startswith("{") else _read(args.json_schema, parser)
        try:
            constraint: dict[str, Any] = {"json": json.loads(text)}
        except ValueError as e:
            parser.error(f"--json-schema {args.json_schema}: not JSON ({e})")
    elif args.regex is not None:
        constraint = {"regex": args.regex}
    elif args.choice:
        constraint = {"choice": args.choice}
    elif args.grammar is not None:
        constraint = {"grammar": _read(args.grammar, parser)}
    elif args.json_object:
        constraint = {"json_object": True}
    else:
        if args.disable_any_whitespace or args.disable_additional_properties:
            parser.error("--disable-any-whitespace and --disable-additional-properties go with "
                         "--json-schema or --json-object")
        return None
    if args.disable_any_whitespace:
        constraint["disable_any_whitespace"] = True
    if args.disable_additional_properties:
        constraint["disable_additional_properties"] = True
    return constraint


def _read(path: str, parser: argparse.ArgumentParser) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        parser.error(f"cannot read {path}: {e.strerror}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-client",
        description="Stream text from a Gemma model served by Triton Inference Server (gRPC).",
        epilog=_exit_code_doc() + "\n\nErrors print one line 'gemma-client: <ErrorType>: <message>' on stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate", help="complete a prompt, printing tokens as they arrive",
        description="Complete PROMPT and print the completion (without the prompt), streamed as it is "
                    "generated, followed by a newline.",
        epilog=_exit_code_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or absent reads it from stdin")
    gen.add_argument("--no-stream", action="store_true",
                     help="ask for the whole completion in one response and print it at the end")
    gen.add_argument("--show-stats", action="store_true",
                     help="print 'finish_reason=... input_tokens=... output_tokens=...' on stderr")
    _sampling_options(gen)
    _structured_options(gen)
    _connection_options(gen, suppress=True)

    chat = commands.add_parser(
        "chat", help="interactive multi-turn chat (reads messages from stdin)",
        description="Multi-turn chat in the Gemma chat format. Each line read from stdin is one user "
                    "message and the reply is streamed to stdout. Works with piped input. "
                    "'/exit' or end of input ends the session; '/reset' forgets the history.",
        epilog=_exit_code_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("--system", metavar="TEXT", help="system instructions (prepended to the first user turn)")
    _sampling_options(chat)
    _structured_options(chat)
    _connection_options(chat, suppress=True)

    health = commands.add_parser(
        "health", help="check that the server and the model are ready",
        description="Print 'ready' and exit 0 when the server and the model are ready; otherwise print "
                    "why on stderr and exit non-zero.",
        epilog=_exit_code_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(health, suppress=True)
    return parser


def _make_client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GemmaClient:
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--header expects KEY=VALUE, got {item!r}")
        headers[key.strip().lower()] = value
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    return GemmaClient(args.url, args.model, timeout=args.timeout, retries=args.retries, headers=headers,
                       ssl=args.ssl, root_certificates=args.root_certs, private_key=args.private_key,
                       certificate_chain=args.cert_chain)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    sampling = {f.key: getattr(args, f.key) for f in protocol.SAMPLING_FIELDS
                if f.kind is not dict and getattr(args, f.key) is not None}
    if args.structured_outputs is not None:
        sampling["structured_outputs"] = args.structured_outputs
    return sampling


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def _generate(client: GemmaClient, args: argparse.Namespace, out: TextIO) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = _sampling(args)
    if args.no_stream:
        completion = client.generate(prompt, **sampling)
        _write(out, completion.text)
    else:
        builder = CompletionBuilder()
        try:
            for delta in client.stream(prompt, **sampling):
                builder.add(delta)
                _write(out, delta.text)
        except BaseException:
            if builder.parts:  # end the partial line; the error goes to stderr
                _write(out, "\n")
            raise
        completion = builder.build()
    _write(out, "\n")
    if completion.logprobs is not None:  # asked for with --logprobs: a table on stderr, stdout stays the text
        _print_logprobs(completion.logprobs)
    if args.show_stats:
        print(f"finish_reason={completion.finish_reason} input_tokens={completion.num_input_tokens} "
              f"output_tokens={completion.num_output_tokens}", file=sys.stderr)
    return EXIT_OK


def _print_logprobs(logprobs) -> None:
    """One line per generated token: id, logprob, text, then the top alternatives."""
    for lp in logprobs:
        top = "  ".join(f"{t.token!r}={t.logprob:.4f}" for t in lp.top_logprobs)
        print(f"{lp.token_id}\t{lp.logprob:.4f}\t{lp.token!r}" + (f"\t{top}" if top else ""), file=sys.stderr)


def _chat(client: GemmaClient, args: argparse.Namespace, out: TextIO) -> int:
    conversation = Conversation(system=args.system)
    interactive = sys.stdin.isatty()
    sampling = _sampling(args)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            return EXIT_OK
        message = line.rstrip("\n")
        command = message.strip()
        if command == "/exit":
            return EXIT_OK
        if command == "/reset":
            conversation.reset()
            continue
        if not command:
            continue
        wrote = False
        try:
            for delta in conversation.send(client, message, **sampling):
                _write(out, delta.text)
                wrote = True
        finally:
            if wrote:
                _write(out, "\n")


def _health(client: GemmaClient, args: argparse.Namespace, out: TextIO) -> int:
    client.check_ready()
    _write(out, "ready\n")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.structured_outputs = _structured_outputs(args, parser)
    client = _make_client(args, parser)
    command = {"generate": _generate, "chat": _chat, "health": _health}[args.command]
    try:
        with client:
            return command(client, args, sys.stdout)
    except errors.GemmaClientError as e:
        message = " ".join(str(e).split())  # one line, whatever the server wrote
        print(f"gemma-client: {type(e).__name__}: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gemma-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (e.g. `| head`); the stream was cancelled
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
