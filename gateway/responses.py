"""OpenAI response bodies and stream chunks for completions and chat completions.

Both endpoints build the same things from the same deltas - a whole response, or chunks sharing one
id, `created` and `model` - and differ only in how a choice looks: `text` for completions, a
`message` (or, streamed, a `delta` opened by the assistant role) for chat. Logprobs, when asked for,
come in each endpoint's own OpenAI shape, for the tokens of the text they travel with (a choice that
ends on EOS has that token last; its text is the special token's, e.g. "<end_of_turn>").
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import AsyncIterator, Optional, Sequence

from gemma_client import Delta, GemmaClientError, Logprob, TokenLogprobs

from .choices import Choices
from .errors import from_client_error
from .sampling import ChoiceRequest
from .sse import DONE, event
from .tools import CallArguments, CallStart, Content, Parser, ToolPlan, call_id

log = logging.getLogger("gateway")


class Usage:
    """A request's token counts, as the server reports them: each prompt once, every choice's output.

    Each response reports its own tokens, so a choice's output is their sum. Cached tokens count per
    prompt, as its tokens do: the fewest any of its choices found in the prefix cache. The choices
    run at once, so a later one may find blocks an earlier one just wrote; the prompt counts once,
    as the choice that computed the most of it saw it."""

    def __init__(self, requests: Sequence[ChoiceRequest]):
        self._prompt_of = {r.index: r.prompt_index for r in requests}
        self._prompt_tokens: dict[int, int] = {}  # by prompt
        self._output_tokens: dict[int, int] = {}  # by choice
        self._cached_tokens: dict[int, int] = {}  # by choice: the latest report

    def add(self, index: int, delta: Delta) -> None:
        if delta.num_input_tokens is not None:
            self._prompt_tokens[self._prompt_of[index]] = delta.num_input_tokens
        if delta.num_output_tokens is not None:
            self._output_tokens[index] = self._output_tokens.get(index, 0) + delta.num_output_tokens
        if delta.num_cached_tokens is not None:
            self._cached_tokens[index] = delta.num_cached_tokens

    def body(self) -> dict:
        prompt, completion = sum(self._prompt_tokens.values()), sum(self._output_tokens.values())
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self._cached_tokens:  # vLLM's `prompt_tokens_details`; absent when the server does not say
            cached_by_prompt: dict[int, int] = {}
            for index, cached in self._cached_tokens.items():
                prompt_index = self._prompt_of[index]
                cached_by_prompt[prompt_index] = min(cached, cached_by_prompt.get(prompt_index, cached))
            usage["prompt_tokens_details"] = {"cached_tokens": sum(cached_by_prompt.values())}
        return usage


class ResponseFormat:
    object: str        # a whole response's `object`
    chunk_object: str  # a stream chunk's
    id_prefix: str

    def __init__(self, model: str):
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, wholes: Sequence[Delta], requests: Sequence[ChoiceRequest]) -> dict:
        """A whole response; `wholes[i]` is choice i's whole text (Choices with stream=False)."""
        usage = Usage(requests)
        for index, whole in enumerate(wholes):
            usage.add(index, whole)
        return {**self.head(self.object), "choices": [self.choice(i, w) for i, w in enumerate(wholes)],
                "usage": usage.body()}

    def choice(self, index: int, whole: Delta) -> dict:
        raise NotImplementedError

    def opening_choices(self, count: int) -> list[dict]:
        """Stream chunks' choices before any text."""
        return []

    def chunk_choices(self, index: int, delta: Delta) -> list[dict]:
        """Stream chunks' choices for one delta of choice `index` (one chunk each)."""
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str):
        super().__init__(model)
        self._text_lengths: dict[int, int] = {}  # per choice: text sent so far (for text_offset)

    def choice(self, index: int, whole: Delta) -> dict:
        start = self._text_lengths.get(index, 0)
        self._text_lengths[index] = start + len(whole.text)
        logprobs = None if whole.logprobs is None else _completion_logprobs(whole.logprobs, start)
        return {"index": index, "text": whole.text, "logprobs": logprobs, "finish_reason": whole.finish_reason}

    def chunk_choices(self, index: int, delta: Delta) -> list[dict]:
        return [self.choice(index, delta)] if delta.text or delta.finish_reason or delta.logprobs else []


def _completion_logprobs(logprobs: Sequence[TokenLogprobs], start: int) -> dict:
    """The legacy completions shape: parallel lists, top alternatives as {token text: logprob}.
    text_offset adds up token texts from where the choice's text stood (the special EOS text too)."""
    offsets = [start]
    for lp in logprobs[:-1]:
        offsets.append(offsets[-1] + len(lp.token))
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in logprobs],
            "text_offset": offsets}


