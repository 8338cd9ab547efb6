"""What the model sends back for one request: its outputs -> the values of each response.

Plain data, no Triton: the Triton model (model_repository/gemma/1/model.py) turns each `Response` into
tensors and sends it, so these rules are unit-tested without a server. They are the vLLM backend's:
- streamed, one response per output of a choice, each value covering the tokens since the previous
  response (text, logprobs, num_output_tokens), the last one final; not streamed, one response at the
  end with each choice's whole text, after the prompt when the request echoes it;
- per-choice outputs hold one element per choice (n); `finish_reason` is "None" until a choice ends;
- only the outputs the request asked for (GenerateRequest.outputs), `text_output` always.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from backend.outputs import RequestOutput
from backend.sampling import TokenLogprobs

from .logprobs import LOWEST_LOGPROB
from .requests import GenerateRequest

LogprobsText = Callable[[Sequence[TokenLogprobs]], str]


@dataclass(frozen=True)
class Response:
    values: dict[str, list]  # output name -> one value per choice (output_log_probs: a list per choice)
    final: bool


@dataclass
class _Choice:
    finish_reason: Optional[str] = None
    cumulative_logprob: float = 0.0
    # Not streamed: everything so far, sent at the end.
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class ResponseBuilder:
    """One request's responses. Feed it each choice's RequestOutputs in order (`add`); outputs that
    end a choice with "cancelled" or "error" are the caller's (they end the request with an error)."""

    def __init__(self, request: GenerateRequest, logprobs_text: LogprobsText):
        self._request, self._logprobs_text = request, logprobs_text
        self._choices = [_Choice() for _ in range(request.n)]
        self._num_prompt_tokens = 0  # every output says it
        self._num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self._choices)

    def add(self, choice: int, out: RequestOutput) -> Optional[Response]:
        """The response this output makes now, if any."""
        state = self._choices[choice]
        state.finish_reason = out.finish_reason
        self._num_prompt_tokens = out.num_prompt_tokens
        state.cumulative_logprob += sum(lp.logprob for lp in out.logprobs or ())
        self._num_cached_tokens = max(self._num_cached_tokens, out.num_cached_tokens)
        if self._request.stream:
            if not (out.token_ids or out.text) and not self.finished:
                return None
            news = [(out.text, out.token_ids, out.logprobs or []) if i == choice else ("", [], [])
                    for i in range(self._request.n)]
            return self._response(news)
        state.text.append(out.text)
        state.token_ids += out.token_ids
        state.logprobs += out.logprobs or []
        if not self.finished:
            return None
        echo = self._request.prompt if self._request.echo_prompt else ""
        return self._response([(echo + "".join(c.text), c.token_ids, c.logprobs) for c in self._choices])

    def _response(self, news: list[tuple[str, list[int], list[TokenLogprobs]]]) -> Response:
        asked = self._request.outputs
        values: dict[str, list] = {"text_output": [text for text, _, _ in news]}
        if "finish_reason" in asked:
            values["finish_reason"] = [str(c.finish_reason) for c in self._choices]
        for name in ("cumulative_logprob", "cum_log_probs"):
            if name in asked:
                values[name] = [c.cumulative_logprob for c in self._choices]
        if "logprobs" in asked:
            values["logprobs"] = ["null" if self._request.logprobs is None else self._logprobs_text(logprobs)
                                  for _, _, logprobs in news]
        if "num_input_tokens" in asked:
            values["num_input_tokens"] = [self._num_prompt_tokens]
        if "num_output_tokens" in asked:
            values["num_output_tokens"] = [len(ids) for _, ids, _ in news]
        if "output_log_probs" in asked:  # single-choice requests only (serving/requests.py)
            values["output_log_probs"] = [[_finite(lp.logprob) for lp in news[0][2]]]
        if "output_ids" in asked:
            values["output_ids"] = list(news[0][1])
        if "num_cached_tokens" in asked:
            values["num_cached_tokens"] = [self._num_cached_tokens]
        return Response(values, self.finished)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST_LOGPROB
