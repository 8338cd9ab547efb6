"""What a request produces, on the consumer's side of the engine.

The engine thread only appends token ids (`TokenDelta`). Turning them into text - incremental
detokenizing and stop strings - is the consumer's work (`OutputProcessor`, run by whoever reads a
`RequestHandle`: the Triton responder thread, an iterator), so it never delays a model step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

from .params import SamplingParams, TokenLogprobs
from .tokenizer import TextStream, Tokenizer


class RequestPhases(NamedTuple):
    """A finished sequence's time in vLLM's request phases, in seconds, by the engine's clock: queued
    until its first step (queue), from that step's start to its first token (prefill: chunks, and
    any wait for the steps of others), and from there to its end (decode). vLLM's inference time is
    prefill + decode."""
    queue_s: float
    prefill_s: float
    decode_s: float


class TokenDelta(NamedTuple):
    """Tokens a sequence generated since its previous delta, as the engine thread reports them. A
    tuple: the engine thread makes one per running sequence each step, and an engine process pickles
    them to its parent, which unpickles them; a tuple costs a third of a frozen dataclass each way."""
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop": the last token is an EOS or stop id
    error: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    logprobs: Optional[list[TokenLogprobs]] = None  # one per token id, if the request asked for them
    # With finish_reason "stop": the last token is the EOS or stop id that ended it (no text of its
    # own); False when a structured-outputs grammar completed on a token of the text.
    ends_with_stop_id: bool = True
    phases: Optional[RequestPhases] = None  # on a sequence's last delta, if it got a first token


@dataclass(frozen=True)
class RequestOutput:
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    num_prompt_tokens: int
    num_output_tokens: int
    # None while running: "stop", "length", "cancelled", "error", or "invalid" (refused by the engine
    # after it was queued: its structured-outputs constraint did not compile; `error` says why)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # One per token id (the EOS / stop id too), if the request asked for logprobs; else None.
    logprobs: Optional[list[TokenLogprobs]] = None
    # On the last output, where the engine ended the sequence (not where the front found a stop string).
    phases: Optional[RequestPhases] = None

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """This output and the request's next one as a single output (for a consumer that fell
        behind and delivers what has accumulated at once)."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return RequestOutput(self.text + later.text, self.token_ids + later.token_ids, later.num_prompt_tokens,
                             later.num_output_tokens, later.finish_reason, later.error, later.num_cached_tokens,
                             logprobs, later.phases)


class OutputProcessor:
    """One request's token deltas -> RequestOutputs with text; finds stop strings.

    `stopped_by_text` turns True when a stop string appeared: the output then ends there with
    finish_reason "stop", and the caller must stop the sequence in the engine (tokens it generated
    meanwhile are dropped)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self._text = TextStream(tokenizer, prompt_ids, params.stop, min_tokens=params.min_tokens)
        self._has_stop_strings = bool(params.stop)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False
        self.stopped_by_text = False
        self._held_ids: list[int] = []  # tokens whose text is not out yet (an incomplete character)
        self._wants_logprobs = params.logprobs is not None
        self._held_logprobs: list[TokenLogprobs] = []  # theirs

    def process(self, deltas: Iterable[TokenDelta]) -> Optional[RequestOutput]:
        """All of `deltas` (in order) as one output; None if they add nothing or the request ended."""
        if self.finished:
            return None
        new_ids: list[int] = []  # tokens that make text
        end_ids: list[int] = []  # an EOS or stop id that ended the sequence: no text of its own
        logprobs: list[TokenLogprobs] = []  # of new_ids + end_ids, if asked for
        finish_reason = error = phases = None
        for delta in deltas:
            self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
            ends_with_stop_id = delta.finish_reason == "stop" and delta.token_ids and delta.ends_with_stop_id
            new_ids += delta.token_ids[:-1] if ends_with_stop_id else delta.token_ids
            end_ids = delta.token_ids[-1:] if ends_with_stop_id else []
            logprobs += delta.logprobs or []
            if delta.finish_reason is not None:
                finish_reason, error, phases = delta.finish_reason, delta.error, delta.phases
                break
        text = []
        if self._has_stop_strings:  # token by token: the output ends with the token completing a stop
            for i, token in enumerate(new_ids):
                text.append(self._text.push(token))
                if self._text.stopped:
                    new_ids, end_ids, finish_reason, error, phases = new_ids[:i + 1], [], "stop", None, None
                    logprobs = logprobs[:i + 1]
                    self.stopped_by_text = True
                    break
        else:  # one decode for all of them
            text.append(self._text.push_many(new_ids))
        if finish_reason in ("stop", "length"):
            text.append(self._text.finish())  # what was held back (nothing once a stop string was found)
        token_ids = self._held_ids + new_ids + end_ids
        logprobs = self._held_logprobs + logprobs
        text = "".join(text)
        if not text and finish_reason is None:
            self._held_ids, self._held_logprobs = token_ids, logprobs
            return None
        self._held_ids, self._held_logprobs = [], []
        self.num_output_tokens += len(token_ids)
        self.finished = finish_reason is not None
        return RequestOutput(text, token_ids, self.num_prompt_tokens, self.num_output_tokens,
                             finish_reason, error, self.num_cached_tokens,
                             logprobs if self._wants_logprobs else None, phases)
