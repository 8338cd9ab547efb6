"""What a request produces, on the consumer's side of the engine.

The engine thread only appends token ids (`TokenDelta`). Turning them into text - incremental
detokenizing and stop strings - is the consumer's work (`OutputProcessor`, run by whoever reads a
`RequestHandle`: the Triton responder thread, an iterator), so it never delays a model step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .sampling import SamplingParams, TokenLogprobs
from .tokenizer import TextStream, Tokenizer


@dataclass(frozen=True)
class TokenDelta:
    """Tokens a sequence generated since its previous delta, as the engine thread reports them."""
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop": the last token is an EOS or stop id
    error: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    logprobs: Optional[list[TokenLogprobs]] = None  # one per token id, if the request asked for them


@dataclass(frozen=True)
class RequestOutput:
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: Optional[str] = None  # None while running: "stop", "length", "cancelled", "error"
    error: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # One per token id (the EOS / stop id too), if the request asked for logprobs; else None.
    logprobs: Optional[list[TokenLogprobs]] = None

    def followed_by(self, later: "RequestOutput") -> "RequestOutput":
        """This output and the request's next one as a single output (for a consumer that fell
        behind and delivers what has accumulated at once)."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return RequestOutput(self.text + later.text, self.token_ids + later.token_ids, later.num_prompt_tokens,
                             later.num_output_tokens, later.finish_reason, later.error, later.num_cached_tokens,
                             logprobs)


class OutputProcessor:
    """One request's token deltas -> RequestOutputs with text; finds stop strings.

    `stopped_by_text` turns True when a stop string appeared: the output then ends there with
    finish_reason "stop", and the caller must stop the sequence in the engine (tokens it generated
    meanwhile are dropped)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self._text = TextStream(tokenizer, prompt_ids, params.stop, min_tokens=params.min_tokens)
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
        token_ids, self._held_ids = self._held_ids, []
        logprobs, self._held_logprobs = self._held_logprobs, []
        text: list[str] = []
        finish_reason = error = None
        for delta in deltas:
            self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
            # An EOS / stop id ends the sequence without text of its own.
            decoded = delta.token_ids[:-1] if delta.finish_reason == "stop" else delta.token_ids
            taken = 0  # of this delta's tokens, those the output keeps
            for token in decoded:
                token_ids.append(token)
                taken += 1
                text.append(self._text.push(token))
                if self._text.stopped:
                    finish_reason = "stop"
                    self.stopped_by_text = True
                    break
            if finish_reason is None:
                token_ids += delta.token_ids[len(decoded):]
                taken = len(delta.token_ids)
            logprobs += (delta.logprobs or [])[:taken]
            if finish_reason is not None:
                break
            if delta.finish_reason is not None:
                finish_reason, error = delta.finish_reason, delta.error
                if finish_reason in ("stop", "length"):
                    text.append(self._text.finish())
                break
        text = "".join(text)
        if not text and finish_reason is None:
            self._held_ids, self._held_logprobs = token_ids, logprobs
            return None
        self.num_output_tokens += len(token_ids)
        self.finished = finish_reason is not None
        return RequestOutput(text, token_ids, self.num_prompt_tokens, self.num_output_tokens,
                             finish_reason, error, self.num_cached_tokens,
                             logprobs if self._wants_logprobs else None)