class ChatFormat(ResponseFormat):
    """Chat choices; with `tools` (a tools.ToolPlan) each choice's text goes through its parser,
    which turns tool calls into `tool_calls` (tools.py)."""
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, model: str, tools: Optional[ToolPlan] = None):
        super().__init__(model)
        self._tools = tools
        self._streams: dict[int, _ToolStream] = {}  # per choice, when streaming with tools

    def choice(self, index: int, whole: Delta) -> dict:
        message: dict = {"role": "assistant", "content": whole.text}
        finish_reason = whole.finish_reason
        if self._tools is not None:
            parser = self._tools.parser()
            pieces = parser.feed(whole.text) + parser.end()
            calls: list[dict] = []
            for piece in pieces:
                if isinstance(piece, CallStart):
                    calls.append({"id": call_id(), "type": "function",
                                  "function": {"name": piece.name, "arguments": ""}})
                elif isinstance(piece, CallArguments):
                    calls[piece.index]["function"]["arguments"] += piece.text
            content = "".join(piece.text for piece in pieces if isinstance(piece, Content))
            message["content"] = content if content.strip() or not calls else None
            if calls:
                message["tool_calls"] = calls
            finish_reason = self._finish_reason(parser, finish_reason)
        return {"index": index, "message": message, "logprobs": _chat_logprobs(whole.logprobs),
                "finish_reason": finish_reason}

    def opening_choices(self, count: int) -> list[dict]:
        # A forced call (tool_choice required or named) has no content, as OpenAI's.
        content = None if self._tools is not None and self._tools.mode != "auto" else ""
        return [_chat_delta(i, {"role": "assistant", "content": content}) for i in range(count)]

    def chunk_choices(self, index: int, delta: Delta) -> list[dict]:
        if self._tools is not None:
            return self._tool_chunk_choices(index, delta)
        # As OpenAI: text in `delta.content` chunks (with their tokens' logprobs), then an empty delta
        # carrying the finish_reason.
        chunks = [_chat_delta(index, {"content": delta.text}, logprobs=_chat_logprobs(delta.logprobs))] \
            if delta.text or delta.logprobs else []
        if delta.finish_reason:
            chunks.append(_chat_delta(index, {}, delta.finish_reason))
        return chunks

    def _tool_chunk_choices(self, index: int, delta: Delta) -> list[dict]:
        """As OpenAI streams tool calls: a call's first chunk has its index, id, type, name and empty
        arguments; the next ones fragments of the arguments; the last chunk finish_reason
        "tool_calls". A delta's logprobs go with the first chunk made of it (or a later one, when
        the parser holds the text back)."""
        stream = self._streams.setdefault(index, _ToolStream(self._tools.parser()))
        if delta.logprobs:
            stream.logprobs += delta.logprobs
        pieces = stream.parser.feed(delta.text)
        if delta.finish_reason:
            pieces += stream.parser.end()
        chunks = []
        for piece in pieces:
            if isinstance(piece, Content):
                chunk_delta = {"content": piece.text}
            elif isinstance(piece, CallStart):
                chunk_delta = {"tool_calls": [{"index": piece.index, "id": call_id(), "type": "function",
                                               "function": {"name": piece.name, "arguments": ""}}]}
            else:
                chunk_delta = {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}
            chunks.append(_chat_delta(index, chunk_delta, logprobs=stream.take_logprobs()))
        if delta.finish_reason:
            chunks.append(_chat_delta(index, {}, self._finish_reason(stream.parser, delta.finish_reason),
                                      logprobs=stream.take_logprobs()))
        return chunks

    def _finish_reason(self, parser: Parser, finish_reason: Optional[str]) -> Optional[str]:
        """"tool_calls" when the choice made calls and they are whole: a constrained output that
        completed its grammar ("stop"), or any call the auto parser read (it reads only whole ones).
        A forced call cut by max_tokens stays "length", its arguments cut short."""
        if parser.calls and (finish_reason == "stop" or self._tools.mode == "auto"):
            return "tool_calls"
        return finish_reason


class _ToolStream:
    def __init__(self, parser: Parser):
        self.parser = parser
        self.logprobs: list[TokenLogprobs] = []  # not sent yet

    def take_logprobs(self) -> Optional[dict]:
        logprobs, self.logprobs = self.logprobs, []
        return _chat_logprobs(logprobs) if logprobs else None


def _chat_delta(index: int, delta: dict, finish_reason: Optional[str] = None,
                logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _chat_logprobs(logprobs: Optional[Sequence[TokenLogprobs]]) -> Optional[dict]:
    if logprobs is None:
        return None
    return {"content": [{**_chat_token(lp), "top_logprobs": [_chat_token(t) for t in lp.top_logprobs]}
                        for lp in logprobs], "refusal": None}


def _chat_token(lp: Logprob) -> dict:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8"))}


async def stream_events(fmt: ResponseFormat, choices: Choices, requests: Sequence[ChoiceRequest],
                        include_usage: bool, prompt_param: str,
                        constraint_param: Optional[str] = None) -> AsyncIterator[bytes]:
    """The SSE events of a streamed response. A choice failing mid-stream ends the stream with an
    error event (as OpenAI's): the status code has gone out already. Whoever sends the events
    closes `choices` (EventStream's `release`)."""
    head = fmt.head(fmt.chunk_object)
    if include_usage:  # OpenAI: every chunk has `usage`, null but in the last one
        head["usage"] = None
    usage = Usage(requests)
    try:
        for choice in fmt.opening_choices(len(requests)):
            yield event({**head, "choices": [choice]})
        async for index, delta in choices:
            usage.add(index, delta)
            for choice in fmt.chunk_choices(index, delta):
                yield event({**head, "choices": [choice]})
        if include_usage:
            yield event({**head, "choices": [], "usage": usage.body()})
    except GemmaClientError as e:
        error = from_client_error(e, prompt_param, constraint_param)
        log.warning("stream %s ended by an error: %s %s", fmt.id, error.status, error.message)
        yield event(error.body())
    yield DONE
